"""A DPO step against an SFT step on the same rows: seconds a step, real tokens a second, peak memory.

    python scripts/benchmark_preference.py                 # the demo model, the shipped pairs
    python scripts/benchmark_preference.py --preset tiny   # a smoke run

Each objective runs in its own process (so peak RSS is its own) on the shipped preference pairs
with demo_dpo.toml's batch shape (2 rows x 384): `sft` trains on the pairs' chosen responses as
examples, `dpo` on the pairs themselves (both sequences, the reference computed first and not
timed). Both use the fast engine and the same batch shape, so a step holds the same number of
positions; the timed steps follow two warm-up steps (compilation).
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def prepared_stepper(config):
    """A set-up run's engine stepper and its epoch-0 batches, as `loop.run` gets them (nothing trained yet)."""
    from gemma_lora.training.run import Run

    run = Run(config, echo=lambda *a: None)
    with run.session():
        run.setup()
    stepper = run.engine.stepper(run.causal_lm, run.plan, run.precision, run.objective)
    return run, stepper, stepper.epoch_batches(0)


def timed_step(stepper, batches, index):
    """One step on batch `index`, its loss scaled as `loop.run` scales it without accumulation; its seconds."""
    from gemma_lora.training.loop import window_weight

    start = time.perf_counter()
    stepper.step(batches[index], 1.0 / max(window_weight(stepper, index, 1), 1.0))
    return time.perf_counter() - start


def measure(objective, preset, steps):
    """Run in a child process: time `steps` training steps of `objective`; print one JSON line."""
    import gemma_lora
    from gemma_lora.config import resolve_config

    gemma_lora.configure_runtime()
    config = resolve_config(overrides=dict(
        preset=preset, data="dolly-preference", objective=objective, engine="fast", batch_size=2,
        sequence_length=384, learning_rate=5e-5, max_steps=steps + 2, answer_splits=[], prompts=[],
        checkpoint_every=None, validation_rows=0, test_rows=4, limit=300,
        output_dir=str(Path(tempfile.mkdtemp()) / "run")))
    _, stepper, batches = prepared_stepper(config)
    timed = [timed_step(stepper, batches, index) for index in range(steps + 2)][2:]
    tokens = sum(int((batches[i]["segment_ids"] > 0).sum()) for i in range(2, steps + 2))
    print(json.dumps({"objective": objective, "seconds_per_step": sum(timed) / len(timed),
                      "real_tokens_per_second": tokens / sum(timed),
                      "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "steps": steps}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return measure(args.child, args.preset, args.steps)
    results = {}
    for objective in ("sft", "dpo"):
        out = subprocess.run([sys.executable, __file__, "--child", objective, "--preset", args.preset,
                              "--steps", str(args.steps)], capture_output=True, text=True, check=True).stdout
        results[objective] = json.loads(out.strip().splitlines()[-1])
    sft, dpo = results["sft"], results["dpo"]
    for r in (sft, dpo):
        print(f"{r['objective']}: {r['seconds_per_step']:.2f} s a step, {r['real_tokens_per_second']:,.0f} real tokens/s, "
              f"peak RSS {r['peak_rss_gib']:.2f} GiB")
    print(f"dpo / sft: step time {dpo['seconds_per_step'] / sft['seconds_per_step']:.2f}x, "
          f"peak RSS {dpo['peak_rss_gib'] / sft['peak_rss_gib']:.2f}x")


if __name__ == "__main__":
    main()
