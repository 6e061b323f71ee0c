"""The two engines, chosen once per run, and `fit`, which trains with one.

An engine is how a run's rows become batches and which jitted step trains
on them:

- `KerasEngine`: KerasHub's model as it is (every architecture, quantized
  bases, full fine-tuning, several devices), on length-bucketed batches of
  `batch_size` rows (`batching.py`), stepped by `keras_engine.KerasStepper`.
  With `--recipe` it trains through `keras.Model.fit` itself, as the classic
  recipe does.
- `FastEngine`: the functional Gemma of `gemma_lora.fast` on packed rows
  (several examples per row, none attending to another), stepped by
  `fast_engine.FastStepper`.

`choose` picks one from the config and the model; afterwards the run holds
the object and nothing compares engine names. `engine.plan(rows, config)`
is that engine's batches of those rows (`Plan`): each epoch is built once and
kept while it is used, so epoch 0 is packed once per run.
"""

from gemma_lora import runtime
from gemma_lora.data.preference import PairRows
from gemma_lora.data.prompts import PromptRows
from gemma_lora.errors import ConfigError
from gemma_lora.fast.extract import unsupported_reasons as fast_unsupported
from gemma_lora.training import batching, fast_engine, grpo_engine, keras_engine, loop, rollouts
from gemma_lora.training.objectives import objective_of
from gemma_lora.training.optim import make_optimizer, schedule_fn
from gemma_lora.training.run_logs import TrainingProgress

runtime.ensure_runtime()

import keras  # noqa: E402

# How many epochs' batches a plan keeps: the current one and the next (an
# optimizer step's accumulation window may cross an epoch's end).
KEPT_EPOCHS = 2


class Plan:
    """One engine's batches of one set of rows: `epoch_batches(epoch)` built once each, and what they hold."""

    def __init__(self, rows, config, build, contents, pairs_per_batch=None):
        self.rows, self.config, self.pairs_per_batch = rows, config, pairs_per_batch
        # GRPO's: the starting LoRA values (the reference model's) and the reward functions, set by the run.
        self.reference = self.rewards = None
        self.timing = {}  # GRPO's: seconds spent sampling and updating, filled by its stepper
        self._build, self._contents = build, contents
        self._epochs = {}
        self.steps_per_epoch = len(self.epoch_batches(0))

    def epoch_batches(self, epoch):
        """The epoch's batches, in training order (a pure function of rows, config and epoch)."""
        if epoch not in self._epochs:
            while len(self._epochs) >= KEPT_EPOCHS:
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = self._build(self.rows, self.config, epoch)
        return self._epochs[epoch]

    def total_batches(self):
        return loop.total_batches(self.steps_per_epoch, self.config)

    def pairs_used(self):
        """The indices of the preference pairs the run's batches hold (a pair plan's), sorted."""
        used = set()
        for batch in range(self.total_batches()):
            epoch, index = divmod(batch, self.steps_per_epoch)
            used.update(self.epoch_batches(epoch)[index]["pair_index"])
        return sorted(used)

    def rebuild(self):
        """Forget the batches built so far (their rows changed, e.g. the reference log-probs were added)."""
        self._epochs.clear()

    def total_steps(self):
        """Optimizer steps a whole run takes: every epoch's, or max_steps if fewer.

        Raises:
            ConfigError: grad_accumulation is more than the run's batches.
        """
        config = self.config
        if not self.total_batches():
            raise ConfigError(
                f"grad_accumulation={config.grad_accumulation} needs that many batches for one optimizer step, but "
                f"the run has {config.epochs * self.steps_per_epoch}. Lower grad_accumulation or batch_size, or "
                "train on more rows or epochs."
            )
        return self.total_batches() // config.grad_accumulation

    def examples_trained(self, first_batch, last_batch):
        """(examples, real tokens) in the run's batches first_batch..last_batch (1-based, inclusive)."""
        examples = tokens = 0
        for batch in range(first_batch, last_batch + 1):
            epoch, index = divmod(batch - 1, self.steps_per_epoch)
            n, t = self._contents(self.rows, self.epoch_batches(epoch)[index])
            examples, tokens = examples + n, tokens + t
        return examples, tokens


class KerasEngine:
    name = "keras"

    def plan(self, rows, config):
        return Plan(rows, config, batching.epoch_batches, batching.batch_contents)

    def stepper(self, causal_lm, plan, precision="float32", objective=None):
        return keras_engine.KerasStepper(causal_lm, plan, objective or objective_of(plan.config))

    def describe(self, plan, config):
        return "engine: keras (keras.Model.fit)" if config.recipe else "engine: keras (KerasHub's model, one jitted step)"

    def data_stats(self, plan):
        """What data.json and summary.json record about this engine's batches (nothing beyond the rows')."""
        return {}

    def train(self, causal_lm, plan, callbacks, start, precision, evaluate, objective):
        if plan.config.recipe:
            return keras_engine.keras_fit(causal_lm, plan, callbacks, start)
        return _run_loop(self.stepper(causal_lm, plan, precision, objective), plan, callbacks, start, evaluate)


class FastEngine:
    name = "fast"

    def plan(self, rows, config):
        """The packed batches of `rows`: `TokenizedRows`, a preference objective's `PairRows`, or GRPO's `PromptRows`."""
        if isinstance(rows, PromptRows):
            return Plan(rows, config, rollouts.epoch_batches, rollouts.batch_contents)
        if isinstance(rows, PairRows):
            return Plan(rows, config, fast_engine.pair_batches, fast_engine.pair_contents,
                        pairs_per_batch=fast_engine.pairs_per_batch(rows, config))
        return Plan(rows, config, fast_engine.epoch_batches, fast_engine.batch_contents)

    def stepper(self, causal_lm, plan, precision="float32", objective=None):
        objective = objective or objective_of(plan.config)
        if isinstance(plan.rows, PromptRows):
            return grpo_engine.GRPOStepper(causal_lm, plan, precision, objective, plan.rewards)
        return fast_engine.FastStepper(causal_lm, plan, precision, objective)

    def describe(self, plan, config):
        if isinstance(plan.rows, PromptRows):
            return (
                f"engine: fast (GRPO: {config.batch_size} prompts x {config.num_generations} completions a batch, "
                f"sampled by the package's decoder, each group packed with its prompt once): {plan.steps_per_epoch} "
                f"batches an epoch of {len(plan.rows)} prompts ({config.grpo_iterations} update(s) per batch of "
                "completions)"
            )
        if plan.pairs_per_batch:
            return (
                f"engine: fast (preference pairs packed, each pair's two sequences in one batch): {plan.steps_per_epoch} "
                f"steps an epoch of {config.batch_size} rows x {config.sequence_length} (about "
                f"{len(plan.rows) / plan.steps_per_epoch:.1f} pairs a step), {self.real_token_fraction(plan):.1%} real tokens"
            )
        return (
            f"engine: fast (packed rows, gemma_lora.fast): {plan.steps_per_epoch} steps an epoch of "
            f"{config.batch_size} rows x {config.sequence_length} (about {len(plan.rows) / plan.steps_per_epoch:.1f} "
            f"examples a step), {self.real_token_fraction(plan):.1%} real tokens"
        )

    def data_stats(self, plan):
        if isinstance(plan.rows, PromptRows):
            return {}  # a GRPO run's rows are packed once sampled
        return {"packed_real_token_fraction": self.real_token_fraction(plan)}

    def real_token_fraction(self, plan):
        """The share of real (non-padding) positions in the first epoch's packed batches."""
        batches = plan.epoch_batches(0)
        real = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
        return real / max(sum(b["segment_ids"].size for b in batches), 1)

    def train(self, causal_lm, plan, callbacks, start, precision, evaluate, objective):
        return _run_loop(self.stepper(causal_lm, plan, precision, objective), plan, callbacks, start, evaluate)


ENGINES = {"keras": KerasEngine, "fast": FastEngine}


def compile_for_training(causal_lm, config=None, total_steps=None, optimizer=None):
    """Compile with the recipe's loss and metrics and the run's optimizer.

    The loss and metrics are what `--recipe`'s `keras.Model.fit` trains and
    reports with (plus `token_loss`, weighted: the mean over loss-carrying
    tokens); both engines' own steps take the optimizer only and their loss
    from the objective. `total_steps` (optimizer steps of the run) is where
    a learning-rate schedule ends; a constant rate does not need it.
    """
    causal_lm.compile(
        optimizer=optimizer or make_optimizer(config, total_steps),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[
            keras.metrics.SparseCategoricalAccuracy(),
            keras.metrics.SparseCategoricalCrossentropy(from_logits=True, name="token_loss"),
        ],
    )


def unsupported_reasons(causal_lm, config):
    """Why the fast engine cannot train this model with this config ([] = it can).

    Several devices and processes are no reason: its step takes batches laid
    out over the data axis and the weights in the model's own layout.
    """
    reasons = fast_unsupported(causal_lm, quantized=bool(config.quantize))
    if config.full_finetune:
        reasons.append("it trains LoRA factors only (full_finetune)")
    return reasons


def choose(causal_lm, config, platform):
    """The engine for this run: `config.engine`, or for "auto" the fast engine on GPU/TPU where it can run.

    "auto" picks the fast engine on GPU/TPU when it supports the run (on one
    device or several, in one process or several): on an H100 it trains the
    gemma_2b shape with 28% less memory, a 4% higher throughput and a faster
    first step than KerasHub in bfloat16, and packs rows to ~99% real tokens
    (docs/perf.md). On CPU "auto" stays on the Keras engine: the fast
    engine's steps hold packed rows, so switching would change what every
    CPU user's batch_size and max_steps mean (the shipped demo config asks
    for the fast engine by name). Gemma 4's mixture of experts, per-layer
    embeddings and KV-shared layers stay on the Keras engine.

    Raises:
        ConfigError: engine="fast" where the fast engine cannot run, naming why.
    """
    fast_only = config.objective != "sft"
    if config.engine == "keras" and not fast_only:
        return KerasEngine()
    reasons = unsupported_reasons(causal_lm, config)
    if fast_only and (config.engine == "keras" or reasons):
        why = "; ".join(r.rstrip(".") for r in reasons) if reasons else "the Keras engine trains sft only"
        raise ConfigError(
            f"objective={config.objective} runs on the fast engine, and {why}. "
            + ("Use --engine fast (or auto)." if not reasons else "Use --objective sft, or a model the fast engine runs.")
        )
    if fast_only and keras.distribution.distribution() is not None:
        # Not yet tested over several devices or processes, so refused rather than assumed to work.
        raise ConfigError(
            f"objective={config.objective} runs on one device for now, and this run is laid out over several. "
            "Use --distribution none (or make one device visible)."
        )
    if config.engine == "fast" and reasons:
        raise ConfigError(
            "engine=fast cannot train this run: " + "; ".join(r.rstrip(".") for r in reasons) + ". Use --engine keras."
        )
    wanted = config.engine == "fast" or fast_only or (platform != "cpu" and not reasons)
    return FastEngine() if wanted else KerasEngine()


def fit(causal_lm, rows, config, callbacks=(), verbose="auto", start=None, engine=None, precision="float32",
        evaluate=None, plan=None):
    """Train on `rows` (a `data.TokenizedRows`) from `start` and return a History.

    Args:
        callbacks: Keras callbacks (plus `begin_epoch` / `on_evaluation` where they have them).
        verbose: truthy shows one progress bar over the optimizer steps the
            run will take (`TrainingProgress`); 0 shows nothing.
        start: a `loop.Position` to resume from (default: the beginning).
        engine: a `KerasEngine` or `FastEngine` (default: the Keras engine).
        precision: the run's dtype policy; the fast engine's dtype follows it.
        evaluate: optional f() -> logs, every `eval_every` optimizer steps.
        plan: `engine.plan(rows, config)`, when the caller has it already.
    """
    engine = engine or KerasEngine()
    plan = plan or engine.plan(rows, config)
    start = start or loop.Position()
    callbacks = list(callbacks)
    progress = None
    if verbose:
        done = (start.epoch * plan.steps_per_epoch + start.step) // config.grad_accumulation
        shown_as = "pair_loss" if config.prefers else "loss" if config.samples_completions else "token_loss"
        progress = TrainingProgress(plan.total_steps() - done, shown_as=shown_as)
        callbacks.append(progress)
    try:
        return engine.train(causal_lm, plan, callbacks, start, precision, evaluate, objective_of(config))
    finally:
        if progress is not None:
            progress.close()


def _run_loop(stepper, plan, callbacks, start, evaluate):
    config = plan.config
    fn = schedule_fn(config, plan.total_steps())
    learning_rate = (lambda step: float(fn(step))) if fn is not None else (lambda step: config.learning_rate)
    return loop.run(stepper, config, callbacks, start, learning_rate=learning_rate, evaluate=evaluate)
