"""Series of pipeline runs that differ in one setting: the LoRA rank sweep, and full fine-tune vs LoRA.

    gemma-lora sweep --ranks 4 8 16 --max-steps 20 --output-dir runs/sweep      # demo preset by default
    gemma-lora compare --lora-rank 8 --max-steps 20 --output-dir runs/full-vs-lora

Each variant is one `run_training(config)` into its own run directory under the
series directory (rank-4/, rank-8/, ... or lora-r8/, full/), so each keeps its
config, metrics, samples, adapter (or model) and summary.json. Every variant
gets the same data, order and seed; only the rank (and alpha) or the training
method differ. The series directory gets results.csv, results.json,
results.md, plot.png and samples.md (the answers side by side).

Resumable: a variant whose directory has summary.json is finished and is read
back, not rerun. A half-finished one continues from its newest checkpoint
when it has one, and starts over otherwise. A variant that fails (out of
memory, NaN loss) is recorded with its reason, and the series goes on; the
next run of the same command tries it again.

Peak memory is JAX's `memory_stats()["peak_bytes_in_use"]` where the backend
reports it (GPU, TPU), else the process's maximum resident set size (CPU,
labelled "max RSS"). Both are peaks of the whole process so far and cannot be
reset, so variants run from small to large (ranks ascending, LoRA before the
full fine-tune): each figure is the variant's own peak unless an earlier
variant's was higher.
"""

import csv
import dataclasses
import gc
import io
import json
import math
import resource
import shutil
import sys
import time
from pathlib import Path

from gemma_lora.config import TrainConfig, resolve_config
from gemma_lora.errors import ConfigError, TrainingError
from gemma_lora.io import atomic_path, prepare_output_dir, read_json, write_text_atomic

DEFAULT_RANKS = (4, 8, 16)
# Small models a CPU can fully fine-tune (a 2B model's weights, gradients and
# AdamW moments would need about 40 GB).
CPU_FULL_FINETUNE_PRESETS = ("tiny", "tiny_gemma2", "demo", "gemma3_270m_gguf")
FAILED_FILE = "failed.json"
# What to do about a damaged file of a finished variant.
RERUN = "Delete that variant's directory and run the same command again to redo it."
MEASURED_FILE = "measured.json"
# The results table: column name -> what it holds (results.md's legend).
COLUMNS = {
    "variant": "run directory name",
    "status": "done, or failed (reason in the last column)",
    "rank": "LoRA rank (full: every weight trained)",
    "alpha": "LoRA alpha; the update is scaled by alpha/rank",
    "trainable_parameters": "trainable parameters",
    "saved_mb": "adapter.lora.h5 size (full fine-tune: the saved model's size), MB",
    "train_seconds": "training wall time, compilation and per-epoch validation included",
    "tokens_per_second": "real (non-padding) training tokens per second",
    "peak_memory_mb": "peak memory of the process so far, MB (see memory_kind)",
    "memory_kind": "device peak (JAX memory_stats) or max RSS (CPU)",
    "final_train_loss": "training token loss, mean over the last epoch's steps",
    "validation_loss": "validation response-token loss after training",
    "validation_sem": "its standard error over rows",
    "test_loss": "test response-token loss after training",
    "test_sem": "its standard error over rows",
    "model_ended_share": "share of greedy test answers the model ended with its stop token (<eos>, or <end_of_turn> "
                         "with the chat format) within max_new_tokens (n/a with answer_splits empty)",
    "samples_ended": "after-training samples the model ended with its stop token",
    "reason": "why a variant failed",
}


@dataclasses.dataclass
class Variant:
    name: str  # its run directory under the series directory
    config: object  # the TrainConfig it runs with
    label: str  # how plots and tables name it


def rank_variants(base, ranks=DEFAULT_RANKS, alpha=None, alpha_per_rank=None, output_dir=None):
    """One variant per rank, all else as `base` (a TrainConfig).

    Args:
        ranks: positive ints, run in ascending order.
        alpha: float or None; hold alpha fixed at this value for every rank.
        alpha_per_rank: float or None; hold alpha/rank fixed (alpha = this × rank).
            Neither: `base.lora_alpha` as is (None: alpha = rank, so alpha/rank = 1).
        output_dir: the series directory (default `base.output_dir`).

    Raises:
        ConfigError: an empty, repeated or non-positive rank, a non-positive
            alpha, or both alpha and alpha_per_rank given.
    """
    problems = []
    ranks = list(ranks)
    if not ranks:
        problems.append("ranks is empty: give at least one, e.g. 4 8 16.")
    bad = [r for r in ranks if not isinstance(r, int) or isinstance(r, bool) or r <= 0]
    if bad:
        problems.append(f"ranks {bad} must be positive integers (e.g. 4 8 16).")
    if len(set(ranks)) != len(ranks):
        problems.append(f"ranks {ranks} repeat a rank; give each once.")
    if alpha is not None and alpha_per_rank is not None:
        problems.append("give alpha (held fixed) or alpha_per_rank (alpha/rank held fixed), not both.")
    for name, value in (("alpha", alpha), ("alpha_per_rank", alpha_per_rank)):
        if value is not None and not (math.isfinite(value) and value > 0):
            problems.append(f"{name}={value} must be > 0.")
    if problems:
        raise ConfigError("Invalid sweep: " + " ".join(problems))
    out = Path(output_dir or base.output_dir or default_series_dir(base, "sweep"))
    variants = []
    for rank in sorted(ranks):
        if alpha is not None:
            rank_alpha = float(alpha)
        elif alpha_per_rank is not None:
            rank_alpha = float(alpha_per_rank) * rank
        else:
            rank_alpha = base.lora_alpha
        config = _derive(base, lora_rank=rank, lora_alpha=rank_alpha, full_finetune=False,
                         output_dir=str(out / f"rank-{rank}"))
        variants.append(Variant(f"rank-{rank}", config, f"rank {rank}"))
    return out, variants


def comparison_variants(base, output_dir=None, platform=None):
    """LoRA at `base.lora_rank`, then a full fine-tune; same data, order, seed and steps.

    Args:
        platform: "cpu", "gpu" or "tpu" (default: JAX's backend).

    Raises:
        ConfigError: a full fine-tune of a large preset on a CPU.
    """
    platform = platform or _platform(base)
    if platform == "cpu" and base.preset in _named_presets() and base.preset not in CPU_FULL_FINETUNE_PRESETS:
        raise ConfigError(
            f"Full fine-tuning of preset={base.preset!r} on a CPU needs far more memory and time than a CPU "
            f"has (weights, gradients and two AdamW moments in float32). Use --preset demo (or tiny) on a "
            "CPU, or run on a GPU."
        )
    out = Path(output_dir or base.output_dir or default_series_dir(base, "full-vs-lora"))
    rank = base.lora_rank
    return out, [
        Variant(f"lora-r{rank}", _derive(base, full_finetune=False, output_dir=str(out / f"lora-r{rank}")), f"LoRA r{rank}"),
        Variant("full", _derive(base, full_finetune=True, output_dir=str(out / "full")), "full fine-tune"),
    ]


def rank_sweep(base, ranks=DEFAULT_RANKS, alpha=None, alpha_per_rank=None, output_dir=None, echo=print):
    """Run (or resume) a rank sweep; write the table, plot and samples; return the rows.

    See `rank_variants` for the arguments and `run_series` for what is written.
    """
    out, variants = rank_variants(base, ranks, alpha, alpha_per_rank, output_dir)
    return run_series(variants, out, "rank", echo)


def compare_full_vs_lora(base, output_dir=None, echo=print):
    """Run (or resume) LoRA at `base.lora_rank` against a full fine-tune; return the rows."""
    out, variants = comparison_variants(base, output_dir)
    return run_series(variants, out, "comparison", echo)


def run_series(variants, series_dir, kind, echo=print):
    """Run each variant not yet finished, then write the results from the run directories.

    Args:
        variants: list of `Variant`, run in order.
        series_dir: directory for the variants' run directories and the results.
        kind: "rank" (line plot over rank) or "comparison" (bar plot).
        echo: where progress lines go.

    Returns:
        A list of row dicts, one per variant (see `COLUMNS`).

    Raises:
        ConfigError: a finished variant in `series_dir` ran with other settings.
        OutputError: `series_dir` holds other files, or cannot be written.
    """
    from gemma_lora.training.run import run_training

    _require_matplotlib()
    series_dir = Path(series_dir)
    # Every variant starts from the same base model, so its held-out answers
    # before training are the same: the first variant measures them, the rest
    # skip minutes of generation.
    variants = variants[:1] + [
        dataclasses.replace(v, config=_derive(v.config, answer_before=False)) for v in variants[1:]
    ]
    _check_series_dir(series_dir, variants)
    echo(f"series directory: {series_dir} (run the same command again to resume)")
    for number, variant in enumerate(variants, 1):
        run_dir = series_dir / variant.name
        heading = f"== {variant.label} ({number}/{len(variants)})"
        if _finished(run_dir):
            echo(f"{heading}: finished earlier, read from {run_dir}")
            continue
        resume = _resumable(run_dir, variant.config)
        if run_dir.exists() and not resume:
            shutil.rmtree(run_dir)  # Failed or cut short before its first checkpoint: start over.
        echo(f"{heading}{': resuming' if resume else ''}")
        try:
            run_training(variant.config, echo=echo, resume=resume)
        except Exception as e:  # Out of memory, NaN loss, ...: record it and go on.
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:500]
            echo(f"{variant.label} failed: {reason}")
            run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(run_dir / FAILED_FILE, json.dumps({"reason": reason}) + "\n")
        else:
            write_text_atomic(run_dir / MEASURED_FILE, json.dumps(peak_memory()) + "\n")
        free_memory()
    rows = [read_row(series_dir / v.name, v) for v in variants]
    write_results(rows, series_dir, kind)
    echo(f"results: {series_dir / 'results.md'}, {series_dir / 'plot.png'}, {series_dir / 'samples.md'}")
    echo(markdown_table(rows))
    return rows


def peak_memory():
    """{"peak_memory_mb", "memory_kind"}: the device's peak where JAX reports it, else max RSS."""
    import jax

    stats = None
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # Backends without memory statistics raise or return None.
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        return {"peak_memory_mb": round(stats["peak_bytes_in_use"] / 2**20, 1),
                "memory_kind": f"device peak ({jax.devices()[0].platform})"}
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_bytes = rss if sys.platform == "darwin" else rss * 1024
    return {"peak_memory_mb": round(rss_bytes / 2**20, 1), "memory_kind": "max RSS (CPU, whole process)"}


def free_memory():
    """Drop the finished variant's model before the next one loads a fresh copy of the base.

    `enable_lora` runs once per layer, so each rank needs its own base model;
    this keeps memory from growing with the number of ranks.
    """
    if "keras" in sys.modules:
        sys.modules["keras"].backend.clear_session()
    gc.collect()


def read_row(run_dir, variant):
    """A results row for one variant, read from its run directory."""
    config = variant.config
    row = dict.fromkeys(COLUMNS, None)
    row.update(
        variant=variant.name,
        rank="full" if config.full_finetune else config.lora_rank,
        alpha=None if config.full_finetune else (config.lora_alpha if config.lora_alpha is not None else config.lora_rank),
        model_ended_share="n/a",
    )
    run_dir = Path(run_dir)
    if not _finished(run_dir):
        failed = run_dir / FAILED_FILE
        reason = read_json(failed, TrainingError).get("reason", "unknown") if failed.is_file() else "not run"
        row.update(status="failed", reason=reason)
        return row
    summary = read_json(run_dir / "summary.json", TrainingError, RERUN)
    after = summary.get("token_loss_after", {})
    sem = summary.get("token_loss_after_sem", {})
    row.update(
        status="done",
        trainable_parameters=summary["parameters"]["trainable_parameters"],
        saved_mb=round(_saved_bytes(run_dir) / 2**20, 3),
        train_seconds=summary["train"].get("seconds"),
        tokens_per_second=summary["train"].get("real_tokens_per_second"),
        final_train_loss=_final_train_loss(run_dir / "metrics.csv"),
        validation_loss=after.get("validation"),
        validation_sem=sem.get("validation"),
        test_loss=after.get("test"),
        test_sem=sem.get("test"),
        model_ended_share=_model_ended_share(summary),
        samples_ended=_samples_ended(run_dir / "samples.json"),
    )
    measured = run_dir / MEASURED_FILE
    if measured.is_file():
        row.update(read_json(measured, TrainingError, RERUN))
    return row


def write_results(rows, series_dir, kind):
    """results.csv, results.json, results.md, plot.png and samples.md, each written atomically."""
    series_dir = Path(series_dir)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS))
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(series_dir / "results.csv", buffer.getvalue())
    write_text_atomic(series_dir / "results.json", json.dumps(rows, indent=2) + "\n")
    legend = "\n".join(f"- **{name}**: {meaning}" for name, meaning in COLUMNS.items())
    write_text_atomic(series_dir / "results.md", markdown_table(rows) + "\n\n" + legend + "\n")
    plot = plot_ranks if kind == "rank" else plot_comparison
    plot(rows, series_dir / "plot.png")
    write_text_atomic(series_dir / "samples.md", samples_side_by_side(rows, series_dir))


def load_results(series_dir):
    """The rows of a finished series, from its results.json.

    Raises:
        OutputError: there is no results.json in `series_dir`.
    """
    from gemma_lora.errors import OutputError

    path = Path(series_dir) / "results.json"
    if not path.is_file():
        raise OutputError(f"No results.json in {series_dir}: run the sweep into it first.")
    return read_json(path, OutputError, "Run the sweep into that directory again to rewrite it.")


def markdown_table(rows):
    """The main columns as a Markdown table (every column is in results.csv)."""
    header = ["variant", "status", "trainable params", "saved MB", "train s", "tokens/s",
              "peak MB", "final train loss", "validation loss", "test loss", "answers ended", "samples ended"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [
            r["variant"], r["status"] if r["status"] == "done" else f"failed: {r['reason']}",
            _fmt(r["trainable_parameters"], "{:,}"), _fmt(r["saved_mb"], "{:.2f}"),
            _fmt(r["train_seconds"], "{:.1f}"), _fmt(r["tokens_per_second"], "{:,.0f}"),
            _fmt(r["peak_memory_mb"], "{:,.0f}") + (" (RSS)" if "RSS" in str(r["memory_kind"]) else ""),
            _fmt(r["final_train_loss"], "{:.4f}"),
            _with_error(r["validation_loss"], r["validation_sem"]),
            _with_error(r["test_loss"], r["test_sem"]),
            _fmt(r["model_ended_share"], "{:.0%}"), _fmt(r["samples_ended"], "{}"),
        ]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def plot_ranks(rows, path):
    """Validation loss (± standard error) and train time against rank, one PNG."""
    import matplotlib

    matplotlib.use("Agg")  # No display on a server or in CI.
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["status"] == "done"]
    ranks = [r["rank"] for r in done]
    fig, (loss_ax, time_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.errorbar(ranks, [r["validation_loss"] for r in done],
                     yerr=[r["validation_sem"] or 0 for r in done], marker="o", capsize=4)
    loss_ax.set(title="Validation loss after training", xlabel="LoRA rank", ylabel="response-token loss")
    time_ax.plot(ranks, [r["train_seconds"] for r in done], marker="o", color="tab:orange")
    time_ax.set(title="Training time", xlabel="LoRA rank", ylabel="seconds")
    for ax in (loss_ax, time_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.grid(alpha=0.3)
    failed = [str(r["rank"]) for r in rows if r["status"] != "done"]
    if failed:
        fig.suptitle(f"failed ranks (not plotted): {', '.join(failed)}", fontsize=9)
    _save_figure(fig, path)


def plot_comparison(rows, path):
    """Bars of trainable parameters, train time, peak memory and validation loss per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["status"] == "done"]
    names = [r["variant"] for r in done]
    panels = [
        ("trainable parameters", [r["trainable_parameters"] for r in done], None, True),
        ("train time, s", [r["train_seconds"] for r in done], None, False),
        (f"peak memory, MB ({done[0]['memory_kind'] if done else ''})", [r["peak_memory_mb"] or 0 for r in done], None, False),
        ("validation loss", [r["validation_loss"] for r in done], [r["validation_sem"] or 0 for r in done], False),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
    for ax, (title, values, errors, log) in zip(axes, panels):
        ax.bar(names, values, yerr=errors, capsize=4, color=["tab:blue", "tab:red"][: len(names)])
        ax.set_title(title, fontsize=9)
        if log:
            ax.set_yscale("log")
    _save_figure(fig, path)


def samples_side_by_side(rows, series_dir):
    """A Markdown table: one row per prompt, the base model's answer, then each variant's."""
    done = [r for r in rows if r["status"] == "done"]
    if not done:
        return "No variant finished; no samples.\n"
    records = {r["variant"]: read_json(Path(series_dir) / r["variant"] / "samples.json", TrainingError, RERUN) for r in done}
    first = records[done[0]["variant"]]
    header = ["instruction", "before (base model)"] + [r["variant"] for r in done]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, sample in enumerate(first):
        cells = [sample["instruction"], _answer(sample["before"])]
        cells += [_answer(records[r["variant"]][i]["after"]) for r in done]
        lines.append("| " + " | ".join(cells) + " |")
    return ("Answers the model ended with its stop token (`<eos>`, or `<end_of_turn>` with the chat format) are "
            "marked ⏹; others stopped at a stop string or the length limit.\n\n" + "\n".join(lines) + "\n")


def default_series_dir(config, what):
    name = Path(config.preset).name.replace("kaggle://", "").replace("/", "_")
    return Path("runs") / f"{what}-{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _derive(base, **changes):
    # Through resolve_config, so each derived config is validated like a user's.
    return resolve_config(overrides={**base.to_dict(), **changes})


def _finished(run_dir):
    return (Path(run_dir) / "summary.json").is_file()


def _resumable(run_dir, config):
    """Whether a half-finished run directory can continue: same config, a checkpoint, before.json."""
    from gemma_lora.run_files import BEFORE_FILE, latest_checkpoint

    saved = run_dir / "config.json"
    return (
        saved.is_file()
        and not (run_dir / FAILED_FILE).is_file()
        and not _changed_settings(read_json(saved, TrainingError, RERUN), config)
        and (run_dir / BEFORE_FILE).is_file()
        and latest_checkpoint(run_dir) is not None
    )


def _check_series_dir(series_dir, variants):
    """Refuse a directory of other files, or finished variants run with other settings."""
    from gemma_lora.errors import OutputError

    if series_dir.exists() and not series_dir.is_dir():
        raise OutputError(f"Output path {series_dir} is a file. Give a directory with --output-dir.")
    if not series_dir.exists():
        prepare_output_dir(series_dir)
        return
    ours = {v.name for v in variants} | {"results.csv", "results.json", "results.md", "plot.png", "samples.md",
                                         "quality.md", "quality.png"}  # the last two: scripts/quality.py
    # Variants of an earlier run with other ranks may stay; anything else means the wrong directory.
    strangers = [p.name for p in series_dir.iterdir()
                 if p.name not in ours and not (p.is_dir() and (p / "config.json").is_file())]
    if strangers:
        raise OutputError(
            f"{series_dir} holds files that are not from a sweep ({', '.join(sorted(strangers)[:5])}). "
            "Give a new --output-dir, or the directory of the sweep to resume."
        )
    for variant in variants:
        saved = series_dir / variant.name / "config.json"
        if not (_finished(saved.parent) and saved.is_file()):
            continue
        changed = _changed_settings(read_json(saved, TrainingError, RERUN), variant.config)
        if changed:
            details = ", ".join(f"{k} {had!r} (now {want!r})" for k, (had, want) in list(changed.items())[:6])
            raise ConfigError(
                f"{saved.parent} finished with other settings: {details}. Resuming would mix them; "
                "give a new --output-dir, or the same settings as before."
            )


def _changed_settings(saved, config):
    """{field: (saved value, wanted value)} for every difference that changes the results.

    Not the output directory, nor answer_before: only the first variant of a
    series answers before training, and which one is first depends on the ranks.
    Nor a field left to the run (chat and stop_strings None: config.json
    records what the run chose), nor one added since the run was saved, at
    its default.
    """
    want = json.loads(json.dumps(config.to_dict()))  # Tuples become lists, as in the saved file.
    defaults = json.loads(json.dumps(TrainConfig().to_dict()))

    def same(k):
        if k in ("chat", "stop_strings") and want.get(k) is None:
            return True
        return saved.get(k, defaults.get(k)) == want.get(k)

    return {
        k: (saved.get(k), want.get(k))
        for k in sorted(set(saved) | set(want))
        if k not in ("output_dir", "answer_before") and not same(k)
    }


def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError(
            "The sweep draws its plot with matplotlib, which is not installed: "
            "pip install \"gemma-lora[sweep]\" (or pip install matplotlib)."
        ) from None


def _platform(config):
    from gemma_lora import runtime

    runtime.configure_runtime(config.memory_fraction, compilation_cache_dir=config.compilation_cache)
    import jax

    return jax.default_backend()


def _named_presets():
    from gemma_lora.model.presets import DEMO_NAMES, TINY_PRESETS, keras_hub

    return set(keras_hub.models.CausalLM.presets) | set(DEMO_NAMES) | set(TINY_PRESETS)


def _saved_bytes(run_dir):
    adapter = run_dir / "adapter.lora.h5"
    if adapter.is_file():
        return adapter.stat().st_size
    from gemma_lora.run_files import MODEL_DIR

    return sum(p.stat().st_size for p in (run_dir / MODEL_DIR).rglob("*") if p.is_file())


def _final_train_loss(metrics_csv):
    if not metrics_csv.is_file():
        return None
    rows = list(csv.DictReader(metrics_csv.read_text().splitlines()))
    value = rows[-1].get("token_loss") if rows else None
    return float(value) if value not in (None, "") else None


def _model_ended_share(summary):
    """The share of held-out greedy answers the model ended with its stop token (test split preferred)."""
    answers = summary.get("answers_after") or {}
    for split in ("test", "validation"):
        if split in answers:
            # Runs written before the chat format recorded it as eos_share.
            return answers[split].get("model_ended_share", answers[split].get("eos_share"))
    return "n/a"  # answer_splits was empty


def _samples_ended(samples_json):
    if not samples_json.is_file():
        return None
    records = read_json(samples_json, TrainingError, RERUN)
    return f"{sum(_ended_by_model(r['after']) for r in records)}/{len(records)}"


def _ended_by_model(sample):
    # Samples written before the chat format have ended_with_eos instead of stop_token.
    return sample.get("stop_token") is not None or bool(sample.get("ended_with_eos"))


def _answer(sample):
    text = sample["text"].strip().replace("|", "\\|").replace("\n", "<br>")
    return (text or "(empty)") + (" ⏹" if _ended_by_model(sample) else "")


def _fmt(value, pattern):
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    return pattern.format(value)


def _with_error(value, sem):
    if value is None:
        return "–"
    return f"{value:.4f} ± {sem:.4f}" if sem is not None else f"{value:.4f}"


def _save_figure(fig, path):
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
