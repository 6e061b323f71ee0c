"""Run the package's training path on a random-weight model of gemma_2b_en's exact shape.

    python scripts/check_gemma_2b_shape.py --steps 30      # on a GPU machine

Nothing here can download gemma_2b_en, so this checks on its shape what
`gemma-lora train` and `gemma-lora train --recipe` do: the parameter summary
(2,506,172,416 base, 1,363,968 trainable at rank 4) and step time, tokens/s
and peak memory of each profile on the shipped Dolly rows. The tokenizer is the
tiny preset's (1,024 pieces, so rows are about twice as long as with Gemma's
256k vocabulary); the weights are random, so losses mean nothing.
"""

import argparse
import time

import gemma_lora

gemma_lora.configure_runtime(seed=0)

import jax  # noqa: E402
import keras  # noqa: E402
import keras_hub  # noqa: E402

from gemma_lora import data  # noqa: E402
from gemma_lora.config import resolve_config  # noqa: E402
from gemma_lora.model import loading, presets
from gemma_lora.training import engines

GEMMA_2B = dict(
    vocabulary_size=256000, num_layers=18, num_query_heads=8, num_key_value_heads=1,
    hidden_dim=2048, intermediate_dim=32768, head_dim=256,
)


class StepTimes(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter())


SMALL = dict(GEMMA_2B, num_layers=2, hidden_dim=64, intermediate_dim=128, head_dim=16, vocabulary_size=1024)


def run(profile, steps, shape):
    recipe = profile == "recipe"
    config = resolve_config(overrides={"preset": "tiny", "max_steps": steps, "limit": 1000}, recipe=recipe)
    precision = config.resolved_precision(loading.platform())
    tiny = loading.load_causal_lm(presets.tiny_preset_dir())
    backbone = keras_hub.models.GemmaBackbone(**shape, dtype=precision)
    causal_lm = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=tiny.preprocessor)
    loading.enable_lora(causal_lm, config.lora_rank, config.lora_alpha, config.lora_targets, seed=0)
    summary = loading.parameter_summary(causal_lm)
    splits = data.split(data.load_examples(config), config)
    rows = data.tokenize_rows(splits.train, causal_lm.preprocessor.tokenizer, config)
    engines.compile_for_training(causal_lm, config)
    times = StepTimes()
    start = time.perf_counter()
    engines.fit(causal_lm, rows, config, callbacks=[times], verbose=0)
    first = times.times[0] - start
    steady = (times.times[-1] - times.times[1]) / (len(times.times) - 2)
    real_per_row = rows.real_tokens / len(rows)
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use", 0) / 2**30
    # Columns: profile | precision | batch | base params | trainable | first step s |
    # step ms | tokens/s (all positions) | real tokens/s | peak GiB
    print(
        f"| {profile} | {precision} | {config.batch_size} | {summary['base_parameters']:,} | "
        f"{summary['trainable_parameters']:,} | {first:.1f} | {steady * 1000:.1f} | "
        f"{config.batch_size * config.sequence_length / steady:,.0f} | "
        f"{config.batch_size * real_per_row / steady:,.0f} | {peak:.1f} |",
        flush=True,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--profile", choices=["recipe", "default"], required=True)
    parser.add_argument("--small", action="store_true", help="A 2-layer model of the same layout (CPU check).")
    args = parser.parse_args()
    run(args.profile, args.steps, SMALL if args.small else GEMMA_2B)


if __name__ == "__main__":
    main()
