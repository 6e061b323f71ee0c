"""Build the shipped preference pairs for the DPO demo from a fine-tuned demo run.

    gemma-lora train --config configs/demo.toml --output-dir /work/exp/pref/sft
    python scripts/build_preference_demo.py --run /work/exp/pref/sft

Reads the run's config.json and adapter, loads the demo base with that adapter
as `gemma-lora generate --adapter` does (its precision choice, the template
and stop strings the adapter records), reads the run's data as the run did
(the shipped Dolly sample, rows without context, the first limit + test_rows =
1,068 in order; checked against the run's data.json fingerprint) and answers
every row greedily with the package's decoder (`sampling.generate`, the run's
max_new_tokens and stop strings).

Writes `gemma_lora/resources/dolly-preference.jsonl.gz`, one record per row in
order: {"prompt", "chosen" (Dolly's response), "rejected" (the model's answer),
"rejected_ended" (the model ended it with <eos>), "rejected_looped"}. Rows
whose answer is empty or equals the reference (white space stripped) are left
out and counted: the package's preference reader refuses both as records that
teach nothing. The Example keeps no Dolly category, so records have none.
"""

import argparse
import dataclasses
import gzip
import json
import time
from pathlib import Path

from gemma_lora import data
from gemma_lora.config import load_config_file, resolve_config
from gemma_lora.io import atomic_path

TARGET = Path(__file__).resolve().parent.parent / "gemma_lora" / "resources" / "dolly-preference.jsonl.gz"
SPLITS = ("train", "validation", "test")


def run_config(run):
    """The run's config, with its chat setting as the adapter records it (what `generate --adapter` uses)."""
    config = resolve_config(load_config_file(run / "config.json"))
    meta = json.loads((run / "adapter.json").read_text())
    # config.json keeps chat as given (null = auto); adapter.json records what the run resolved it to.
    config = dataclasses.replace(config, chat=meta["chat_format"] is not None, sampler="greedy")
    assert config.template == meta["template"] and config.resolved_stop_strings() == meta["stop_strings"], meta
    return config


def load_model(run, config):
    """The demo base plus the run's adapter, loaded as cli.run_generate loads them."""
    from gemma_lora import runtime

    runtime.configure_runtime(config.memory_fraction, config.seed, config.compilation_cache)
    from gemma_lora.adapters.store import load_adapter
    from gemma_lora.model import loading, presets

    preset_dir = presets.resolve_preset(config.preset, config.preset_version)
    # generate's choice (no cpu_bf16): float32 on a CPU, mixed_bfloat16 on an accelerator.
    precision = config.resolved_precision(loading.platform())
    print(f"loading {config.preset} ({precision}) with {run / 'adapter.lora.h5'}")
    causal_lm = loading.load_causal_lm(preset_dir, precision, quantize=config.quantize, frozen_base=True)
    load_adapter(causal_lm, str(run / "adapter.lora.h5"), preset=config.preset)
    return causal_lm


def run_examples(run, config):
    """The run's rows in the run's order; the fingerprint proves they are the ones it split."""
    examples = data.load_examples(config)
    recorded = json.loads((run / "data.json").read_text())
    assert len(examples) == config.limit + config.test_rows, len(examples)
    assert data.fingerprint(examples) == recorded["fingerprint"], "the data differs from the run's"
    return examples, {name: recorded["splits"][name]["rows"] for name in SPLITS}


def shares(samples):
    n = len(samples)
    return (f"{n} rows: ended {sum(s.ended_by_model for s in samples) / n:.1%}, "
            f"looped {sum(s.looped for s in samples) / n:.1%}, "
            f"mean new tokens {sum(s.new_tokens for s in samples) / n:.1f}")


def write_jsonl_gz(records, path):
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    # A temporary name then a rename: an interrupted build leaves no half file in resources/.
    with atomic_path(path, suffix=".jsonl.gz") as tmp:
        # mtime 0 and no name: the same answers give the same bytes.
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
            f.write(lines.encode("utf-8"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="The SFT run directory (config.json, adapter).")
    parser.add_argument("--output", type=Path, default=TARGET)
    args = parser.parse_args()
    start = time.time()
    config = run_config(args.run)
    examples, ranges = run_examples(args.run, config)
    causal_lm = load_model(args.run, config)
    from gemma_lora.sampling import generate

    samples = generate(causal_lm, examples, config, label=f"answering {len(examples)} rows")
    records, kept, same, empty = [], [], 0, 0
    for example, sample in zip(examples, samples):
        rejected = sample.text.strip()  # as `gemma-lora generate` shows it
        if not rejected:
            empty += 1
            continue
        if rejected == example.response.strip():
            same += 1
            continue
        kept.append(sample)
        records.append({"prompt": example.instruction, "chosen": example.response, "rejected": rejected,
                        "rejected_ended": sample.ended_by_model, "rejected_looped": sample.looped})
    write_jsonl_gz(records, args.output)
    print(f"wrote {args.output} ({args.output.stat().st_size:,} bytes): {len(records)} rows")
    print(f"skipped: {same} answers identical to the reference, {empty} empty")
    print(f"written: {shares(kept)}")
    for name in SPLITS:  # every answer of the split, skipped ones included, as summary.json counts them
        lo, hi = ranges[name]
        print(f"  {name} rows {lo}-{hi - 1}: {shares(samples[lo:hi])}")
    print(f"time: {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
