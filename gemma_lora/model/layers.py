"""Walking a KerasHub backbone's layers: the numbering LoRA files use, and the layers with LoRA.

Below `model`, `quantize`, `adapters` and `export`, which all need these
walks, so none of them imports another for them.
"""


def layers_with_weights(backbone):
    """The backbone's layers in the order KerasHub numbers them in LoRA files.

    `_flatten_layers` filtered to layers with weights is the walk KerasHub's
    own `save_lora_weights` and `load_lora_weights` use; the same numbering
    keeps adapter files interchangeable.
    """
    return [layer for layer in backbone._flatten_layers(include_self=False) if layer.weights]


def lora_layers(causal_lm):
    return [layer for layer in layers_with_weights(causal_lm.backbone) if getattr(layer, "lora_enabled", False)]


def model_inputs(causal_lm, token_ids, padding_mask):
    """The inputs dict the model takes for these token ids: Gemma 4's backbone also takes `position_ids`.

    Rows are left-aligned (padding at the end), so each token's position is
    its index, as KerasHub's Gemma4CausalLMPreprocessor writes them. Shapes
    are static even inside a jitted step, so the positions are a constant.
    """
    inputs = {"token_ids": token_ids, "padding_mask": padding_mask}
    if "position_ids" in causal_lm.backbone.input:
        import numpy as np

        positions = np.arange(token_ids.shape[1], dtype="int32")[None, :]
        inputs["position_ids"] = np.broadcast_to(positions, token_ids.shape)
    return inputs
