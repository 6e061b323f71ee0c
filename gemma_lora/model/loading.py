"""Load a preset directory as a KerasHub CausalLM in a precision, enable LoRA on it, count its parameters.

`presets.resolve_preset` turns a name into the directory this loads; under
`mixed_bfloat16` a frozen base keeps its projections in bfloat16
(`frozen_base_policy`), and LoRA factors are float32 whatever the policy.
"""

import contextlib

from gemma_lora import runtime
from gemma_lora.config import GEMMA_LAYER_NAMES
from gemma_lora.errors import ConfigError, PresetError
from gemma_lora.model import gemma4
from gemma_lora.model.layers import lora_layers

runtime.ensure_runtime()

import keras  # noqa: E402
import keras_hub  # noqa: E402


def load_causal_lm(preset_dir, precision="float32", sequence_length=None, quantize=None, frozen_base=False):
    """Load a KerasHub CausalLM from a local preset directory (a Gemma 4 one as its text stack, see gemma4.py).

    Args:
        preset_dir: directory from `resolve_preset`.
        precision: Keras dtype policy name ("float32", "bfloat16", "mixed_bfloat16").
        sequence_length: int or None; set on the preprocessor (generation length cap).
        quantize: None, "int8" or "int4": store the (frozen) base weights
            quantized, before any LoRA is enabled (see quantize.py).
        frozen_base: bool, default False. The base will not be trained (LoRA,
            generation): under mixed_bfloat16 its projection matrices are
            stored in bfloat16 instead of float32 (`frozen_base_policy`).
    """
    dtype = frozen_base_policy(precision) if frozen_base else precision
    # Gemma 4: KerasHub's CausalLM.from_preset would pick Gemma4AssistantCausalLM, so
    # the class comes from the preset; a multimodal one is loaded as its text stack.
    try:
        if gemma4.task_class(preset_dir) is None:
            causal_lm = keras_hub.models.CausalLM.from_preset(str(preset_dir), dtype=dtype)
        elif gemma4.has_encoders(preset_dir):
            causal_lm = gemma4.load_text_model(preset_dir, dtype)
        else:
            causal_lm = gemma4.from_preset(preset_dir, dtype)
    except (ValueError, OSError, KeyError) as e:
        raise PresetError(f"Cannot load the preset in {preset_dir}: {e}") from None
    if sequence_length and causal_lm.preprocessor is not None:
        causal_lm.preprocessor.sequence_length = sequence_length
    if quantize is not None:
        from gemma_lora.model.quantize import quantize_base

        quantize_base(causal_lm, quantize)
    return causal_lm


def frozen_base_policy(precision):
    """The dtype policy of a model whose base is frozen: `precision`, with projections stored in its compute dtype.

    Under mixed_bfloat16 Keras keeps float32 variables and casts each
    projection matrix to bfloat16 every time it is used, so storing them in
    bfloat16 gives the same logits, bit for bit, from half their memory (a
    gemma_2b_en base: 6.1 GB instead of 10; a fast-engine run no longer holds
    a bfloat16 copy beside the float32 one). The token embedding and the norm
    scales stay float32: KerasHub does not autocast them, so storing them in
    bfloat16 would change the logits.
    """
    if precision != "mixed_bfloat16":
        return precision
    policy = keras.dtype_policies.DTypePolicyMap(default_policy=keras.dtype_policies.DTypePolicy(precision))
    policy[f".*/({'|'.join(GEMMA_LAYER_NAMES)})"] = keras.dtype_policies.DTypePolicy("bfloat16")
    return policy


def enable_lora(causal_lm, rank, alpha=None, targets=("query", "value"), seed=None):
    """Freeze the backbone and add LoRA factors to the named layers.

    Uses KerasHub's `Backbone.enable_lora`, so its `save_lora_weights` and
    `load_lora_weights` work unchanged. KerasHub does not pass `lora_alpha`
    on; Keras layers keep it as the public `lora_alpha` attribute and scale
    the update by alpha/rank, so alpha is set on each layer afterwards.

    Returns:
        The list of layers that got LoRA.

    Raises:
        ConfigError: a target name matches no layer of this model.
    """
    backbone = causal_lm.backbone
    # Only layers that take LoRA count: KerasHub skips any other named layer
    # silently (Gemma 2's and 3's post_attention_norm / post_ffw_norm are layers too).
    names = _einsum_names(backbone)
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise ConfigError(
            f"lora_targets {unknown} match no LoRA-able layer of this {type(backbone).__name__}. "
            f"LoRA-able layers here: {', '.join(sorted(names))}."
        )
    if seed is not None:
        keras.utils.set_random_seed(seed)  # LoRA A factors are randomly initialised.
    with _float32_lora_variables(backbone, targets):
        backbone.enable_lora(rank, target_layer_names=list(targets))
    layers = lora_layers(causal_lm)
    if alpha is not None:
        for layer in layers:
            layer.lora_alpha = float(alpha)
    return layers


@contextlib.contextmanager
def _float32_lora_variables(backbone, targets):
    """LoRA factors in float32 even on projections stored in bfloat16 (`frozen_base_policy`).

    Keras creates a layer's LoRA variables in the layer's variable dtype; for
    the time of `enable_lora` a bfloat16-stored target layer gets the mixed
    policy (float32 variables, the same bfloat16 compute), then its own back.
    AdamW steps smaller than ~1/256 of a factor would round away in bfloat16
    (docs/precision.md).
    """
    swapped = []
    for layer in backbone._flatten_layers(include_self=False):
        policy = layer.dtype_policy
        if (layer.name in targets and isinstance(policy, keras.dtype_policies.DTypePolicyMap)
                and layer.variable_dtype != "float32"):
            layer.dtype_policy = keras.dtype_policies.DTypePolicy(f"mixed_{layer.compute_dtype}")
            swapped.append((layer, policy))
    try:
        yield
    finally:
        for layer, policy in swapped:
            del policy[layer.path]  # the map's pattern applies to the layer again


def _einsum_names(backbone):
    return {
        layer.name
        for layer in backbone._flatten_layers(include_self=False)
        if hasattr(layer, "enable_lora")
    }


def parameter_summary(causal_lm):
    """Count base (non-LoRA) and trainable parameters."""
    lora_ids = set()
    for layer in lora_layers(causal_lm):
        lora_ids |= {id(layer.lora_kernel_a), id(layer.lora_kernel_b)}
    weights = causal_lm.backbone.weights
    base = sum(_size(w) for w in weights if id(w) not in lora_ids)
    trainable = sum(_size(w) for w in causal_lm.trainable_weights)
    return {"base_parameters": base, "trainable_parameters": trainable}


def _size(variable):
    size = 1
    for dim in variable.shape:
        size *= int(dim)
    return size


def platform():
    """'cpu', 'gpu' or 'tpu': where JAX will run."""
    import jax

    return jax.default_backend()


# The CPU flags (Linux's /proc/cpuinfo names) of units that multiply bfloat16
# natively; XLA's CPU backend uses them through oneDNN.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_bf16(cpuinfo="/proc/cpuinfo"):
    """The first of `BF16_CPU_FLAGS` this CPU has, or None (also where /proc/cpuinfo does not exist)."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    return next((flag for flag in BF16_CPU_FLAGS if flag in flags), None)
