"""Fold an adapter into its base: W + (alpha/rank)·A·B as a plain KerasHub preset, or as a model in memory.

A quantized base is dequantized first (`quantize.float_kernel`), so the
merged model is float whatever the base was stored as; its metadata.json
records the chat format the adapter was trained on.
"""

import json
from pathlib import Path

from gemma_lora.io import atomic_dir
from gemma_lora.model.layers import layers_with_weights
from gemma_lora.model.presets import CHAT_FORMAT_KEY
from gemma_lora.model.quantize import float_embeddings, float_kernel, quantization_mode


def merge_adapter(causal_lm, preset_dir, output_dir, precision="float32", chat_format=None):
    """Fold W + (alpha/rank)·A·B into a plain model and save it as a KerasHub preset.

    Args:
        causal_lm: the model with the adapter applied (its base may be quantized).
        preset_dir: the base preset directory (a fresh copy without LoRA is loaded from it).
        output_dir: the new preset directory (must not exist).
        precision: dtype of the merged model's weights.
        chat_format: the adapter's `chat_format` ("gemma", "gemma4" or None), recorded
            in the preset's metadata.json so the merged model is used with it.

    Returns:
        The output directory; `keras_hub.models.CausalLM.from_preset(output_dir)`
        loads it with no LoRA.

    Raises:
        OutputError: `output_dir` exists or cannot be written.
    """
    from gemma_lora.errors import OutputError

    output_dir = Path(output_dir)
    if output_dir.exists():
        raise OutputError(f"{output_dir} already exists. Give a new directory for the merged model.")
    plain = merged_model(causal_lm, preset_dir, precision)
    return save_preset(plain, output_dir, chat_format)


def save_preset(causal_lm, output_dir, chat_format=None):
    """Save a whole model as a KerasHub preset directory, atomically (staged, then renamed).

    A `chat_format` ("gemma", "gemma4") is added to the preset's metadata.json, where
    `model.chat_format_of` finds it: KerasHub records no such thing itself.

    Raises:
        OutputError: `output_dir` exists or cannot be written (nothing partial is left).
    """
    from gemma_lora.errors import OutputError

    output_dir = Path(output_dir)
    if output_dir.exists():
        raise OutputError(f"{output_dir} already exists. Give a new directory for the model.")
    with atomic_dir(output_dir) as staging:
        causal_lm.save_to_preset(str(staging))
        if chat_format:
            metadata = staging / "metadata.json"
            metadata.write_text(json.dumps({**json.loads(metadata.read_text()), CHAT_FORMAT_KEY: chat_format}, indent=4))
    return output_dir


def merged_model(causal_lm, preset_dir, precision="float32"):
    """A fresh model from `preset_dir` holding `causal_lm`'s weights with LoRA folded in.

    A quantized base is dequantized: every quantized layer gets its
    dequantized weights (plus the LoRA update where it has one), so the
    merged model computes what the trained model did, in `precision`
    (float32 by default) instead of int8/int4. Layers that were never
    quantized (norms) keep the preset's values, which quantization left as is.
    """
    from gemma_lora.model.loading import load_causal_lm

    quantized = quantization_mode(causal_lm) is not None
    source = layers_with_weights(causal_lm.backbone)
    plain = load_causal_lm(preset_dir, precision)
    target = layers_with_weights(plain.backbone)
    for index, layer in enumerate(source):
        if getattr(layer, "lora_enabled", False) or (quantized and getattr(layer, "quantization_mode", None)):
            if hasattr(layer, "equation"):  # EinsumDense; `kernel` of a float LoRA layer is W + update.
                target[index].kernel.assign(float_kernel(layer))
            else:
                target[index].embeddings.assign(float_embeddings(layer))
    return plain
