"""The fast engine of `train`: packed rows through `gemma_lora.fast`'s JAX step.

`train.fit` calls `fit` here when `engine` resolves to "fast". It trains the
same LoRA factors of the same Keras model as the Keras engine, on the same
rows in the same epoch order, so the rest of the pipeline (scoring,
generation, adapters, checkpoints, resume) does not know which engine ran:

- each epoch's rows (in `train.epoch_order`) are packed several per row by
  `packing.pack` (no cross-attention, response weights kept), the packed rows
  shuffled by (seed, epoch) and cut into batches of `batch_size` rows, all of
  one shape, so the step compiles once;
- the Keras callbacks of the run (checkpointer, split scorer, CSV log) are
  driven by hand with the same hooks and logs Keras' `fit` would give them;
- before a callback can look at the model (epoch end, a checkpoint, the end)
  the trained factors are written back into the Keras LoRA variables and the
  AdamW moments into the Keras optimizer's slots, so a checkpoint has the
  Keras engine's format and either engine can resume it.

Why a hand-driven loop: Keras' `fit` runs the model's own `train_step`, and
KerasHub's backbones take no per-example attention masks, so packed rows
cannot go through it (see `gemma_lora.fast`).
"""

import numpy as np

from gemma_lora import fast, packing, runtime
from gemma_lora.config import ENGINES  # noqa: F401  (re-exported)
from gemma_lora.errors import ConfigError
from gemma_lora.loop import History, Position, epoch_order, epochs_from, with_step_limit

runtime.ensure_runtime()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402


def unsupported_reasons(causal_lm, config, devices=None):
    """Why the fast engine cannot train this model with this config ([] = it can)."""
    reasons = []
    try:
        fast.architecture(causal_lm.backbone)
    except ConfigError as error:
        reasons.append(str(error))
    if config.quantize:
        reasons.append("it does not read quantized base weights (quantize)")
    if config.full_finetune:
        reasons.append("it trains LoRA factors only (full_finetune)")
    devices = len(jax.devices()) if devices is None else devices
    if config.distribution != "none" and devices > 1:
        reasons.append(f"it runs on one device and {devices} are visible (set distribution=none)")
    return reasons


def resolve_engine(causal_lm, config, platform):
    """'keras' or 'fast' for this run.

    "auto" picks the fast engine on GPU/TPU when it supports the run: on an
    H100 it trains the gemma_2b shape with 28% less memory, a 4% higher
    throughput and a faster first step than KerasHub in bfloat16, and packs
    rows to ~99% real tokens (docs/perf.md). On CPU the Keras engine stays
    the default: on the real Gemma 3 270M the fast engine trained to the same
    validation loss 1.3-1.4x sooner, but its steps hold packed rows, so
    switching would change what every CPU user's batch_size and max_steps
    mean (docs/perf.md).

    Raises:
        ConfigError: engine="fast" where the fast engine cannot run, naming why.
    """
    if config.engine == "keras":
        return "keras"
    reasons = unsupported_reasons(causal_lm, config)
    if config.engine == "fast":
        if reasons:
            raise ConfigError(
                "engine=fast cannot train this run: " + "; ".join(reasons) + ". Use --engine keras."
            )
        return "fast"
    return "fast" if platform != "cpu" and not reasons else "keras"


def fast_dtype(precision):
    """The fast engine's dtype for frozen weights and activations."""
    return "float32" if precision == "float32" else "bfloat16"


def examples_of(rows):
    """Each row's (token_ids, loss_weights) without padding, as `packing.pack` takes them.

    A row's weight at position t weighs the prediction of token t + 1, which
    is `pack`'s convention. A row cut at sequence_length loses the label of
    its last position (its next token is not in the row).
    """
    lengths = rows.padding_mask.sum(axis=1)
    return [(rows.token_ids[i, :n], rows.weights[i, :n]) for i, n in enumerate(lengths)]


def epoch_batches(rows, config, epoch):
    """The packed batches of an epoch, in training order: a list of dicts of arrays.

    A pure function of (rows, config, epoch), so a resumed run rebuilds them.
    """
    examples = examples_of(rows)
    order = epoch_order(len(examples), config, epoch)
    packed = packing.pack([examples[i] for i in order], config.sequence_length)
    n = len(packed["token_ids"])
    if config.shuffle:
        packed = {k: v[np.random.default_rng([config.seed, epoch, 1]).permutation(n)] for k, v in packed.items()}
    extra = -n % config.batch_size
    if extra:
        # Empty rows (segment 0, weight 0) keep the last batch the same shape.
        packed = {k: np.concatenate([v, np.zeros((extra, v.shape[1]), v.dtype)]) for k, v in packed.items()}
    size = config.batch_size
    return [{k: v[i : i + size] for k, v in packed.items()} for i in range(0, n + extra, size)]


def batch_contents(batch):
    """(examples, real tokens) in a packed batch: its distinct segments, its non-padding positions."""
    segments = batch["segment_ids"]
    examples = sum(len(np.unique(row[row > 0])) for row in segments)
    return examples, int((segments > 0).sum())


def steps_per_epoch(rows, config):
    return len(epoch_batches(rows, config, 0))


def packed_stats(rows, config):
    """Steps and the real-token share of the first epoch's packed batches."""
    batches = epoch_batches(rows, config, 0)
    positions = sum(b["segment_ids"].size for b in batches)
    real = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    return {"steps_per_epoch": len(batches), "real_token_fraction": real / max(positions, 1)}


class Engine:
    """The fast step's state for one Keras model, kept in sync with it on demand."""

    def __init__(self, causal_lm, config, precision):
        self.causal_lm = causal_lm
        self.fast_config, self.frozen, self.lora = fast.extract_params(
            causal_lm, tuple(config.lora_targets), dtype=fast_dtype(precision), seed=config.seed
        )
        optimizer = causal_lm.optimizer  # made by train.compile_for_training
        self.step = fast.make_train_step(
            self.fast_config,
            fast.AdamW(
                learning_rate=config.learning_rate,
                weight_decay=config.weight_decay,
                beta_1=float(optimizer.beta_1),
                beta_2=float(optimizer.beta_2),
                epsilon=float(optimizer.epsilon),
            ),
        )
        self.opt_state = self._read_optimizer()

    def _slots(self):
        """(keras LoRA variable, fast pytree path) pairs, in a fixed order."""
        blocks = self.causal_lm.backbone.transformer_layers
        for i, block in enumerate(blocks):
            for target in self.fast_config.lora_targets:
                layer = fast._layer_of(block, target)
                yield layer.lora_kernel_a, (i, target, "lora_kernel_a")
                yield layer.lora_kernel_b, (i, target, "lora_kernel_b")

    def _read_optimizer(self):
        # The Keras optimizer's moments: zeros on a fresh run, a checkpoint's on resume.
        optimizer = self.causal_lm.optimizer
        optimizer.build(self.causal_lm.trainable_variables)
        state = self.step.init(self.lora)
        m, v = state["m"], state["v"]
        for variable, (i, target, name) in self._slots():
            index = optimizer._get_variable_index(variable)
            m[i][target][name] = jnp.asarray(optimizer._momentums[index].value, jnp.float32)
            v[i][target][name] = jnp.asarray(optimizer._velocities[index].value, jnp.float32)
        state["count"] = jnp.asarray(int(optimizer.iterations.value), jnp.int32)
        return state

    def sync_to_keras(self):
        """Write the factors and AdamW state into the Keras model and optimizer."""
        fast.write_back(self.causal_lm, self.fast_config, self.lora)
        optimizer = self.causal_lm.optimizer
        for variable, (i, target, name) in self._slots():
            index = optimizer._get_variable_index(variable)
            optimizer._momentums[index].assign(np.asarray(self.opt_state["m"][i][target][name]))
            optimizer._velocities[index].assign(np.asarray(self.opt_state["v"][i][target][name]))
        optimizer.iterations.assign(int(self.opt_state["count"]))

    def train_step(self, batch):
        """One step; returns (nll_sum, weight_sum) as floats."""
        self.lora, self.opt_state, sums = self.step(self.frozen, self.lora, self.opt_state, batch)
        return float(sums["nll_sum"]), float(sums["weight_sum"])


def fit(causal_lm, rows, config, precision, callbacks=(), start=None):
    """Train like `train.fit`, with the fast engine; returns a `loop.History`."""
    start = start or Position()
    engine = Engine(causal_lm, config, precision)
    # StopAfterSteps (for max_steps) ends the run by setting stop_training, as under Keras' fit.
    callbacks = with_step_limit(callbacks, config, start, steps_per_epoch(rows, config))
    for callback in callbacks:
        callback.set_model(causal_lm)
    # Checkpointer.save syncs Keras' JAX state first; route that to the fast state.
    causal_lm.jax_state_sync = engine.sync_to_keras
    history = History()
    causal_lm.stop_training = False
    try:
        for callback in callbacks:
            callback.on_train_begin()
        for epoch, skip in epochs_from(start, config, callbacks):
            batches = epoch_batches(rows, config, epoch)[skip:]
            for callback in callbacks:
                callback.on_epoch_begin(epoch)
            nll = weight = 0.0
            for index, batch in enumerate(batches):
                step_nll, step_weight = engine.train_step(batch)
                nll, weight = nll + step_nll, weight + step_weight
                logs = {"loss": step_nll / max(step_weight, 1.0), "token_loss": nll / max(weight, 1.0)}
                for callback in callbacks:
                    callback.on_train_batch_end(index, logs)
                if causal_lm.stop_training:
                    break
            engine.sync_to_keras()
            logs = {"loss": nll / max(weight, 1.0), "token_loss": nll / max(weight, 1.0)}
            for callback in callbacks:
                callback.on_epoch_end(epoch, logs)
            history.append(logs)
            if causal_lm.stop_training:
                break
        for callback in callbacks:
            callback.on_train_end()
    finally:
        del causal_lm.jax_state_sync  # back to Keras' own method
        engine.sync_to_keras()
    return history
