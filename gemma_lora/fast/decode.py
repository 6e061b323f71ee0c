"""Greedy / top-k decoding with a key/value cache and continuous batching, in JAX.

    tokens = decode_tokens(causal_lm, prompts, max_new_tokens=128, stop_token_ids=[eos])

Why not KerasHub's `generate`: on the real Gemma 3 270M on this project's
2-core CPU it answered 68 held-out rows in 226-279 s (8,704 new tokens).
Three things cost that time, none of them the decoding itself:
- its cache is seeded by running the whole padded prompt through the model
  *with logits*: a 262,144-wide vocabulary projection for every prompt
  position of every row, which is thrown away;
- decoding starts at the shortest prompt of a batch and runs to the end of
  the padded length, so most rows take more steps than they need;
- a batch lasts as long as its slowest row: after fine-tuning most answers
  end early, and their rows idle until the last one ends.

This module runs the same Gemma math (`gemma_lora.fast`'s functional layers,
float32 logits within 1e-5 of KerasHub's) in two jitted functions:
- `extend` feeds a chunk of `PREFILL_CHUNK` prompt tokens for a few rows
  into their cache slots and returns the next token after each (prompts are
  read chunk by chunk, so one compiled shape takes any prompt length);
- `advance` takes `CHUNK_STEPS` decoding steps for every slot at once.
A slot whose answer ended (a stop token, `max_new_tokens`, or a stop string
found on the host) is refilled with the next waiting prompt, so the batch
stays full until the last rows. Shapes depend only on the number of slots,
the cache length (rounded up to `CACHE_MULTIPLE`) and the chunk sizes: the
second call on the same rows, or on other rows of like length, compiles
nothing.

Where bfloat16 is native, the float32 model's vocabulary projection is
done in bfloat16 to pick a shortlist whose float32 logits choose the token
(`_next_token`); rows are decoded all at once up to MAX_SLOTS
(`auto_slots`). 68 test rows of the real 270M: 42 s against KerasHub's 151 s
(docs/perf.md, "Held-out answering").

LoRA is merged into the kernels once per call (Keras' own `layer.kernel`,
W + (alpha / rank) A B): decoding reads every weight at every step, and the
rank-r detour would add work without changing the result.
"""

import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np

from gemma_lora import runtime
from gemma_lora.fast import extract, forward

runtime.ensure_runtime()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

# Prompt tokens fed per `extend` call, and rows per call.
PREFILL_CHUNK = 32
PREFILL_ROWS = 4
# Decoding steps per `advance` call: the host looks for ended rows (stop
# strings, refills) between calls. A row that ends mid-chunk idles for the
# rest of it, so small chunks waste less; each call costs a host round trip.
CHUNK_STEPS = 8
# The cache length is the longest prompt plus max_new_tokens, rounded up to
# this: like lengths share one compiled program.
CACHE_MULTIPLE = 128
# `auto_slots`' bounds: rows decoded together, and their key/value cache.
MIN_SLOTS, MAX_SLOTS = 16, 128
CACHE_BYTES = 2 << 30
# Candidate tokens the bfloat16 vocabulary projection keeps for float32 to
# choose from (`_next_token`).
SHORTLIST = 16
# Traces of the jitted functions (Python runs in them only while tracing);
# tests check that a second call compiles nothing.
TRACES = {"extend": 0, "advance": 0}


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy, or sampled from softmax(logits / temperature),
    restricted to the `top_k` largest logits (0 = no limit) and then to the smallest set of
    those whose probability reaches `top_p` (1.0 = no limit). Hashable: a static argument."""

    greedy: bool = True
    top_k: int = 0
    temperature: float = 1.0
    top_p: float = 1.0


class Unsupported(Exception):
    """The model cannot be decoded here (the reason is the message); use KerasHub's generate."""


def unsupported_reason(causal_lm):
    """Why this module cannot decode `causal_lm`, or None if it can."""
    import keras

    from gemma_lora.model.quantize import quantization_mode

    reasons = extract.unsupported_reasons(causal_lm, quantized=quantization_mode(causal_lm) is not None)
    if keras.distribution.distribution() is not None:
        reasons.append("its weights are laid out over several devices")
    return "; ".join(reasons) or None


def inference_params(causal_lm):
    """(FastConfig, frozen weights) of `causal_lm` with any LoRA merged into the kernels.

    The arrays are the Keras variables' own where no LoRA is enabled (no
    copy), in the variables' dtype; the compute dtype is the model's.
    """
    backbone = causal_lm.backbone
    config = extract.FastConfig(
        **extract.architecture(backbone), lora_targets=(), dtype=backbone.compute_dtype, attention="xla"
    )

    def value(variable):
        return jnp.asarray(variable.value if hasattr(variable, "value") else variable)

    # `kernel` is W + (alpha / rank) A B when LoRA is enabled, as Keras computes it.
    layers = [extract.frozen_layer(config, block, value, merged=True) for block in backbone.transformer_layers]
    frozen = {
        "embedding": value(backbone.token_embedding.embeddings),
        "final_norm": value(backbone.layer_norm.scale),
        "layers": layers,
    }
    return config, frozen


def cache_length(longest_prompt, max_new_tokens):
    return -(-(longest_prompt + max_new_tokens) // CACHE_MULTIPLE) * CACHE_MULTIPLE


def auto_slots(config, rows, length):
    """Rows to decode together: every row up to MAX_SLOTS, in equal waves beyond,
    fewer where their cache would pass CACHE_BYTES (never fewer than MIN_SLOTS).

    A step reads every weight once whatever the rows, so more rows cost less
    each: the real Gemma 3 270M in float32 on this project's 2-core CPU
    took 137 ms a step with 16 rows, 201 with 32 and 339 with 64 (117, 159
    and 189 tokens/s; 2026-12-07), and answered the 68 test rows in 42 s as
    one wave of 68 against 54 s as two of 34. Equal waves, because a base
    model's answers all run to the token limit: 200 rows as 128 + 72 would
    decode the last 72 at a cost of 128.
    """
    per_row = sum(2 * math.prod(shape) for shape in _cache_shapes(config, 1, length)) * jnp.dtype(config.dtype).itemsize
    most = max(MIN_SLOTS, min(MAX_SLOTS, CACHE_BYTES // per_row))
    waves = -(-rows // most)
    return max(1, min(most, -(-rows // waves)))


def _cache_shapes(config, slots, length):
    """Each layer's key (and value) cache shape."""
    for index in range(config.num_layers):
        head_dim, kv_heads, _, _ = config.heads_of(index)  # Gemma 4's global layers have their own
        yield (slots, length, kv_heads, head_dim)


def empty_cache(config, slots, length):
    dtype = jnp.dtype(config.dtype)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for shape in _cache_shapes(config, slots, length)]


def _cast(config, frozen):
    dtype = jnp.dtype(config.dtype)
    return jax.tree.map(lambda w: w.astype(dtype), frozen)


def _forward(config, frozen, caches, rows, token_ids, positions, valid, span=None):
    """Run `token_ids` (r, c) at `positions` through every layer, writing their keys
    and values into the cache slots `rows` (r,), and attending over each slot's cache.

    `rows` None means every slot, in order. `valid` (r, c) marks real
    tokens; the others write nowhere. Attention reads the first `span`
    cache positions (None: all), which must hold every position attended. Returns the final-normalised hidden
    states and the updated caches.
    """
    frozen = _cast(config, frozen)
    slots, length = caches[0][0].shape[:2]
    seen = jnp.arange(length)[:span]  # the cache positions attention reads
    slot_index = jnp.arange(slots) if rows is None else rows
    # An index past the end drops the write ("drop" mode): padding tokens and unused rows.
    write_at = jnp.where(valid, positions, length)
    new_caches = []

    def attend_for(layer_cache):
        def attend(q, k, v, window):
            k_cache, v_cache = layer_cache
            k_cache = k_cache.at[slot_index[:, None], write_at].set(k, mode="drop")
            v_cache = v_cache.at[slot_index[:, None], write_at].set(v, mode="drop")
            new_caches.append((k_cache, v_cache))
            # Each query sees the keys at or before its position (and within the
            # sliding window on Gemma 2 and 3's local layers), as KerasHub's mask.
            see = seen[None, None, :] <= positions[:, :, None]
            if window:
                see &= positions[:, :, None] - seen[None, None, :] < window
            kc, vc = (k_cache, v_cache) if rows is None else (k_cache[rows], v_cache[rows])
            kc, vc = kc[:, :span], vc[:, :span]
            # Gemma 2's attention soft cap included, where the model has one.
            return forward.masked_attention(config, q, kc.astype(q.dtype), vc.astype(q.dtype), see[:, None])

        return attend

    x = forward.embed(config, frozen, token_ids)
    for index, (layer, layer_cache) in enumerate(zip(frozen["layers"], caches)):
        x = forward.decoder_layer(config, x, layer, {}, positions, index, attend_for(layer_cache))
    h = forward.rms_norm(x, frozen["final_norm"], config.layer_norm_epsilon, config.norm_offset)
    return h, new_caches


def _next_token(config, frozen, h, sampling, key, shortlist_table):
    """(token, its log-probability) for each row of final hidden states `h` (r, d).

    The log-probability is under softmax(logits / temperature) over the whole
    vocabulary (what a GRPO loss computes for the token), whatever top_k /
    top_p restricted the draw to; with the shortlist (greedy decoding of a
    float32 model) it is over the shortlist's logits.
    """
    if shortlist_table is None:
        logits = jnp.einsum("rd,vd->rv", h, frozen["embedding"].astype(h.dtype), preferred_element_type=jnp.float32)
        candidates = None
    else:
        # The vocabulary projection is the step's largest read (262,144 x 640 on
        # Gemma 3 270M). A bfloat16 copy halves it and picks a shortlist; the
        # float32 logits of the shortlist alone choose the token, so greedy
        # decoding writes the float32 decoder's tokens unless its winner falls
        # outside bfloat16's top SHORTLIST (or two logits tie to float noise).
        approximate = jnp.einsum("rd,vd->rv", h.astype(shortlist_table.dtype), shortlist_table,
                                 preferred_element_type=jnp.float32)
        _, candidates = jax.lax.top_k(approximate, max(SHORTLIST, sampling.top_k))
        rows = frozen["embedding"][candidates].astype(h.dtype)  # (r, C, d)
        logits = jnp.einsum("rd,rcd->rc", h, rows, preferred_element_type=jnp.float32)
    # Gemma 2's final soft cap: it keeps the order (greedy is unchanged) but
    # narrows the top-k softmax, as KerasHub's sampler sees it.
    logits = forward.soft_cap(logits, config.final_logit_soft_cap)
    if not sampling.greedy:
        logits = logits / sampling.temperature
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    if sampling.greedy:
        index = jnp.argmax(logits, axis=-1)[:, None]
    else:
        index = _sample(logits, sampling, key)
    logp = jnp.take_along_axis(log_probs, index, axis=-1)[:, 0]
    if candidates is not None:
        index = jnp.take_along_axis(candidates, index, axis=-1)
    return index[:, 0].astype(jnp.int32), logp


def _sample(logits, sampling, key):
    """Draw one index per row from softmax(logits) cut to top_k, then top_p (KerasHub's TopKSampler at top_p 1)."""
    k = sampling.top_k or logits.shape[-1]
    if k >= logits.shape[-1] and sampling.top_p >= 1.0:
        return jax.random.categorical(key, logits, axis=-1)[:, None]
    top, index = jax.lax.top_k(logits, k)  # sorted, largest first
    if sampling.top_p < 1.0:
        probs = jax.nn.softmax(top, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability of the tokens ranked above each
        top = jnp.where(before < sampling.top_p, top, -jnp.inf)  # the first token is always kept
    choice = jax.random.categorical(key, top, axis=-1)
    return jnp.take_along_axis(index, choice[:, None], axis=-1)


def bfloat16_native(platform, cpu_bf16):
    """Whether bfloat16 matrix products are native: GPU, TPU, or a CPU with bfloat16
    units (`cpu_bf16`, a flag name or None). Elsewhere XLA emulates them, and the
    shortlist's bfloat16 copy would cost more than it saves."""
    return platform != "cpu" or bool(cpu_bf16)


def shortlist_table(config, frozen):
    """The bfloat16 copy of the embedding that picks `_next_token`'s shortlist, or None
    for a model that is not float32 (a bfloat16 one projects in bfloat16 already)."""
    if jnp.dtype(config.dtype) != jnp.float32:
        return None
    return frozen["embedding"].astype(jnp.bfloat16)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(4,))
def _extend(config, sampling, frozen, table, caches, rows, token_ids, start, count, key):
    """Feed up to `c` prompt tokens of each row; the next token after each row's last one, and its log-prob."""
    TRACES["extend"] += 1
    c = token_ids.shape[1]
    offsets = jnp.arange(c)[None, :]
    valid = offsets < count[:, None]
    positions = start[:, None] + offsets
    h, caches = _forward(config, frozen, caches, rows, token_ids, positions, valid)
    last = jnp.take_along_axis(h, jnp.maximum(count - 1, 0)[:, None, None], axis=1)[:, 0]
    return (caches, *_next_token(config, frozen, last, sampling, key, table))


@functools.partial(jax.jit, donate_argnums=(0,))
def _copy_slots(caches, source, target):
    """Copy the cache of slots `source` into slots `target` (a target past the last slot is dropped)."""
    return [(k.at[target].set(k[source], mode="drop"), v.at[target].set(v[source], mode="drop")) for k, v in caches]


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=(6,))
def _advance(config, sampling, steps, span, frozen, table, caches, token, position, budget, stop_ids, key):
    """Up to `steps` decoding steps for every slot; (caches, tokens (slots, steps), their log-probs, position).

    Attention reads the first `span` cache positions: a multiple of
    CACHE_MULTIPLE past every slot's last position, so early steps do not
    read the empty end of the cache (a step's cache read grows with slots).

    A slot generates while its `budget` (tokens it may still add) lasts and
    until it writes a stop token; after that it emits -1 and stays put.
    """
    TRACES["advance"] += 1
    slots = token.shape[0]
    out = jnp.full((slots, steps), -1, jnp.int32)
    out_logps = jnp.zeros((slots, steps), jnp.float32)

    def live(budget):
        return budget > 0

    def body(carry):
        i, caches, token, position, budget, out, out_logps = carry
        h, caches = _forward(
            config, frozen, caches, None, token[:, None], position[:, None], live(budget)[:, None], span
        )
        new, logp = _next_token(config, frozen, h[:, 0], sampling, jax.random.fold_in(key, i), table)
        going = live(budget)
        out = out.at[:, i].set(jnp.where(going, new, -1))
        out_logps = out_logps.at[:, i].set(jnp.where(going, logp, 0.0))
        stopped = jnp.isin(new, stop_ids)
        budget = jnp.where(going, jnp.where(stopped, 0, budget - 1), 0)
        return i + 1, caches, jnp.where(going, new, token), position + going, budget, out, out_logps

    def cond(carry):
        return (carry[0] < steps) & jnp.any(live(carry[4]))

    _, caches, token, position, budget, out, out_logps = jax.lax.while_loop(
        cond, body, (0, caches, token, position, budget, out, out_logps)
    )
    return caches, out, out_logps, position


def decode_tokens(
    causal_lm,
    prompts,
    max_new_tokens,
    stop_token_ids,
    greedy=True,
    top_k=5,
    seed=0,
    slots=None,
    ended=None,
    progress=None,
    shortlist=None,
):
    """Generate after each prompt until a stop token or `max_new_tokens`.

    Args:
        causal_lm: a Gemma causal LM `unsupported_reason` accepts.
        prompts: list of token-id lists (with <bos>), any lengths.
        max_new_tokens: int, most tokens generated per prompt.
        stop_token_ids: ids that end an answer (kept as its last token).
        greedy: bool; False samples from the top `top_k` logits.
        seed: int, seeds top-k sampling.
        slots: rows decoded together (the batch); None: `auto_slots`.
        ended: optional `f(index, tokens) -> bool` asked between chunks: True
            ends that row where it stands (e.g. a stop string in its text).
        progress: optional `f(rows done, tokens generated)`, called after
            each chunk of steps.
        shortlist: None (default) takes each token from the float32 logits
            of a bfloat16 projection's top `SHORTLIST` where bfloat16 is
            native (`bfloat16_native`); True does so anywhere (a float32
            model), False computes every float32 logit.

    Returns:
        A list of token-id lists, one per prompt: the new tokens, ending with
        the stop token where one was generated.

    Raises:
        Unsupported: the model cannot be decoded here.
    """
    reason = unsupported_reason(causal_lm)
    if reason:
        raise Unsupported(reason)
    if not prompts:
        return []
    config, frozen = inference_params(causal_lm)
    if shortlist is None:
        from gemma_lora.model import loading

        shortlist = bfloat16_native(loading.platform(), loading.cpu_bf16())
    table = shortlist_table(config, frozen) if shortlist else None
    sampling = Sampling(greedy=greedy, top_k=0 if greedy else top_k)
    tokens, _ = generate(config, frozen, prompts, max_new_tokens, stop_token_ids, sampling, seed, slots, ended,
                         progress, table)
    return tokens


def decoding_config(fast_config):
    """The decoder's config of the fast engine's model: no LoRA detour (merged), XLA attention, layers unstacked."""
    return dataclasses.replace(fast_config, lora_targets=(), attention="xla", scan_layers=False)


def merged_params(fast_config, frozen, lora):
    """(decoding config, weights) of the fast engine's arrays with its LoRA factors merged: W + s A B.

    What `inference_params` reads from a Keras model (its `layer.kernel`),
    computed from the arrays a training step holds, so a GRPO step samples
    from the policy it trains without writing the Keras variables.
    """
    config = decoding_config(fast_config)
    layers = []
    for layer, factors in zip(frozen["layers"], lora):
        layer = dict(layer)
        for name, pair in factors.items():
            kernel = layer[name]
            delta = jnp.matmul(pair["lora_kernel_a"], pair["lora_kernel_b"]) * fast_config.lora_scale
            layer[name] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
        layers.append(layer)
    return config, {**frozen, "layers": layers}


def generate(config, frozen, prompts, max_new_tokens, stop_token_ids, sampling=Sampling(), seed=0, slots=None,
             ended=None, progress=None, table=None):
    """`decode_tokens` on weights already read (`inference_params`, `merged_params`): (tokens, log-probs) per prompt.

    `sampling` chooses each token (`Sampling`); each token's log-probability
    under it comes back beside it (`_next_token`). `table`: the shortlist's
    bfloat16 embedding, or None.

    Identical prompts (a GRPO group's) are read into the cache once: the
    first fills a slot, the others copy its cache and sample from its last
    prompt position on (which each recomputes), so their answers are drawn
    independently.
    """
    if not prompts:
        return [], []
    length = cache_length(max(map(len, prompts)), max_new_tokens)
    slots = slots or auto_slots(config, len(prompts), length)
    caches = empty_cache(config, slots, length)
    stop_ids = jnp.asarray(sorted(set(stop_token_ids)) or [-2], jnp.int32)
    base_key = jax.random.key(seed)
    calls = iter(range(1 << 30))
    keys = [tuple(p) for p in prompts]
    first_seen = {}
    for i, key in enumerate(keys):
        first_seen.setdefault(key, i)

    # Longest prompts first: rows filled together have like lengths (fewer
    # wasted prefill positions), and the longest answers start early.
    # Copies of a prompt stay together, so they find its cache still there.
    waiting = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), first_seen[keys[i]], i))[::-1]
    results = [None] * len(prompts)
    result_logps = [None] * len(prompts)
    owner = [None] * slots  # which prompt each slot holds
    holds = [None] * slots  # the prompt whose tokens a slot's cache holds (what a copy can start from)
    token = np.zeros(slots, np.int32)
    position = np.zeros(slots, np.int32)
    budget = np.zeros(slots, np.int32)
    done = tokens = 0
    generated = [[] for _ in range(slots)]
    logps = [[] for _ in range(slots)]

    def finish(slot):
        nonlocal done, tokens
        results[owner[slot]], result_logps[owner[slot]] = generated[slot], logps[slot]
        tokens += len(generated[slot])
        owner[slot], budget[slot] = None, 0
        done += 1

    while waiting or any(o is not None for o in owner):
        free = [s for s in range(slots) if owner[s] is None]
        # Fill every free slot, PREFILL_ROWS at a time (a fill call costs the
        # same for 1 row as for PREFILL_ROWS). Waiting for a full group instead
        # left 2 of 34 slots idle for a whole wave of 128-token answers, and
        # their rows a third wave alone: a fill costs less than a
        # chunk of steps with a slot idle.
        while waiting and free:
            assigned = [(free.pop(0), waiting.pop()) for _ in range(min(len(free), len(waiting)))]
            for slot, _ in assigned:
                holds[slot] = None  # about to be overwritten
            fills, copies, planned = [], [], {}
            for slot, row in assigned:
                source = planned.get(keys[row], next((s for s in range(slots) if holds[s] == keys[row]), None))
                if source is None:
                    fills.append((slot, row))
                    planned[keys[row]] = slot
                else:
                    copies.append((slot, row, source))
            for at in range(0, len(fills), PREFILL_ROWS):
                group = fills[at : at + PREFILL_ROWS]
                caches, first, first_logp = _prefill(config, sampling, frozen, table, caches, group, prompts, slots,
                                                     next(calls), base_key)
                for (slot, row), tok, logp in zip(group, first, first_logp):
                    owner[slot], holds[slot], generated[slot], logps[slot] = row, keys[row], [int(tok)], [float(logp)]
                    token[slot], position[slot] = tok, len(prompts[row])
                    stopped = int(tok) in stop_token_ids or max_new_tokens == 1
                    budget[slot] = 0 if stopped else max_new_tokens - 1
                    if stopped or (ended and ended(row, generated[slot])):
                        finish(slot)
            for at in range(0, len(copies), PREFILL_ROWS):
                group = copies[at : at + PREFILL_ROWS]
                source = np.zeros(PREFILL_ROWS, np.int32)
                target = np.full(PREFILL_ROWS, slots, np.int32)  # past the end: dropped
                for i, (slot, _, src) in enumerate(group):
                    source[i], target[i] = src, slot
                caches = _copy_slots(caches, jnp.asarray(source), jnp.asarray(target))
                for slot, row, _ in group:
                    # The copy recomputes the prompt's last position and samples its own first token.
                    owner[slot], holds[slot], generated[slot], logps[slot] = row, keys[row], [], []
                    token[slot], position[slot], budget[slot] = prompts[row][-1], len(prompts[row]) - 1, max_new_tokens
            free = [s for s in range(slots) if owner[s] is None]
        if not any(o is not None for o in owner):
            continue
        key = jax.random.fold_in(base_key, next(calls))
        last = max(int(position[s]) for s in range(slots) if owner[s] is not None)
        span = min(length, cache_length(last + 1, CHUNK_STEPS))
        caches, out, out_logps, new_position = _advance(
            config, sampling, CHUNK_STEPS, span, frozen, table, caches, jnp.asarray(token), jnp.asarray(position),
            jnp.asarray(budget), stop_ids, key,
        )
        out, out_logps, new_position = np.asarray(out), np.asarray(out_logps), np.asarray(new_position)
        for slot in range(slots):
            if owner[slot] is None:
                continue
            kept = out[slot] >= 0
            new = [int(t) for t in out[slot][kept]]
            generated[slot] += new
            logps[slot] += [float(v) for v in out_logps[slot][kept]]
            budget[slot] -= len(new)
            if new:
                token[slot] = new[-1]
            position[slot] = new_position[slot]
            stopped = bool(new) and new[-1] in stop_token_ids
            if stopped or budget[slot] <= 0 or (ended and ended(owner[slot], generated[slot])):
                finish(slot)
        if progress:
            progress(done, tokens + sum(len(generated[s]) for s in range(slots) if owner[s] is not None))
    return results, result_logps


def _prefill(config, sampling, frozen, table, caches, group, prompts, slots, call, base_key):
    """Feed the prompts of `group` [(slot, prompt index)] into their slots; the first new token of each, and its log-prob."""
    rows = np.full(PREFILL_ROWS, slots, np.int32)  # slot `slots` is past the end: writes are dropped
    for i, (slot, _) in enumerate(group):
        rows[i] = slot
    lengths = [len(prompts[p]) for _, p in group]
    first = np.zeros(len(group), np.int32)
    first_logp = np.zeros(len(group), np.float32)
    for start in range(0, max(lengths), PREFILL_CHUNK):
        ids = np.zeros((PREFILL_ROWS, PREFILL_CHUNK), np.int32)
        count = np.zeros(PREFILL_ROWS, np.int32)
        for i, (_, p) in enumerate(group):
            piece = prompts[p][start : start + PREFILL_CHUNK]
            ids[i, : len(piece)] = piece
            count[i] = len(piece)
        key = jax.random.fold_in(jax.random.fold_in(base_key, call), start)
        caches, nxt, nxt_logp = _extend(
            config, sampling, frozen, table, caches, jnp.asarray(rows), jnp.asarray(ids),
            jnp.full(PREFILL_ROWS, start, jnp.int32), jnp.asarray(count), key,
        )
        nxt, nxt_logp = np.asarray(nxt), np.asarray(nxt_logp)
        for i, n in enumerate(lengths):
            if start < n <= start + PREFILL_CHUNK:  # this chunk held the prompt's last token
                first[i], first_logp[i] = nxt[i], nxt_logp[i]
    return caches, first, first_logp


def flops_per_token(config):
    """Multiply-adds x 2 of one decoded token (weights only, attention excluded)."""
    d, f, n, k, h = config.hidden_dim, config.ffw_dim, config.num_query_heads, config.num_key_value_heads, config.head_dim
    per_layer = d * h * (2 * n + 2 * k) + 3 * d * f
    return 2 * (config.num_layers * per_layer + config.vocabulary_size * d)

