"""Checkpoints of the trainable weights and optimizer state, for resuming a run.

A checkpoint is one `.npz` file in `<run_dir>/checkpoints/`, written to a
temporary name and renamed, so a run killed at any moment (SIGKILL included)
leaves only whole checkpoints and loses at most one checkpoint interval. The
newest one and the one before it are kept.

Ctrl-C during training does not kill the step in flight: the first one asks
the checkpoint callback to save after the current step and stop; a second
one interrupts at once.
"""

import re
import signal
import zipfile
from pathlib import Path

import numpy as np

from gemma_lora import runtime
from gemma_lora.errors import TrainingError
from gemma_lora.io import atomic_path
from gemma_lora.loop import Position

runtime.ensure_runtime()

import keras  # noqa: E402

DIRECTORY = "checkpoints"
KEEP = 2
_NAME = re.compile(r"step-(\d+)\.npz$")


def save_checkpoint(causal_lm, run_dir, position, global_step):
    """Write the trainable weights, optimizer variables and position atomically.

    Returns:
        The checkpoint's path.
    """
    directory = Path(run_dir) / DIRECTORY
    directory.mkdir(exist_ok=True)
    arrays = {f"weight_{i}": np.asarray(v) for i, v in enumerate(causal_lm.trainable_variables)}
    arrays.update({f"optimizer_{i}": np.asarray(v) for i, v in enumerate(causal_lm.optimizer.variables)})
    path = directory / f"step-{global_step:08d}.npz"
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, epoch=position.epoch, step=position.step, global_step=global_step, **arrays)
    for old in sorted(directory.glob("step-*.npz"))[:-KEEP]:
        old.unlink()
    return path


def latest_checkpoint(run_dir):
    """The newest checkpoint file in a run directory, or None."""
    found = sorted(Path(run_dir, DIRECTORY).glob("step-*.npz"))
    return found[-1] if found else None


def restore_checkpoint(causal_lm, path):
    """Load weights and optimizer state saved by `save_checkpoint`; return (Position, global_step).

    The model must be compiled (its optimizer exists) and have the same LoRA
    layout as when the checkpoint was written.

    Raises:
        TrainingError: the checkpoint is unreadable or does not match this model.
    """
    try:
        with np.load(path) as file:
            saved = {name: file[name] for name in file.files}  # a truncated or damaged file fails here
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        older = [p for p in sorted(Path(path).parent.glob("step-*.npz")) if p != Path(path)]
        fix = f"Delete it to resume from {older[-1].name}" if older else "Start the run again"
        raise TrainingError(f"Checkpoint {path} is unreadable ({type(e).__name__}). {fix}.") from None
    optimizer = causal_lm.optimizer
    optimizer.build(causal_lm.trainable_variables)  # creates the slots to fill
    names = [f"optimizer_{i}" for i in range(len(optimizer.variables))]
    weight_names = [f"weight_{i}" for i in range(len(causal_lm.trainable_variables))]
    if any(name not in saved for name in [*names, *weight_names, "epoch", "step", "global_step"]) or (
        f"optimizer_{len(names)}" in saved
    ):
        raise TrainingError(
            f"Checkpoint {path} holds other state than this run's (another LoRA layout, or a damaged "
            "file). Resume with the run's own config.json (do not change LoRA settings)."
        )
    for variable, value in zip(causal_lm.trainable_variables, (saved[name] for name in weight_names)):
        if tuple(variable.shape) != value.shape:
            raise TrainingError(
                f"Checkpoint {path} does not fit this model ({variable.path}: {value.shape} vs "
                f"{tuple(variable.shape)}). Resume with the run's own config.json."
            )
        variable.assign(value)
    for variable, name in zip(optimizer.variables, names):
        variable.assign(saved[name])
    position = Position(int(saved["epoch"]), int(saved["step"]))
    return position, int(saved["global_step"])


class Checkpointer(keras.callbacks.Callback):
    """Save a checkpoint every `every` steps, on Ctrl-C, and never after a bad step.

    `fit` tells it where each epoch starts (`begin_epoch`), so it knows the
    position to record.
    """

    def __init__(self, run_dir, every, steps_per_epoch, start_global_step=0):
        super().__init__()
        self.run_dir = run_dir
        self.every = every
        self.steps_per_epoch = steps_per_epoch
        self.global_step = start_global_step
        self.position = Position()
        self.epoch_first_step = start_global_step + 1
        self.last_saved = None
        self.interrupted = False
        self.bad_step = None

    def begin_epoch(self, epoch, skip):
        self.position = Position(epoch, skip)
        self.epoch_first_step = self.global_step + 1

    def on_epoch_end(self, epoch, logs=None):
        # metrics.csv's per-epoch means cover these steps only: after a
        # resume, the steps of this process, not the whole epoch.
        if logs is not None:
            logs["first_step"] = self.epoch_first_step
            logs["last_step"] = self.global_step

    def on_train_batch_end(self, batch, logs=None):
        self.global_step += 1
        self.position.step += 1
        loss = float((logs or {}).get("loss", 0.0))
        if not np.isfinite(loss):
            self.bad_step = self.global_step
            self.model.stop_training = True
            return  # Never checkpoint a step whose loss was not finite.
        if self.position.step == self.steps_per_epoch:
            # The epoch is over: record it as the start of the next one.
            position = Position(self.position.epoch + 1, 0)
        else:
            position = Position(self.position.epoch, self.position.step)
        due = self.every and self.global_step % self.every == 0
        if due or self.interrupted:
            self.save(position)
        if self.interrupted:
            self.model.stop_training = True

    def save(self, position):
        # Keras' JAX trainer keeps the live state outside the variables between
        # steps; write it back first so the checkpoint holds this step's values.
        self.model.jax_state_sync()
        if not all(np.isfinite(np.asarray(v)).all() for v in self.model.trainable_variables):
            self.bad_step = self.global_step
            self.model.stop_training = True
            return
        self.last_saved = save_checkpoint(self.model, self.run_dir, position, self.global_step)

    def on_train_begin(self, logs=None):
        self._previous_handler = signal.getsignal(signal.SIGINT)
        try:
            signal.signal(signal.SIGINT, self._on_interrupt)
        except ValueError:  # Not the main thread: leave Ctrl-C alone.
            self._previous_handler = None

    def on_train_end(self, logs=None):
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)

    def _on_interrupt(self, signum, frame):
        if self.interrupted:  # A second Ctrl-C: stop now.
            raise KeyboardInterrupt
        self.interrupted = True


BEST_FILE = "best.npz"


class BestKeeper(keras.callbacks.Callback):
    """Keep the trainable weights of the evaluation with the lowest validation loss (`keep_best`).

    Each better evaluation writes them to `<run_dir>/best.npz` (atomically,
    with its step and loss), so a resumed run still knows its best;
    `restore` puts them back into the model at the end, and the adapter
    written after it is the best step's.
    """

    def __init__(self, run_dir, metric="validation_token_loss"):
        super().__init__()
        self.path = Path(run_dir) / BEST_FILE
        self.metric = metric
        self.best_step, self.best_loss = None, float("inf")
        if self.path.is_file():
            with np.load(self.path) as saved:
                self.best_step, self.best_loss = int(saved["step"]), float(saved["loss"])

    def on_evaluation(self, step, logs):
        loss = float(logs[self.metric])
        if not np.isfinite(loss) or loss >= self.best_loss:
            return
        self.best_step, self.best_loss = step, loss
        arrays = {f"weight_{i}": np.asarray(v) for i, v in enumerate(self.model.trainable_variables)}
        with atomic_path(self.path, suffix=".npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, step=step, loss=loss, **arrays)

    def restore(self, causal_lm):
        """Load the best step's weights into `causal_lm`; return (step, loss), or None if none was kept."""
        if not self.path.is_file():
            return None
        with np.load(self.path) as saved:
            for i, variable in enumerate(causal_lm.trainable_variables):
                variable.assign(saved[f"weight_{i}"])
            return int(saved["step"]), float(saved["loss"])
