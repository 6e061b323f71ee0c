"""GRPO's batches on the host: which prompts a step samples for, group advantages, completions packed with their prompt.

A GRPO run's plan (`epoch_batches`) is a list of prompt batches: each holds
`batch_size` prompt indices and the seed its completions are sampled with,
drawn from (seed, epoch, batch), so a resumed run samples the same
completions again. An accumulation window of batches is repeated
`grpo_iterations` times: the same dicts, so the completions sampled for the
first pass (kept in the dict by the engine) are reused by the others.

A batch's completions are packed for the training step with their prompt
once (`pack_groups`): a group is one segment of a row holding the prompt
(branch 0) and then each completion (branch 1, 2, ...), whose positions
continue the prompt's and which see the prompt and themselves only
(`forward.branch_mask`). The prompt's last token starts every branch (it
predicts the completion's first token, a different one in each), so a
prompt of P tokens and G completions of L tokens take P - 1 + G L
positions instead of G (P + L): on the category demo's prompts (about 100
tokens) and 8 completions of about 4, a sixth.
"""

import numpy as np

from gemma_lora.errors import ConfigError
from gemma_lora.training.loop import epoch_order


def epoch_batches(prompts, config, epoch):
    """The epoch's prompt batches in training order, each window of grad_accumulation repeated grpo_iterations times."""
    order = epoch_order(len(prompts), config, epoch)
    size = config.batch_size
    batches = [{"prompt_index": [int(i) for i in order[at : at + size]],
                "seed": int(np.random.default_rng([config.seed, epoch, at // size, 7]).integers(1 << 31))}
               for at in range(0, len(order), size)]
    window = config.grad_accumulation
    out = []
    for at in range(0, len(batches), window):
        out += batches[at : at + window] * config.grpo_iterations
    return out


def batch_contents(prompts, batch):
    """(completions, real tokens) of a prompt batch once sampled (0, 0 before)."""
    packed = batch.get("packed")
    if packed is None:
        return 0, 0
    return int(packed["completions"]), int((packed["segment_ids"] > 0).sum())


def group_advantages(rewards, group, scale="group"):
    """Each completion's advantage: its reward minus its group's mean, over a standard deviation (TRL's `scale_rewards`).

    rewards: (n,) with n = groups x `group`, a group's completions together.
    scale: "group" (each group's sample standard deviation, n - 1, as
    torch.std), "batch" (the whole batch's), "none" (Dr. GRPO: not divided).
    The divisor gets 1e-4 added, as TRL, so a group of equal rewards gives 0.
    Returns (advantages (n,), whether each completion's group has equal rewards (n,)).
    """
    rewards = np.asarray(rewards, np.float64).reshape(-1, group)
    centred = rewards - rewards.mean(axis=1, keepdims=True)
    std = rewards.std(axis=1, ddof=1, keepdims=True) * np.ones_like(rewards)
    if scale == "batch":
        std = np.full_like(rewards, rewards.std(ddof=1) if rewards.size > 1 else 0.0)
    equal = np.isclose(rewards.std(axis=1, ddof=1, keepdims=True), 0.0) * np.ones_like(rewards)
    advantages = centred if scale == "none" else centred / (std + 1e-4)
    return advantages.reshape(-1).astype(np.float32), equal.reshape(-1).astype(bool)


COLUMNS = ("token_ids", "positions", "segment_ids", "branch_ids", "labels", "loss_weights", "sequence_ids",
           "advantages", "sampling_logps", "old_logps")


def pack_groups(prompts, completions, advantages, sampling_logps, sequence_length, row_multiple):
    """A batch's groups packed into rows of `sequence_length`: dict of (rows, sequence_length) arrays.

    prompts: per group, its prompt's token ids (<bos> first); completions:
    per group, its completions' token ids (each >= 1 token, a stop token
    last where one ended it); advantages and sampling_logps: per group, per
    completion, its advantage and its tokens' log-probs. A branch that does
    not fit the row after the others starts a new row with the prompt again.
    Rows are rounded up to a multiple of `row_multiple` (empty rows: segment 0).
    Columns: see `COLUMNS`; `sequence_ids` numbers the completions 1..n in
    the order given, on the positions whose label is one of their tokens.
    """
    rows = []
    state = {"row": None}

    def new_row():
        row = {name: np.zeros(sequence_length, np.float32 if name in ("loss_weights", "advantages", "sampling_logps",
                                                                     "old_logps") else np.int32)
               for name in COLUMNS}
        rows.append(row)
        state.update(row=row, used=0, segment=0)

    def start_group(prefix):
        if state["row"] is None or state["used"] + len(prefix) + 1 > sequence_length:
            new_row()
        state["segment"] += 1
        row, at = state["row"], state["used"]
        row["token_ids"][at : at + len(prefix)] = prefix
        row["positions"][at : at + len(prefix)] = np.arange(len(prefix))
        row["segment_ids"][at : at + len(prefix)] = state["segment"]
        state["used"] += len(prefix)

    sequence = 0
    for prompt, group, group_advantages_, group_logps in zip(prompts, completions, advantages, sampling_logps):
        prefix = np.asarray(prompt[:-1], np.int32)
        if len(prefix) + max(map(len, group)) > sequence_length:
            raise ConfigError(
                f"a prompt of {len(prompt)} tokens and a completion of {max(map(len, group))} do not fit "
                f"sequence_length={sequence_length}: raise --sequence-length or lower --max-new-tokens."
            )
        start_group(prefix)
        for branch, (completion, advantage, logps) in enumerate(zip(group, group_advantages_, group_logps), start=1):
            sequence += 1
            n = len(completion)
            if state["used"] + n > sequence_length:  # a new row, with the prompt again
                state["row"] = None
                start_group(prefix)
            row, at = state["row"], state["used"]
            inputs = [prompt[-1], *completion[:-1]]
            row["token_ids"][at : at + n] = inputs
            row["positions"][at : at + n] = len(prompt) - 1 + np.arange(n)
            row["segment_ids"][at : at + n] = state["segment"]
            row["branch_ids"][at : at + n] = branch
            row["labels"][at : at + n] = completion
            row["loss_weights"][at : at + n] = 1.0
            row["sequence_ids"][at : at + n] = sequence
            row["advantages"][at : at + n] = advantage
            row["sampling_logps"][at : at + n] = logps[:n]
            state["used"] += n
    while len(rows) % row_multiple:
        new_row()
    packed = {name: np.stack([row[name] for row in rows]) for name in COLUMNS}
    packed["completions"] = sequence
    return packed
