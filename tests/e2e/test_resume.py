"""Checkpoints and resume: crash, SIGKILL, Ctrl-C and NaN mid-run; resumed = uninterrupted."""

import signal
import subprocess
import sys
import time

import h5py
import keras
import numpy as np
import pytest
from conftest import REPO

from gemma_lora import run_files
from gemma_lora.cli import main
from gemma_lora.errors import OutputError, TrainingError
from gemma_lora.training import checkpoints, engines, loop
from gemma_lora.training.run import run_training

RUN = dict(limit=20, validation_rows=4, test_rows=2, batch_size=2, epochs=2, checkpoint_every=3,
           learning_rate=5e-3, max_new_tokens=2)  # 8 steps an epoch, 16 in all


def adapter_arrays(run_dir):
    with h5py.File(run_dir / "adapter.lora.h5", "r") as f:
        return {name: np.asarray(f[name]) for name in _datasets(f)}


def _datasets(f):
    found = []
    f.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) else None)
    return found


def assert_same_adapter(a, b):
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)


class CrashAt(keras.callbacks.Callback):
    def __init__(self, step):
        super().__init__()
        self.step, self.seen = step, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.step:
            raise RuntimeError("simulated crash")


@pytest.fixture
def reference(tmp_path_factory, make_config):
    """An uninterrupted run with the RUN settings."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    run_training(make_config(**RUN, output_dir=str(run_dir)), echo=lambda *a: None)
    return adapter_arrays(run_dir)


def test_a_crashed_run_resumes_to_the_uninterrupted_result(tmp_path, make_config, reference, monkeypatch):
    config = make_config(**RUN, output_dir=str(tmp_path / "run"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(config, echo=lambda *a: None, callbacks=[CrashAt(11)])
    assert run_files.latest_checkpoint(tmp_path / "run").name == "step-00000009.npz"  # mid second epoch
    lines = []
    run_training(config, echo=lines.append, resume=True)
    assert any("resuming from step-00000009.npz: 9 optimizer steps (9 batches) done, epoch 2" in line for line in lines)
    assert_same_adapter(adapter_arrays(tmp_path / "run"), reference)


@pytest.mark.slow
def test_a_sigkilled_run_resumes_to_the_uninterrupted_result(tmp_path, reference):
    run_dir = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--sequence-length", "64", "--output-dir", str(run_dir),
            *[f"--{k.replace('_', '-')}={v}" for k, v in RUN.items()]]
    sigkill_after_first_checkpoint(args, run_dir)
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert_same_adapter(adapter_arrays(run_dir), reference)


def sigkill_after_first_checkpoint(args, run_dir):
    """Run `gemma-lora ARGS` in a child process and SIGKILL it once its first checkpoint is in `run_dir`."""
    process = subprocess.Popen([sys.executable, "-m", "gemma_lora.cli", *args], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while run_files.latest_checkpoint(run_dir) is None and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (run_dir / "adapter.lora.h5").exists()


def test_ctrl_c_saves_a_checkpoint_then_exits(tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--sequence-length", "64", "--output-dir", str(run_dir),
            "--checkpoint-every", "1000", *[f"--{k.replace('_', '-')}={v}" for k, v in RUN.items() if k != "checkpoint_every"]]
    process = subprocess.Popen([sys.executable, "-m", "gemma_lora.cli", *args], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (run_dir / "metrics.csv").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)  # metrics.csv appears when training starts
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=240)
    assert process.returncode == 130, err[-2000:]
    assert "interrupted: checkpoint" in out and f"gemma-lora train --resume {run_dir}" in out
    assert run_files.latest_checkpoint(run_dir) is not None


def test_nan_mid_run_stops_and_keeps_the_last_good_checkpoint(tmp_path, make_config, monkeypatch):
    class PoisonAt(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 4:
                self.model.jax_state_sync()
                for variable in self.model.trainable_variables:
                    variable.assign(np.full(variable.shape, np.nan, "float32"))

    config = make_config(**RUN, output_dir=str(tmp_path / "run"))
    with pytest.raises(TrainingError, match=r"NaN at step 5.*step-00000003.npz, is kept.*--resume"):
        run_training(config, echo=lambda *a: None, callbacks=[PoisonAt()])
    kept = run_files.latest_checkpoint(tmp_path / "run")
    assert kept.name == "step-00000003.npz"
    with np.load(kept) as saved:
        assert all(np.isfinite(saved[name]).all() for name in saved.files)


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, tiny_lm, make_config, monkeypatch):
    from gemma_lora.model import loading

    loading.enable_lora(tiny_lm, 4, seed=0)
    engines.compile_for_training(tiny_lm, make_config())
    tiny_lm.optimizer.build(tiny_lm.trainable_variables)
    good = checkpoints.save_checkpoint(tiny_lm, tmp_path, loop.Position(0, 1), 1)
    before = good.read_bytes()

    def full_disk(file, **arrays):
        file.write(b"PK partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)
    with pytest.raises(OutputError, match="No space left on device"):
        checkpoints.save_checkpoint(tiny_lm, tmp_path, loop.Position(0, 2), 2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [good.name]
    assert good.read_bytes() == before


def test_resume_refuses_flags_finished_runs_and_runs_without_checkpoints(tmp_path, capsys, make_config):
    assert main(["train", "--resume", str(tmp_path), "--lora-rank", "8"]) == 2
    assert "--resume uses the run's own config.json; drop --lora-rank" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    run_dir = tmp_path / "done"
    run_training(make_config(max_steps=1, checkpoint_every=None, max_new_tokens=1, output_dir=str(run_dir)), echo=lambda *a: None)
    assert main(["train", "--resume", str(run_dir)]) == 2
    assert "already finished" in capsys.readouterr().err
    (run_dir / "adapter.json").unlink()
    assert main(["train", "--resume", str(run_dir)]) == 2
    assert "No checkpoint" in capsys.readouterr().err
