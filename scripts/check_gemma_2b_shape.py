"""Run the package's training path on a random-weight model of gemma_2b_en's exact shape.

    python scripts/check_gemma_2b_shape.py --profile default --steps 30       # on a GPU machine
    python scripts/check_gemma_2b_shape.py --profile default --engine fast --batch-size 8 \
        --sequence-length 512 --decode-rows 64 --json-out fast.json        # scripts/accelerator_check.sh
    python scripts/check_gemma_2b_shape.py --profile default --small --engine fast --decode-rows 4   # CPU check

Nothing here can download gemma_2b_en, so this checks on its shape what
`gemma-lora train` and `gemma-lora train --recipe` do: the parameter summary
(2,506,172,416 base, 1,363,968 trainable at rank 4) and step time, tokens/s
and peak memory of each profile on the shipped Dolly rows (the Keras engine, or
the fast engine's packed rows with `--engine fast`), and with `--decode-rows`
the package's decoder's new tokens/s on that model (greedy, no stop token, so
every row runs to `--max-new-tokens`). The tokenizer is the
tiny preset's (1,024 pieces, so rows are about twice as long as with Gemma's
256k vocabulary); the weights are random, so losses mean nothing.
"""

import argparse
import json
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


def run(profile, steps, shape, engine="keras", batch_size=None, sequence_length=None):
    recipe = profile == "recipe"
    overrides = {"preset": "tiny", "max_steps": steps, "limit": 1000, "engine": engine}
    overrides.update({k: v for k, v in (("batch_size", batch_size), ("sequence_length", sequence_length)) if v})
    config = resolve_config(overrides=overrides, recipe=recipe)
    precision = config.resolved_precision(loading.platform(), cpu_bf16=loading.cpu_bf16() is not None)
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
    chosen = engines.choose(causal_lm, config, loading.platform())
    plan = chosen.plan(rows, config)
    engines.fit(causal_lm, rows, config, callbacks=[times], verbose=0, engine=chosen, precision=precision, plan=plan)
    first = times.times[0] - start
    steady = (times.times[-1] - times.times[1]) / (len(times.times) - 2)
    # The fast engine's rows are packed examples; the Keras engine's one example each.
    if config.engine == "fast":
        real_per_row = config.sequence_length * chosen.real_token_fraction(plan)
    else:
        real_per_row = rows.real_tokens / len(rows)
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use", 0) / 2**30
    result = {
        "profile": profile, "engine": config.engine, "precision": precision, "batch": config.batch_size,
        "sequence_length": config.sequence_length, "base_parameters": summary["base_parameters"],
        "trainable_parameters": summary["trainable_parameters"], "steps": steps, "first_step_s": first,
        "step_ms": steady * 1000, "tokens_per_s": config.batch_size * config.sequence_length / steady,
        "real_tokens_per_s": config.batch_size * real_per_row / steady, "peak_gib_training": peak,
    }
    # Columns: profile | engine | precision | batch | base params | trainable | first step s |
    # step ms | tokens/s (all positions) | real tokens/s | peak GiB
    print(
        f"| {profile} | {config.engine} | {precision} | {config.batch_size} | {summary['base_parameters']:,} | "
        f"{summary['trainable_parameters']:,} | {first:.1f} | {steady * 1000:.1f} | "
        f"{result['tokens_per_s']:,.0f} | {result['real_tokens_per_s']:,.0f} | {peak:.1f} |",
        flush=True,
    )
    return causal_lm, result


def decode_speed(causal_lm, rows, max_new_tokens):
    """New tokens/s of the package's decoder on `rows` random 32-token prompts (second call: no compilation)."""
    import numpy as np

    from gemma_lora.fast import decode

    rng = np.random.default_rng(0)
    vocab = causal_lm.backbone.vocabulary_size
    prompts = [[2, *map(int, rng.integers(3, vocab, 31))] for _ in range(rows)]
    times = []
    for _ in range(2):
        start = time.perf_counter()
        out = decode.decode_tokens(causal_lm, prompts, max_new_tokens, [])
        times.append(time.perf_counter() - start)
    new = sum(map(len, out))
    stats = jax.devices()[0].memory_stats() or {}
    result = {"decode_rows": rows, "decode_new_tokens": new, "decode_first_call_s": times[0],
              "decode_second_call_s": times[1], "decode_tokens_per_s": new / times[1],
              "peak_gib_after_decoding": stats.get("peak_bytes_in_use", 0) / 2**30}
    print(f"decoder: {rows} rows, {new:,} new tokens, first call {times[0]:.1f} s, second {times[1]:.1f} s, "
          f"{result['decode_tokens_per_s']:,.0f} new tokens/s", flush=True)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--profile", choices=["recipe", "default"], required=True)
    parser.add_argument("--small", action="store_true", help="A 2-layer model of the same layout (CPU check).")
    parser.add_argument("--engine", choices=["keras", "fast"], default="keras")
    parser.add_argument("--batch-size", type=int, help="Rows a step (default: the config's).")
    parser.add_argument("--sequence-length", type=int, help="Tokens a row (default: the config's).")
    parser.add_argument("--decode-rows", type=int, default=0, help="Also time the decoder on this many prompts.")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--json-out", help="Write the figures to this JSON file.")
    args = parser.parse_args()
    causal_lm, result = run(args.profile, args.steps, SMALL if args.small else GEMMA_2B, args.engine,
                            args.batch_size, args.sequence_length)
    if args.decode_rows:
        result.update(decode_speed(causal_lm, args.decode_rows, args.max_new_tokens))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
