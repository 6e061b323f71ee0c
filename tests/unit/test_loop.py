"""The one training loop: schedules, accumulation, clipping, keep-best, resume, both engines alike."""

import math

import keras
import numpy as np
import pytest
from numerics import assert_close_at_scale

from gemma_lora import data
from gemma_lora.model import loading
from gemma_lora.training import engines


def tiny_rows(causal_lm, config, n=8):
    examples = data.split(data.load_examples(config), config).train[:n]
    return data.tokenize_rows(examples, causal_lm.preprocessor.tokenizer, config)


def first_moments(causal_lm):
    """AdamW's first moment of each trainable variable: (1 - beta_1) x the gradient after one update."""
    optimizer = causal_lm.optimizer
    return [np.asarray(optimizer._momentums[optimizer._get_variable_index(v)]) for v in causal_lm.trainable_variables]


class LearningRates(keras.callbacks.Callback):
    """The optimizer's own learning rate for each update, read from its variables after the update before it."""

    def __init__(self):
        super().__init__()
        self.rates = []

    def on_train_begin(self, logs=None):
        self.rates.append(float(self.model.optimizer.learning_rate))

    def on_train_batch_end(self, batch, logs=None):
        if logs.get("update"):
            self.model.jax_state_sync()
            self.rates.append(float(self.model.optimizer.learning_rate))


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_the_learning_rate_follows_the_schedule(tiny_lm, make_config, schedule):
    peak, warm, total = 1e-3, 3, 10
    config = make_config(lr_schedule=schedule, warmup_steps=warm, learning_rate=peak, batch_size=1, limit=20,
                         validation_rows=4, max_steps=total)
    loading.enable_lora(tiny_lm, 4, seed=0)
    rows = tiny_rows(tiny_lm, config, 12)
    engines.compile_for_training(tiny_lm, config, engines.KerasEngine().plan(rows, config).total_steps())
    rates = LearningRates()
    engines.fit(tiny_lm, rows, config, callbacks=[rates], verbose=0)
    used = rates.rates[:total]  # the rate of updates 0 .. total - 1

    def expected(k):
        if k < warm:
            return peak * k / warm
        progress = (k - warm) / (total - warm)
        return {"constant": peak, "linear": peak * (1 - progress),
                "cosine": peak * 0.5 * (1 + math.cos(math.pi * progress))}[schedule]

    np.testing.assert_allclose(used, [expected(k) for k in range(total)], rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("engine", ["keras", "fast"])
def test_accumulated_batches_equal_one_larger_batch(tiny_preset, make_config, engine):
    """2 batches of 2 rows accumulated give the gradient (and update) of 1 batch of 4 rows."""
    moments, weights = [], []
    for batch_size, accumulation in ((4, 1), (2, 2)):
        lm = loading.load_causal_lm(tiny_preset, "float32", sequence_length=64)
        loading.enable_lora(lm, 4, seed=0)
        config = make_config(batch_size=batch_size, grad_accumulation=accumulation, max_steps=1, shuffle=False,
                             bucket_by_length=False, learning_rate=1e-3, engine=engine)
        # The first 4 rows (Keras engine), or packed rows (fast engine: the same whatever the batch size).
        rows = tiny_rows(lm, config, 4 if engine == "keras" else 16)
        engines.compile_for_training(lm, config, 1)
        engines.fit(lm, rows, config, verbose=0, engine=engines.ENGINES[engine]())
        moments.append(first_moments(lm))
        weights.append([np.asarray(v) for v in lm.trainable_variables])
    for one, accumulated in zip(*moments):
        np.testing.assert_allclose(accumulated, one, rtol=2e-4, atol=1e-9)
    assert any(np.abs(m).max() > 0 for m in moments[0])
    for one, accumulated in zip(*weights):
        assert_close_at_scale(accumulated, one, rtol=1e-5)


def test_clipping_bounds_the_gradient_the_optimizer_sees(tiny_preset, make_config):
    norms = {}
    for clip in (None, 1e-3):
        lm = loading.load_causal_lm(tiny_preset, "float32", sequence_length=64)
        loading.enable_lora(lm, 4, seed=0)
        config = make_config(max_steps=1, max_grad_norm=clip, shuffle=False)
        engines.compile_for_training(lm, config, 1)
        engines.fit(lm, tiny_rows(lm, config, 4), config, verbose=0)
        moment = first_moments(lm)
        beta_1 = float(lm.optimizer.beta_1)
        norms[clip] = math.sqrt(sum(float((m**2).sum()) for m in moment)) / (1 - beta_1)
    assert norms[None] > 10 * 1e-3  # the clip is binding...
    assert norms[1e-3] == pytest.approx(1e-3, rel=1e-4)  # ...and the gradient reaching AdamW has its norm


def test_both_engines_give_the_same_loss_and_gradient_on_the_same_unpacked_rows(tiny_preset, make_config):
    config = make_config(batch_size=4, sequence_length=64, shuffle=False, bucket_by_length=False)
    results = []
    for engine in ("keras", "fast"):
        lm = loading.load_causal_lm(tiny_preset, "float32", sequence_length=64)
        loading.enable_lora(lm, 4, targets=("query", "value", "ffw_linear"), seed=0)
        rows = tiny_rows(lm, config, 4)
        engines.compile_for_training(lm, config)
        if engine == "keras":
            stepper = engines.KerasEngine().stepper(lm, engines.KerasEngine().plan(rows, config))
            batch = np.arange(4)
        else:
            stepper = engines.FastEngine().stepper(lm, engines.FastEngine().plan(rows, config))
            lengths = rows.padding_mask.sum(1)
            segments = (np.arange(64)[None, :] < lengths[:, None]).astype(np.int32)
            batch = {"token_ids": rows.token_ids, "segment_ids": segments, "positions": np.tile(np.arange(64), (4, 1)),
                     "labels": rows.labels, "loss_weights": rows.weights}
        weight = stepper.batch_weight(batch)
        nll, step_weight, loss = stepper.step(batch, 1.0 / weight)
        stepper.sync()
        results.append((loss, step_weight, first_moments(lm)))
    (keras_loss, keras_weight, keras_m), (fast_loss, fast_weight, fast_m) = results
    assert keras_weight == fast_weight == float(rows.weights.sum())
    assert fast_loss == pytest.approx(keras_loss, rel=1e-5)
    for a, b in zip(keras_m, fast_m):
        assert_close_at_scale(b, a, rtol=1e-3)


def test_keep_best_restores_the_weights_of_the_best_evaluation(tiny_lm, make_config, tmp_path):
    """Scripted validation losses (best at step 2 of 5): the kept weights are step 2's, exactly."""
    from gemma_lora.training.checkpoints import BestKeeper

    config = make_config(learning_rate=1e-2, max_steps=5, eval_every=1, keep_best=True, batch_size=2, shuffle=False)
    loading.enable_lora(tiny_lm, 4, seed=0)
    rows = tiny_rows(tiny_lm, config, 12)
    engines.compile_for_training(tiny_lm, config)
    scripted = iter([3.0, 1.0, 2.0, 1.5, 4.0])
    snapshots = {}

    class Snapshot(keras.callbacks.Callback):
        def on_evaluation(self, step, logs):
            snapshots[step] = [np.asarray(v) for v in self.model.trainable_variables]

    keeper = BestKeeper(tmp_path)
    engines.fit(tiny_lm, rows, config, callbacks=[keeper, Snapshot()], verbose=0,
              evaluate=lambda: {"validation_token_loss": next(scripted)})
    assert sorted(snapshots) == [1, 2, 3, 4, 5] and keeper.best_step == 2
    assert not all(np.array_equal(a, b) for a, b in zip(snapshots[2], snapshots[5]))
    assert keeper.restore(tiny_lm) == (2, 1.0)
    for value, kept in zip(tiny_lm.trainable_variables, snapshots[2]):
        np.testing.assert_array_equal(np.asarray(value), kept)
    assert BestKeeper(tmp_path).best_step == 2  # a resumed run knows it from best.npz


def test_recipe_mode_refuses_the_new_controls(make_config):
    from gemma_lora.errors import ConfigError

    with pytest.raises(ConfigError, match="drop --recipe to use lr_schedule, grad_accumulation"):
        make_config(recipe=True, lr_schedule="cosine", grad_accumulation=2)


def test_accumulation_longer_than_the_run_is_refused(tiny_lm, make_config):
    from gemma_lora.errors import ConfigError

    config = make_config(grad_accumulation=50)
    with pytest.raises(ConfigError, match="grad_accumulation=50 needs that many batches"):
        engines.KerasEngine().plan(tiny_rows(tiny_lm, config, 8), config).total_steps()


def test_keras_callbacks_read_the_model_through_jax_state_sync():
    """loop.run points the model's `jax_state_sync` at its engine's `sync`, so that a callback reading
    `self.model` (a checkpoint, keep-best) sees the loop's state. That relies on Keras' `Callback.model`
    calling `jax_state_sync` on every access; this fails if Keras stops doing so."""
    calls = []

    class Model:
        def jax_state_sync(self):
            calls.append("synced")

    callback = keras.callbacks.Callback()
    callback.set_model(Model())
    assert isinstance(callback.model, Model)
    assert calls == ["synced"]
