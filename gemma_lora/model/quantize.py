"""Quantized frozen base for LoRA (QLoRA-style): int8 or int4 weights, float LoRA factors.

    causal_lm = load_causal_lm(preset_dir, quantize="int4")   # quantize_base(), then
    enable_lora(causal_lm, rank=4)                             # LoRA on the quantized layers

Order matters: quantize first, then enable LoRA. Keras' quantized EinsumDense
adds the float32 LoRA path on top of the int8/int4 kernel (`_int8_call`,
`_int4_call`), and `enable_lora` after int4 uses the unpacked kernel shape.
Quantizing a model that already has LoRA rebuilds the kernels and loses the
factors' link to them (keras-hub #1705 shows the save/reload half of that
story), so `quantize_base` refuses it.

Quantization is weight-only: activations stay in the compute dtype. That is
QLoRA's scheme (low-bit storage, dequantized compute), gradients reach the
LoRA factors through unrounded activations, and a merged model (dequantized
weights + LoRA update, in float) gives the trained model's logits.
"""

import numpy as np

from gemma_lora import runtime
from gemma_lora.errors import ConfigError
from gemma_lora.model.gemma4 import quantize_problem
from gemma_lora.model.layers import lora_layers

runtime.ensure_runtime()

import keras  # noqa: E402
from keras import ops  # noqa: E402

MODES = ("int8", "int4")


def quantize_base(causal_lm, mode):
    """Quantize the backbone's Dense/EinsumDense/Embedding weights in place (weight-only).

    Args:
        causal_lm: a CausalLM without LoRA.
        mode: "int8" or "int4" (int4 in blocks of 128 inputs, Keras' default).

    Raises:
        ConfigError: unknown mode, LoRA is already enabled, or a Gemma 4
            (whose KerasHub decoder block would read the integers unscaled).
    """
    if mode not in MODES:
        raise ConfigError(f"quantize={mode!r} must be one of {', '.join(MODES)} (or None for no quantization).")
    problem = quantize_problem(causal_lm.backbone)
    if problem:
        raise ConfigError(problem)
    if lora_layers(causal_lm):
        raise ConfigError("Quantize the base before enabling LoRA: load a fresh model with quantize=..., then enable_lora.")
    if mode == "int8":
        config = keras.quantizers.Int8QuantizationConfig(activation_quantizer=None)
    else:
        config = keras.quantizers.Int4QuantizationConfig(activation_quantizer=None)
    # Norm and input layers have no quantized form; Keras warns once per layer.
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have a `quantize` method")
        causal_lm.backbone.quantize(mode, config=config)
    causal_lm.generate_function = None  # A compiled generate would still hold the float weights.
    return causal_lm


def quantization_mode(causal_lm):
    """"int8", "int4" or None: how the backbone's weights are stored."""
    modes = {
        layer.quantization_mode
        for layer in causal_lm.backbone._flatten_layers(include_self=False)
        if getattr(layer, "quantization_mode", None)
    }
    return modes.pop() if modes else None  # quantize_base sets one mode for all layers.


def float_kernel(layer):
    """The float32 kernel a (possibly quantized) EinsumDense applies, LoRA update included.

    Keras has no public dequantize; this follows the first step of its own
    `EinsumDense._get_kernel_with_merged_lora` (keras 3.15), which
    dequantizes before re-quantizing a merged kernel. The tests compare the
    result with the quantized layer's own outputs, so a change there fails
    loudly.
    """
    from keras.src import quantizers

    mode = layer.quantization_mode
    if mode is None:
        return np.asarray(layer.kernel, "float32")
    if mode == "int8":
        kernel = ops.divide(ops.cast(layer._kernel, "float32"), layer._adjust_scale_for_dequant(layer.kernel_scale))
    elif mode == "int4":
        unpacked = ops.cast(quantizers.unpack_int4(layer._kernel, layer._int4_unpacked_column_size, axis=-1), "float32")
        block = getattr(layer, "_int4_block_size", None)
        if block in (None, -1):
            flat = ops.divide(unpacked, layer.kernel_scale)
        else:
            flat = quantizers.dequantize_with_sz_map(unpacked, layer.kernel_scale, layer.kernel_zero, layer.g_idx, group_axis=0)
        kernel = ops.reshape(flat, layer.original_kernel_shape)
    else:
        raise ConfigError(f"Cannot dequantize a {mode} layer ({layer.path}); only int8 and int4 are supported.")
    if layer.lora_enabled:
        kernel = kernel + (layer.lora_alpha / layer.lora_rank) * ops.matmul(layer.lora_kernel_a, layer.lora_kernel_b)
    return np.asarray(kernel, "float32")


def float_embeddings(layer):
    """The float32 table a (possibly quantized) embedding layer looks tokens up in.

    Looking up every token id returns the table as the layer's own call
    dequantizes it, with public API only.
    """
    ids = np.arange(layer.input_dim, dtype="int32")
    return np.asarray(ops.cast(layer(ids), "float32"))


def base_weight_bytes(causal_lm):
    """Bytes held by the backbone's variables, LoRA factors excluded."""
    lora = set()
    for layer in lora_layers(causal_lm):
        lora |= {id(layer.lora_kernel_a), id(layer.lora_kernel_b)}
    return sum(w.value.nbytes for w in causal_lm.backbone.weights if id(w) not in lora)
