"""Quantized base + LoRA (QLoRA-style), int8 and int4: train, save/reload, merge, checks."""

import json

import keras_hub
import numpy as np
import pytest

from gemma_lora import data
from gemma_lora.adapters import files, merge, store
from gemma_lora.errors import AdapterError, ConfigError
from gemma_lora.model import layers, loading
from gemma_lora.model.quantize import (
    base_weight_bytes,
    quantization_mode,
    quantize_base,
)
from gemma_lora.training import engines, scoring

TOKENS = {"token_ids": np.array([[2, 300, 301, 302, 4, 5, 6, 7]], "int32"), "padding_mask": np.ones((1, 8), bool)}
TARGETS = ("query", "value", "ffw_linear")
MODES = ("int8", "int4")


def logits(causal_lm):
    return np.asarray(causal_lm(TOKENS))


def quantized(tiny_preset, mode):
    return loading.load_causal_lm(tiny_preset, "float32", quantize=mode)


def with_adapter(causal_lm, seed=0):
    """LoRA with non-zero B factors, a stand-in for training."""
    layers = loading.enable_lora(causal_lm, 4, 8.0, TARGETS, seed=seed)
    rng = np.random.default_rng(seed)
    for layer in layers:
        layer.lora_kernel_b.assign(rng.normal(0, 0.5, layer.lora_kernel_b.shape).astype("float32"))
    return causal_lm


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_training_lowers_the_loss_and_leaves_the_quantized_base_untouched(tiny_preset, make_config, mode):
    causal_lm = quantized(tiny_preset, mode)
    full = loading.load_causal_lm(tiny_preset, "float32")
    assert quantization_mode(full) is None and quantization_mode(causal_lm) == mode
    kernel = causal_lm.backbone.get_layer("decoder_block_0").attention.query_dense._kernel
    assert kernel.dtype == "int8"  # int4 packs two values per int8
    ratio = base_weight_bytes(causal_lm) / base_weight_bytes(full)
    assert ratio < (0.35 if mode == "int8" else 0.25), ratio

    config = make_config(learning_rate=1e-2, epochs=4, quantize=mode)
    layers = loading.enable_lora(causal_lm, 8, targets=TARGETS, seed=0)
    lora_ids = {id(v) for layer in layers for v in (layer.lora_kernel_a, layer.lora_kernel_b)}
    assert {id(v) for v in causal_lm.trainable_weights} == lora_ids
    frozen = {v.path: np.array(v) for v in causal_lm.weights if id(v) not in lora_ids}
    factors = {v.path: np.array(v) for v in causal_lm.weights if id(v) in lora_ids}
    examples = data.split(data.load_examples(config), config).train[:8]
    rows = data.tokenize_rows(examples, causal_lm.preprocessor.tokenizer, config)
    engines.compile_for_training(causal_lm, config)
    before = scoring.token_loss(causal_lm, rows)["token_loss"]
    engines.fit(causal_lm, rows, config, verbose=0)
    after = scoring.token_loss(causal_lm, rows)["token_loss"]
    assert after < before - 0.1, (before, after)
    weights = {v.path: np.array(v) for v in causal_lm.weights}
    for path, value in frozen.items():
        np.testing.assert_array_equal(weights[path], value, err_msg=path)
    assert all(not np.array_equal(weights[p], v) for p, v in factors.items())


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_adapter_reloads_onto_a_fresh_quantized_base_and_merges_to_float(tmp_path, tiny_preset, make_config, mode):
    source = with_adapter(quantized(tiny_preset, mode))
    store.save_adapter(source, tmp_path, make_config(lora_alpha=8.0, lora_targets=list(TARGETS), quantize=mode))
    assert json.loads((tmp_path / files.METADATA_FILE).read_text())["quantize"] == mode
    target = quantized(tiny_preset, mode)
    quantized_base = logits(target)
    store.load_adapter(target, tmp_path / files.ADAPTER_FILE)
    np.testing.assert_array_equal(logits(target), logits(source))
    # A float base would give other logits: refused, naming the fix.
    float_base = loading.load_causal_lm(tiny_preset, "float32")
    with pytest.raises(AdapterError, match=f"trained on a base stored as {mode}.*--quantize {mode}"):
        store.load_adapter(float_base, tmp_path / files.ADAPTER_FILE)

    out = merge.merge_adapter(source, tiny_preset, tmp_path / "merged")
    merged = keras_hub.models.CausalLM.from_preset(str(out))
    assert quantization_mode(merged) is None and not layers.lora_layers(merged)
    assert all(w.dtype == "float32" for w in merged.backbone.weights)
    # The merge reproduces the quantized model with its adapter (float rounding
    # apart), and differs from the float base and from the quantized base alone.
    tolerance = 1e-4 * np.abs(logits(source)).max()
    np.testing.assert_allclose(logits(merged), logits(source), atol=tolerance)
    assert np.abs(logits(merged) - logits(float_base)).max() > 100 * tolerance
    assert np.abs(logits(merged) - quantized_base).max() > 100 * tolerance


def test_bad_mode_and_wrong_order(tiny_preset, make_config):
    with pytest.raises(ConfigError, match="quantize='int3' must be one of int8, int4 or None"):
        make_config(quantize="int3")
    causal_lm = loading.load_causal_lm(tiny_preset, "float32")
    loading.enable_lora(causal_lm, 4)
    with pytest.raises(ConfigError, match="Quantize the base before enabling LoRA"):
        quantize_base(causal_lm, "int8")
