"""What a training objective is to the loop, and supervised fine-tuning (`SFT`), the first one.

The loop (`loop.run`), the engines, checkpoints, scoring and progress know
nothing about what is learned. Inside its jitted step an engine hands the
objective a *forward*: the model's differentiable functions of the trainable
weights for one batch. The objective returns a loss sum and the weight that
sum is over; the loop divides by the weight of the whole optimizer step (so
`grad_accumulation` equals one larger batch) and logs `nll / weight`:

    class Objective:
        name: str                                  # the run's `objective`
        def loss(self, forward) -> (loss_sum, weight_sum)   # traced, in float32

A forward has the functions the objectives read:

    forward.token_nll_sums() -> (sum of weight x -log p(label), sum of weights)
    forward.sequence_logps() -> (policy (pairs, 2), token counts (pairs, 2), reference (pairs, 2))

`token_nll_sums` is over the batch's weighted tokens (`scoring.token_nll` on
KerasHub's logits for the Keras engine; the fused, chunked head of
`fast/forward.py` for the fast engine, which never holds the batch's logits).
`sequence_logps` is per preference pair of the batch: the summed log p of
the chosen and the rejected response, their token counts, and the same
sums under the reference model, which is the starting model (the base with
LoRA off, or with `init_adapter`'s factors): computed once before training
(`training/preference.py`) and carried as a batch column, so a step runs
the policy only. A batch (`packing.pack_pairs`) keeps each pair's two
sequences together; an objective's weight is then its number of pairs.

An objective also says how to read a batch's weight on the host
(`batch_weight`), whether it learns from pairs (`pairs`) and whether it
needs the reference (`uses_reference`).

RL with verifiable rewards (`GRPO`) learns from completions it samples
itself: before a batch's first step the engine (`training/rollouts.py`)
samples `num_generations` completions per prompt with the decoder, scores
them with the reward functions and packs them with their advantages; the
forward then gives

    forward.completion_logps() -> (policy log p of each completion token, the batch's columns)

per position of the packed batch, at the sampling temperature, with the
reference's (the starting model's LoRA factors, when beta > 0) and the
sampling policy's (for grpo_iterations > 1) in the batch. The loop, the
checkpoints (the trainable weights and the optimizer, whatever the loss)
and the scoring stay as they are.
"""

from dataclasses import dataclass

from gemma_lora import runtime

runtime.ensure_runtime()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402


@dataclass(frozen=True)
class SFT:
    """Supervised fine-tuning: the cross-entropy of each loss-carrying token, weighted by its loss weight.

    Which tokens carry loss (responses only, every model turn of a chat, or
    every token with the recipe) is the data's choice (`data.tokenize_rows`);
    the objective only sums. Frozen and hashable: it is part of the key of
    the compiled step.
    """

    name: str = "sft"
    pairs = False  # learns from single examples, not preference pairs
    uses_reference = False

    def loss(self, forward):
        return forward.token_nll_sums()

    def batch_weight(self, batch):
        """The weight a batch's loss sum is over, read on the host: its loss-carrying tokens' weights."""
        return float(batch["loss_weights"].sum())


@dataclass(frozen=True)
class PairTerms:
    """Per pair of a batch: the objective's loss, each side's implicit reward and the log-probabilities it used."""

    losses: jax.Array
    chosen_rewards: jax.Array
    rejected_rewards: jax.Array
    chosen_logps: jax.Array
    rejected_logps: jax.Array
    mask: jax.Array  # 1 for the batch's real pairs, 0 for its padding


@dataclass(frozen=True)
class Preference:
    """What the four preference objectives share: per-pair log-probabilities in, a loss per pair out.

    The forward gives `sequence_logps()`: per pair, the summed log p of the
    chosen and the rejected response tokens under the policy, their token
    counts, and the starting model's (the reference's) sums, computed once
    before training and carried as a batch column. `losses` is the method's
    formula; the loss a step minimises is its mean over the step's pairs
    (weight = the number of pairs). Reward accuracy is the share of pairs whose
    chosen reward beats the rejected one.
    """

    beta: float = 0.1
    label_smoothing: float = 0.0
    pairs = True
    uses_reference = False

    def terms(self, forward):
        logps, counts, reference = forward.sequence_logps()
        mask = (counts[:, 0] > 0).astype(jnp.float32)
        counts = jnp.maximum(counts, 1.0)
        losses, rewards, used = self.losses(logps, counts, reference)
        losses = jnp.where(mask > 0, losses, 0.0)
        return PairTerms(losses, rewards[:, 0], rewards[:, 1], used[:, 0], used[:, 1], mask)

    def loss(self, forward):
        terms = self.terms(forward)
        return jnp.sum(terms.losses), jnp.sum(terms.mask)

    def batch_weight(self, batch):
        """The number of pairs in a batch (`packing.pack_pairs`), read on the host."""
        return float(len(batch["pair_index"]))

    def smoothed(self, z):
        # Conservative DPO (Mitchell 2023, TRL's label_smoothing): a share of the labels is taken as flipped.
        return -(1.0 - self.label_smoothing) * jax.nn.log_sigmoid(z) - self.label_smoothing * jax.nn.log_sigmoid(-z)


@dataclass(frozen=True)
class DPO(Preference):
    """DPO (Rafailov et al. 2023, eq. 7), TRL's loss_type="sigmoid", with its label smoothing.

    z = beta [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))], sums over response tokens;
    loss = -(1 - e) log sigmoid(z) - e log sigmoid(-z); rewards beta (log pi - log ref).
    """

    name: str = "dpo"
    uses_reference = True

    def losses(self, logps, counts, reference):
        ratios = logps - reference
        return self.smoothed(self.beta * (ratios[:, 0] - ratios[:, 1])), self.beta * ratios, logps


@dataclass(frozen=True)
class IPO(Preference):
    """IPO (Azar et al. 2023, eq. 17) as TRL's loss_type="ipo" computes it: on log-probabilities per token.

    h = (log pi(y_w) - log ref(y_w)) / |y_w| - (log pi(y_l) - log ref(y_l)) / |y_l|;
    loss = (h - 1 / (2 beta))^2; rewards beta (log pi - log ref) on the sums, as DPO's.
    The paper writes h with whole-sequence sums; TRL (and this) divide each
    by its response's token count, so long responses do not dominate the margin.
    """

    name: str = "ipo"
    uses_reference = True

    def losses(self, logps, counts, reference):
        ratios = (logps - reference) / counts
        h = ratios[:, 0] - ratios[:, 1]
        return jnp.square(h - 1.0 / (2.0 * self.beta)), self.beta * (logps - reference), logps


@dataclass(frozen=True)
class SimPO(Preference):
    """SimPO (Meng et al. 2024, eq. 6), TRL's CPOTrainer with loss_type="simpo" and cpo_alpha=0: no reference.

    z = beta (mean log pi(y_w) - mean log pi(y_l)) - gamma; loss = -(1 - e) log sigmoid(z) - e log sigmoid(-z);
    rewards beta x mean log pi (per token, the paper's length normalisation).
    """

    name: str = "simpo"
    gamma: float = 0.5

    def losses(self, logps, counts, reference):
        means = logps / counts
        return self.smoothed(self.beta * (means[:, 0] - means[:, 1]) - self.gamma), self.beta * means, means


@dataclass(frozen=True)
class ORPO(Preference):
    """ORPO (Hong et al. 2024, eqs. 6-7), as TRL's ORPOTrainer: the chosen responses' cross-entropy plus an odds ratio.

    With mean log-probabilities per token m_w, m_l: log odds(y) = m - log(1 - exp(m));
    loss = -m_w - lambda log sigmoid(log odds(y_w) - log odds(y_l)); rewards lambda x m.
    Where this differs from TRL 1.16: TRL's cross-entropy term is over every
    token of the chosen row after `<bos>`, the prompt's included, pooled over
    the batch; here it is over the response only (as every objective here) and
    per pair (the mean of the pairs' means, so every pair weighs alike). The
    odds-ratio term and the log-probabilities are TRL's. `beta` is lambda.
    """

    name: str = "orpo"

    def losses(self, logps, counts, reference):
        means = logps / counts
        # log(1 - exp(m)) for m < 0, kept finite as m -> 0 (a response the model is sure of).
        log_rest = jnp.log1p(-jnp.exp(jnp.minimum(means, -1e-6)))
        log_odds = (means[:, 0] - means[:, 1]) - (log_rest[:, 0] - log_rest[:, 1])
        return -means[:, 0] - self.beta * jax.nn.log_sigmoid(log_odds), self.beta * means, means


def policy_loss(logps, old_logps, ref_logps, advantages, mask, sequence_ids, sequences, loss_type="dapo",
                epsilon_low=0.2, epsilon_high=0.2, beta=0.0, max_completion_length=1):
    """GRPO's clipped surrogate loss of one batch of completions: (loss sum, weight, sums for the metrics).

    Every argument but the settings is per token, of one shape (a packed
    batch's (rows, length)): the policy's log p of the token (`logps`, the
    only differentiable one), the sampling policy's (`old_logps`), the
    reference's (`ref_logps`, read only when beta > 0), the token's
    completion's advantage, `mask` 1 on completion tokens, and
    `sequence_ids` (1..sequences: the completion a token belongs to, 0 none).

    Per token, with r = exp(logps - old_logps) and A the advantage
    (DeepSeekMath, Shao et al. 2024, eq. 3; DAPO, Yu et al. 2025, eq. 8 for
    the separate clipping ranges):

        l = -min(r A, clip(r, 1 - epsilon_low, 1 + epsilon_high) A) + beta kl,
        kl = exp(ref - logps) - (ref - logps) - 1          (Schulman's k3 estimator, as the paper)

    and the batch's loss, by `loss_type` (TRL's `loss_type` of the same names):

        grpo:    mean over completions of each completion's mean l      weight = completions
        dapo:    sum of l over every completion token / token count     weight = tokens
        dr_grpo: sum of l / (completions x max_completion_length)      weight = completions (Liu et al. 2025)

    loss = loss sum / weight; the loop divides by the weight of the whole
    optimizer step, so grad_accumulation matches one larger batch (for dapo,
    TRL's `num_items_in_batch`).
    """
    mask = mask.astype(jnp.float32)
    ratio = jnp.exp(logps - old_logps)
    clipped = jnp.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high)
    per_token = -jnp.minimum(ratio * advantages, clipped * advantages)
    kl = jnp.zeros_like(logps)
    if beta:
        delta = ref_logps - logps
        kl = jnp.exp(delta) - delta - 1.0
        per_token = per_token + beta * kl
    per_token = per_token * mask
    ids = sequence_ids.reshape(-1)
    tokens = jax.ops.segment_sum(mask.reshape(-1), ids, sequences + 1)[1:]
    completions = jnp.sum(tokens > 0).astype(jnp.float32)
    if loss_type == "grpo":
        per_completion = jax.ops.segment_sum(per_token.reshape(-1), ids, sequences + 1)[1:]
        loss_sum, weight = jnp.sum(per_completion / jnp.maximum(tokens, 1.0)), completions
    elif loss_type == "dapo":
        loss_sum, weight = jnp.sum(per_token), jnp.sum(mask)
    elif loss_type == "dr_grpo":
        loss_sum, weight = jnp.sum(per_token) / max_completion_length, completions
    else:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r}")
    # TRL's clip metrics: a token is clipped where the clipped term is the one min() takes and moves nothing.
    low = (ratio < 1.0 - epsilon_low) & (advantages < 0)
    high = (ratio > 1.0 + epsilon_high) & (advantages > 0)
    sums = {"tokens": jnp.sum(mask), "kl": jnp.sum(kl * mask), "clipped": jnp.sum((low | high) * mask)}
    return loss_sum, weight, sums


@dataclass(frozen=True)
class GRPO:
    """Group Relative Policy Optimization on sampled completions (`policy_loss`), with its DAPO and Dr. GRPO forms.

    The advantages (rewards normalised within each prompt's group) are
    computed on the host when the completions are scored
    (`rollouts.group_advantages`); the step reads them as a batch column.
    `old_logps` is the sampling policy's log p: the policy's own, without
    gradient, in a batch's first update (r = 1, as TRL when
    grpo_iterations = 1), and the values that update computed in the later
    grpo_iterations - 1 (`use_old` = 1).
    """

    name: str = "grpo"
    loss_type: str = "dapo"
    beta: float = 0.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    max_completion_length: int = 1
    temperature: float = 1.0
    pairs = False
    uses_reference = False

    def terms(self, forward):
        """(loss sum, weight, metric sums, the policy's log p per position) of the forward's batch."""
        logps, batch = forward.completion_logps(self.temperature)
        old = jnp.where(batch["use_old"] > 0, batch["old_logps"], jax.lax.stop_gradient(logps))
        reference = batch.get("ref_logps", jnp.zeros_like(logps))
        loss_sum, weight, sums = policy_loss(
            logps, old, reference, batch["advantages"], batch["loss_weights"] > 0, batch["sequence_ids"],
            forward.sequences, self.loss_type, self.epsilon_low,
            self.epsilon_high, self.beta, self.max_completion_length)
        return loss_sum, weight, sums, logps

    def loss(self, forward):
        loss_sum, weight, _, _ = self.terms(forward)
        return loss_sum, weight

    def batch_weight(self, batch):
        """A batch's completions (grpo, dr_grpo) or completion tokens (dapo), read on the host once sampled."""
        if self.loss_type == "dapo":
            return float((batch["loss_weights"] > 0).sum())
        return float(batch["completions"])


OBJECTIVES = {"sft": SFT, "dpo": DPO, "ipo": IPO, "orpo": ORPO, "simpo": SimPO, "grpo": GRPO}


def objective_of(config):
    """The objective a run trains with, with its settings from the config."""
    name = getattr(config, "objective", "sft")
    if name == "sft":
        return SFT()
    if name == "orpo":
        return ORPO(beta=config.orpo_lambda)
    if name == "grpo":
        return GRPO(loss_type=config.grpo_loss, beta=config.resolved_beta(), epsilon_low=config.epsilon,
                    epsilon_high=config.epsilon if config.epsilon_high is None else config.epsilon_high,
                    max_completion_length=config.max_new_tokens, temperature=config.temperature)
    settings = {"beta": config.resolved_beta(), "label_smoothing": config.label_smoothing}
    if name == "simpo":
        return SimPO(**settings, gamma=config.simpo_gamma)
    if name == "ipo":
        return IPO(beta=settings["beta"])
    return DPO(**settings)


def pair_metrics(terms):
    """Sums over a batch's real pairs of what an evaluation reports (divide by `pairs`)."""
    mask = terms.mask
    return {
        "pairs": jnp.sum(mask),
        "loss": jnp.sum(terms.losses * mask),
        "reward_accuracy": jnp.sum((terms.chosen_rewards > terms.rejected_rewards) * mask),
        "reward_margin": jnp.sum((terms.chosen_rewards - terms.rejected_rewards) * mask),
        "chosen_logps": jnp.sum(terms.chosen_logps * mask),
        "rejected_logps": jnp.sum(terms.rejected_logps * mask),
    }
