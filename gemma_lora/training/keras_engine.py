"""The Keras engine's step: KerasHub's model as it is, trained by the one loop or, for the recipe, by `Model.fit`.

`KerasStepper` takes the length-bucketed batches of `batching.py`, each
trimmed to its longest row; its step is `stateless_call` of the Keras model,
the objective's loss (`objectives.py`) on the logits, and Keras' optimizer's
`stateless_apply`, in one jitted function (compiled once per batch length).
Under a Keras distribution each batch is laid out as Keras' own trainer lays
it out, and the state keeps its variables' layout. `keras_fit` is the
classic recipe's training, kept exact: `keras.Model.fit` once per epoch.
"""

import weakref

from gemma_lora import runtime
from gemma_lora.model.layers import model_inputs
from gemma_lora.parallel import distribute
from gemma_lora.training import loop
from gemma_lora.training.batching import batch_arrays, batch_length
from gemma_lora.training.loop import History, epochs_from, with_step_limit
from gemma_lora.training.scoring import weighted_nll

runtime.ensure_runtime()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402


class KerasStepper(loop.StepEngine):
    """KerasHub's model (any architecture, quantized bases, several devices), stepped by the loop."""

    def __init__(self, causal_lm, plan, objective):
        super().__init__(causal_lm, plan)
        self.non_trainable = [v.value for v in causal_lm.non_trainable_variables]
        state = self.state_shardings()
        out_shardings = None if state is None else (*state, None, None)
        key = (id(self.optimizer), objective, self.distribution is not None)
        self._step = loop.compiled_step(
            causal_lm, key,
            lambda: jax.jit(_keras_train_step(causal_lm, self.optimizer, objective), donate_argnums=(0, 1),
                            out_shardings=out_shardings),
        )

    def batch_weight(self, index):
        return float(self.plan.rows.weights[index].sum())

    def step(self, index, scale):
        rows, config = self.plan.rows, self.plan.config
        size, trim = config.batch_size, config.bucket_by_length
        shape = (size, batch_length(rows, index, trim))
        # Under a distribution each process builds only the rows its own devices hold.
        sharding, share = distribute.batch_layout(shape, self.distribution)
        x, labels, weights = batch_arrays(rows, index, size, trim, share)
        inputs = distribute.to_global((x["token_ids"], x["padding_mask"], labels, weights), sharding, shape)
        self.trainable, self.optimizer_values, nll, weight = self._step(
            self.trainable, self.optimizer_values, self.non_trainable, *inputs, jnp.float32(scale)
        )
        nll, weight = float(nll), float(weight)
        return nll, weight, nll / max(weight, 1.0)


class KerasForward:
    """The Keras model's outputs on one batch, as a function of its trainable values (what an objective reads)."""

    def __init__(self, model, trainable, non_trainable, token_ids, padding_mask, labels, weights):
        self.model, self.trainable, self.non_trainable = model, trainable, non_trainable
        self.token_ids, self.padding_mask, self.labels, self.weights = token_ids, padding_mask, labels, weights

    def logits(self):
        inputs = model_inputs(self.model, self.token_ids, self.padding_mask)
        logits, _ = self.model.stateless_call(self.trainable, self.non_trainable, inputs, training=True)
        return logits

    def token_nll_sums(self):
        return weighted_nll(self.logits(), self.labels, self.weights)


def _keras_train_step(causal_lm, optimizer, objective):
    """The Keras engine's step function for `causal_lm` (compiled once per batch length)."""
    # A weak reference: the compiled step is kept per model (loop.compiled_step),
    # and a strong one would keep every model ever trained alive.
    model = weakref.ref(causal_lm)

    def train_step(trainable, optimizer_values, non_trainable, token_ids, padding_mask, labels, weights, scale):
        # The name is what tests count traces of.
        def loss(trainable):
            forward = KerasForward(model(), trainable, non_trainable, token_ids, padding_mask, labels, weights)
            nll, weight = objective.loss(forward)
            # The mean over the optimizer step's loss-carrying tokens (`scale`, from the
            # loop), as in the fast engine: not Keras' sample-weighted loss, which
            # divides by every position of the batch, padding included, so its
            # scale moves with each length bucket.
            return nll * scale, (nll, weight)

        grads, (nll, weight) = jax.grad(loss, has_aux=True)(trainable)
        trainable, optimizer_values = optimizer.stateless_apply(optimizer_values, grads, trainable)
        return trainable, optimizer_values, nll, weight

    return train_step


def keras_fit(causal_lm, plan, callbacks, start):
    """The classic recipe's training: `keras.Model.fit` once per epoch on the epoch's batches.

    Batches go straight to `keras.Model.fit` as a `PyDataset`: KerasHub's own
    `fit` (its PipelineModel) would wrap arrays in a grain/tf.data dataset
    and drop `shuffle`. The loss is Keras' compiled one (the recipe's).
    """
    rows, config = plan.rows, plan.config
    callbacks = with_step_limit(callbacks, config, start, plan.steps_per_epoch)
    history = History()
    for epoch, skip in epochs_from(start, config, callbacks):
        # The epoch's batches are a pure function of (seed, epoch), so a
        # resumed run rebuilds them and drops the ones already taken.
        batches = plan.epoch_batches(epoch)[skip:]
        history.extend(
            keras.Model.fit(
                causal_lm,
                Batches(rows, batches, config, causal_lm),
                initial_epoch=epoch,
                epochs=epoch + 1,
                shuffle=False,
                callbacks=callbacks,
                verbose=0,  # TrainingProgress shows progress over the whole run instead.
            )
        )
        if causal_lm.stop_training:
            break
    return history


class Batches(keras.utils.PyDataset):
    """An epoch's batches for `keras.Model.fit`, each trimmed to its own length."""

    def __init__(self, rows, batches, config, model=None):
        super().__init__()
        self.rows, self.batches, self.config, self.model = rows, batches, config, model

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        x, labels, weights = batch_arrays(self.rows, self.batches[i], self.config.batch_size, self.config.bucket_by_length)
        return {**x, **self.extra_inputs(x)}, labels, weights

    def extra_inputs(self, x):
        # Gemma 4's position ids; Keras' fit keeps no model here, so it is given at construction.
        return {} if self.model is None else model_inputs(self.model, x["token_ids"], x["padding_mask"])
