"""A frozen base under mixed precision: projections stored in bfloat16, the same logits, one copy in the fast engine."""

import jax
import numpy as np
import pytest

from gemma_lora import data
from gemma_lora.config import GEMMA_LAYER_NAMES
from gemma_lora.fast import extract
from gemma_lora.model import loading
from gemma_lora.training import engines, scoring


def live_bytes():
    seen, total = set(), 0
    for array in jax.live_arrays():
        for shard in array.addressable_shards:
            pointer = shard.data.unsafe_buffer_pointer()
            if pointer not in seen:
                seen.add(pointer)
                total += shard.data.nbytes
    return total


def with_factors(causal_lm, seed=0):
    """LoRA rank 4 on every projection, with non-zero B factors (so LoRA shows in the logits)."""
    layers = loading.enable_lora(causal_lm, 4, targets=GEMMA_LAYER_NAMES, seed=0)
    rng = np.random.default_rng(seed)
    for layer in layers:
        layer.lora_kernel_b.assign(rng.normal(0, 0.2, layer.lora_kernel_b.shape).astype("float32"))
    return causal_lm


@pytest.mark.slow
def test_projections_in_bfloat16_give_mixed_precisions_logits_bit_for_bit(tiny_preset):
    stock = with_factors(loading.load_causal_lm(tiny_preset, "mixed_bfloat16"))
    frozen = with_factors(loading.load_causal_lm(tiny_preset, "mixed_bfloat16", frozen_base=True))
    dtypes = {v.path.split("/")[-2] + "/" + v.name: v.dtype for v in frozen.backbone.weights}
    assert dtypes["query/kernel"] == "bfloat16" and dtypes["ffw_linear/kernel"] == "bfloat16"
    assert dtypes["query/lora_kernel_a"] == "float32" and dtypes["query/lora_kernel_b"] == "float32"
    assert dtypes["token_embedding/embeddings"] == "float32" and dtypes["pre_attention_norm/scale"] == "float32"
    ids = np.random.default_rng(1).integers(1, 1000, (2, 24)).astype("int32")
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids, bool)}
    np.testing.assert_array_equal(np.asarray(frozen(x), np.float32), np.asarray(stock(x), np.float32))
    held = lambda lm: sum(v.value.nbytes for v in lm.backbone.weights)  # noqa: E731
    assert held(frozen) < 0.8 * held(stock)


def test_the_fast_engine_holds_no_second_copy_of_the_base(tiny_preset, make_config):
    causal_lm = with_factors(loading.load_causal_lm(tiny_preset, "mixed_bfloat16", frozen_base=True))
    config = make_config(lora_targets=list(GEMMA_LAYER_NAMES))
    rows = data.tokenize_rows(data.split(data.load_examples(config), config).train[:8],
                              causal_lm.preprocessor.tokenizer, config)
    engines.compile_for_training(causal_lm, config)
    causal_lm.optimizer.build(causal_lm.trainable_variables)  # Keras' own AdamW slots, before counting
    base = sum(v.value.nbytes for v in causal_lm.backbone.weights if "lora" not in v.name)
    before = live_bytes()
    engine = engines.FastEngine().stepper(causal_lm, engines.FastEngine().plan(rows, config), "mixed_bfloat16")
    added = live_bytes() - before
    state = sum(a.nbytes for a in engine.trainable + engine.optimizer_values)
    assert added <= state + 0.05 * base, (added, state, base)  # the LoRA state, not the base again
    # The check can fail: what the fast engine did before (a float32 base, read cast to
    # bfloat16) holds a second, half-size copy of the whole base.
    stock = with_factors(loading.load_causal_lm(tiny_preset, "mixed_bfloat16"))
    stock_base = sum(v.value.nbytes for v in stock.backbone.weights if "lora" not in v.name)
    before = live_bytes()
    copy = extract.extract_params(stock, GEMMA_LAYER_NAMES, dtype="bfloat16", cast=True)
    assert live_bytes() - before > 0.45 * stock_base
    del copy


@pytest.mark.parametrize("engine", ["keras", "fast"])
def test_both_engines_train_a_bfloat16_stored_base(tiny_preset, make_config, engine):
    causal_lm = loading.load_causal_lm(tiny_preset, "mixed_bfloat16", sequence_length=64, frozen_base=True)
    loading.enable_lora(causal_lm, 8, targets=("query", "value", "ffw_linear"), seed=0)
    config = make_config(learning_rate=1e-2, epochs=6, lora_targets=["query", "value", "ffw_linear"], engine=engine)
    rows = data.tokenize_rows(data.split(data.load_examples(config), config).train[:8],
                              causal_lm.preprocessor.tokenizer, config)
    engines.compile_for_training(causal_lm, config)
    before = scoring.token_loss(causal_lm, rows)["token_loss"]
    frozen = {v.path: np.asarray(v) for v in causal_lm.backbone.weights if "lora" not in v.name}
    engines.fit(causal_lm, rows, config, verbose=0, engine=engines.ENGINES[engine](), precision="mixed_bfloat16")
    assert scoring.token_loss(causal_lm, rows)["token_loss"] < before - 0.2
    for v in causal_lm.backbone.weights:
        if v.path in frozen:
            np.testing.assert_array_equal(np.asarray(v), frozen[v.path], err_msg=v.path)


def test_a_bfloat16_fast_step_gives_float32_s_loss_and_gradients_within_bfloat16_rounding(tiny_preset, make_config):
    # The CPU default on bfloat16 units (mixed_bfloat16) against float32: the same
    # step on the same rows. bfloat16 keeps 8 significant bits (relative rounding
    # 2**-8 = 0.4%). The loss, a mean over every token, averages the rounding
    # out: held to half of that (measured here 3e-5). The LoRA gradient compounds
    # it through the layers: held to 5% of its norm (measured 1.6%) and a cosine of 0.99.
    import jax

    from gemma_lora.training import fast_engine

    config = make_config(lora_targets=["query", "value", "ffw_linear"], engine="fast", batch_size=4)
    results = {}
    for precision in ("float32", "mixed_bfloat16"):
        causal_lm = loading.load_causal_lm(tiny_preset, precision, sequence_length=64, frozen_base=True)
        loading.enable_lora(causal_lm, 8, targets=("query", "value", "ffw_linear"), seed=0)
        for v in causal_lm.trainable_variables:  # B factors away from zero, so gradients reach every factor
            v.assign(np.random.default_rng(len(v.path)).normal(0, 0.05, v.shape).astype("float32"))
        rows = data.tokenize_rows(data.split(data.load_examples(config), config).train[:8],
                                  causal_lm.preprocessor.tokenizer, config)
        engines.compile_for_training(causal_lm, config)
        engine = engines.FastEngine()
        stepper = engine.stepper(causal_lm, engine.plan(rows, config), precision)
        assert all(v.dtype == "float32" for v in stepper.trainable)  # LoRA factors stay float32
        assert stepper.fast_config.dtype == ("float32" if precision == "float32" else "bfloat16")  # the computation's
        batch = {k: jax.numpy.asarray(v) for k, v in fast_engine.epoch_batches(rows, config, 0)[0].items()}

        def loss(trainable):
            lora = fast_engine.lora_tree(stepper.fast_config, stepper.paths, trainable)
            nll, weight = fast_engine.FastForward(stepper.fast_config, stepper.frozen, lora, batch).token_nll_sums()
            return nll / weight

        value, grads = jax.value_and_grad(loss)(stepper.trainable)
        results[precision] = float(value), np.concatenate([np.asarray(g, np.float32).ravel() for g in grads])
    (loss32, grad32), (loss16, grad16) = results["float32"], results["mixed_bfloat16"]
    assert abs(loss16 - loss32) < 2e-3 * abs(loss32), (loss16, loss32)
    assert np.linalg.norm(grad16 - grad32) < 5e-2 * np.linalg.norm(grad32)
    assert grad16 @ grad32 / (np.linalg.norm(grad16) * np.linalg.norm(grad32)) > 0.99
