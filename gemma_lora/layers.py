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
