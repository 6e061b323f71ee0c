"""The notebooks run top to bottom on the tiny preset (GEMMA_LORA_PRESET=tiny), and are stored without outputs."""

import json
import math
import os
import shutil
from pathlib import Path

import pytest
from conftest import REPO

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(REPO) / "notebooks"


def execute(name, cwd, monkeypatch, **env):
    """Run a notebook in a fresh kernel that imports this checkout; return its text output."""
    monkeypatch.setenv("GEMMA_LORA_PRESET", "tiny")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    # A cell that raises fails the test with CellExecutionError, naming the cell.
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}}).execute()
    texts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            texts.append(output.get("text") or output.get("data", {}).get("text/plain", ""))
    return "\n".join(texts)


@pytest.mark.parametrize("name", ["quickstart.ipynb", "rank_sweep.ipynb", "preference.ipynb", "grpo.ipynb"])
def test_notebooks_are_stored_without_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


@pytest.mark.slow
def test_quickstart_notebook_runs_on_tiny(tmp_path, monkeypatch):
    out = execute("quickstart.ipynb", tmp_path, monkeypatch)
    assert "Kaggle credentials: none found" in out  # conftest removes every credential
    assert "validation loss:" in out and "the reloaded adapter gives the same answers" in out
    assert (tmp_path / "quickstart" / "adapter.lora.h5").is_file()
    assert (tmp_path / "quickstart" / "merged" / "config.json").is_file()
    # The chat-file example: conversations in Gemma's turns, loss on the model's, the format recorded.
    assert "first row: <start_of_turn>user\nAnswer helpfully.\n\n" in out
    assert "what carries loss:" in out and "chat_format 'gemma'" in out


@pytest.mark.slow
def test_rank_sweep_notebook_resumes_a_finished_sweep(tiny_sweep, tmp_path, monkeypatch):
    # The notebook's tiny settings match the tiny_sweep fixture, so it reads both ranks back.
    directory = tmp_path / "sweep"
    shutil.copytree(tiny_sweep["dir"], directory)
    out = execute("rank_sweep.ipynb", tmp_path, monkeypatch, GEMMA_LORA_SWEEP_DIR=str(directory))
    assert out.count("finished earlier") == 2
    assert "| rank-2 | done | 1,408 |" in out and "IPython.core.display.Image" in out


@pytest.mark.slow
def test_preference_notebook_runs_sft_then_dpo_on_tiny(tmp_path, monkeypatch):
    # Smoke mode writes its own crafted pairs: CI needs no shipped preference file.
    out = execute("preference.ipynb", tmp_path, monkeypatch)
    sft, dpo = tmp_path / "preference" / "sft", tmp_path / "preference" / "dpo"
    assert (tmp_path / "preference" / "pairs.jsonl").is_file() and (sft / "adapter.lora.h5").is_file()
    assert "Kaggle credentials: none found" in out and "starting from preference/sft" in out
    assert "reference: the starting model's log-probs" in out and "test pairs (8): reward accuracy" in out
    summary = json.loads((dpo / "summary.json").read_text())
    recorded = json.loads((dpo / "config.json").read_text())
    assert summary["objective"] == "dpo" and recorded["init_adapter"] == str(sft.relative_to(tmp_path))
    assert abs(summary["pairs_before"]["test"]["loss"] - math.log(2)) < 1e-6  # the SFT model is the reference
    assert summary["pairs_after"]["test"]["reward_accuracy"] > 0.5  # the crafted preference is learned
    assert "| SFT       |" in out and "| SFT + DPO |" in out and "test rows: 8 answered, 8 pairs" in out


@pytest.mark.slow
def test_grpo_notebook_runs_sft_then_grpo_on_tiny(tmp_path, monkeypatch):
    out = execute("grpo.ipynb", tmp_path, monkeypatch)
    sft, grpo = tmp_path / "grpo" / "sft", tmp_path / "grpo" / "grpo"
    assert (sft / "adapter.lora.h5").is_file() and (grpo / "adapter.lora.h5").is_file()
    assert "Kaggle credentials: none found" in out and "starting from grpo/sft" in out
    summary = json.loads((grpo / "summary.json").read_text())
    recorded = json.loads((grpo / "config.json").read_text())
    assert summary["objective"] == "grpo" and recorded["init_adapter"] == str(sft.relative_to(tmp_path))
    assert summary["rollouts"]["batches_sampled"] == 3 and summary["train"]["sampling_seconds"] > 0
    header = (grpo / "rollouts.csv").read_text().splitlines()[0]
    assert "reward_exact_match" in header and "reward_closeness" in header  # the notebook's own reward
    assert "| base       |" in out and "| SFT + GRPO |" in out and "GRPO: 3 steps, sampling" in out


def test_notebook_credentials_come_from_the_environment_and_are_not_shown(monkeypatch):
    from gemma_lora.model.presets import use_notebook_credentials

    assert use_notebook_credentials() is None
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "secret-key")
    assert use_notebook_credentials() == "environment"
