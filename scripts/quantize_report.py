"""Compare LoRA on a float, int8 and int4 base: base-weight memory, peak memory, speed, loss.

    python scripts/quantize_report.py                    # tiny preset, 20 steps per mode
    python scripts/quantize_report.py --preset demo --steps 10 --sequence-length 128

Each mode runs in its own subprocess, so the peak resident memory
(getrusage's max RSS, which on CPU includes JAX's buffers) belongs to that mode
alone. Every mode trains the same rows in the same order from the same seed.
Tokens/s counts real (non-padding) tokens and includes compilation.
"""

import argparse
import json
import resource
import subprocess
import sys
import time

MODES = ("none", "int8", "int4")


def measure(preset, mode, steps, sequence_length, batch_size):
    """Train `steps` steps on `preset` with the base quantized as `mode`; return the figures."""
    from gemma_lora import runtime

    runtime.configure_runtime(seed=0)
    from gemma_lora import data
    from gemma_lora.config import resolve_config
    from gemma_lora.model import loading, presets
    from gemma_lora.model.quantize import base_weight_bytes, quantize_base
    from gemma_lora.training import engines, scoring

    config = resolve_config(overrides=dict(
        preset=preset, sequence_length=sequence_length, batch_size=batch_size, max_steps=steps,
        limit=max(steps * batch_size, 8) + 8, validation_rows=8, learning_rate=1e-3,
        quantize=None if mode == "none" else mode,
    ))
    causal_lm = loading.load_causal_lm(presets.resolve_preset(preset), "float32", sequence_length)
    if config.quantize:
        quantize_base(causal_lm, config.quantize)
    loading.enable_lora(causal_lm, config.lora_rank, targets=config.lora_targets, seed=0)
    splits = data.split(data.load_examples(config), config)
    rows = data.tokenize_rows(splits.train, causal_lm.preprocessor.tokenizer, config)
    engines.compile_for_training(causal_lm, config)
    start = time.perf_counter()
    engines.fit(causal_lm, rows, config, verbose=0)
    seconds = time.perf_counter() - start
    seen = min(steps * batch_size, len(rows))
    return {
        "mode": mode,
        "base_weight_mib": base_weight_bytes(causal_lm) / 2**20,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "tokens_per_s": seen * rows.real_tokens / len(rows) / seconds,
        "train_token_loss": scoring.token_loss(causal_lm, rows)["token_loss"],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="tiny", help="Preset to measure (default: tiny).")
    parser.add_argument("--steps", type=int, default=20, help="Training steps per mode.")
    parser.add_argument("--sequence-length", type=int, default=128, help="Tokens per row.")
    parser.add_argument("--batch-size", type=int, default=4, help="Rows per step.")
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES, help="Modes to run.")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one mode, print JSON
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.preset, args.one, args.steps, args.sequence_length, args.batch_size)))
        return
    results = []
    for mode in args.modes:
        command = [sys.executable, __file__, "--one", mode, "--preset", args.preset, "--steps", str(args.steps),
                   "--sequence-length", str(args.sequence_length), "--batch-size", str(args.batch_size)]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(f"{mode}: done", file=sys.stderr)
    print(f"preset {args.preset}, {args.steps} steps, batch {args.batch_size}, sequence length {args.sequence_length}, "
          "LoRA rank 4 on query/value, float32 compute\n")
    print("| base | base weights (MiB) | peak RSS (MiB) | real tokens/s | train token loss after |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['mode']} | {r['base_weight_mib']:.2f} | {r['peak_rss_mib']:,.0f} | "
              f"{r['tokens_per_s']:,.0f} | {r['train_token_loss']:.4f} |")


if __name__ == "__main__":
    main()
