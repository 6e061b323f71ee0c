"""GRPO's clipped surrogate loss (`objectives.policy_loss`) against the papers' formulas, written here in NumPy float64.

The reference reads the completions DENSE, one (S, T) row per completion
with its mask and its advantage, as DeepSeekMath (eq. 3), DAPO (eq. 8) and
Dr. GRPO write the loss. gemma-lora's function reads the same tokens PACKED:
each completion contiguous in one of a few rows, in shuffled order, with
shuffled sequence ids, gaps between them and finite garbage (not zeros) on
every non-completion position, so a token that escapes the mask shows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import assert_close_at_scale

from gemma_lora.training import objectives

# The loss is a sum of at most S x T = 54 per-token terms, each a few float32 operations deep: its float32 error is
# at most ~(54 + a few) ulps of the summed MAGNITUDES of the terms (`reference_loss(..., magnitude=True)`), and
# 1e-5 = 84 float32 epsilons of that scale bounds it. The reference's own error (float64) is ~1e-16 of it.
RELATIVE = 1e-5
LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
LENGTHS = (9, 1, 5, 7, 3, 8)  # tokens per completion: the longest fills T, one has a single token
ADVANTAGES = (1.3, -0.7, 0.4, -1.6, -0.25, 0.9)  # both signs, away from 0
MAX_COMPLETION_LENGTH = 12  # > T, as a generation limit is: dr_grpo divides by it, not by the longest completion
MARGIN = 0.02  # ratios stay this far from 1 - epsilon_low and 1 + epsilon_high: the loss is smooth there


def completions(seed, mu, epsilon_low=0.2, epsilon_high=0.2):
    """Dense float32 (S, T) log-probs (policy, sampling policy, reference), (S,) advantages, (S, T) bool mask.

    mu = 1: the sampling policy is the policy (ratio 1). mu > 1: token t of completion s has its ratio below
    1 - epsilon_low, inside the range or above 1 + epsilon_high by (s + t) mod 3, so every completion of 3 or
    more tokens has all three and both advantage signs meet both clipped sides. Padding holds garbage.
    """
    rng = np.random.default_rng(seed)
    shape = (len(LENGTHS), max(LENGTHS))
    mask = np.arange(shape[1])[None, :] < np.asarray(LENGTHS)[:, None]
    logps = rng.uniform(-4.0, -0.05, shape)
    if mu == 1:
        ratio = np.ones(shape)
    else:
        low = rng.uniform(0.5, 1.0 - epsilon_low - MARGIN, shape)
        inside = rng.uniform(1.0 - epsilon_low + MARGIN, 1.0 + epsilon_high - MARGIN, shape)
        high = rng.uniform(1.0 + epsilon_high + MARGIN, 1.6, shape)
        region = (np.arange(shape[0])[:, None] + np.arange(shape[1])[None, :]) % 3
        ratio = np.choose(region, [low, inside, high])
    old = logps - np.log(ratio)
    ref = logps + rng.normal(0.0, 0.3, shape)
    f32 = np.float32
    garbage = ~mask
    logps[garbage], old[garbage], ref[garbage] = -9.0, rng.uniform(-5, 0, garbage.sum()), 3.0
    return {"logps": logps.astype(f32), "old": old.astype(f32), "ref": ref.astype(f32),
            "advantages": np.asarray(ADVANTAGES, f32), "mask": mask}


def pack(dense, seed, rows=3, unused_ids=3):
    """The dense completions in a (rows, length) layout: each completion contiguous in a random row, in shuffled
    order with random gaps; sequence ids a shuffled 1..S, and `sequences` = S + `unused_ids` (a batch's capacity,
    as the packer gives). Returns the packed arrays and `where`: (row, column) of each dense token, -1 off mask."""
    rng = np.random.default_rng(seed)
    mask = dense["mask"]
    count, width = mask.shape
    ids = rng.permutation(count) + 1
    where = np.full((count, width, 2), -1)
    ends = np.zeros(rows, int)
    for s in rng.permutation(count):
        row = int(np.argmin(ends)) if rng.random() < 0.5 else int(rng.integers(rows))
        start = ends[row] + int(rng.integers(0, 3))
        n = int(mask[s].sum())
        where[s, :n, 0], where[s, :n, 1] = row, start + np.arange(n)
        ends[row] = start + n
    shape = (rows, int(ends.max()) + 2)
    f32 = np.float32
    packed = {"logps": rng.uniform(-6, 0, shape).astype(f32), "old": rng.uniform(-6, 0, shape).astype(f32),
              "ref": rng.uniform(-6, 0, shape).astype(f32), "advantages": rng.normal(0, 2, shape).astype(f32),
              "mask": np.zeros(shape, bool), "sequence_ids": np.zeros(shape, np.int32)}
    s, t = np.nonzero(mask)
    r, c = where[s, t, 0], where[s, t, 1]
    for name in ("logps", "old", "ref"):
        packed[name][r, c] = dense[name][s, t]
    packed["advantages"][r, c] = dense["advantages"][s]
    packed["mask"][r, c] = True
    packed["sequence_ids"][r, c] = ids[s]
    packed["sequences"] = count + unused_ids
    return packed, where


def unpack(values, where):
    """Packed per-token values back to the dense (S, T) layout, 0 off the mask."""
    dense = np.zeros(where.shape[:2])
    valid = where[..., 0] >= 0
    dense[valid] = values[where[valid][:, 0], where[valid][:, 1]]
    return dense


def reference_loss(logps, old, ref, advantages, mask, loss_type, epsilon_low, epsilon_high, beta,
                   max_completion_length, magnitude=False):
    """The batch loss from the papers' definitions, float64, dense; `magnitude`: the same reduction of the
    per-token terms' magnitudes |r A| + beta (e^d + |d| + 1), the scale a float32 evaluation's error is of."""
    logps, old, ref = (np.asarray(x, np.float64) for x in (logps, old, ref))
    a = np.asarray(advantages, np.float64)[:, None]
    ratio = np.exp(logps - old)
    surrogate = np.minimum(ratio * a, np.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high) * a)
    d = ref - logps
    per_token = -surrogate + beta * (np.exp(d) - d - 1.0)  # Schulman's k3 estimator of KL(policy || reference)
    if magnitude:
        per_token = np.abs(ratio * a) + beta * (np.exp(d) + np.abs(d) + 1.0)
    per_token = np.where(mask, per_token, 0.0)
    if loss_type == "grpo":  # DeepSeekMath: each completion's token mean, then the mean over completions
        return float(np.mean(per_token.sum(1) / mask.sum(1)))
    if loss_type == "dapo":  # DAPO: one token mean over the batch
        return float(per_token.sum() / mask.sum())
    if loss_type == "dr_grpo":  # Dr. GRPO: a constant normaliser, completions x the generation limit
        return float(per_token.sum() / (mask.shape[0] * max_completion_length))
    raise AssertionError(loss_type)


def reference_clipped(logps, old, advantages, mask, epsilon_low, epsilon_high):
    """TRL's clipped-region count: (r < 1 - el and A < 0) or (r > 1 + eh and A > 0), over the completion tokens."""
    ratio = np.exp(np.asarray(logps, np.float64) - old)
    a = np.asarray(advantages)[:, None]
    region = ((ratio < 1.0 - epsilon_low) & (a < 0)) | ((ratio > 1.0 + epsilon_high) & (a > 0))
    return int((region & mask).sum())


def gemma_lora_loss(packed, settings):
    """gemma-lora's loss (loss sum / weight), its metric sums and d loss / d logps, on the packed layout."""
    def loss(logps):
        loss_sum, weight, sums = objectives.policy_loss(
            logps, jnp.asarray(packed["old"]), jnp.asarray(packed["ref"]), jnp.asarray(packed["advantages"]),
            jnp.asarray(packed["mask"]), jnp.asarray(packed["sequence_ids"]), packed["sequences"], **settings)
        return loss_sum / weight, sums

    (value, sums), grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(packed["logps"]))
    return float(value), {k: float(v) for k, v in sums.items()}, np.asarray(grad, np.float64)


def dense_args(dense):
    return dense["logps"], dense["old"], dense["ref"], dense["advantages"], dense["mask"]


def settings_of(loss_type, beta, epsilon_low=0.2, epsilon_high=0.2):
    return {"loss_type": loss_type, "epsilon_low": epsilon_low, "epsilon_high": epsilon_high, "beta": beta,
            "max_completion_length": MAX_COMPLETION_LENGTH}


CASES = [(loss_type, mu, beta) for loss_type in LOSS_TYPES for mu in (1, 2) for beta in (0.0, 0.04)]
IDS = [f"{loss_type}-mu{mu}-beta{beta}" for loss_type, mu, beta in CASES]


@pytest.mark.parametrize("loss_type, mu, beta", CASES, ids=IDS)
def test_loss_and_metric_sums_match_the_formulas(loss_type, mu, beta):
    dense = completions(seed=10 + mu, mu=mu)
    packed, _ = pack(dense, seed=20 + mu)
    settings = settings_of(loss_type, beta)
    value, sums, _ = gemma_lora_loss(packed, settings)
    want = reference_loss(*dense_args(dense), **settings)
    scale = reference_loss(*dense_args(dense), **settings, magnitude=True)
    assert abs(value - want) <= RELATIVE * scale, (value, want, scale)

    mask = dense["mask"]
    assert sums["tokens"] == mask.sum()
    clipped = reference_clipped(dense["logps"], dense["old"], dense["advantages"], mask, 0.2, 0.2)
    assert sums["clipped"] == clipped
    if mu > 1:  # the data reach every region, and TRL's count is not simply "ratio outside the range"
        ratio = np.exp(dense["logps"].astype(np.float64) - dense["old"])
        outside = ((ratio < 0.8) | (ratio > 1.2)) & mask
        assert 0 < clipped < outside.sum()
    else:
        assert clipped == 0
    d = dense["ref"].astype(np.float64) - dense["logps"]
    kl = np.where(mask, np.exp(d) - d - 1.0, 0.0).sum() if beta else 0.0
    kl_scale = np.where(mask, np.exp(d) + np.abs(d) + 1.0, 0.0).sum()
    assert abs(sums["kl"] - kl) <= RELATIVE * kl_scale, (sums["kl"], kl)


@pytest.mark.parametrize("loss_type, mu, beta", CASES, ids=IDS)
def test_gradient_matches_finite_differences(loss_type, mu, beta):
    dense = completions(seed=30 + mu, mu=mu)
    packed, where = pack(dense, seed=40 + mu)
    settings = settings_of(loss_type, beta)
    _, _, grad = gemma_lora_loss(packed, settings)
    assert np.all(grad[~packed["mask"]] == 0.0)  # nothing flows to the garbage between completions

    # Central differences in float64, step h: truncation ~h^2 (1e-12), rounding ~1e-16 / h (1e-10); every ratio
    # is MARGIN (>> h) from a clip boundary, so each token's loss is smooth over the step.
    h = 1e-6
    logps = dense["logps"].astype(np.float64)
    want = np.zeros(logps.shape)
    for s, t in zip(*np.nonzero(dense["mask"])):
        step = np.zeros(logps.shape)
        step[s, t] = h
        up, down = (reference_loss(logps + sign * step, *dense_args(dense)[1:], **settings) for sign in (1, -1))
        want[s, t] = (up - down) / (2 * h)
    assert np.abs(want).max() > 0
    # Each element is one token's derivative: a few float32 ulps of it, or of the gradient's scale.
    assert_close_at_scale(unpack(grad, where), want, rtol=1e-5, scale_eps=64)
    if mu > 1 and beta == 0:  # the clipped tokens, and only they, get no gradient
        ratio = np.exp(logps - dense["old"])
        a = dense["advantages"][:, None].astype(np.float64)
        frozen = (((ratio < 0.8) & (a < 0)) | ((ratio > 1.2) & (a > 0))) & dense["mask"]
        assert frozen.any() and np.all(unpack(grad, where)[frozen] == 0.0)
        assert np.all(unpack(grad, where)[dense["mask"] & ~frozen] != 0.0)


def test_epsilon_low_and_high_are_not_swapped():
    """epsilon_low 0.1, epsilon_high 0.3: ratios in (0.7, 0.9) with A < 0 and in (1.1, 1.3) with A > 0 are clipped
    by the first bound and not the second, or the other way round, so swapping the two changes the loss."""
    low, high = 0.1, 0.3
    rng = np.random.default_rng(5)
    dense = completions(seed=6, mu=1)
    mask, a = dense["mask"], dense["advantages"][:, None]
    ratio = np.where(a < 0, rng.uniform(0.7 + MARGIN, 0.9 - MARGIN, mask.shape),
                     rng.uniform(1.1 + MARGIN, 1.3 - MARGIN, mask.shape))
    dense["old"] = (dense["logps"] - np.log(ratio)).astype(np.float32)
    packed, where = pack(dense, seed=7)
    settings = settings_of("dapo", 0.0, epsilon_low=low, epsilon_high=high)
    swapped = settings_of("dapo", 0.0, epsilon_low=high, epsilon_high=low)
    value, sums, grad = gemma_lora_loss(packed, settings)
    want = reference_loss(*dense_args(dense), **settings)
    wrong = reference_loss(*dense_args(dense), **swapped)
    scale = reference_loss(*dense_args(dense), **settings, magnitude=True)
    assert abs(want - wrong) > 1000 * RELATIVE * scale  # the case tells the two apart
    assert abs(value - want) <= RELATIVE * scale, (value, want, wrong)
    # Correct: only the A < 0 tokens (r < 0.9) are clipped and frozen; swapped, it would be the A > 0 ones (r > 1.1).
    negative = np.broadcast_to(a < 0, mask.shape) & mask
    assert sums["clipped"] == reference_clipped(dense["logps"], dense["old"], dense["advantages"], mask, low, high)
    assert sums["clipped"] == negative.sum()
    dense_grad = unpack(grad, where)
    assert np.all(dense_grad[negative] == 0.0) and np.all(dense_grad[mask & ~negative] != 0.0)

