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

A forward today has one function, the one SFT needs:

    forward.token_nll_sums() -> (sum of weight x -log p(label), sum of weights)

over the batch's weighted tokens (`scoring.token_nll` on KerasHub's logits
for the Keras engine; the fused, chunked head of `fast/forward.py` for the
fast engine, which never holds the batch's logits).

How the next objectives plug in without changing the loop:

- Preference pairs (DPO, IPO; ORPO and SimPO without a reference): the data
  layer writes each pair as two rows (prompt + chosen, prompt + rejected)
  that a batch keeps together, and the forward gains `sequence_logps()`, the
  sum of log p over each sequence's loss tokens (a row on the Keras engine, a
  packed segment on the fast engine). The reference model's log-probs are the
  same function with LoRA off, computed once before training and carried as
  batch columns. `loss` is then the method's formula over the pairs, and its
  weight the number of pairs.
- RL with verifiable rewards (GRPO): a step starts by generating. The
  objective gets a `prepare(policy, batch)` hook, called by the engine
  before the jitted step, that samples completions with the decoder,
  scores them with the reward functions and returns the batch the loss
  sees (completions, their sampling log-probs, advantages); `loss` uses a
  per-token `token_logps()` for the clipped ratio and the KL term.

Both are new forward functions and new objective classes; the loop, the
checkpoints (which save the trainable weights and the optimizer, whatever
the loss) and the scoring stay as they are.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class SFT:
    """Supervised fine-tuning: the cross-entropy of each loss-carrying token, weighted by its loss weight.

    Which tokens carry loss (responses only, every model turn of a chat, or
    every token with the recipe) is the data's choice (`data.tokenize_rows`);
    the objective only sums. Frozen and hashable: it is part of the key of
    the compiled step.
    """

    name: str = "sft"

    def loss(self, forward):
        return forward.token_nll_sums()


OBJECTIVES = {"sft": SFT}


def objective_of(config):
    """The objective a run trains with (supervised fine-tuning, until the config names others)."""
    return OBJECTIVES[getattr(config, "objective", "sft")]()
