"""Training on the tiny preset: LoRA checklist items 2, 5, 7; true per-token loss; NaN stop."""

import jax
import numpy as np
import pytest

from gemma_lora import data
from gemma_lora.model import loading
from gemma_lora.training import batching, engines, scoring


def tiny_rows(causal_lm, config, n=16):
    examples = data.split(data.load_examples(config), config).train[:n]
    return data.tokenize_rows(examples, causal_lm.preprocessor.tokenizer, config)


def test_frozen_weights_are_bit_identical_and_every_adapter_weight_changes(tiny_lm, make_config):
    config = make_config(learning_rate=1e-3)
    layers = loading.enable_lora(tiny_lm, 4, seed=0)
    lora_ids = {id(v) for layer in layers for v in (layer.lora_kernel_a, layer.lora_kernel_b)}
    frozen = {v.path: np.array(v) for v in tiny_lm.weights if id(v) not in lora_ids}
    adapters = {v.path: np.array(v) for v in tiny_lm.weights if id(v) in lora_ids}
    engines.compile_for_training(tiny_lm, config)
    engines.fit(tiny_lm, tiny_rows(tiny_lm, config, 8), config, verbose=0)
    after = {v.path: np.array(v) for v in tiny_lm.weights}
    for path, value in frozen.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)
    for path, value in adapters.items():
        assert not np.array_equal(after[path], value), f"{path} did not change"
    assert len(adapters) == 8


def test_loss_goes_down_on_a_small_fixed_dataset(tiny_lm, make_config):
    config = make_config(learning_rate=1e-2, epochs=10, batch_size=4)
    loading.enable_lora(tiny_lm, 8, targets=("query", "value", "ffw_linear"), seed=0)
    rows = tiny_rows(tiny_lm, config, 8)
    engines.compile_for_training(tiny_lm, config)
    before = scoring.token_loss(tiny_lm, rows)["token_loss"]
    engines.fit(tiny_lm, rows, config, verbose=0)
    after = scoring.token_loss(tiny_lm, rows)["token_loss"]
    assert after < before - 0.3, (before, after)  # ~0.65 nats on this setup


def test_the_train_step_compiles_once_per_batch_length(tiny_lm, make_config):
    """One trace per distinct (rounded) batch length; more epochs, and a padded last batch, add none.

    Traces, not XLA compilations, are counted: the tests' persistent
    compilation cache would hide a recompilation, never a retrace.
    """
    compiles = []

    def count_train_step_traces(event, duration, fun_name="", **kwargs):
        if event == "/jax/core/compile/jaxpr_trace_duration" and fun_name == "train_step":
            compiles.append(fun_name)

    jax.monitoring.register_event_duration_secs_listener(count_train_step_traces)
    loading.enable_lora(tiny_lm, 4, seed=0)
    config = make_config(batch_size=4, sequence_length=192, epochs=2)
    rows = tiny_rows(tiny_lm, config, 10)  # 10 rows: the last batch is padded to 4
    lengths = {batching.batch_arrays(rows, b, 4)[1].shape[1] for b in batching.epoch_batches(rows, config, 0)}
    engines.compile_for_training(tiny_lm, config)
    engines.fit(tiny_lm, rows, make_config(batch_size=4, sequence_length=192, epochs=1), verbose=0)
    first = len(compiles)
    engines.fit(tiny_lm, rows, config, verbose=0)
    assert first == len(lengths)
    assert len(compiles) == first, f"{len(compiles) - first} extra traces"


def test_epoch_batches_hold_every_row_once_and_cut_only_padding(tiny_lm, make_config):
    config = make_config(batch_size=4, sequence_length=192)
    rows = tiny_rows(tiny_lm, config, 16)
    lengths = rows.padding_mask.sum(1)
    batches = batching.epoch_batches(rows, config, epoch=0)
    assert sorted(np.concatenate(batches).tolist()) == list(range(16))
    assert all(np.array_equal(a, b) for a, b in zip(batches, batching.epoch_batches(rows, config, epoch=0)))
    assert not all(np.array_equal(a, b) for a, b in zip(batches, batching.epoch_batches(rows, config, epoch=1)))
    # Sorted by length: no batch's rows straddle another batch's lengths.
    spans = sorted((lengths[b].min(), lengths[b].max()) for b in batches)
    assert all(high <= next_low for (_, high), (next_low, _) in zip(spans, spans[1:]))
    trimmed = [batching.batch_arrays(rows, b, 4) for b in batches]
    assert min(t[1].shape[1] for t in trimmed) < 192  # something was cut...
    assert sum(t[2].sum() for t in trimmed) == rows.weights.sum()  # ...and no weighted token
    recipe = make_config(batch_size=4, sequence_length=192, bucket_by_length=False, shuffle=False)
    assert [b.tolist() for b in batching.epoch_batches(rows, recipe, 0)] == [list(range(i, i + 4)) for i in (0, 4, 8, 12)]


def test_token_loss_is_the_mean_over_weighted_tokens(tiny_lm, make_config):
    config = make_config(sequence_length=192)
    rows = tiny_rows(tiny_lm, config, 5)
    assert rows.padding_mask.sum(1).min() < 128  # the scorer trims some batches
    result = scoring.token_loss(tiny_lm, rows, batch_size=2)  # 5 rows: a padded last batch
    logits = np.asarray(tiny_lm(rows.x), dtype=np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(log_probs, rows.labels[..., None], -1)[..., 0]
    expected = (nll * rows.weights).sum() / rows.weights.sum()
    assert result["token_loss"] == pytest.approx(expected, rel=1e-4)
    assert result["tokens"] == rows.loss_tokens
    np.testing.assert_allclose(result["row_losses"], (nll * rows.weights).sum(1) / rows.weights.sum(1), rtol=1e-4)


def test_scoring_the_same_rows_with_the_same_weights_again_is_not_recomputed(tiny_lm, make_config, monkeypatch):
    """The pipeline's "after" scores right after the end-of-training validation reuse it; any change scores again."""
    rows = tiny_rows(tiny_lm, make_config(sequence_length=64), 4)
    first = scoring.token_loss(tiny_lm, rows, batch_size=2)
    calls = []
    scorer = scoring._scorer
    monkeypatch.setattr(scoring, "_scorer", lambda lm: calls.append(1) or scorer(lm))
    again = scoring.token_loss(tiny_lm, rows, batch_size=2)
    assert calls == [] and again["token_loss"] == first["token_loss"]
    again["row_losses"][:] = 0  # a caller's copy: the remembered result is unchanged
    assert scoring.token_loss(tiny_lm, rows, batch_size=2)["row_losses"].tolist() == first["row_losses"].tolist()
    scoring.token_loss(tiny_lm, rows, batch_size=4)  # another batch size (other padding): scored
    assert calls == [1]
    variable = tiny_lm.trainable_variables[0]
    variable.assign(variable.value + 0.5)  # new weights: scored again, with a new result
    changed = scoring.token_loss(tiny_lm, rows, batch_size=2)
    assert calls == [1, 1] and changed["token_loss"] != first["token_loss"]
    variable.assign(variable.value - 0.5)


def test_training_minimises_the_per_token_loss_and_only_the_recipe_keeps_keras_padded_loss(tiny_lm, make_config):
    """Both engines' objective is the mean over loss-carrying tokens; --recipe keeps stock Keras' loss,
    which divides by every position, padding included (so it reads lower than the per-token loss)."""
    config = make_config(learning_rate=1e-9, batch_size=4, shuffle=False, bucket_by_length=False)
    loading.enable_lora(tiny_lm, 4, seed=0)
    rows = tiny_rows(tiny_lm, config, 4)
    engines.compile_for_training(tiny_lm, config)
    expected = scoring.token_loss(tiny_lm, rows)["token_loss"]
    logs = engines.fit(tiny_lm, rows, config, verbose=0).history
    assert logs["token_loss"][0] == pytest.approx(expected, rel=1e-3)
    assert logs["loss"][0] == pytest.approx(expected, rel=1e-3)
    padding_share = 1 - rows.weights.sum() / rows.weights.size
    recipe = make_config(recipe=True, learning_rate=1e-9, batch_size=4, limit=8, response_only_loss=True)
    engines.compile_for_training(tiny_lm, recipe)
    logs = engines.fit(tiny_lm, rows, recipe, verbose=0).history
    assert padding_share > 0.2 and logs["loss"][0] < 0.9 * expected  # the stock quirk, kept in recipe mode


def test_a_nan_loss_stops_training_without_a_checkpoint(tmp_path, tiny_lm, make_config):
    from gemma_lora.training.checkpoints import Checkpointer

    config = make_config(batch_size=4)
    layers = loading.enable_lora(tiny_lm, 4, seed=0)
    layers[0].lora_kernel_b.assign(np.full(layers[0].lora_kernel_b.shape, np.nan, "float32"))
    guard = Checkpointer(tmp_path, every=1, steps_per_epoch=4)
    engines.compile_for_training(tiny_lm, config)
    engines.fit(tiny_lm, tiny_rows(tiny_lm, config, 16), config, callbacks=[guard], verbose=0)
    assert guard.bad_step == 1 and guard.batches_done == 1
    assert guard.last_saved is None and not (tmp_path / "checkpoints").exists()


def test_shuffling_is_seeded(tiny_lm, make_config):
    """Same seed, same adapter; shuffling changes the result (the order really changed)."""
    import keras

    layers = loading.enable_lora(tiny_lm, 4, seed=0)
    start = [np.array(v) for v in tiny_lm.trainable_weights]
    config = make_config(learning_rate=1e-2, epochs=2, batch_size=4)
    rows = tiny_rows(tiny_lm, config, 8)

    def adapter_after(shuffle, seed):
        for variable, value in zip(tiny_lm.trainable_weights, start):
            variable.assign(value)
        run_config = make_config(learning_rate=1e-2, epochs=2, batch_size=4, shuffle=shuffle, seed=seed)
        engines.compile_for_training(tiny_lm, run_config)
        keras.utils.set_random_seed(seed)
        engines.fit(tiny_lm, rows, run_config, verbose=0)
        return np.concatenate([np.ravel(v) for v in tiny_lm.trainable_weights])

    first = adapter_after(True, 1)
    np.testing.assert_array_equal(adapter_after(True, 1), first)
    assert not np.allclose(adapter_after(False, 1), first, atol=1e-6)
    assert len(layers) == 4
