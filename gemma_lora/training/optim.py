"""The optimizer both engines step: Keras' AdamW with a learning-rate schedule, clipping and accumulation.

    optimizer = make_optimizer(config, total_steps=150)
    optimizer.build(causal_lm.trainable_variables)
    trainable, optimizer_values = optimizer.stateless_apply(optimizer_values, grads, trainable)

One Keras optimizer serves the Keras engine and the fast engine alike
(through `stateless_apply` inside their jitted steps), so both follow the
same schedule and their state is the same Keras variables: a checkpoint of
either engine resumes in the other, and `--recipe`'s `keras.Model.fit` uses
it unchanged. Keras provides the rest:
- `global_clipnorm` clips the (accumulated) gradient to a global norm;
- `gradient_accumulation_steps` sums N batches' gradients in optimizer
  variables (saved in checkpoints, so a run resumes mid-accumulation) and
  applies their mean every N-th call.
The schedules are optax's (`warmup_cosine_decay_schedule`, `linear_schedule`,
`join_schedules`); `Schedule` only hands them to Keras.
"""

import math

from gemma_lora import runtime

runtime.ensure_runtime()

import keras  # noqa: E402
import optax  # noqa: E402


def warmup_steps(config, total_steps):
    """Warm-up length in optimizer steps: warmup_steps, else warmup_ratio of the run."""
    if config.warmup_steps is not None:
        return min(config.warmup_steps, total_steps)
    return int(math.ceil(config.warmup_ratio * total_steps))


def schedule_fn(config, total_steps):
    """optax schedule: the learning rate at each optimizer step (0-based), or None for a constant rate."""
    peak, warm = config.learning_rate, warmup_steps(config, total_steps)
    if config.lr_schedule == "constant" and not warm:
        return None
    if config.lr_schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warm, max(total_steps, warm + 1), end_value=0.0)
    after = (
        optax.constant_schedule(peak)
        if config.lr_schedule == "constant"
        else optax.linear_schedule(peak, 0.0, max(total_steps - warm, 1))
    )
    if not warm:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), after], [warm])


class Schedule(keras.optimizers.schedules.LearningRateSchedule):
    """An optax schedule over optimizer steps, as a Keras schedule.

    Keras calls a schedule with its count of `apply` calls, which with
    gradient accumulation is batches, not updates; dividing by the
    accumulation gives the update the batch belongs to.
    """

    def __init__(self, fn, accumulation=1):
        self.fn, self.accumulation = fn, accumulation

    def __call__(self, step):
        return self.fn(keras.ops.floor_divide(step, self.accumulation))

    def get_config(self):
        return {"accumulation": self.accumulation}


def make_optimizer(config, total_steps=None):
    """AdamW as in the classic recipe (no weight decay on bias and norm scales), with the run's controls.

    Args:
        config: the run's `TrainConfig` (learning_rate, lr_schedule,
            warmup_steps/ratio, max_grad_norm, grad_accumulation, weight_decay).
        total_steps: optimizer steps the run takes (schedules end there);
            needed when the schedule is not constant.
    """
    fn = schedule_fn(config, total_steps or 1)
    accumulation = config.grad_accumulation
    optimizer = keras.optimizers.AdamW(
        learning_rate=config.learning_rate if fn is None else Schedule(fn, accumulation),
        weight_decay=config.weight_decay,
        global_clipnorm=config.max_grad_norm,
        gradient_accumulation_steps=accumulation if accumulation > 1 else None,
    )
    optimizer.exclude_from_weight_decay(var_names=["bias", "scale"])
    return optimizer


def describe(config, total_steps):
    """One line saying what the optimizer will do over `total_steps` optimizer steps."""
    warm = warmup_steps(config, total_steps)
    lr = f"lr {config.learning_rate:g}"
    if config.lr_schedule != "constant" or warm:
        lr += f" {config.lr_schedule}" + (f" after {warm} warm-up steps" if warm else "") + f" over {total_steps} steps"
    else:
        lr += " constant"
    parts = [f"AdamW, {lr}", f"weight decay {config.weight_decay:g}"]
    if config.grad_accumulation > 1:
        parts.append(
            f"effective batch {config.batch_size * config.grad_accumulation} "
            f"({config.grad_accumulation} x {config.batch_size} rows accumulated)"
        )
    if config.max_grad_norm:
        parts.append(f"gradients clipped to global norm {config.max_grad_norm:g}")
    return "optimizer: " + ", ".join(parts)


def current_learning_rate(optimizer):
    """The rate the optimizer's next update uses, as a float."""
    return float(optimizer.learning_rate)
