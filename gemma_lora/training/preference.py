"""What a preference run adds around the loop: the reference model's log-probs, once, and held-out pair scores.

The reference is the starting model itself, never a second copy: before the
first step the model's LoRA factors are either fresh (B = 0, so the model
is the base exactly) or `init_adapter`'s, and the log-probabilities it gives
every training and held-out pair then are the reference's (`reference_logps`).
They are computed once, with progress, written to the run directory
(`REFERENCE_FILE`) and read back by a resumed run, whose model has moved on.
A step therefore runs the policy only: two sequences forward and backward
per pair, as SFT on both.

`PairScores` scores held-out pairs with the objective as the loop trains
it: loss, reward accuracy (the share of pairs whose chosen implicit reward
beats the rejected one), reward margin and the mean log-probabilities of
each side.
"""

import numpy as np

from gemma_lora import runtime
from gemma_lora.data.preference import PairRows
from gemma_lora.fast import forward
from gemma_lora.io import write_bytes_atomic
from gemma_lora.progress import Progress
from gemma_lora.training import fast_engine
from gemma_lora.training.objectives import PairTerms, pair_metrics

runtime.ensure_runtime()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

REFERENCE_FILE = "reference_logps.npz"
PAIR_METRICS = ("loss", "reward_accuracy", "reward_margin", "chosen_logps", "rejected_logps")


class PairScorer:
    """The fast forward over pair batches, with the model's current LoRA factors (read at each call)."""

    def __init__(self, causal_lm, config, precision):
        self.causal_lm, self.config = causal_lm, config
        self.fast_config, self.frozen, self.paths = fast_engine.fast_view(causal_lm, precision, config.seed)
        fc = self.fast_config
        self._token_logps = jax.jit(lambda frozen, lora, batch: forward.token_logps(fc, frozen, lora, batch))

    def lora(self):
        values = [v.value for v in self.causal_lm.trainable_variables]
        return fast_engine.lora_tree(self.fast_config, self.paths, values)

    def batches(self, pairs):
        """Pair batches of `pairs` in their order, with each batch's arrays ready for the forward."""
        for batch in fast_engine.pair_batches(pairs, self.config):
            yield batch, {k: v for k, v in batch.items() if isinstance(v, np.ndarray)}

    def token_logps(self, pairs, label=None):
        """Per pair, the model's log p at each position of its (chosen, rejected) sequences (0 off the responses)."""
        out = [None] * len(pairs)
        lora = self.lora()
        progress = Progress(len(pairs), label, unit="pair", enabled=bool(label and len(pairs)))
        for batch, arrays in self.batches(pairs):
            logps = np.asarray(self._token_logps(self.frozen, lora, arrays))
            for index, sides in zip(batch["pair_index"], batch["pair_places"]):
                out[index] = tuple(logps[row, start:end] for row, start, end in sides)
            progress.update(len(batch["pair_index"]))
        progress.close()
        return out


def reference_logps(scorer, pairs, indices, label="reference log-probs"):
    """{pair index: the starting model's per-position log-probs of its (chosen, rejected)} for `indices` of `pairs`."""
    subset = PairRows(*[[getattr(pairs, f)[i] for i in indices] for f in ("prompts", "chosen", "rejected")])
    return dict(zip(indices, scorer.token_logps(subset, label=label)))


def with_reference(pairs, reference):
    """`pairs` with `reference` ({index: (chosen, rejected)}) as its reference column (None where not computed)."""
    pairs.reference = [reference.get(i) for i in range(len(pairs))]
    return pairs


def save_reference(path, reference_by_split):
    """Write each split's {pair index: (chosen, rejected)} log-probs to `path` (.npz, via a temporary name)."""
    import io

    arrays = {}
    for split, reference in reference_by_split.items():
        indices = sorted(reference)
        arrays[f"{split}_index"] = np.asarray(indices, np.int64)
        for side, name in enumerate(("chosen", "rejected")):
            parts = [reference[i][side] for i in indices]
            arrays[f"{split}_{name}"] = np.concatenate(parts) if parts else np.zeros(0, np.float32)
            arrays[f"{split}_{name}_lengths"] = np.asarray([len(p) for p in parts], np.int64)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes_atomic(path, buffer.getvalue())


def load_reference(path):
    """`save_reference`'s file back: {split: {pair index: (chosen, rejected)}}."""
    with np.load(path) as saved:
        out = {}
        for split in sorted({k.split("_")[0] for k in saved.files}):
            indices = saved[f"{split}_index"].tolist()
            sides = [np.split(saved[f"{split}_{name}"], np.cumsum(saved[f"{split}_{name}_lengths"])[:-1])
                     if indices else [] for name in ("chosen", "rejected")]
            out[split] = {i: (c, r) for i, c, r in zip(indices, *sides)}
        return out


def scores_at_start(objective, pairs):
    """Held-out pair scores of the starting model, from the reference log-probs alone (the policy is the reference)."""
    sums = []
    for i in range(len(pairs)):
        weights = [side["loss_weights"] for side in pairs.sequences(i)]
        sums.append([(float(np.sum(ref)), float(np.sum(w > 0))) for ref, w in zip(pairs.reference[i], weights)])
    sums = np.asarray(sums, np.float32)  # (pairs, side, (logp, count))
    logps, counts = jnp.asarray(sums[..., 0]), jnp.asarray(sums[..., 1])
    losses, rewards, used = objective.losses(logps, counts, logps)
    terms = PairTerms(losses, rewards[:, 0], rewards[:, 1], used[:, 0], used[:, 1], jnp.ones(len(pairs)))
    return _means(pair_metrics(terms))


def _means(sums):
    pairs = max(float(sums["pairs"]), 1.0)
    return {name: float(sums[name]) / pairs for name in PAIR_METRICS}


class PairScores:
    """Held-out pair scores with the run's objective: f() -> {loss, reward_accuracy, reward_margin, ...}."""

    def __init__(self, scorer, objective, pairs):
        self.scorer, self.objective, self.pairs = scorer, objective, pairs
        fc, slots = scorer.fast_config, fast_engine.pairs_per_batch(pairs, scorer.config)

        def sums(frozen, lora, batch):
            return pair_metrics(objective.terms(fast_engine.FastForward(fc, frozen, lora, batch, slots)))

        self._sums = jax.jit(sums)

    def __call__(self):
        totals = {}
        lora = self.scorer.lora()
        for _, arrays in self.scorer.batches(self.pairs):
            for name, value in self._sums(self.scorer.frozen, lora, arrays).items():
                totals[name] = totals.get(name, 0.0) + float(value)
        return _means(totals)
