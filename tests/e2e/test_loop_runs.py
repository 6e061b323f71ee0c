"""Whole runs of the training loop: keep-best, resume mid-warm-up and mid-accumulation; no import circles."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import REPO
from numerics import assert_close_at_scale

from gemma_lora import data
from gemma_lora.model import loading, presets
from gemma_lora.training import scoring


def test_a_keep_best_run_writes_the_adapter_of_its_best_evaluation(tmp_path, make_config):
    import json

    from gemma_lora.adapters import store
    from gemma_lora.training.run import run_training

    config = make_config(limit=40, validation_rows=8, learning_rate=0.05, lora_targets=["query", "value", "ffw_linear"],
                         max_steps=6, eval_every=1, keep_best=True, answer_splits=[], checkpoint_every=None,
                         output_dir=str(tmp_path / "run"))
    result = run_training(config, echo=lambda *a: None)
    rows = list(__import__("csv").DictReader((tmp_path / "run" / "evaluations.csv").open()))
    losses = [float(r["validation_token_loss"]) for r in rows]
    best = int(np.argmin(losses)) + 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    meta = json.loads((tmp_path / "run" / "adapter.json").read_text())
    assert len(losses) == 6 and summary["train"]["best_step"] == best == meta["training"]["best_step"]
    assert result.after["validation"] == pytest.approx(min(losses), rel=1e-5)
    # The saved adapter scores as the best step did.
    lm = loading.load_causal_lm(presets.resolve_preset("tiny"), "float32", sequence_length=64)
    store.load_adapter(lm, tmp_path / "run" / "adapter.lora.h5")
    scored = scoring.token_loss(lm, data.tokenize_rows(data.split(data.load_examples(config), config).validation,
                                                     lm.preprocessor.tokenizer, config))["token_loss"]
    assert scored == pytest.approx(min(losses), rel=1e-5)


def test_resume_mid_warmup_and_mid_accumulation_gives_the_uninterrupted_adapter(tmp_path, make_config, monkeypatch):
    from gemma_lora.training.run import run_training

    settings = dict(limit=40, validation_rows=8, batch_size=2, grad_accumulation=3, max_steps=5, warmup_steps=3,
                    lr_schedule="cosine", max_grad_norm=0.5, learning_rate=5e-3, answer_splits=[],
                    checkpoint_every=1)
    run_training(make_config(**settings, output_dir=str(tmp_path / "whole")), echo=lambda *a: None)

    class CtrlCAt(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 7:  # the 8th batch: the 2nd of optimizer step 3's three, still warming up
                os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        run_training(make_config(**settings, output_dir=str(tmp_path / "cut")), echo=lambda *a: None, callbacks=[CtrlCAt()])
    saved = sorted((tmp_path / "cut" / "checkpoints").glob("step-*.npz"))[-1]
    assert saved.name == "step-00000008.npz"  # mid-accumulation: 8 batches = 2 steps and 2 of 3 batches
    from gemma_lora.config import load_config_file, resolve_config

    resumed = resolve_config(load_config_file(tmp_path / "cut" / "config.json"), {"output_dir": str(tmp_path / "cut")})
    run_training(resumed, echo=lambda *a: None, resume=True)
    import h5py

    def factors(path):
        found = []
        with h5py.File(path, "r") as f:
            f.visititems(lambda name, obj: found.append((name, np.asarray(obj))) if isinstance(obj, h5py.Dataset) else None)
        return found

    for (name, a), (_, b) in zip(factors(tmp_path / "whole" / "adapter.lora.h5"), factors(tmp_path / "cut" / "adapter.lora.h5")):
        assert_close_at_scale(b, a, rtol=1e-5, err_msg=name)


def test_no_import_circles():
    tool = Path(REPO).parent / "shared" / "tools" / "import_circles.py"
    if not tool.is_file():
        pytest.skip(f"{tool} is not beside this checkout")
    result = subprocess.run([sys.executable, str(tool), "gemma_lora"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
