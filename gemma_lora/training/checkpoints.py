"""Checkpoints of the trainable weights and optimizer state, for resuming a run.

A checkpoint is one `.npz` file in `<run_dir>/checkpoints/`, written to a
temporary name and renamed, so a run killed at any moment (SIGKILL included)
leaves only whole checkpoints and loses at most one checkpoint interval. The
newest one and the one before it are kept.

Ctrl-C during training does not kill the step in flight: the first one asks
the checkpoint callback to save after the current step and stop; a second
one interrupts at once.

In a job of several processes the arrays are gathered from every process
and process 0 alone writes and reads the files (the others receive what it
read), so the run directory need only exist on process 0's host. There
Ctrl-C interrupts at once: the processes could not agree on one step to stop
after.
"""

import signal
from pathlib import Path

import numpy as np

from gemma_lora import runtime
from gemma_lora.errors import TrainingError
from gemma_lora.io import atomic_path
from gemma_lora.parallel import hosts
from gemma_lora.run_files import checkpoint_path, checkpoints_of, read_checkpoint
from gemma_lora.training.loop import Position

runtime.ensure_runtime()

import keras  # noqa: E402

KEEP = 2


def checkpoint_arrays(causal_lm):
    """The trainable weights and optimizer variables as whole NumPy arrays, by their checkpoint names.

    Gathered over the processes of a job, so every process must call it.
    """
    trainable, optimizer = causal_lm.trainable_variables, causal_lm.optimizer.variables
    values = hosts.gather([*trainable, *optimizer])
    names = [f"weight_{i}" for i in range(len(trainable))] + [f"optimizer_{i}" for i in range(len(optimizer))]
    return dict(zip(names, values))


def save_checkpoint(causal_lm, run_dir, position, batches_done, arrays=None):
    """Write the trainable weights, optimizer variables and position atomically.

    Every process of a job calls it (the arrays are gathered, unless given
    as `checkpoint_arrays`' result); process 0 writes.

    Returns:
        The checkpoint's path.
    """
    arrays = checkpoint_arrays(causal_lm) if arrays is None else arrays
    path = checkpoint_path(run_dir, batches_done)
    if not hosts.is_main():
        return path
    path.parent.mkdir(exist_ok=True)
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            # Stored as "global_step" (the key since the first release, so older checkpoints resume): batches, not optimizer steps.
            np.savez(f, epoch=position.epoch, step=position.step, global_step=batches_done, **arrays)
    for old in checkpoints_of(run_dir)[:-KEEP]:
        old.unlink()
    return path


def restore_checkpoint(causal_lm, path):
    """Load weights and optimizer state saved by `save_checkpoint`; return (Position, batches_done).

    The model must be compiled (its optimizer exists) and have the same LoRA
    layout as when the checkpoint was written. In a job of several processes
    process 0 reads the file and the others receive its arrays, whatever
    number of processes wrote it.

    Raises:
        TrainingError: the checkpoint is unreadable or does not match this model.
    """
    optimizer = causal_lm.optimizer
    optimizer.build(causal_lm.trainable_variables)  # creates the slots to fill
    names = [f"optimizer_{i}" for i in range(len(optimizer.variables))]
    weight_names = [f"weight_{i}" for i in range(len(causal_lm.trainable_variables))]
    shapes = {name: tuple(v.shape) for name, v in zip(weight_names, causal_lm.trainable_variables)}
    paths = {name: v.path for name, v in zip(weight_names, causal_lm.trainable_variables)}

    def read():
        saved = read_checkpoint(path)
        if any(name not in saved for name in [*names, *weight_names, "epoch", "step", "global_step"]) or (
            f"optimizer_{len(names)}" in saved
        ):
            raise TrainingError(
                f"Checkpoint {path} holds other state than this run's (another LoRA layout, or a damaged "
                "file). Resume with the run's own config.json (do not change LoRA settings)."
            )
        for name, shape in shapes.items():
            if saved[name].shape != shape:
                raise TrainingError(
                    f"Checkpoint {path} does not fit this model ({paths[name]}: {saved[name].shape} vs "
                    f"{shape}). Resume with the run's own config.json."
                )
        where = [int(saved[name]) for name in ("epoch", "step", "global_step")]
        return where, {name: saved[name] for name in [*weight_names, *names]}

    (epoch, step, batches_done), saved = hosts.from_main("checkpoint", read)
    for variable, name in zip(causal_lm.trainable_variables, weight_names):
        variable.assign(saved[name])
    for variable, name in zip(optimizer.variables, names):
        variable.assign(saved[name])
    return Position(epoch, step), batches_done


class Checkpointer(keras.callbacks.Callback):
    """Save a checkpoint every `every` steps, on Ctrl-C, and never after a bad step.

    `fit` tells it where each epoch starts (`begin_epoch`), so it knows the
    position to record.
    """

    def __init__(self, run_dir, every, steps_per_epoch, start_batches_done=0):
        super().__init__()
        self.run_dir = run_dir
        self.every = every
        self.steps_per_epoch = steps_per_epoch
        self.batches_done = start_batches_done
        self.position = Position()
        self.epoch_first_step = start_batches_done + 1
        self.last_saved = None
        self.interrupted = False
        self.bad_step = None

    def begin_epoch(self, epoch, skip):
        self.position = Position(epoch, skip)
        self.epoch_first_step = self.batches_done + 1

    def on_epoch_end(self, epoch, logs=None):
        # metrics.csv's per-epoch means cover these steps only: after a
        # resume, the steps of this process, not the whole epoch.
        if logs is not None:
            logs["first_step"] = self.epoch_first_step
            logs["last_step"] = self.batches_done

    def on_train_batch_end(self, batch, logs=None):
        self.batches_done += 1
        self.position.step += 1
        loss = float((logs or {}).get("loss", 0.0))
        if not np.isfinite(loss):
            self.bad_step = self.batches_done
            self.model.stop_training = True
            return  # Never checkpoint a step whose loss was not finite.
        if self.position.step == self.steps_per_epoch:
            # The epoch is over: record it as the start of the next one.
            position = Position(self.position.epoch + 1, 0)
        else:
            position = Position(self.position.epoch, self.position.step)
        due = self.every and self.batches_done % self.every == 0
        if due or self.interrupted:
            self.save(position)
        if self.interrupted:
            self.model.stop_training = True

    def save(self, position):
        # Keras' JAX trainer keeps the live state outside the variables between
        # steps; write it back first so the checkpoint holds this step's values.
        self.model.jax_state_sync()
        arrays = checkpoint_arrays(self.model)
        if not all(np.isfinite(a).all() for name, a in arrays.items() if name.startswith("weight_")):
            self.bad_step = self.batches_done
            self.model.stop_training = True
            return
        self.last_saved = save_checkpoint(self.model, self.run_dir, position, self.batches_done, arrays)

    def on_train_begin(self, logs=None):
        self._previous_handler = None
        if hosts.several():
            return  # Ctrl-C reaches the processes at different steps: it interrupts at once there.
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
        kept = hosts.first("best step so far", self._kept)
        if kept is not None:
            self.best_step, self.best_loss = kept

    def _kept(self):
        if not self.path.is_file():
            return None
        with np.load(self.path) as saved:
            return int(saved["step"]), float(saved["loss"])

    def on_evaluation(self, step, logs):
        # Every process of a job sees the same loss, so all gather together (or none does).
        loss = float(logs[self.metric])
        if not np.isfinite(loss) or loss >= self.best_loss:
            return
        self.best_step, self.best_loss = step, loss
        values = hosts.gather(self.model.trainable_variables)
        if not hosts.is_main():
            return
        arrays = {f"weight_{i}": value for i, value in enumerate(values)}
        with atomic_path(self.path, suffix=".npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, step=step, loss=loss, **arrays)

    def restore(self, causal_lm):
        """Load the best step's weights into `causal_lm`; return (step, loss), or None if none was kept."""

        def read():
            if not self.path.is_file():
                return None, {}
            with np.load(self.path) as saved:
                weights = {name: saved[name] for name in saved.files if name.startswith("weight_")}
                return [int(saved["step"]), float(saved["loss"])], weights

        kept, weights = hosts.from_main("best step", read)
        if kept is None:
            return None
        for i, variable in enumerate(causal_lm.trainable_variables):
            variable.assign(weights[f"weight_{i}"])
        return kept[0], kept[1]
