"""A run's place in training, shared by both engines: position, epoch order, step limit, history.

Below `train` (the Keras engine) and `fast_train` (the fast engine), so
neither imports the other for these.
"""

import dataclasses

import numpy as np

from gemma_lora import runtime

runtime.ensure_runtime()

import keras  # noqa: E402


@dataclasses.dataclass
class Position:
    """Where training stands: epochs finished and steps done in the current epoch."""

    epoch: int = 0
    step: int = 0


class History:
    """Per-epoch logs of every `keras.Model.fit` call of one training run."""

    def __init__(self):
        self.history = {}

    def extend(self, keras_history):
        for name, values in keras_history.history.items():
            self.history.setdefault(name, []).extend(values)

    def append(self, logs):
        """Add one epoch's logs (the fast engine's, which has no keras History)."""
        for name, value in logs.items():
            self.history.setdefault(name, []).append(value)


def epoch_order(n_rows, config, epoch):
    """Row order of an epoch: file order, or a permutation drawn from (seed, epoch).

    Drawn here rather than by Keras' shuffle so that a resumed run can rebuild
    the order of an interrupted epoch and skip the steps it already took.
    """
    if not config.shuffle:
        return np.arange(n_rows)
    return np.random.default_rng([config.seed, epoch]).permutation(n_rows)


def with_step_limit(callbacks, config, start, steps_per_epoch):
    """The run's callbacks, led by a StopAfterSteps for the steps `max_steps` leaves after `start`."""
    callbacks = list(callbacks)
    if config.max_steps:
        done = start.epoch * steps_per_epoch + start.step
        callbacks.insert(0, StopAfterSteps(config.max_steps - done))
    return callbacks


def epochs_from(start, config, callbacks):
    """Yield (epoch, steps already taken in it) from `start`, telling callbacks where each begins."""
    for epoch in range(start.epoch, config.epochs):
        skip = start.step if epoch == start.epoch else 0
        for callback in callbacks:
            if hasattr(callback, "begin_epoch"):
                callback.begin_epoch(epoch, skip)
        yield epoch, skip


class StopAfterSteps(keras.callbacks.Callback):
    """Stop training after a number of optimizer steps, counted across fit calls."""

    def __init__(self, max_steps):
        super().__init__()
        self.max_steps = max_steps
        self.steps = 0

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if self.steps >= self.max_steps:
            self.model.stop_training = True
