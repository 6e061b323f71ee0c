"""A functional Gemma (1, 2, 3 and 4, text) forward pass and LoRA train step in pure JAX.

KerasHub's causal LMs train through Keras: they merge every LoRA factor into
its kernel each step, materialise float32 logits for the whole batch and
cannot take per-example attention masks, so packed rows are impossible. This
module reads the same weights into plain arrays and runs the same math as
KerasHub's `GemmaBackbone` (gemma_backbone.py, gemma_decoder_block.py,
gemma_attention.py, rms_normalization.py in keras-hub 0.32) and text-only
`Gemma3Backbone` (gemma3_backbone.py, gemma3_decoder_block.py,
gemma3_attention.py: adds query/key norms, norms after attention and after
the FFN, and sliding-window layers with their own RoPE wavelength) as one
jitted step:

    config, frozen, lora = extract_params(causal_lm, rank=4)
    step = make_train_step(config, AdamW(learning_rate=5e-5, weight_decay=0.01))
    opt_state = step.init(lora)
    for batch in batches:            # dicts made by `gemma_lora.packing.pack`
        lora, opt_state, sums = step(frozen, lora, opt_state, batch)
    write_back(causal_lm, config, lora)   # the Keras model now has the result

A batch is a dict of (batch, seq) arrays: `token_ids`, `segment_ids` (0 =
padding, 1..k = the packed examples of a row), `positions` (restarting at 0 for
each example), `labels` (the next token) and `loss_weights`.

Gemma 2 is a `GemmaBackbone` with Gemma 3's post norms, sliding-window layers
alternating with global ones (layer 0 slides) and two soft caps,
`cap * tanh(x / cap)`: on every attention logit (before the mask and the
softmax) and on every final logit (before the loss). cuDNN's fused attention
cannot apply the first, so soft-capped layers take this module's own
attention (`soft_capped_attention`, slices of queries whose logits are
recomputed in the backward pass instead of kept).

Gemma 4 (gemma4_backbone.py, gemma4_decoder_block.py, gemma4_attention.py,
gemma4_layers.py) is Gemma 3's block with: RMS norms that scale by `scale`
(not 1 + scale), a scale-free RMS norm on the values, queries not scaled
(its query/key norms do that work), each layer's output multiplied by its
`layer_scalar`, and global layers with their own head width, fewer KV heads
whose key projection is also the value's (K = V: the value is the raw key
projection, RMS-normed but not rotated) and RoPE on only part of each head
(`global_rope_partial_rotary_factor`). Its mixture-of-experts block, per-layer
embeddings and KV-shared layers are refused (`architecture` names the field).
"""

import dataclasses
import functools
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


def _layer_of(block, target):
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


def _norms(config):
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
        if t in EQUATIONS and (layer := _layer_of(block, t)) is not None and layer.lora_enabled
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
            layer = _layer_of(block, target)
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
        "layers": _arrange(config, layers),
    }
    return config, frozen, _arrange(config, lora)


def frozen_layer(config, block, array, merged=False):
    """A block's frozen weights under `config`: its norm scales, each projection's kernel and
    Gemma 4's layer scalar, each through `array` (variable -> array).

    merged: the kernel as Keras applies it (`layer.kernel`: W + (alpha / rank) A B
    where LoRA is enabled), for decoding; else the base kernel alone.
    """
    params = {name: array(norm_of(block).scale) for name, norm_of in _norms(config)}
    for name in EQUATIONS:
        layer = _layer_of(block, name)
        if layer is not None:
            params[name] = array(layer.kernel if merged and layer.lora_enabled else _base_kernel(layer))
    if config.layer_scalar:
        params["layer_scalar"] = array(block.layer_scalar)
    return params


def _arrange(config, per_layer):
    """A list of per-layer pytrees, or one pytree of stacked arrays to scan."""
    if config.scan_layers:
        return jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
    return list(per_layer)


def layer_lora(config, lora, index):
    """The LoRA factors of layer `index`: {target: {"lora_kernel_a", "lora_kernel_b"}}."""
    if config.scan_layers:
        return jax.tree.map(lambda x: x[index], lora)
    return lora[index]


def write_back(causal_lm, config, lora):
    """Assign trained LoRA factors to the Keras model's EinsumDense layers.

    Enables LoRA (with the config's rank and alpha) on target layers that do
    not have it yet, so the Keras model then computes what the fast path does.

    Raises:
        ConfigError: a target layer already has LoRA of another rank or alpha.
    """
    blocks = causal_lm.backbone.transformer_layers
    for i, block in enumerate(blocks):
        factors = layer_lora(config, lora, i)
        for target in config.lora_targets:
            layer = _layer_of(block, target)
            if layer is None:
                continue
            if not layer.lora_enabled:
                layer.enable_lora(config.lora_rank, lora_alpha=config.lora_alpha)
            if (layer.lora_rank, float(layer.lora_alpha)) != (
                config.lora_rank,
                config.lora_alpha,
            ):
                raise ConfigError(
                    f"Layer {layer.path} has LoRA rank {layer.lora_rank} alpha "
                    f"{layer.lora_alpha}; the trained factors have rank "
                    f"{config.lora_rank} alpha {config.lora_alpha}."
                )
            layer.lora_kernel_a.assign(np.asarray(factors[target]["lora_kernel_a"]))
            layer.lora_kernel_b.assign(np.asarray(factors[target]["lora_kernel_b"]))


def init_params(config, key):
    """Random frozen weights and fresh LoRA factors of `config`'s shape.

    For benchmarks: builds gemma_2b-sized weights directly on the device, in
    `config.dtype`, without a Keras model holding a second copy. Norm scales
    are small and random rather than zero so no multiply sees only zeros.
    """
    dtype = jnp.dtype(config.dtype)
    n, d, f, L = config.num_query_heads, config.hidden_dim, config.ffw_dim, config.num_layers
    keys = iter(jax.random.split(key, 16 * (L + 1)))

    def normal(shape, scale):
        # Drawn in the target dtype: no float32 copy of the weights, ever.
        return jax.random.normal(next(keys), shape, dtype) * jnp.asarray(scale, dtype)

    layers, lora = [], []
    for index in range(L):
        h, k, k_eq_v, _ = config.heads_of(index)
        shapes = {
            "query": (n, d, h),
            "key": (k, d, h),
            "value": (k, d, h),
            "attention_output": (n, h, d),
            "ffw_gating": (d, f),
            "ffw_gating_2": (d, f),
            "ffw_linear": (f, d),
        }
        if k_eq_v:
            del shapes["value"]
        fan_in = {"attention_output": n * h, "ffw_linear": f}
        layer = {
            name: normal(shape, 1.0 / math.sqrt(fan_in.get(name, d)))
            for name, shape in shapes.items()
        }
        for name, _ in _norms(config):
            layer[name] = normal((h,) if name in ("query_norm", "key_norm") else (d,), 0.1)
        if config.layer_scalar:
            layer["layer_scalar"] = jnp.ones((), dtype)
        layers.append(layer)
        factors = {}
        for target in config.lora_targets:
            if target not in shapes:
                continue
            shape = shapes[target]
            # he_uniform, as Keras initialises lora_kernel_a; B starts at 0.
            bound = math.sqrt(6.0 / math.prod(shape[:-1]))
            factors[target] = {
                "lora_kernel_a": jax.random.uniform(
                    next(keys), (*shape[:-1], config.lora_rank), jnp.float32, -bound, bound
                ),
                "lora_kernel_b": jnp.zeros((config.lora_rank, shape[-1]), jnp.float32),
            }
        lora.append(factors)
    frozen = {
        "embedding": normal((config.vocabulary_size, d), 1.0 / math.sqrt(d)),
        "final_norm": normal((d,), 0.1),
        "layers": _arrange(config, layers),
    }
    return frozen, _arrange(config, lora)


# ------------------------------------------------------------------- forward


# The elementwise helpers below are wrapped in jax.checkpoint: their backward
# then keeps only their (bfloat16) inputs and recomputes the float32
# intermediates inside the fused backward kernels, instead of storing float32
# copies of activations for every layer.


def _rms_norm(x, scale, epsilon, offset=1.0):
    # As KerasHub's RMSNormalization: statistics in float32, x * (1 + scale)
    # (Gemma 4's: x * scale, offset 0; `scale` None: no scale, Gemma 4's value norm).
    return _checkpointed_rms_norm(x, scale, epsilon, offset)  # static arguments must be given by position


@functools.partial(jax.checkpoint, static_argnums=(2, 3))
def _checkpointed_rms_norm(x, scale, epsilon, offset):
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(var + epsilon)
    if scale is not None:
        y = y * (offset + scale.astype(jnp.float32))
    return y.astype(x.dtype)


@functools.partial(jax.checkpoint, static_argnums=(2, 3, 4))
def _rope(x, positions, wavelength, scaling_factor, rotary_dim=None):
    # KerasHub's RotaryEmbedding (rotate-half form, "linear" scaling divides
    # the frequencies). For Gemma 1 KerasHub then interleaves the two halves
    # of q and of k; the same permutation on both leaves every q.k product
    # unchanged, so we skip it. Gemma 4's partial RoPE (rotary_dim < head
    # width) turns the first rotary_dim / 2 pairs (x[j], x[half + j]) with the
    # frequencies of the whole head and leaves the others: a frequency of 0.
    half = x.shape[-1] // 2
    inv_freq = wavelength ** (-np.arange(0, 2 * half, 2, dtype=np.float32) / (2 * half))
    inv_freq = (inv_freq / scaling_factor).astype(np.float32)
    if rotary_dim is not None and rotary_dim < 2 * half:
        inv_freq[rotary_dim // 2 :] = 0.0
    angle = positions.astype(jnp.float32)[..., None] * inv_freq  # (b, t, half)
    angle = jnp.concatenate([angle, angle], axis=-1)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * jnp.cos(angle) + rotated * jnp.sin(angle)).astype(x.dtype)


def _project(x, kernel, lora, equation, scale):
    # x @ W + s * (x @ A) @ B: the rank-r detour costs ~r/width of the main
    # product, where merging A @ B into W would rewrite W every step.
    y = jnp.einsum(equation, x, kernel.astype(x.dtype))  # a no-op unless stored wider than x
    if lora is None:
        return y
    low = jnp.einsum(equation, x, lora["lora_kernel_a"].astype(x.dtype))
    delta = jnp.matmul(low, lora["lora_kernel_b"].astype(x.dtype))
    return y + (scale * delta).astype(y.dtype)


def _attention_impl(config):
    if config.attention != "auto":
        return config.attention
    return "cudnn" if jax.default_backend() == "gpu" else "xla"


def attention_path(config, index):
    """Which attention layer `index` runs: "soft-capped" (`soft_capped_attention`,
    for a layer with an attention-logit soft cap, which no implementation of
    jax.nn.dot_product_attention applies), else "cudnn" or "xla"."""
    del index  # every layer of a KerasHub Gemma has the same cap (see `architecture`)
    return "soft-capped" if config.attention_logit_soft_cap else _attention_impl(config)


def soft_cap(x, cap):
    """cap * tanh(x / cap), in x's dtype; x unchanged when cap is None."""
    if not cap:
        return x
    return jnp.tanh(x / cap) * cap


def soft_capped_attention(q, k, v, mask, scale, cap):
    """Grouped-query attention with Gemma 2's soft cap on the logits, as KerasHub's GemmaAttention.

    Logits (q * scale) . k in float32, then `soft_cap`, then the mask (after
    the cap: a masked logit must not be squashed to -cap), then the softmax
    in float32, rounded to v's dtype before the product with v.

    Args:
        q: (batch, t, query_heads, head_dim).
        k, v: (batch, s, kv_heads, head_dim); query head j reads kv head
            j // (query_heads / kv_heads), as KerasHub and jax.nn do.
        mask: bool, broadcastable to (batch, 1, t, s): True where a query may
            see a key. A row with no True key gets uniform weights (its
            output is garbage and must be ignored, as padding is).
        scale: float, the query scale.
        cap: float, the soft cap.
    Returns:
        (batch, t, query_heads, head_dim) in q's dtype.
    """
    b, t, n, h = q.shape
    groups = n // k.shape[2]
    q = (q * jnp.asarray(scale, q.dtype)).reshape(b, t, k.shape[2], groups, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
    logits = soft_cap(logits, cap)
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", weights, v)
    return out.reshape(b, t, n, h)


def masked_attention(config, q, k, v, mask):
    """Attention of q over k/v under a boolean `mask` (batch, 1, t, s), for decoding:
    soft-capped where the model caps its attention logits, else XLA's."""
    if config.attention_logit_soft_cap:
        return soft_capped_attention(q, k, v, mask, config.attention_scale, config.attention_logit_soft_cap)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=config.attention_scale, implementation="xla")


def _attention(config, q, k, v, segment_ids, window):
    # Packed examples must not see each other: a query attends to keys of its
    # own segment only. Padding (segment 0) attends to padding, so no row of
    # the mask is empty (an empty row gives NaN in some kernels). A sliding
    # window (Gemma 2 and 3's local layers) keeps keys less than `window` tokens
    # back, as KerasHub's mask does; within a segment that distance is the
    # same in the packed row and in the example alone.
    if config.attention_logit_soft_cap:
        return _sliced_soft_capped_attention(config, q, k, v, segment_ids, window)
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    causal = config.mask_form != "dense"
    if not causal:
        t = segment_ids.shape[1]
        same = same & jnp.tril(jnp.ones((t, t), bool))[None, None]
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=None if config.mask_form == "none" else same,
        scale=config.attention_scale,
        is_causal=causal,
        local_window_size=(window - 1, 0) if window else None,
        implementation=_attention_impl(config),
    )


def _sliced_soft_capped_attention(config, q, k, v, segment_ids, window):
    # `soft_capped_attention` over slices of `attention_chunk` queries, each
    # under jax.checkpoint: the backward pass recomputes a slice's float32
    # logits and weights from q, k and v instead of keeping (heads, seq, seq)
    # of them per layer, as cuDNN's flash attention avoids keeping them for
    # uncapped layers. Only one slice's logits exist at a time.
    b, t = segment_ids.shape
    chunk = min(config.attention_chunk, t)
    pad = -t % chunk
    rows = jnp.arange(t + pad)
    keys = jnp.arange(t)
    # Padding queries (segment -1) see no key; their outputs are cut off below.
    query_segments = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    slices = (t + pad) // chunk

    @jax.checkpoint
    def one(q_slice, segment_slice, row_slice):
        see = row_slice[:, None] >= keys[None, :]  # causal, in row order = position order within a segment
        if window:
            see = see & (row_slice[:, None] - keys[None, :] < window)
        see = see[None]
        if config.mask_form != "none":
            see = see & (segment_slice[:, :, None] == segment_ids[:, None, :])
        return soft_capped_attention(
            q_slice, k, v, see[:, None], config.attention_scale, config.attention_logit_soft_cap
        )

    def by_slice(x):  # (b, slices * chunk, ...) -> (slices, b, chunk, ...)
        return jnp.moveaxis(x.reshape(b, slices, chunk, *x.shape[2:]), 1, 0)

    out = jax.lax.map(
        lambda xs: one(*xs), (by_slice(q), by_slice(query_segments), rows.reshape(slices, chunk))
    )
    return jnp.moveaxis(out, 0, 1).reshape(b, t + pad, *q.shape[2:])[:, :t]


def _decoder_layer(config, x, layer, lora, positions, index, attend):
    """One Gemma block. `attend(q, k, v, window)` does the attention proper:
    over the packed row for training (`_attention`), over a key/value cache
    when decoding (`gemma_lora.decode`)."""
    s = config.lora_scale
    window, wavelength, scaling = config.attention_of(index)
    _, _, k_eq_v, rotary_dim = config.heads_of(index)
    eps, offset = config.layer_norm_epsilon, config.norm_offset

    def project(name, inputs):
        return _project(inputs, layer[name], lora.get(name), EQUATIONS[name], s)

    def query_or_key(name, y):
        if config.query_key_norm:
            y = _rms_norm(y, layer[f"{name}_norm"], eps, offset)
        return _rope(y, positions, wavelength, scaling, rotary_dim)

    h = _rms_norm(x, layer["pre_attention_norm"], eps, offset)
    q = query_or_key("query", project("query", h))
    key = project("key", h)
    k = query_or_key("key", key)
    # Gemma 4's K = V layers take the key projection (before its norm and RoPE) as the values.
    v = key if k_eq_v else project("value", h)
    if config.value_norm:
        v = _rms_norm(v, None, eps)
    attended = project("attention_output", attend(q, k, v, window))
    if config.post_attention_norm:
        attended = _rms_norm(attended, layer["post_attention_norm"], eps, offset)
    x = x + attended

    def feed_forward(x):
        h = _rms_norm(x, layer["pre_ffw_norm"], eps, offset)
        up = project("ffw_gating_2", h)
        if config.remat == "gate":
            # Keep h and up; the gate projection is recomputed when needed.
            gated = jax.checkpoint(lambda h, up: _geglu(project("ffw_gating", h), up))
            y = project("ffw_linear", gated(h, up))
        else:
            y = project("ffw_linear", _geglu(project("ffw_gating", h), up))
        if config.post_ffw_norm:
            y = _rms_norm(y, layer["post_ffw_norm"], eps, offset)
        return y

    if config.remat == "ffn":
        feed_forward = jax.checkpoint(feed_forward)
    x = x + feed_forward(x)
    if config.layer_scalar:
        x = x * layer["layer_scalar"].astype(x.dtype)
    return x


@jax.checkpoint
def _geglu(gate, up):
    # KerasHub: gelu(approximate=True)(x1) * x2. In float32, rounded once.
    gate32 = jax.nn.gelu(gate.astype(jnp.float32), approximate=True)
    return (gate32 * up.astype(jnp.float32)).astype(gate.dtype)


def embed(config, frozen, token_ids):
    """Token embeddings scaled by sqrt(hidden_dim), in config.dtype."""
    dtype = jnp.dtype(config.dtype)
    x = jnp.take(frozen["embedding"], token_ids, axis=0).astype(dtype)
    # KerasHub casts sqrt(hidden_dim) to the activation dtype before scaling.
    return x * jnp.asarray(math.sqrt(config.hidden_dim), jnp.float32).astype(dtype)


def hidden_states(config, frozen, lora, token_ids, segment_ids, positions):
    """Final-normalised hidden states, (batch, seq, hidden) in config.dtype."""
    x = embed(config, frozen, token_ids)

    def attend(q, k, v, window):
        return _attention(config, q, k, v, segment_ids, window)

    def body(x, layer_and_lora, index):
        layer, layer_lora = layer_and_lora
        return _decoder_layer(config, x, layer, layer_lora, positions, index, attend), None

    if config.remat == "layer":
        body = jax.checkpoint(body, static_argnums=(2,))
    if config.scan_layers:
        # Every layer attends alike under scan_layers (validate): layer 0 speaks for all.
        x, _ = jax.lax.scan(lambda x, xs: body(x, xs, 0), x, (frozen["layers"], lora))
    else:
        for index, layer_and_lora in enumerate(zip(frozen["layers"], lora)):
            x, _ = body(x, layer_and_lora, index)
    return _rms_norm(x, frozen["final_norm"], config.layer_norm_epsilon, config.norm_offset)


def logits(config, frozen, lora, token_ids, segment_ids, positions):
    """Full float32 logits, (batch, seq, vocab), final soft cap applied. For tests and small inputs."""
    h = hidden_states(config, frozen, lora, token_ids, segment_ids, positions)
    out = jnp.einsum("btd,vd->btv", h, frozen["embedding"].astype(h.dtype), preferred_element_type=jnp.float32)
    return soft_cap(out, config.final_logit_soft_cap)


# ---------------------------------------------------------------------- loss


def _chunk_nll(h, embedding, labels, weights, with_grad, logits_dtype, cap):
    # One slice of tokens against the whole (tied) vocabulary; logits exist
    # only for this slice. Reductions run in float32 whatever logits_dtype.
    # The table may be stored wider than the activations (a float32 Keras
    # embedding under mixed precision): the product runs in the activations' dtype.
    embedding = embedding.astype(h.dtype)
    raw = jnp.einsum("td,vd->tv", h, embedding, preferred_element_type=logits_dtype)
    logits = soft_cap(raw.astype(jnp.float32), cap)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    weights = jnp.where(weights > 0, weights, 0.0)
    nll = jnp.sum(jnp.where(weights > 0, (lse - picked) * weights, 0.0))
    if not with_grad:
        return nll, None
    # d nll / d logits = weight * (softmax - onehot), built in one fused pass.
    vocab = jax.lax.broadcasted_iota(labels.dtype, logits.shape, 1)
    probs = jnp.exp(logits - lse[:, None])
    dlogits = (jnp.where(vocab == labels[:, None], probs - 1.0, probs) * weights[:, None])
    if cap:
        # Through the soft cap: d(cap * tanh(x / cap)) / dx = 1 - (capped / cap)^2.
        dlogits = dlogits * (1.0 - jnp.square(logits / cap))
    dh = jnp.einsum(
        "tv,vd->td",
        dlogits.astype(embedding.dtype),
        embedding,
        preferred_element_type=jnp.float32,
    )
    return nll, dh.astype(h.dtype)


def _chunked(h, labels, weights, chunk):
    n = h.shape[0]
    chunk = min(chunk, n)
    pad = (-n) % chunk
    if pad:
        h = jnp.pad(h, ((0, pad), (0, 0)))
        labels = jnp.pad(labels, (0, pad))
        weights = jnp.pad(weights, (0, pad))
    count = (n + pad) // chunk
    return (
        h.reshape(count, chunk, h.shape[-1]),
        labels.reshape(count, chunk),
        weights.reshape(count, chunk),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _lm_nll(h, embedding, labels, weights, chunk, logits_dtype, cap):
    hs, ls, ws = _chunked(h, labels, weights, chunk)

    def body(total, xs):
        nll, _ = _chunk_nll(xs[0], embedding, xs[1], xs[2], False, logits_dtype, cap)
        return total + nll, None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hs, ls, ws))
    return total


def _lm_nll_fwd(h, embedding, labels, weights, chunk, logits_dtype, cap):
    # The gradient with respect to h is computed alongside the loss, slice by
    # slice, so the backward pass neither keeps nor recomputes any logits:
    # two vocabulary-sized matmuls per token instead of three.
    n = h.shape[0]
    hs, ls, ws = _chunked(h, labels, weights, chunk)

    def body(total, xs):
        nll, dh = _chunk_nll(xs[0], embedding, xs[1], xs[2], True, logits_dtype, cap)
        return total + nll, dh

    total, dh = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hs, ls, ws))
    return total, dh.reshape(-1, h.shape[-1])[:n]


def _lm_nll_bwd(chunk, logits_dtype, cap, dh, g):
    # The embedding is frozen and labels/weights are data: no cotangents.
    return (dh * g.astype(dh.dtype), None, None, None)


_lm_nll.defvjp(_lm_nll_fwd, _lm_nll_bwd)


def loss_sums(config, frozen, lora, batch):
    """Sum of -log p(label) over weighted tokens, and the sum of the weights.

    The per-token mean is `nll_sum / weight_sum`; reporting the two sums lets
    a caller average over many batches exactly.
    """
    h = hidden_states(
        config,
        frozen,
        lora,
        batch["token_ids"],
        batch["segment_ids"],
        batch["positions"],
    )
    weights = batch["loss_weights"].astype(jnp.float32).reshape(-1)
    nll = _lm_nll(
        h.reshape(-1, config.hidden_dim),
        frozen["embedding"],
        batch["labels"].reshape(-1).astype(jnp.int32),
        weights,
        config.loss_chunk,
        jnp.dtype(config.logits_dtype),
        config.final_logit_soft_cap,
    )
    return nll, jnp.sum(weights)


# ----------------------------------------------------------------- optimizer


@dataclasses.dataclass(frozen=True)
class AdamW:
    """keras.optimizers.AdamW's update, on a pytree of float32 arrays.

    Written here so this module needs nothing but JAX (scripts/benchmark.py
    runs it on the GPU machine without Keras); training goes through
    gemma_lora.optim, Keras' own AdamW. The rule is a dozen lines. As in Keras: decoupled decay
    `p -= p * wd * lr` first, then Adam with bias correction folded into the
    step size and epsilon added to sqrt(v); leaves whose path contains one of
    `exclude` (Keras: `exclude_from_weight_decay(var_names=...)`) get no decay.
    """

    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7
    exclude: tuple = ("bias", "scale")

    def init(self, params):
        zeros = lambda p: jnp.zeros_like(p)  # noqa: E731
        return {
            "count": jnp.zeros((), jnp.int32),
            "m": jax.tree.map(zeros, params),
            "v": jax.tree.map(zeros, params),
        }

    def _decays(self, path):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return not any(word in name for word in self.exclude)

    def update(self, params, grads, state):
        count = state["count"] + 1
        t = count.astype(jnp.float32)
        lr = self.learning_rate
        alpha = lr * jnp.sqrt(1.0 - self.beta_2**t) / (1.0 - self.beta_1**t)

        def one(path, p, g, m, v):
            if self.weight_decay and self._decays(path):
                p = p - p * (self.weight_decay * lr)
            m = m + (g - m) * (1.0 - self.beta_1)
            v = v + (jnp.square(g) - v) * (1.0 - self.beta_2)
            return p - m * alpha / (jnp.sqrt(v) + self.epsilon), m, v

        out = jax.tree_util.tree_map_with_path(one, params, grads, state["m"], state["v"])
        is_triple = lambda x: isinstance(x, tuple)  # noqa: E731
        pick = lambda i: jax.tree.map(lambda x: x[i], out, is_leaf=is_triple)  # noqa: E731
        return pick(0), {"count": count, "m": pick(1), "v": pick(2)}


# ---------------------------------------------------------------- train step


class TrainStep:
    """One jitted LoRA training step: gradients of the mean per-token loss.

    `step(frozen, lora, opt_state, batch) -> (lora, opt_state, sums)`, where
    `sums = {"nll_sum", "weight_sum"}` stay on the device (no host sync per
    step). The LoRA and optimizer buffers are donated: the caller's old arrays
    are invalid after the call. `traces` counts compilations of the step.
    """

    def __init__(self, config, optimizer=None):
        self.config = config.validate()
        self.optimizer = optimizer or AdamW()
        self.traces = 0
        self._step = jax.jit(self._run, donate_argnums=(1, 2))

    def init(self, lora):
        return self.optimizer.init(lora)

    def _run(self, frozen, lora, opt_state, batch):
        self.traces += 1  # Python runs here only while tracing.

        def objective(lora):
            nll, weight = loss_sums(self.config, frozen, lora, batch)
            return nll / jnp.maximum(weight, 1.0), (nll, weight)

        grads, (nll, weight) = jax.grad(objective, has_aux=True)(lora)
        lora, opt_state = self.optimizer.update(lora, grads, opt_state)
        return lora, opt_state, {"nll_sum": nll, "weight_sum": weight}

    def __call__(self, frozen, lora, opt_state, batch):
        return self._step(frozen, lora, opt_state, batch)


def make_train_step(config, optimizer=None):
    """A `TrainStep` for `config` with `optimizer` (default: AdamW())."""
    return TrainStep(config, optimizer)
