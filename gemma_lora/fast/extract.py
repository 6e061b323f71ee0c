"""Read a KerasHub Gemma into the functional Gemma's arrays, and say whether it can.

KerasHub's causal LMs train through Keras: they merge every LoRA factor into
its kernel each step, materialise float32 logits for the whole batch and
cannot take per-example attention masks, so packed rows are impossible.
`extract_params` reads the same weights into plain arrays (the Keras
variables' own buffers where the dtype allows: one copy of the base) for
`forward.py`, which runs the same math as one jitted function:

    config, frozen, lora = extract_params(causal_lm, targets, dtype="bfloat16")
    nll_sum, weight_sum = forward.loss_sums(config, frozen, lora, batch)

`FastConfig` is everything about the architecture the forward pass needs
(Gemma 1-3 read by `architecture`, Gemma 4's text stack by
`_gemma4_architecture`); `check_model` is the one test of whether the fast
engine and decoder can run a model: Gemma 4's mixture of experts, per-layer
embeddings and KV-shared layers are refused, naming the field.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from gemma_lora.errors import ConfigError

# The einsum equation of every EinsumDense layer LoRA may target, as KerasHub
# builds them. In each one the kernel's last axis is the output's last axis,
# which is what lets Keras' LoRA (and `_project` below) reuse the equation for
# `x @ lora_kernel_a` and finish with a plain matmul by `lora_kernel_b`.
EQUATIONS = {
    "query": "btd,ndh->btnh",
    "key": "btd,kdh->btkh",
    "value": "btd,kdh->btkh",
    "attention_output": "btnh,nhd->btd",
    "ffw_gating": "btd,df->btf",
    "ffw_gating_2": "btd,df->btf",
    "ffw_linear": "btf,fd->btd",
}

# "auto" picks cuDNN flash attention on GPU and XLA elsewhere, for layers
# without an attention-logit soft cap; soft-capped layers (Gemma 2) always take
# `soft_capped_attention`, since neither of jax.nn.dot_product_attention's
# implementations can apply the cap (see `attention_path`).
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")
# How packing reaches attention. "dense": a (batch, 1, seq, seq) boolean mask of
# same-segment-and-causal pairs. "causal": `is_causal=True` plus a same-segment
# mask, so cuDNN can skip the blocks above the diagonal. "none": `is_causal`
# alone, correct only for rows holding one example (padding at the end never
# reaches earlier tokens); it measures what the segment mask costs.
MASK_FORMS = ("dense", "causal", "none")
# What the backward pass recomputes instead of keeping. "none": keep every
# layer's activations (fastest). "gate": keep the GeGLU's linear half and
# recompute its gate projection (one of the three FFN matmuls; halves the
# largest activation). "ffn": recompute each feed-forward block
# (its two up-projections) from its input. "layer": keep only each layer's
# input and recompute the whole layer (least memory, ~1.5x the FLOPs).
REMAT_MODES = ("none", "gate", "ffn", "layer")


@dataclasses.dataclass(frozen=True)
class FastConfig:
    """Static description of the model and of how the fast path runs it.

    Frozen (hashable) so it can be closed over by jitted functions. The
    defaults are the fastest settings measured on an H100 (docs/perf.md).
    """

    vocabulary_size: int
    num_layers: int
    num_query_heads: int
    num_key_value_heads: int
    hidden_dim: int
    head_dim: int
    ffw_dim: int  # each GeGLU half: KerasHub's intermediate_dim // 2 (Gemma 1), intermediate_dim (Gemma 3)
    layer_norm_epsilon: float = 1e-6
    # Attention scale 1/sqrt(head_dim) (True) or 1/sqrt(hidden_dim / heads).
    query_head_dim_normalize: bool = True
    # Gemma 3: RMSNorm on each head's query and key before RoPE, and on the
    # attention and FFN outputs before each residual add.
    query_key_norm: bool = False
    post_attention_norm: bool = False
    post_ffw_norm: bool = False
    # Per layer (sliding_window, rope_wavelength, rope_scaling_factor), where
    # sliding_window 0 means global attention. Empty: every layer global with
    # wavelength 10,000 and no scaling (Gemma 1).
    layer_attention: tuple = ()
    # Gemma 2: cap * tanh(x / cap) on every attention logit and on every
    # final (vocabulary) logit; None = no cap (Gemma 1 and 3 presets).
    attention_logit_soft_cap: float | None = None
    final_logit_soft_cap: float | None = None
    # Gemma 4: norms scale by `scale` (offset 0; Gemma 1-3 by 1 + scale), values
    # get a scale-free RMS norm, queries are scaled by query_scale (1.0) instead
    # of 1/sqrt(width), and each layer's output is multiplied by its layer_scalar.
    norm_offset: float = 1.0
    value_norm: bool = False
    query_scale: float | None = None
    layer_scalar: bool = False
    # Per layer (head_dim, num_key_value_heads, k_eq_v, rotary_dim): Gemma 4's
    # global layers differ from its sliding ones. k_eq_v: the layer has no value
    # projection, its values are its key projection. rotary_dim: the leading
    # dimensions of each half-head that RoPE turns. Empty: every layer
    # (head_dim, num_key_value_heads, False, head_dim).
    layer_heads: tuple = ()
    lora_targets: tuple = ("query", "value")
    lora_rank: int = 4
    lora_alpha: float = 4.0
    dtype: str = "bfloat16"  # frozen weights and activations; LoRA stays float32
    attention: str = "auto"  # "auto" = cuDNN flash attention on GPU, else XLA
    mask_form: str = "causal"  # see MASK_FORMS
    remat: str = "none"  # see REMAT_MODES
    # Layers as one lax.scan over stacked weights (compiles one layer body,
    # ~2x faster to compile) or a Python loop over per-layer arrays: the scan
    # copies every weight and saved activation out of the stack in both
    # passes, which cost 16% of the step at gemma_2b's shape.
    scan_layers: bool = False
    loss_chunk: int = 1024  # tokens per slice of the vocabulary projection
    # Queries per slice of the soft-capped attention: each slice's
    # (heads, slice, seq) float32 logits exist only while it is computed,
    # and are recomputed in the backward pass instead of kept. 128 was the
    # fastest of 64-512 on this project's CPU (docs/perf.md); not yet timed on a GPU.
    attention_chunk: int = 128
    # dtype the vocabulary projection writes its logits in. "bfloat16" halves
    # the loss' memory traffic at the price of ~3 significant digits.
    logits_dtype: str = "float32"

    @property
    def lora_scale(self):
        return self.lora_alpha / self.lora_rank

    @property
    def attention_scale(self):
        if self.query_scale is not None:
            return self.query_scale
        width = self.head_dim if self.query_head_dim_normalize else self.hidden_dim // self.num_query_heads
        return 1.0 / math.sqrt(width)

    def attention_of(self, index):
        """(sliding_window, rope_wavelength, rope_scaling_factor) of layer `index`."""
        return self.layer_attention[index] if self.layer_attention else (0, 10_000.0, 1.0)

    def heads_of(self, index):
        """(head_dim, num_key_value_heads, k_eq_v, rotary_dim) of layer `index`."""
        if self.layer_heads:
            return self.layer_heads[index]
        return (self.head_dim, self.num_key_value_heads, False, self.head_dim)

    def validate(self):
        """Raise ConfigError listing every invalid setting at once."""
        problems = []
        unknown = [t for t in self.lora_targets if t not in EQUATIONS]
        if unknown:
            problems.append(
                f"lora_targets={unknown} are not Gemma layers; choose from "
                f"{sorted(EQUATIONS)}"
            )
        if self.lora_rank < 1:
            problems.append(f"lora_rank must be >= 1. Received: {self.lora_rank}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            problems.append(
                f"attention must be one of {ATTENTION_IMPLEMENTATIONS}. "
                f"Received: {self.attention!r}"
            )
        if self.mask_form not in MASK_FORMS:
            problems.append(
                f"mask_form must be one of {MASK_FORMS}. Received: {self.mask_form!r}"
            )
        if self.remat not in REMAT_MODES:
            problems.append(
                f"remat must be one of {REMAT_MODES}. Received: {self.remat!r}"
            )
        if self.loss_chunk < 1:
            problems.append(f"loss_chunk must be >= 1. Received: {self.loss_chunk}")
        if self.attention_chunk < 1:
            problems.append(f"attention_chunk must be >= 1. Received: {self.attention_chunk}")
        if self.attention == "cudnn" and self.attention_logit_soft_cap:
            problems.append(
                "attention='cudnn' cannot apply this model's attention-logit soft cap "
                f"({self.attention_logit_soft_cap:g}; cuDNN's fused attention has none). "
                "Use attention='auto', which gives soft-capped layers their own path"
            )
        for name in ("layer_attention", "layer_heads"):
            entries = getattr(self, name)
            if entries and len(entries) != self.num_layers:
                problems.append(
                    f"{name} needs one entry per layer ({self.num_layers}). Received: {len(entries)}"
                )
        if self.scan_layers and (len(set(self.layer_attention)) > 1 or len(set(self.layer_heads)) > 1):
            # One scanned body cannot switch between local and global layers.
            problems.append(
                "scan_layers needs every layer to attend alike; this model mixes "
                "sliding-window and global layers. Use scan_layers=False"
            )
        if problems:
            raise ConfigError("; ".join(problems))
        return self


# ---------------------------------------------------------------- parameters


def layer_of(block, target):
    """The Keras layer of `target` in `block`; None for the value of a Gemma 4 K = V layer (it has none)."""
    attention = block.attention
    return {
        "query": lambda: attention.query_dense,
        "key": lambda: attention.key_dense,
        "value": lambda: attention.value_dense,
        "attention_output": lambda: attention.output_dense,
        "ffw_gating": lambda: block.gating_ffw,
        "ffw_gating_2": lambda: block.gating_ffw_2,
        "ffw_linear": lambda: block.ffw_linear,
    }[target]()


def _base_kernel(layer):
    # `layer.kernel` returns the kernel with LoRA already merged in when LoRA
    # is enabled; the frozen base is the variable named "kernel".
    return next(w for w in layer.weights if w.name == "kernel")


def architecture(backbone):
    """The `FastConfig` fields that describe `backbone`'s architecture.

    Everything is read off the Keras layers that compute it (a block's
    attention for its window, RoPE and query scaling, the embedding for the
    final soft cap), not off the backbone's config: keras-hub 0.32's
    `GemmaDecoderBlock` builds its attention with `query_head_dim_normalize=True`
    whatever the backbone says, so gemma2_27b_en (config False) scales its
    queries by 1/sqrt(head_dim) in KerasHub, and so does this path.

    Raises:
        ConfigError: the backbone uses something the fast path does not
            implement (dropout, a vision encoder, bidirectional or
            embedding-model attention, soft caps that differ by layer;
            Gemma 4's mixture of experts, per-layer embeddings and KV-shared
            layers), naming each.
    """
    kind = type(backbone).__name__
    if kind == "Gemma4Backbone":
        return _gemma4_architecture(backbone)
    if kind not in ("GemmaBackbone", "Gemma3Backbone"):
        raise ConfigError(
            f"The fast path implements Gemma 1, 2, 3 and 4 (text) only; this is a {kind}. "
            "Train it with the Keras path instead."
        )
    blocks = backbone.transformer_layers
    unsupported = {"dropout": backbone.dropout}
    if kind == "Gemma3Backbone":
        unsupported.update(
            vision_encoder=backbone.vision_encoder,
            use_bidirectional_attention=backbone.use_bidirectional_attention,
            is_embedding_model=backbone.is_embedding_model,
        )
    caps = {b.attention.logit_soft_cap for b in blocks}
    unsupported["per-layer attention soft caps"] = len(caps) > 1
    used = {k: v for k, v in unsupported.items() if v}
    if used:
        raise ConfigError(
            f"The fast path implements Gemma 1, 2 and 3 (text) only; this {kind} sets "
            f"{sorted(used)}. Train it with the Keras path instead."
        )
    fields = _shared_fields(backbone, caps.pop())
    fields.update(
        query_head_dim_normalize=bool(blocks[0].attention.query_head_dim_normalize),
        post_attention_norm=bool(backbone.use_post_attention_norm),
        post_ffw_norm=bool(backbone.use_post_ffw_norm),
    )
    if kind == "Gemma3Backbone":
        fields.update(
            query_key_norm=bool(backbone.use_query_key_norm),
            layer_attention=tuple(
                (
                    int(b.attention.sliding_window_size) if b.attention.use_sliding_window_attention else 0,
                    float(b.attention.rope_wavelength),
                    float(b.attention.rope_scaling_factor),
                )
                for b in blocks
            ),
        )
    elif any(b.attention.use_sliding_window_attention for b in blocks):
        # Gemma 2: every other layer slides (KerasHub: layers 0, 2, 4, ...); all
        # take GemmaAttention's fixed RoPE (wavelength 10,000, no scaling).
        fields["layer_attention"] = tuple(
            (
                int(b.attention.sliding_window_size) if b.attention.use_sliding_window_attention else 0,
                float(b.attention.rope_layer.max_wavelength),
                float(b.attention.rope_layer.scaling_factor),
            )
            for b in blocks
        )
    return fields


def _shared_fields(backbone, attention_cap):
    """The FastConfig fields every Gemma backbone gives the same way: sizes, epsilon, soft caps."""
    final_cap = backbone.token_embedding.logit_soft_cap
    return dict(
        vocabulary_size=backbone.vocabulary_size,
        num_layers=backbone.num_layers,
        num_query_heads=backbone.num_query_heads,
        num_key_value_heads=backbone.num_key_value_heads,
        hidden_dim=backbone.hidden_dim,
        head_dim=backbone.head_dim,
        # Each GeGLU half: intermediate_dim // 2 in Gemma 1 and 2, intermediate_dim in Gemma 3 and 4.
        ffw_dim=int(_base_kernel(backbone.transformer_layers[0].gating_ffw).shape[-1]),
        layer_norm_epsilon=float(backbone.layer_norm_epsilon),
        attention_logit_soft_cap=None if attention_cap is None else float(attention_cap),
        final_logit_soft_cap=None if final_cap is None else float(final_cap),
    )


def _gemma4_architecture(backbone):
    """`architecture` of a Gemma4Backbone: its dense text stack, or one ConfigError naming what it cannot run."""
    blocks = backbone.transformer_layers
    unsupported = {
        # Each names the backbone field; the reason is the part of the model this path does not compute.
        "enable_moe_block (the mixture-of-experts feed-forward block)": backbone.enable_moe_block,
        "hidden_size_per_layer_input (per-layer token embeddings)": backbone.hidden_size_per_layer_input,
        "num_kv_shared_layers (layers that reuse an earlier layer's keys and values)": backbone.num_kv_shared_layers,
        "vision_encoder": backbone.vision_encoder,
        "audio_encoder": backbone.audio_encoder,
        "use_bidirectional_attention": backbone.use_bidirectional_attention,
        "is_embedding_model": backbone.is_embedding_model,
        "dropout": backbone.dropout,
        "per-layer attention soft caps": len({b.attention.logit_soft_cap for b in blocks}) > 1,
    }
    used = [name for name, value in unsupported.items() if value]
    if used:
        raise ConfigError(
            f"The fast path implements Gemma 4's dense text stack only; this Gemma4Backbone sets {', '.join(used)}. "
            "Train it with --engine keras."
        )
    return dict(
        _shared_fields(backbone, blocks[0].attention.logit_soft_cap),
        query_key_norm=True,
        post_attention_norm=True,
        post_ffw_norm=True,
        norm_offset=0.0,
        value_norm=True,
        query_scale=1.0,  # Gemma4TextAttention: "scaling = 1.0"
        layer_scalar=True,
        layer_attention=tuple(
            (
                int(b.attention.sliding_window_size) if b.use_sliding_window_attention else 0,
                float(b.attention.rope_wavelength),
                float(b.attention.rope_scaling_factor),
            )
            for b in blocks
        ),
        layer_heads=tuple(
            (int(b.attention.head_dim), int(b.attention.effective_num_kv_heads), bool(b.attention.attention_k_eq_v),
             int(b.attention.rotary_dim))
            for b in blocks
        ),
    )


def check_model(causal_lm):
    """`architecture(causal_lm.backbone)`, and the task's own final cap, which the fast path does not apply.

    Raises:
        ConfigError: as `architecture`, or a Gemma4CausalLM built with `final_logit_cap`
            (KerasHub's presets put Gemma 4's cap on the backbone's embedding instead).
    """
    fields = architecture(causal_lm.backbone)
    if getattr(causal_lm, "final_logit_cap", None) is not None:
        raise ConfigError(
            f"The fast path applies the backbone's final_logit_soft_cap only; this {type(causal_lm).__name__} sets "
            "final_logit_cap on the task as well. Train it with --engine keras."
        )
    return fields


def unsupported_reasons(causal_lm, quantized):
    """Why the fast path (its engine and its decoder) cannot run this model, [] where it can.

    `quantized`: whether the base weights are (or will be) quantized, which the fast path does not read.
    """
    reasons = []
    try:
        check_model(causal_lm)
    except ConfigError as error:
        reasons.append(str(error))
    if quantized:
        reasons.append("it does not read quantized base weights (quantize)")
    return reasons


# The norm weights of a layer beyond pre_attention_norm and pre_ffw_norm, by
# the config flag that adds them: (name in `frozen`, how to reach the Keras layer).
_EXTRA_NORMS = {
    "query_key_norm": (
        ("query_norm", lambda block: block.attention.query_norm),
        ("key_norm", lambda block: block.attention.key_norm),
    ),
    "post_attention_norm": (("post_attention_norm", lambda block: block.post_attention_norm),),
    "post_ffw_norm": (("post_ffw_norm", lambda block: block.post_ffw_norm),),
}


def norm_readers(config):
    """(name, accessor) of every norm of a layer under `config`."""
    names = [
        ("pre_attention_norm", lambda block: block.pre_attention_norm),
        ("pre_ffw_norm", lambda block: block.pre_ffw_norm),
    ]
    for flag, extra in _EXTRA_NORMS.items():
        if getattr(config, flag):
            names.extend(extra)
    return names


def extract_params(
    causal_lm,
    lora_targets=("query", "value"),
    rank=None,
    alpha=None,
    dtype="bfloat16",
    seed=0,
    cast=True,
    **options,
):
    """Read a KerasHub Gemma causal LM into (config, frozen, lora) pytrees.

    Args:
        causal_lm: a `keras_hub.models.GemmaCausalLM` (Gemma 1) or a text-only
            `Gemma3CausalLM`; see `architecture` for what is refused.
        lora_targets: tuple of str, default ("query", "value"); names from
            `EQUATIONS`.
        rank: int or None. LoRA rank. None takes the rank of LoRA already
            enabled on the targets, else 4.
        alpha: float or None. LoRA alpha (update scale alpha / rank). None takes
            the enabled layers' alpha, else `rank` (Keras' default).
        dtype: str, default "bfloat16". dtype of the frozen weights and of the
            activations; "float32" reproduces KerasHub's float32 model.
        seed: int, default 0. Seeds the initial `lora_kernel_a` when the model
            has no LoRA enabled (he_uniform, as Keras does; `lora_kernel_b`
            starts at zero, so the initial model is the base model).
        cast: bool, default True. False keeps each frozen array in the dtype
            the Keras variable stores (no copy: the same buffer); the forward
            pass casts where it computes. `train`'s fast engine passes False so
            the base exists once (see `model.frozen_base_policy`).
        **options: other `FastConfig` fields (attention, mask_form, remat,
            loss_chunk).

    Returns:
        (FastConfig, frozen, lora). `frozen` holds the base weights in `dtype`;
        `lora` holds, per layer and target, float32 "lora_kernel_a" of shape
        kernel.shape[:-1] + (rank,) and "lora_kernel_b" of shape
        (rank, kernel.shape[-1]), exactly Keras' shapes. Per layer means a
        list indexed by layer, or with `scan_layers=True` arrays stacked on a
        leading layer axis; `layer_lora` reads either.

    Raises:
        ConfigError: unsupported architecture, unknown target, or a rank or
            alpha that disagrees with LoRA already enabled on the model.
    """
    import keras

    backbone = causal_lm.backbone
    fields = check_model(causal_lm)
    blocks = backbone.transformer_layers
    lora_targets = tuple(lora_targets)
    enabled = [
        layer
        for block in blocks
        for t in lora_targets
        if t in EQUATIONS and (layer := layer_of(block, t)) is not None and layer.lora_enabled
    ][:1]
    if enabled:
        if rank is not None and rank != enabled[0].lora_rank:
            raise ConfigError(
                f"The model already has LoRA rank {enabled[0].lora_rank} enabled. "
                f"Received: rank={rank}. Pass rank=None to use it."
            )
        rank = enabled[0].lora_rank
        alpha = enabled[0].lora_alpha if alpha is None else alpha
    rank = 4 if rank is None else rank
    alpha = rank if alpha is None else alpha
    config = FastConfig(
        **fields,
        lora_targets=lora_targets,
        lora_rank=int(rank),
        lora_alpha=float(alpha),
        dtype=dtype,
        **options,
    ).validate()

    initializer = keras.initializers.HeUniform(seed=seed)
    layers, lora = [], []
    def frozen_array(variable):
        return jnp.asarray(variable.value, dtype) if cast else jnp.asarray(variable.value)

    for block in blocks:
        layers.append(frozen_layer(config, block, frozen_array))
        layer_lora = {}
        for target in lora_targets:
            layer = layer_of(block, target)
            if layer is None:  # a Gemma 4 K = V layer's value: no projection of its own, no LoRA (as in Keras)
                continue
            shape = tuple(_base_kernel(layer).shape)
            if layer.lora_enabled:
                if layer.lora_rank != rank:
                    raise ConfigError(
                        f"Layer {layer.path} has LoRA rank {layer.lora_rank}, "
                        f"others {rank}. Enable one rank on every target."
                    )
                a, b = layer.lora_kernel_a.value, layer.lora_kernel_b.value
            else:
                a = initializer(shape[:-1] + (rank,), dtype="float32")
                b = np.zeros((rank, shape[-1]), "float32")
            layer_lora[target] = {
                "lora_kernel_a": jnp.asarray(a, jnp.float32),
                "lora_kernel_b": jnp.asarray(b, jnp.float32),
            }
        lora.append(layer_lora)
    frozen = {
        "embedding": frozen_array(backbone.token_embedding.embeddings),
        "final_norm": frozen_array(backbone.layer_norm.scale),
        "layers": arrange_layers(config, layers),
    }
    return config, frozen, arrange_layers(config, lora)


def frozen_layer(config, block, array, merged=False):
    """A block's frozen weights under `config`: its norm scales, each projection's kernel and
    Gemma 4's layer scalar, each through `array` (variable -> array).

    merged: the kernel as Keras applies it (`layer.kernel`: W + (alpha / rank) A B
    where LoRA is enabled), for decoding; else the base kernel alone.
    """
    params = {name: array(norm_of(block).scale) for name, norm_of in norm_readers(config)}
    for name in EQUATIONS:
        layer = layer_of(block, name)
        if layer is not None:
            params[name] = array(layer.kernel if merged and layer.lora_enabled else _base_kernel(layer))
    if config.layer_scalar:
        params["layer_scalar"] = array(block.layer_scalar)
    return params


def arrange_layers(config, per_layer):
    """A list of per-layer pytrees, or one pytree of stacked arrays to scan."""
    if config.scan_layers:
        return jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
    return list(per_layer)


def layer_lora(config, lora, index):
    """The LoRA factors of layer `index`: {target: {"lora_kernel_a", "lora_kernel_b"}}."""
    if config.scan_layers:
        return jax.tree.map(lambda x: x[index], lora)
    return lora[index]


# ------------------------------------------------------------------- forward


# The elementwise helpers below are wrapped in jax.checkpoint: their backward
# then keeps only their (bfloat16) inputs and recomputes the float32
# intermediates inside the fused backward kernels, instead of storing float32
# copies of activations for every layer.


# ---------------------------------------------------------------------- loss


# ----------------------------------------------------------------- optimizer


# ---------------------------------------------------------------- train step


