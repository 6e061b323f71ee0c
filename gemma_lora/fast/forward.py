"""The functional Gemma's forward pass and loss, in pure JAX (Gemma 1, 2, 3 and 4 text).

The math of KerasHub's `GemmaBackbone` and text-only `Gemma3Backbone` /
`Gemma4Backbone` (keras-hub 0.32: the decoder blocks, attention and RMS
norms), on the plain arrays `extract.py` reads out of a Keras model, with
two things KerasHub's models cannot do: per-example attention masks
(`segment_ids`), so several examples share one packed row, and a loss head
that never holds a batch's logits (`loss_sums`: slices of tokens against the
tied vocabulary, its gradient computed with the forward).

A batch is a dict of (batch, seq) arrays: `token_ids`, `segment_ids` (0 =
padding, 1..k = the packed examples of a row), `positions` (restarting at 0
for each example), `labels` (the next token) and `loss_weights`.

Gemma 2 adds soft caps, `cap * tanh(x / cap)`, on every attention logit and
every final logit. cuDNN's fused attention cannot apply the first, so
soft-capped layers take `soft_capped_attention`: slices of queries whose
logits are recomputed in the backward pass instead of kept. Gemma 4's
differences (scale-only norms, value norms, K = V global layers, partial
RoPE, layer scalars) are read from `FastConfig` (see extract.py).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from gemma_lora.fast.extract import EQUATIONS


def rms_norm(x, scale, epsilon, offset=1.0):
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
        cap: float, the soft cap, or None for none.
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
    """Attention of q over k/v under a boolean `mask` (batch, 1, t, s), for decoding,
    soft-capped where the model caps its attention logits.

    The grouped einsums of `soft_capped_attention`, not jax.nn's XLA
    attention: a decoding step's one query per row over a 384-long cache
    (16 rows, 4 query heads on 1 key/value head of 256) took 1.4 ms there
    against 2.7 ms on this project's 2-core CPU (2026-12-07), same outputs
    within 5e-7; the step runs it once per layer.
    """
    return soft_capped_attention(q, k, v, mask, config.attention_scale, config.attention_logit_soft_cap)


def branch_mask(segment_ids, branch_ids, positions, window):
    """(b, t, t) bool: which keys each query sees in a row of prompts shared by branches (GRPO's completions).

    A group is one segment: its prompt (branch 0) and then each completion
    (branch 1, 2, ...) placed one after another, its positions continuing the
    prompt's. A query sees the keys of its segment at or before it in the row
    that are the prompt's or its own branch's; the sliding window counts
    positions (the distance in the row is longer across the branches between).
    """
    t = segment_ids.shape[1]
    see = segment_ids[:, :, None] == segment_ids[:, None, :]
    see &= jnp.tril(jnp.ones((t, t), bool))[None]
    see &= (branch_ids[:, None, :] == 0) | (branch_ids[:, :, None] == branch_ids[:, None, :])
    if window:
        see &= positions[:, :, None] - positions[:, None, :] < window
    return see


def _attention(config, q, k, v, segment_ids, window, branches=None):
    # Packed examples must not see each other: a query attends to keys of its
    # own segment only. Padding (segment 0) attends to padding, so no row of
    # the mask is empty (an empty row gives NaN in some kernels). A sliding
    # window (Gemma 2 and 3's local layers) keeps keys less than `window` tokens
    # back, as KerasHub's mask does; within a segment that distance is the
    # same in the packed row and in the example alone. `branches`: (branch_ids,
    # positions) of rows whose prompts several completions share (`branch_mask`).
    if config.attention_logit_soft_cap:
        return _sliced_soft_capped_attention(config, q, k, v, segment_ids, window, branches)
    if branches is not None:
        see = branch_mask(segment_ids, *branches, window)
        return jax.nn.dot_product_attention(q, k, v, mask=see[:, None], scale=config.attention_scale,
                                            implementation=_attention_impl(config))
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


def _sliced_soft_capped_attention(config, q, k, v, segment_ids, window, branches=None):
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
    if branches is None:  # no branches: every token is the prompt's (branch 0), positions unread
        branch_ids, positions = jnp.zeros_like(segment_ids), jnp.broadcast_to(jnp.arange(t), segment_ids.shape)
    else:
        branch_ids, positions = branches
    query_branches, query_positions = (jnp.pad(x, ((0, 0), (0, pad))) for x in (branch_ids, positions))

    @jax.checkpoint
    def one(q_slice, segment_slice, row_slice, branch_slice, position_slice):
        see = row_slice[:, None] >= keys[None, :]  # causal, in row order = position order within a segment
        see = see[None]
        if window and branches is None:
            see = see & (row_slice[:, None] - keys[None, :] < window)
        elif window:
            see = see & (position_slice[:, :, None] - positions[:, None, :] < window)
        if config.mask_form != "none" or branches is not None:
            see = see & (segment_slice[:, :, None] == segment_ids[:, None, :])
        if branches is not None:
            see = see & ((branch_ids[:, None, :] == 0) | (branch_slice[:, :, None] == branch_ids[:, None, :]))
        return soft_capped_attention(
            q_slice, k, v, see[:, None], config.attention_scale, config.attention_logit_soft_cap
        )

    def by_slice(x):  # (b, slices * chunk, ...) -> (slices, b, chunk, ...)
        return jnp.moveaxis(x.reshape(b, slices, chunk, *x.shape[2:]), 1, 0)

    out = jax.lax.map(
        lambda xs: one(*xs), (by_slice(q), by_slice(query_segments), rows.reshape(slices, chunk),
                              by_slice(query_branches), by_slice(query_positions))
    )
    return jnp.moveaxis(out, 0, 1).reshape(b, t + pad, *q.shape[2:])[:, :t]


def decoder_layer(config, x, layer, lora, positions, index, attend):
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
            y = rms_norm(y, layer[f"{name}_norm"], eps, offset)
        return _rope(y, positions, wavelength, scaling, rotary_dim)

    h = rms_norm(x, layer["pre_attention_norm"], eps, offset)
    q = query_or_key("query", project("query", h))
    key = project("key", h)
    k = query_or_key("key", key)
    # Gemma 4's K = V layers take the key projection (before its norm and RoPE) as the values.
    v = key if k_eq_v else project("value", h)
    if config.value_norm:
        v = rms_norm(v, None, eps)
    attended = project("attention_output", attend(q, k, v, window))
    if config.post_attention_norm:
        attended = rms_norm(attended, layer["post_attention_norm"], eps, offset)
    x = x + attended

    def feed_forward(x):
        h = rms_norm(x, layer["pre_ffw_norm"], eps, offset)
        up = project("ffw_gating_2", h)
        if config.remat == "gate":
            # Keep h and up; the gate projection is recomputed when needed.
            gated = jax.checkpoint(lambda h, up: _geglu(project("ffw_gating", h), up))
            y = project("ffw_linear", gated(h, up))
        else:
            y = project("ffw_linear", _geglu(project("ffw_gating", h), up))
        if config.post_ffw_norm:
            y = rms_norm(y, layer["post_ffw_norm"], eps, offset)
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


def hidden_states(config, frozen, lora, token_ids, segment_ids, positions, branch_ids=None):
    """Final-normalised hidden states, (batch, seq, hidden) in config.dtype.

    `branch_ids`: rows whose prompts several completions share (`branch_mask`); None: plain packed rows.
    """
    x = embed(config, frozen, token_ids)
    branches = None if branch_ids is None else (branch_ids, positions)

    def attend(q, k, v, window):
        return _attention(config, q, k, v, segment_ids, window, branches)

    def body(x, layer_and_lora, index):
        layer, layer_lora = layer_and_lora
        return decoder_layer(config, x, layer, layer_lora, positions, index, attend), None

    if config.remat == "layer":
        body = jax.checkpoint(body, static_argnums=(2,))
    if config.scan_layers:
        # Every layer attends alike under scan_layers (validate): layer 0 speaks for all.
        x, _ = jax.lax.scan(lambda x, xs: body(x, xs, 0), x, (frozen["layers"], lora))
    else:
        for index, layer_and_lora in enumerate(zip(frozen["layers"], lora)):
            x, _ = body(x, layer_and_lora, index)
    return rms_norm(x, frozen["final_norm"], config.layer_norm_epsilon, config.norm_offset)


def logits(config, frozen, lora, token_ids, segment_ids, positions):
    """Full float32 logits, (batch, seq, vocab), final soft cap applied. For tests and small inputs."""
    h = hidden_states(config, frozen, lora, token_ids, segment_ids, positions)
    out = jnp.einsum("btd,vd->btv", h, frozen["embedding"].astype(h.dtype), preferred_element_type=jnp.float32)
    return soft_cap(out, config.final_logit_soft_cap)


def _chunk_logits(h, embedding, labels, logits_dtype, cap, scale=1.0):
    # One slice of tokens against the whole (tied) vocabulary; logits exist
    # only for this slice. Reductions run in float32 whatever logits_dtype.
    # The table may be stored wider than the activations (a float32 Keras
    # embedding under mixed precision): the product runs in the activations' dtype.
    # `scale`: 1 / the sampling temperature (GRPO's log-probs are the sampler's).
    embedding = embedding.astype(h.dtype)
    raw = jnp.einsum("td,vd->tv", h, embedding, preferred_element_type=logits_dtype)
    logits = soft_cap(raw.astype(jnp.float32), cap)
    if scale != 1.0:
        logits = logits * scale
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    return embedding, logits, lse, picked


def _chunk_dh(h, embedding, logits, lse, labels, weights, cap, scale=1.0):
    # d nll / d logits = weight * (softmax - onehot), built in one fused pass
    # (times `scale` for logits scaled by 1 / temperature).
    vocab = jax.lax.broadcasted_iota(labels.dtype, logits.shape, 1)
    probs = jnp.exp(logits - lse[:, None])
    dlogits = (jnp.where(vocab == labels[:, None], probs - 1.0, probs) * weights[:, None])
    if scale != 1.0:
        dlogits = dlogits * scale
    if cap:
        # Through the soft cap: d(cap * tanh(x / cap)) / dx = 1 - (capped / cap)^2.
        dlogits = dlogits * (1.0 - jnp.square(logits / (scale * cap)))
    dh = jnp.einsum(
        "tv,vd->td",
        dlogits.astype(embedding.dtype),
        embedding,
        preferred_element_type=jnp.float32,
    )
    return dh.astype(h.dtype)


def _chunk_nll(h, embedding, labels, weights, with_grad, logits_dtype, cap):
    embedding, logits, lse, picked = _chunk_logits(h, embedding, labels, logits_dtype, cap)
    weights = jnp.where(weights > 0, weights, 0.0)
    nll = jnp.sum(jnp.where(weights > 0, (lse - picked) * weights, 0.0))
    if not with_grad:
        return nll, None
    return nll, _chunk_dh(h, embedding, logits, lse, labels, weights, cap)


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _token_nll(h, embedding, labels, chunk, logits_dtype, cap, scale=1.0):
    """-log p(label) of every token, (n,), by slices as `_lm_nll` (whose sum-only form SFT keeps);
    p = softmax(logits x scale)."""
    hs, ls, _ = _chunked(h, labels, jnp.zeros(labels.shape, jnp.float32), chunk)

    def body(carry, xs):
        _, _, lse, picked = _chunk_logits(xs[0], embedding, xs[1], logits_dtype, cap, scale)
        return carry, lse - picked

    _, nll = jax.lax.scan(body, None, (hs, ls))
    return nll.reshape(-1)[: h.shape[0]]


def _token_nll_fwd(h, embedding, labels, chunk, logits_dtype, cap, scale=1.0):
    # As `_lm_nll_fwd`: each token's gradient with respect to h is computed with
    # its loss, for a unit weight; the backward pass scales it by the token's
    # cotangent (a row of logits depends on its own token only).
    n = h.shape[0]
    hs, ls, _ = _chunked(h, labels, jnp.zeros(labels.shape, jnp.float32), chunk)

    def body(carry, xs):
        table, logits, lse, picked = _chunk_logits(xs[0], embedding, xs[1], logits_dtype, cap, scale)
        dh = _chunk_dh(xs[0], table, logits, lse, xs[1], jnp.ones(xs[1].shape, jnp.float32), cap, scale)
        return carry, (lse - picked, dh)

    _, (nll, dh) = jax.lax.scan(body, None, (hs, ls))
    return nll.reshape(-1)[:n], dh.reshape(-1, h.shape[-1])[:n]


def _token_nll_bwd(chunk, logits_dtype, cap, scale, dh, g):
    return (dh * g[:, None].astype(dh.dtype), None, None)


_token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)


def token_logps(config, frozen, lora, batch, temperature=1.0):
    """log p(label) of every position of a packed batch, (batch, seq) float32 (0 where no weight).

    Differentiable in `lora`, without holding the batch's logits (as `loss_sums`).
    p = softmax(logits / temperature); a batch with `branch_ids` shares
    prompts between completions (`branch_mask`).
    """
    h = hidden_states(config, frozen, lora, batch["token_ids"], batch["segment_ids"], batch["positions"],
                      batch.get("branch_ids"))
    nll = _token_nll(
        h.reshape(-1, config.hidden_dim),
        frozen["embedding"],
        batch["labels"].reshape(-1).astype(jnp.int32),
        config.loss_chunk,
        jnp.dtype(config.logits_dtype),
        config.final_logit_soft_cap,
        float(1.0 / temperature),
    ).reshape(batch["labels"].shape)
    return jnp.where(batch["loss_weights"] > 0, -nll, 0.0)


def sequence_sums(values, sequence_ids, pairs):
    """Per pair, (chosen, rejected) sums of per-position `values` over their sequences (`packing.pack_pairs`' ids).

    Returns (pairs, 2) float32.
    """
    sums = jax.ops.segment_sum(values.reshape(-1).astype(jnp.float32), sequence_ids.reshape(-1), 2 * pairs + 1)
    return sums[1:].reshape(pairs, 2)
