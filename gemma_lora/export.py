"""Export a merged model to a Hugging Face transformers folder, with KerasHub's own exporter.

    gemma-lora export runs/<run>/adapter.lora.h5 hf_model/   # merge, then export
    gemma-lora export merged/ hf_model/                       # a merged preset directory

    transformers.AutoModelForCausalLM.from_pretrained("hf_model")

KerasHub's Gemma exporter reads each layer's raw kernel variable, so a LoRA
update still attached to a layer would be silently dropped, and a quantized
kernel would be written as its int8 numbers. Only a plain float model (what
`merged_model` returns) is exported; anything else is refused.
"""

import json
from pathlib import Path

from gemma_lora.errors import ExportError, OutputError
from gemma_lora.io import atomic_dir
from gemma_lora.model import lora_layers
from gemma_lora.quantize import quantization_mode


def supported_backbones():
    """Backbone class names KerasHub can export to transformers (Gemma, Gemma 3, ...)."""
    from keras_hub.src.utils.transformers.export import hf_exporter

    return sorted(set(hf_exporter.MODEL_EXPORTERS) & set(hf_exporter.MODEL_CONFIGS))


def export_transformers(causal_lm, output_dir):
    """Write `causal_lm` (weights, config, tokenizer) as a transformers folder, atomically.

    Args:
        causal_lm: a KerasHub CausalLM without LoRA and without quantized weights.
        output_dir: the new folder (must not exist).

    Returns:
        The output directory.

    Raises:
        ExportError: LoRA is still enabled, the weights are quantized, or the
            architecture has no transformers exporter.
        OutputError: `output_dir` exists or cannot be written.
    """
    name = type(causal_lm.backbone).__name__
    if lora_layers(causal_lm):
        raise ExportError(
            f"This model still has LoRA enabled on {len(lora_layers(causal_lm))} layers; KerasHub's exporter would "
            "drop the update. Merge first: `gemma-lora export ADAPTER OUT_DIR` merges for you, or pass "
            "adapters.merged_model(...)."
        )
    mode = quantization_mode(causal_lm)
    if mode is not None:
        raise ExportError(
            f"This model's weights are stored as {mode}; the exporter would write the raw integers. "
            "Export the merged (dequantized, float) model from adapters.merged_model instead."
        )
    if name not in supported_backbones():
        raise ExportError(
            f"KerasHub cannot export a {name} to transformers; it can export {', '.join(supported_backbones())}."
        )
    output_dir = Path(output_dir)
    if output_dir.exists():
        raise OutputError(f"{output_dir} already exists. Give a new directory for the exported model.")
    with atomic_dir(output_dir) as staging:
        causal_lm.export_to_transformers(str(staging))
        _name_architecture(staging / "config.json")
    return output_dir


def _name_architecture(config_file):
    # KerasHub 0.32's Gemma exporter writes no "architectures" (its Gemma 3 one
    # does). transformers goes by model_type, but vLLM and KerasHub's own
    # transformers importer read the architecture name.
    config = json.loads(config_file.read_text())
    if "architectures" not in config and config.get("model_type") == "gemma":
        config["architectures"] = ["GemmaForCausalLM"]
        config_file.write_text(json.dumps(config, indent=2))
