"""Base model vs LoRA ranks vs full fine-tuning: held-out response loss and time.

    python scripts/quality.py --ranks 4 16 --max-steps 60 --output-dir runs/quality
    python scripts/quality.py --preset tiny --ranks 2 --max-steps 2 --sequence-length 64

Every variant is one run of the package's pipeline (`gemma_lora.sweep`) on the
same data, order, seed and steps: LoRA at each rank, then a full fine-tune.
The base model's row comes from the runs' own before-training scores (the
same model and rows for every variant). Any training flag works; the default
preset is `demo`, the real Gemma 3 270M, and held-out answering is off
(--answer-splits test turns it on; it costs minutes per variant on a CPU).

Writes OUTPUT_DIR/<variant>/ run directories, the sweep's results.* files and
quality.md (the table below) and quality.png (test loss and time per variant).
Rerunning the same command resumes: finished variants are read back.
"""

import argparse
import json
import sys
from pathlib import Path

from gemma_lora.cli import add_field_flags, config_from_args
from gemma_lora.config import FIELDS
from gemma_lora.errors import GemmaLoraError
from gemma_lora.io import atomic_path, write_text_atomic

FLAGS = tuple(name for name in FIELDS if name not in ("lora_rank", "lora_alpha", "full_finetune"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16], help="LoRA ranks to train.")
    parser.add_argument("--no-full", action="store_true", help="Skip the full fine-tune.")
    parser.add_argument("--config", help="TOML, YAML or JSON file of config fields.")
    add_field_flags(parser, FLAGS)
    args = parser.parse_args(argv)
    try:
        base = config_from_args(args, FLAGS, {"preset": "demo", "answer_splits": [], "checkpoint_every": None})
        run(base, args.ranks, full=not args.no_full)
    except GemmaLoraError as e:
        print(f"quality: error: {e}", file=sys.stderr)
        return 2
    return 0


def run(base, ranks, full=True, echo=print):
    from gemma_lora import sweep

    out, variants = sweep.rank_variants(base, ranks, output_dir=base.output_dir or sweep.default_series_dir(base, "quality"))
    if full:
        _, (_, full_variant) = sweep.comparison_variants(base, output_dir=out)
        variants.append(full_variant)
    rows = sweep.run_series(variants, out, "rank" if not full else "comparison", echo)
    table = quality_rows(out, rows)
    text = markdown(table, base)
    write_text_atomic(out / "quality.md", text)
    plot(table, out / "quality.png")
    echo(text)
    return table


def quality_rows(series_dir, rows):
    """The base row (before-training scores) followed by one row per finished variant."""
    done = [r for r in rows if r["status"] == "done"]
    table = []
    if done:
        before = json.loads((Path(series_dir) / done[0]["variant"] / "before.json").read_text())
        base_answers = before.get("answers", {}).get("test", {})
        table.append({
            "variant": "base (no training)", "trainable_parameters": 0, "train_seconds": None,
            "validation_loss": before["token_loss"].get("validation"), "validation_sem": None,
            "test_loss": before["token_loss"].get("test"), "test_sem": None,
            "model_ended_share": base_answers.get("model_ended_share", base_answers.get("eos_share")),
        })
    for r in rows:
        table.append({key: r.get(key) for key in (
            "variant", "status", "reason", "trainable_parameters", "train_seconds",
            "validation_loss", "validation_sem", "test_loss", "test_sem", "model_ended_share")})
    base_test = table[0]["test_loss"] if done else None
    for row in table:
        if base_test and isinstance(row.get("test_loss"), float):
            row["test_change"] = row["test_loss"] / base_test - 1
    return table


def markdown(table, base):
    settings = (
        f"preset {base.preset}, sequence length {base.sequence_length}, batch {base.batch_size}, "
        f"max_steps {base.max_steps}, epochs {base.epochs}, learning rate {base.learning_rate}, "
        f"LoRA targets {', '.join(base.lora_targets)}, seed {base.seed}, precision {base.precision}"
    )
    lines = [
        f"Settings: {settings}. Losses are mean cross-entropy per response token (nats), ± standard error over rows.",
        "",
        "| variant | trainable params | train s | validation loss | test loss | test vs base | test answers the model ended (<eos>, or <end_of_turn> with chat) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table:
        if r.get("status") not in (None, "done"):
            lines.append(f"| {r['variant']} | failed: {r['reason']} | | | | | |")
            continue
        lines.append("| " + " | ".join([
            r["variant"], f"{r['trainable_parameters']:,}", _num(r["train_seconds"], "{:.0f}"),
            _with_sem(r["validation_loss"], r["validation_sem"]), _with_sem(r["test_loss"], r["test_sem"]),
            _num(r.get("test_change"), "{:+.1%}"), _num(r["model_ended_share"], "{:.0%}"),
        ]) + " |")
    return "\n".join(lines) + "\n"


def plot(table, path):
    import matplotlib

    matplotlib.use("Agg")  # No display on a server or in CI.
    import matplotlib.pyplot as plt

    rows = [r for r in table if isinstance(r.get("test_loss"), float)]
    names = [r["variant"].replace(" (no training)", "") for r in rows]
    fig, (loss_ax, time_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.bar(names, [r["test_loss"] for r in rows], yerr=[r["test_sem"] or 0 for r in rows], capsize=4)
    loss_ax.set(title="Test response loss (lower is better)", ylabel="nats per response token")
    low = min(r["test_loss"] for r in rows)
    loss_ax.set_ylim(bottom=max(0.0, low - 0.5))
    trained = [r for r in rows if r["train_seconds"]]
    time_ax.bar([r["variant"] for r in trained], [r["train_seconds"] for r in trained], color="tab:orange")
    time_ax.set(title="Training time", ylabel="seconds")
    for ax in (loss_ax, time_ax):
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    with atomic_path(path) as staging:
        fig.savefig(staging, format="png", dpi=120)
    plt.close(fig)


def _num(value, pattern):
    return pattern.format(value) if isinstance(value, (int, float)) else "–"


def _with_sem(value, sem):
    if not isinstance(value, float):
        return "–"
    return f"{value:.4f}" + (f" ± {sem:.4f}" if isinstance(sem, float) else "")


if __name__ == "__main__":
    sys.exit(main())
