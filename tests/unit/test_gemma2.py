"""Gemma 2 through the Keras engine and the pipeline: the LoRA checklist (STYLE.md) on tiny_gemma2.

tiny_gemma2 is the tiny preset with Gemma 2's architecture as KerasHub builds
gemma2_2b_en (post norms, attention and final soft caps, layer 0 sliding with
a window shorter than the rows, layer 1 global, 2 KV heads). The fast path's
math is checked against KerasHub in test_fast.py, decoding in test_decode.py,
the layout map in test_distribute.py, exports in test_export*.py.
"""

import jax
import keras_hub
import numpy as np
import pytest
from numerics import assert_close_at_scale
from test_loop import first_moments
from test_model import hand_count_lora

from gemma_lora import data
from gemma_lora.adapters import files, merge, store
from gemma_lora.errors import ConfigError
from gemma_lora.model import layers, loading
from gemma_lora.model.quantize import quantization_mode
from gemma_lora.training import engines, scoring

ALL = ("query", "key", "value", "attention_output", "ffw_gating", "ffw_gating_2", "ffw_linear")
TOKENS = {"token_ids": np.array([[2, 300, 301, 302, 4, 5, 6, 7] * 3], "int32"), "padding_mask": np.ones((1, 24), bool)}


def fresh(preset, **kwargs):
    return loading.load_causal_lm(preset, "float32", **kwargs)


def logits(causal_lm):
    return np.asarray(causal_lm(TOKENS))


def rows_of(causal_lm, config, n=8):
    examples = data.split(data.load_examples(config), config).train[:n]
    return data.tokenize_rows(examples, causal_lm.preprocessor.tokenizer, config)


def trained_like(causal_lm, targets=ALL, alpha=8.0, seed=0):
    layers = loading.enable_lora(causal_lm, 4, alpha, targets, seed=seed)
    rng = np.random.default_rng(seed)
    for layer in layers:
        layer.lora_kernel_b.assign(rng.normal(0, 0.2, layer.lora_kernel_b.shape).astype("float32"))
    return causal_lm


def test_tiny_gemma2_is_a_gemma2(tiny_gemma2_preset):
    backbone = fresh(tiny_gemma2_preset).backbone
    assert type(backbone).__name__ == "GemmaBackbone"
    assert backbone.use_post_attention_norm and backbone.use_post_ffw_norm
    assert (backbone.attention_logit_soft_cap, backbone.final_logit_soft_cap) == (50.0, 30.0)
    assert [b.attention.use_sliding_window_attention for b in backbone.transformer_layers] == [True, False]
    assert backbone.num_key_value_heads == 2


def test_trainable_parameters_match_the_hand_count_and_targets_are_gemma_layers(tiny_gemma2_preset):
    """Checklist 1 and 6: Gemma 2's LoRA-able layers are Gemma's seven; another name is refused, listing them."""
    causal_lm = fresh(tiny_gemma2_preset)
    expected = hand_count_lora(causal_lm.backbone, 8, ALL)
    layers = loading.enable_lora(causal_lm, 8, targets=ALL)
    assert loading.parameter_summary(causal_lm)["trainable_parameters"] == expected
    assert len(layers) == 2 * len(ALL)
    with pytest.raises(ConfigError, match=r"\['post_ffw_norm'\] match no LoRA-able layer of this GemmaBackbone. LoRA-able "
                                          r"layers here: attention_output, ffw_gating, ffw_gating_2, ffw_linear, key"):
        loading.enable_lora(fresh(tiny_gemma2_preset), 4, targets=("query", "post_ffw_norm"))


def test_keras_engine_keeps_the_base_changes_every_factor_lowers_the_loss_and_compiles_once(
        tiny_gemma2_preset, make_config):
    """Checklist 2, 5 and 7 on the Keras engine."""
    traces = []

    def count(event, duration, fun_name="", **kwargs):
        if event == "/jax/core/compile/jaxpr_trace_duration" and fun_name == "train_step":
            traces.append(fun_name)

    jax.monitoring.register_event_duration_secs_listener(count)
    causal_lm = fresh(tiny_gemma2_preset, sequence_length=64)
    config = make_config(preset="tiny_gemma2", learning_rate=1e-2, epochs=6, batch_size=4, bucket_by_length=False)
    layers = loading.enable_lora(causal_lm, 8, targets=("query", "value", "ffw_linear"), seed=0)
    lora_ids = {id(v) for layer in layers for v in (layer.lora_kernel_a, layer.lora_kernel_b)}
    frozen = {v.path: np.array(v) for v in causal_lm.weights if id(v) not in lora_ids}
    factors = {v.path: np.array(v) for v in causal_lm.weights if id(v) in lora_ids}
    rows = rows_of(causal_lm, config)
    engines.compile_for_training(causal_lm, config)
    before = scoring.token_loss(causal_lm, rows)["token_loss"]
    engines.fit(causal_lm, rows, config, verbose=0)
    after = scoring.token_loss(causal_lm, rows)["token_loss"]
    assert after < before - 0.3, (before, after)
    weights = {v.path: np.array(v) for v in causal_lm.weights}
    for path, value in frozen.items():
        np.testing.assert_array_equal(weights[path], value, err_msg=path)
    assert all(not np.array_equal(weights[p], v) for p, v in factors.items())
    assert len(traces) == 1  # six epochs of one batch shape: one trace


@pytest.mark.slow
def test_both_engines_give_the_same_loss_and_gradient(tiny_gemma2_preset, make_config):
    """The fast engine (soft caps, window, post norms in JAX) steps as KerasHub's model does."""
    config = make_config(preset="tiny_gemma2", batch_size=4, sequence_length=64, shuffle=False, bucket_by_length=False)
    results = []
    for engine in ("keras", "fast"):
        causal_lm = fresh(tiny_gemma2_preset, sequence_length=64)
        loading.enable_lora(causal_lm, 4, targets=ALL, seed=0)
        rows = rows_of(causal_lm, config, 4)
        engines.compile_for_training(causal_lm, config)
        if engine == "keras":
            stepper, batch = engines.KerasEngine().stepper(causal_lm, engines.KerasEngine().plan(rows, config)), np.arange(4)
        else:
            stepper = engines.FastEngine().stepper(causal_lm, engines.FastEngine().plan(rows, config))
            lengths = rows.padding_mask.sum(1)
            batch = {"token_ids": rows.token_ids, "labels": rows.labels, "loss_weights": rows.weights,
                     "segment_ids": (np.arange(64)[None, :] < lengths[:, None]).astype(np.int32),
                     "positions": np.tile(np.arange(64), (4, 1))}
        _, weight, loss = stepper.step(batch, 1.0 / stepper.batch_weight(batch))
        stepper.sync()
        results.append((loss, weight, first_moments(causal_lm)))
    (keras_loss, keras_weight, keras_m), (fast_loss, fast_weight, fast_m) = results
    assert keras_weight == fast_weight
    assert fast_loss == pytest.approx(keras_loss, rel=1e-5)
    for a, b in zip(keras_m, fast_m):
        assert_close_at_scale(b, a, rtol=1e-3)


def test_adapter_reloads_onto_a_fresh_base_and_merges(tmp_path, tiny_gemma2_preset, make_config):
    """Checklist 3 and 4."""
    source = trained_like(fresh(tiny_gemma2_preset))
    store.save_adapter(source, tmp_path, make_config(preset="tiny_gemma2", lora_alpha=8.0, lora_targets=list(ALL)))
    target = fresh(tiny_gemma2_preset)
    assert np.abs(logits(target) - logits(source)).max() > 1e-2
    meta = store.load_adapter(target, tmp_path / files.ADAPTER_FILE)
    np.testing.assert_array_equal(logits(target), logits(source))
    assert meta["base_preset"] == "tiny_gemma2"
    merged = keras_hub.models.CausalLM.from_preset(str(merge.merge_adapter(source, tiny_gemma2_preset, tmp_path / "m")))
    assert not layers.lora_layers(merged) and merged.backbone.final_logit_soft_cap == 30.0
    np.testing.assert_allclose(logits(merged), logits(source), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_quantized_gemma2_trains_and_merges_to_float(tmp_path, tiny_gemma2_preset, make_config):
    config = make_config(preset="tiny_gemma2", quantize="int8", learning_rate=1e-2, epochs=2, lora_alpha=8.0,
                         lora_targets=list(ALL), batch_size=4, bucket_by_length=False)
    source = fresh(tiny_gemma2_preset, sequence_length=64, quantize="int8")
    assert quantization_mode(source) == "int8"
    loading.enable_lora(source, 4, 8.0, ALL, seed=0)
    rows = rows_of(source, config, 4)
    engines.compile_for_training(source, config)
    before = scoring.token_loss(source, rows)["token_loss"]
    engines.fit(source, rows, config, verbose=0)
    assert scoring.token_loss(source, rows)["token_loss"] < before
    # (Reloading onto a fresh quantized base is the same KerasHub code for every Gemma: test_quantize.py.)
    merged = keras_hub.models.CausalLM.from_preset(str(merge.merge_adapter(source, tiny_gemma2_preset, tmp_path / "m")))
    assert quantization_mode(merged) is None
    np.testing.assert_allclose(logits(merged), logits(source), atol=1e-4 * np.abs(logits(source)).max())
