"""The files of a run directory, named once, and the checks that they are whole (no Keras needed).

    RUN_DIR/config.json      the resolved config (`--config` repeats the run)
            data.json        what was read and how it was split
            before.json      scores and samples before training (a resume reuses them)
            checkpoints/     step-NNNNNNNN.npz, the newest two
            best.npz         with keep_best
            metrics.csv  evaluations.csv  samples.json  samples.md  answers.json
            adapter.lora.h5 + adapter.json, or model/ (a full fine-tune)
            summary.json     written last

`resumable` and `check_intact` read the adapter and the newest checkpoint the
way `generate --adapter` reads an adapter, so `--resume` and `info` refuse a
damaged run directory in one line, naming the file and the fix, before any
model is loaded and without changing anything on disk.
"""

import zipfile
from pathlib import Path

import numpy as np

from gemma_lora.adapters.files import ADAPTER_FILE, metadata_path, read_adapter
from gemma_lora.errors import AdapterError, TrainingError

CONFIG_FILE = "config.json"
DATA_FILE = "data.json"
BEFORE_FILE = "before.json"
SUMMARY_FILE = "summary.json"
MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoints"


def checkpoint_path(run_dir, batches):
    """Where the checkpoint written after `batches` batches goes."""
    return Path(run_dir) / CHECKPOINT_DIR / f"step-{batches:08d}.npz"


def checkpoints_of(run_dir):
    """The run's checkpoint files, oldest first."""
    return sorted(Path(run_dir, CHECKPOINT_DIR).glob("step-*.npz"))


def latest_checkpoint(run_dir):
    """The newest checkpoint file in a run directory, or None."""
    found = checkpoints_of(run_dir)
    return found[-1] if found else None


def read_checkpoint(path):
    """Every array of a checkpoint file, by name.

    Raises:
        TrainingError: the file is truncated, damaged or no checkpoint,
            naming it and the older checkpoint to fall back to.
    """
    try:
        with np.load(path) as file:
            return {name: file[name] for name in file.files}  # a truncated or damaged file fails here
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        older = [p for p in checkpoints_of(Path(path).parent.parent) if p != Path(path)]
        fix = f"Delete it to resume from {older[-1].name}" if older else "Start the run again in a new directory"
        raise TrainingError(f"Checkpoint {path} is unreadable ({type(e).__name__}: truncated or damaged). {fix}.") from None


def finished(run_dir):
    """The file that says a run finished (its adapter's metadata, or a full fine-tune's model/), or None."""
    for done in (metadata_path(Path(run_dir) / ADAPTER_FILE), Path(run_dir) / MODEL_DIR):
        if done.exists():
            return done
    return None


def check_adapter(run_dir):
    """Raise TrainingError naming the file if a finished LoRA run's adapter is unreadable."""
    adapter = Path(run_dir) / ADAPTER_FILE
    if not metadata_path(adapter).exists():
        return
    try:
        read_adapter(adapter)
    except AdapterError as error:
        checkpoint = latest_checkpoint(run_dir)
        fix = (f"Or delete {adapter.name}, {metadata_path(adapter).name} and {SUMMARY_FILE} and run `gemma-lora train "
               f"--resume {run_dir}` to train again from {checkpoint.name}." if checkpoint else
               "Or train the run again in a new directory.")
        raise TrainingError(f"The run in {run_dir} finished, but its adapter is damaged: {error} {fix}") from None


def resumable(run_dir):
    """Check that a run directory can be resumed; return its newest checkpoint (read whole once, here).

    Raises:
        TrainingError: not a run directory, already finished (or finished
            with a damaged adapter), no checkpoint yet, or a damaged newest
            checkpoint, each naming the file and the fix.
    """
    run_dir = Path(run_dir)
    check_adapter(run_dir)
    done = finished(run_dir)
    if done is not None:
        raise TrainingError(f"The run in {run_dir} already finished (it has {done.name}); nothing to resume.")
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None or not (run_dir / BEFORE_FILE).is_file():
        raise TrainingError(
            f"No checkpoint in {run_dir / CHECKPOINT_DIR}: the run stopped before its first one. "
            "Start it again instead of resuming."
        )
    read_checkpoint(checkpoint)
    return checkpoint


def check_intact(run_dir):
    """Raise TrainingError if a run directory's adapter or newest checkpoint is unreadable (for `info`)."""
    check_adapter(run_dir)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None:
        read_checkpoint(checkpoint)
