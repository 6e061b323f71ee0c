"""The rank sweep and the full-fine-tune comparison on the tiny preset: outputs, resume, failures, bad input."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, TINY_SWEEP, TINY_SWEEP_RANKS

from gemma_lora import sweep
from gemma_lora.cli import main
from gemma_lora.config import resolve_config
from gemma_lora.errors import ConfigError, TrainingError

FLAGS = ["--preset", "tiny", "--sequence-length", "64", "--limit", "24", "--validation-rows", "4",
         "--test-rows", "4", "--max-new-tokens", "8", "--max-steps", "2"]


def copy_of(tiny_sweep, tmp_path):
    target = tmp_path / "sweep"
    shutil.copytree(tiny_sweep["dir"], target)
    return target


def test_sweep_writes_table_plot_samples_and_one_adapter_per_rank(tiny_sweep):
    directory, rows = tiny_sweep["dir"], tiny_sweep["rows"]
    assert [r["variant"] for r in rows] == ["rank-2", "rank-4"] and {r["status"] for r in rows} == {"done"}
    for rank in TINY_SWEEP_RANKS:
        meta = json.loads((directory / f"rank-{rank}" / "adapter.json").read_text())
        assert meta["rank"] == rank and (directory / f"rank-{rank}" / "adapter.lora.h5").is_file()
    for name in ("results.csv", "results.json", "results.md", "samples.md"):
        assert (directory / name).is_file(), name
    assert (directory / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in directory.rglob("*") if ".tmp" in p.name]
    assert json.loads((directory / "results.json").read_text()) == rows
    header = (directory / "results.csv").read_text().splitlines()[0].split(",")
    assert header == list(sweep.COLUMNS)
    for row in rows:
        assert row["train_seconds"] > 0 and row["tokens_per_second"] > 0 and row["peak_memory_mb"] > 0
        assert "RSS" in row["memory_kind"]  # CPU: labelled as the process's max RSS
        assert row["validation_sem"] > 0 and row["test_sem"] > 0
        assert row["final_train_loss"] > 0 and row["samples_ended"].endswith("/2")
        assert 0 <= row["model_ended_share"] <= 1
    # Progress while it runs, and the table at the end.
    assert "== rank 2 (1/2)" in tiny_sweep["lines"] and "== rank 4 (2/2)" in tiny_sweep["lines"]
    assert tiny_sweep["lines"][-1].startswith("| variant | status |")
    assert tiny_sweep["lines"][-1].count("\n| rank-") == 2
    # Samples side by side: the base model's answer, then one column per rank.
    assert "| instruction | before (base model) | rank-2 | rank-4 |" in (directory / "samples.md").read_text()


def test_trainable_parameters_and_adapter_size_grow_with_rank(tiny_sweep):
    rows = tiny_sweep["rows"]
    # Tiny Gemma, 2 layers, LoRA on query (kernel 4x64x16: A 4x64xr, B rx16) and
    # value (kernel 1x64x16: A 1x64xr, B rx16): 2 * (272 + 80) * r = 704 r.
    assert [r["trainable_parameters"] for r in rows] == [704 * r for r in TINY_SWEEP_RANKS]
    assert rows[0]["saved_mb"] < rows[1]["saved_mb"]


def test_the_sweep_frees_each_rank_model(tiny_sweep):
    # Each rank loads a fresh base; none may outlive its rank.
    assert tiny_sweep["models_after"] <= tiny_sweep["models_before"]


def test_a_rerun_skips_finished_ranks(tiny_sweep, tmp_path, monkeypatch):
    directory = copy_of(tiny_sweep, tmp_path)

    def must_not_train(config, **kwargs):
        raise AssertionError(f"rank {config.lora_rank} was trained again")

    monkeypatch.setattr("gemma_lora.training.run.run_training", must_not_train)
    lines = []
    rows = sweep.rank_sweep(tiny_sweep["config"], TINY_SWEEP_RANKS, output_dir=directory, echo=lines.append)
    assert rows == tiny_sweep["rows"]
    assert sum("finished earlier" in line for line in lines) == 2


@pytest.mark.slow
def test_a_failed_rank_is_recorded_and_the_sweep_goes_on(tiny_sweep, tmp_path, monkeypatch):
    directory = copy_of(tiny_sweep, tmp_path)
    attempts = []

    def fail(config, **kwargs):
        attempts.append(config.lora_rank)
        if config.lora_rank == 1:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2GiB.")
        raise TrainingError("The training loss became NaN at step 3; training stopped.")

    monkeypatch.setattr("gemma_lora.training.run.run_training", fail)
    rows = sweep.rank_sweep(tiny_sweep["config"], [1, 2, 4, 8], output_dir=directory, echo=lambda line: None)
    assert attempts == [1, 8]  # 2 and 4 were finished; after rank 1 failed, rank 8 still ran.
    assert [r["status"] for r in rows] == ["failed", "done", "done", "failed"]
    assert rows[0]["reason"].startswith("RuntimeError: RESOURCE_EXHAUSTED") and "NaN" in rows[3]["reason"]
    table = (directory / "results.md").read_text()
    assert "failed: RuntimeError: RESOURCE_EXHAUSTED" in table and "| rank-4 | done |" in table
    assert "failed" in (directory / "results.csv").read_text()
    # Failed ranks are not finished: the next run tries them again.
    attempts.clear()
    sweep.rank_sweep(tiny_sweep["config"], [1, 2, 4, 8], output_dir=directory, echo=lambda line: None)
    assert attempts == [1, 8]


def test_a_half_finished_rank_starts_over(tiny_sweep, tmp_path, monkeypatch):
    directory = copy_of(tiny_sweep, tmp_path)
    (directory / "rank-4" / "summary.json").unlink()  # Cut short, before any checkpoint.
    seen = []

    def record(config, resume=False, **kwargs):
        seen.append((config.lora_rank, resume, (directory / "rank-4").exists()))
        raise RuntimeError("stop here")

    monkeypatch.setattr("gemma_lora.training.run.run_training", record)
    sweep.rank_sweep(tiny_sweep["config"], TINY_SWEEP_RANKS, output_dir=directory, echo=lambda line: None)
    assert seen == [(4, False, False)]  # only rank 4, from scratch, its old files cleared


def test_resuming_with_other_settings_is_refused(tiny_sweep, tmp_path):
    directory = copy_of(tiny_sweep, tmp_path)
    changed = resolve_config(overrides=dict(TINY_SWEEP, max_steps=3))
    with pytest.raises(ConfigError, match=r"rank-2 finished with other settings: max_steps 2 \(now 3\)"):
        sweep.rank_sweep(changed, TINY_SWEEP_RANKS, output_dir=directory)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ranks": []}, "ranks is empty"),
        ({"ranks": [0, 4]}, r"ranks \[0\] must be positive integers"),
        ({"ranks": [4, 4]}, "repeat a rank"),
        ({"ranks": [4], "alpha": 8.0, "alpha_per_rank": 2.0}, "not both"),
        ({"ranks": [4], "alpha": -1.0}, r"alpha=-1.0 must be > 0"),
    ],
)
def test_bad_sweep_input_is_one_config_error(kwargs, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        sweep.rank_variants(resolve_config(overrides=TINY_SWEEP), output_dir=tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())


def test_alpha_held_fixed_or_alpha_per_rank_held_fixed(tmp_path):
    base = resolve_config(overrides=TINY_SWEEP)
    alphas = lambda **kw: [v.config.lora_alpha for v in sweep.rank_variants(base, [8, 2], output_dir=tmp_path, **kw)[1]]
    assert alphas() == [None, None]  # alpha = rank: alpha/rank = 1
    assert alphas(alpha=16.0) == [16.0, 16.0]
    assert alphas(alpha_per_rank=2.0) == [4.0, 16.0]  # ranks run ascending
    _, variants = sweep.rank_variants(base, [8, 2], output_dir=tmp_path)
    assert [v.config.output_dir for v in variants] == [str(tmp_path / "rank-2"), str(tmp_path / "rank-8")]
    assert {v.config.seed for v in variants} == {base.seed}


def test_cli_and_script_front_ends(tiny_sweep, tmp_path, capsys):
    directory = copy_of(tiny_sweep, tmp_path)
    assert main(["sweep", *FLAGS, "--ranks", "2", "4", "--output-dir", str(directory)]) == 0
    assert "| rank-4 | done |" in capsys.readouterr().out
    result = subprocess.run(
        [sys.executable, "scripts/rank_sweep.py", *FLAGS, "--ranks", "0", "--output-dir", str(tmp_path / "new")],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("gemma-lora: error: Invalid sweep: ranks [0]")
    assert not (tmp_path / "new").exists()


def test_compare_refuses_a_large_full_fine_tune_on_cpu(tmp_path):
    config = resolve_config(overrides=dict(TINY_SWEEP, preset="gemma_2b_en"))
    with pytest.raises(ConfigError, match="preset='gemma_2b_en' on a CPU"):
        sweep.comparison_variants(config, output_dir=tmp_path, platform="cpu")
    _, variants = sweep.comparison_variants(config, output_dir=tmp_path, platform="gpu")
    assert [v.config.full_finetune for v in variants] == [False, True]


@pytest.mark.slow
def test_full_fine_tune_vs_lora_on_tiny(tmp_path, capsys):
    directory = tmp_path / "compare"
    result = subprocess.run(
        [sys.executable, "scripts/compare_full_vs_lora.py", *FLAGS, "--output-dir", str(directory)],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((directory / "results.json").read_text())
    lora, full = rows
    assert (lora["variant"], full["variant"]) == ("lora-r4", "full") and {lora["status"], full["status"]} == {"done"}
    assert lora["trainable_parameters"] == 2816 and full["trainable_parameters"] == 135488  # every weight
    assert (directory / "lora-r4" / "adapter.lora.h5").is_file()
    # The full fine-tune keeps the whole model as a preset, not an adapter.
    from gemma_lora.model.presets import check_preset_dir

    check_preset_dir(directory / "full" / "model")
    assert not (directory / "full" / "adapter.lora.h5").exists()
    summary = json.loads((directory / "full" / "summary.json").read_text())
    assert summary["token_loss_after"]["validation"] != summary["token_loss_before"]["validation"]
    assert (directory / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert "| full | done | 135,488 |" in result.stdout


def test_quality_script_adds_the_base_row_and_a_full_fine_tune_to_a_sweep(tiny_sweep, tmp_path):
    """scripts/quality.py reuses finished ranks, trains only the full fine-tune, and scores vs the base."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality", os.path.join(REPO, "scripts", "quality.py"))
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    directory = copy_of(tiny_sweep, tmp_path)
    lines = []
    config = dataclasses.replace(tiny_sweep["config"], output_dir=str(directory))
    table = quality.run(config, TINY_SWEEP_RANKS, full=True, echo=lines.append)
    assert [r["variant"] for r in table] == ["base (no training)", "rank-2", "rank-4", "full"]
    assert any("finished earlier" in line for line in lines if "rank 2" in line)
    before = json.loads((directory / "rank-2" / "before.json").read_text())["token_loss"]["test"]
    assert table[0]["test_loss"] == before
    for row in table[1:]:
        assert row["test_change"] == pytest.approx(row["test_loss"] / before - 1)
    assert table[-1]["trainable_parameters"] > table[-2]["trainable_parameters"]
    text = (directory / "quality.md").read_text()
    assert text.count("\n| ") == 5 and "| base (no training) | 0 |" in text  # header + 4 rows
    assert (directory / "quality.png").read_bytes()[:4] == b"\x89PNG"
