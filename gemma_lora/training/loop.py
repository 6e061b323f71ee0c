"""The one training loop, and what both engines share: position, epoch order, step limit, history.

`run` drives a `StepEngine` (the Keras engine's or the fast engine's
stepper) through the epochs: accumulation, the learning rate in the logs,
`eval_every` evaluations, `max_steps`, callbacks (checkpoints, keep-best,
CSV and TensorBoard logs, progress). It knows nothing of the objective.
"""

import dataclasses
import weakref

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


class StepEngine:
    """An engine as the loop drives it: its batches, and one jitted step over the run's state.

    The state is the Keras model's trainable values and its optimizer's
    variables, as lists in Keras' own order, whatever the engine computes
    with: `sync` writes them into the Keras variables (before a checkpoint,
    an evaluation, an epoch's end and the end of training), so the rest of
    the package sees one Keras model either way. The arrays are copies: the
    step donates them, and the Keras variables keep valid buffers until then.

    Its batches come from its engine's `plan` (`engines.Plan`). Subclasses
    give `batch_weight(batch)` (its loss-carrying weight, read on the host)
    and `step(batch, scale) -> (nll_sum, weight_sum, loss)`: the objective's
    summed loss and weight of the batch, and the loss whose gradient the
    step took.
    """

    def __init__(self, causal_lm, plan):
        import jax.numpy as jnp

        self.causal_lm, self.plan = causal_lm, plan
        self.optimizer = causal_lm.optimizer
        self.optimizer.build(causal_lm.trainable_variables)
        self.trainable = [jnp.array(v.value) for v in causal_lm.trainable_variables]
        self.optimizer_values = [jnp.array(v.value) for v in self.optimizer.variables]
        self.synced = False
        # Keras' global distribution (several devices, maybe several processes), or None.
        self.distribution = keras.distribution.distribution()

    def steps_per_epoch(self):
        return self.plan.steps_per_epoch

    def step_logs(self):
        """What the last step measured beyond its loss (GRPO's rewards, sampling time), for the batch's logs."""
        return {}

    def epoch_batches(self, epoch):
        return self.plan.epoch_batches(epoch)

    def state_shardings(self):
        """(trainable, optimizer) shardings of the variables, for a step's out_shardings; None on one device.

        The step then keeps each state array in its variable's layout, as
        Keras' own trainer does.
        """
        if self.distribution is None:
            return None
        return ([v.value.sharding for v in self.causal_lm.trainable_variables],
                [v.value.sharding for v in self.optimizer.variables])

    def sync(self):
        """Write the state into the Keras model's and optimizer's variables (once per step).

        Keras' `Callback.model` calls the model's `jax_state_sync` at every
        access; a second write after the first would undo what a callback
        assigned in between, so, like Keras' own trainer, sync only once
        until the next step changes the state.
        """
        if self.synced:
            return
        for variable, value in zip(self.causal_lm.trainable_variables, self.trainable):
            variable.assign(value)
        for variable, value in zip(self.optimizer.variables, self.optimizer_values):
            variable.assign(value)
        self.synced = True

    def reload(self):
        """Take the state back from the Keras variables (a callback may have changed them), as Keras' fit does."""
        self.trainable = [v.value for v in self.causal_lm.trainable_variables]
        self.optimizer_values = [v.value for v in self.optimizer.variables]
        self.synced = False


_STEPS = weakref.WeakKeyDictionary()  # model -> {key: jitted step}


def compiled_step(causal_lm, key, make):
    """The jitted step `make()` builds, kept per model and `key` across `fit` calls.

    A second `fit` on the same model and optimizer (another epoch count, a
    resumed run in the same process) then compiles nothing new, as Keras'
    own `train_function` is kept. `key` must name everything the step
    closes over (the optimizer object, the engine's static layout).
    """
    steps = _STEPS.setdefault(causal_lm, {})
    if key not in steps:
        steps.clear()  # an older optimizer's step would keep that optimizer alive
        steps[key] = make()
    return steps[key]


def run(engine, config, callbacks=(), start=None, learning_rate=None, evaluate=None):
    """Train with `engine` from `start` (a `Position`) to the run's end; return a `History`.

    One loop for both engines. It takes the epochs' batches in order
    (skipping those a resumed run already took), gives each batch its share
    of the optimizer step's loss (`scale`: the step's loss is the mean over
    the loss-carrying tokens of all its `grad_accumulation` batches, so
    accumulation equals one larger batch), stops after `max_steps`
    optimizer steps or the last epoch, and tells `callbacks` (Keras
    callbacks, plus `begin_epoch(epoch, skip)` and `on_evaluation(step,
    logs)` where they have them) what happens.

    A batch's logs: `loss` (the loss its gradient came from), `token_loss`
    (the epoch's mean per token so far), `optimizer_step` (updates done),
    `update` (whether this batch ended an optimizer step) and
    `learning_rate` (of that update). An epoch's logs: the mean `loss` over
    its batches and its `token_loss`.

    Args:
        learning_rate: optional f(optimizer step) -> float, for the logs.
        evaluate: optional f() -> dict of logs, called every `eval_every`
            optimizer steps and after the last one (the engine is synced first).
    """
    start = start or Position()
    per_epoch = engine.steps_per_epoch()
    accumulation = config.grad_accumulation
    last = total_batches(per_epoch, config)
    done = start.epoch * per_epoch + start.step
    causal_lm = engine.causal_lm
    for callback in callbacks:
        callback.set_model(causal_lm)
    # Keras 3's `Callback.model` property (keras/src/callbacks/callback.py)
    # calls `model.jax_state_sync()` on the JAX backend at every access, to
    # write its trainer's state into the variables before a callback reads
    # them. This loop keeps that state itself, so the model's method is
    # pointed at the engine's `sync` for the run (and restored after);
    # tests/unit/test_loop.py fails if Keras stops calling it there.
    causal_lm.jax_state_sync = engine.sync
    causal_lm.stop_training = False

    history = History()
    scale = None
    since_nll = since_weight = 0.0  # training loss since the last evaluation
    try:
        for callback in callbacks:
            callback.on_train_begin()
        for epoch, skip in epochs_from(start, config, callbacks):
            if done >= last:
                break
            batches = engine.epoch_batches(epoch)
            for callback in callbacks:
                callback.on_epoch_begin(epoch)
            nll = weight = losses = 0.0
            taken = 0
            for index in range(skip, per_epoch):
                for callback in callbacks:
                    callback.on_train_batch_begin(index)
                if engine.synced:  # the Keras variables were handed out; continue from them
                    engine.reload()
                if index == skip or done % accumulation == 0:
                    scale = accumulation / max(window_weight(engine, done, accumulation), 1.0)
                step_nll, step_weight, step_loss = engine.step(batches[index], scale)
                engine.synced = False  # the state moved on from what the Keras variables hold
                done += 1
                taken += 1
                nll, weight, losses = nll + step_nll, weight + step_weight, losses + step_loss
                since_nll, since_weight = since_nll + step_nll, since_weight + step_weight
                update = done % accumulation == 0
                steps = done // accumulation
                logs = {"loss": step_loss, "token_loss": nll / max(weight, 1.0), "optimizer_step": steps, "update": update,
                        **engine.step_logs()}
                if learning_rate is not None:
                    logs["learning_rate"] = learning_rate(steps - 1 if update else steps)
                for callback in callbacks:
                    callback.on_train_batch_end(index, logs)
                if update and evaluate is not None and config.eval_every and (
                    steps % config.eval_every == 0 or done >= last
                ) and not causal_lm.stop_training:
                    _evaluate(engine, evaluate, steps, since_nll / max(since_weight, 1.0), learning_rate, callbacks)
                    since_nll = since_weight = 0.0
                if causal_lm.stop_training or done >= last:
                    break
            engine.sync()
            logs = {"loss": losses / max(taken, 1), "token_loss": nll / max(weight, 1.0)}
            for callback in callbacks:
                callback.on_epoch_end(epoch, logs)
            history.append(logs)
            if causal_lm.stop_training or done >= last:
                break
        for callback in callbacks:
            callback.on_train_end()
    finally:
        del causal_lm.jax_state_sync  # back to Keras' own method
        engine.sync()
    return history


def window_weight(engine, batch_index, accumulation):
    """Loss-carrying weight of the optimizer step (accumulation window) that holds the run's batch `batch_index`."""
    first = batch_index - batch_index % accumulation
    total = 0.0
    for g in range(first, first + accumulation):
        epoch, i = divmod(g, engine.steps_per_epoch())
        total += engine.batch_weight(engine.epoch_batches(epoch)[i])
    return total


def _evaluate(engine, evaluate, steps, train_token_loss, learning_rate, callbacks):
    """Score after optimizer step `steps` (the engine synced first) and tell the callbacks that have `on_evaluation`."""
    engine.sync()
    results = dict(evaluate(), step=steps, train_token_loss=train_token_loss)
    if learning_rate is not None:
        results["learning_rate"] = learning_rate(steps - 1)
    for callback in callbacks:
        if hasattr(callback, "on_evaluation"):
            callback.on_evaluation(steps, results)


def total_batches(per_epoch, config):
    """Batches the whole run takes: every epoch's, or max_steps optimizer steps' if fewer,
    in whole optimizer steps (a last partial accumulation is not taken)."""
    batches = config.epochs * per_epoch
    if config.max_steps:
        batches = min(batches, config.max_steps * config.grad_accumulation)
    return batches - batches % config.grad_accumulation
