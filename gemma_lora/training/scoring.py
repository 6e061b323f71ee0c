"""Held-out scores: the true per-token loss of a split, and the cross-entropy every Keras-side loss uses.

Keras' printed `loss` divides the summed loss by every position of the batch,
padding and masked prompt tokens included (0.86 printed where the real mean
was 3.15 on the real Gemma 3 270M). So the package reports `token_loss`, the
mean over the tokens that carry loss, and scores validation/test splits the
same way (`token_loss`, `SplitScorer` after each epoch, `validation_scores`
every `eval_every` steps). `token_nll` is the one cross-entropy on KerasHub's
logits, for the Keras engine's step and for scoring; the fast engine's loss
head (`fast/forward.py`) computes the same quantity slice by slice with its
own gradient, since it never holds the logits.
"""

import math
import weakref

import numpy as np

from gemma_lora import runtime
from gemma_lora.model.layers import model_inputs
from gemma_lora.progress import Progress
from gemma_lora.training.batching import batch_arrays

runtime.ensure_runtime()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402


def token_nll(logits, labels):
    """-log p(label) at every position, in float32.

    -log softmax(logits)[label] = logsumexp(logits) - logits[label]: no second
    vocabulary-sized array of log-probabilities (262k wide on Gemma 3).
    """
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - picked


def weighted_nll(logits, labels, weights):
    """(sum of weight x -log p(label), sum of weights) over the whole batch, in float32."""
    weights = weights.astype(jnp.float32)
    return jnp.sum(token_nll(logits, labels) * weights), jnp.sum(weights)


class SplitScorer(keras.callbacks.Callback):
    """After each epoch, add the true per-token loss of each split to the logs."""

    def __init__(self, splits, batch_size, show_progress=True):
        super().__init__()
        self.splits = {name: rows for name, rows in splits.items() if rows is not None and len(rows)}
        self.batch_size = batch_size
        self.show_progress = show_progress

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        for name, rows in self.splits.items():
            label = f"scoring {name} rows" if self.show_progress else None
            result = token_loss(self.model, rows, self.batch_size, label=label)
            logs[f"{name}_token_loss"] = result["token_loss"]
            logs[f"{name}_perplexity"] = result["perplexity"]


def validation_scores(causal_lm, rows, batch_size=8):
    """The loop's `evaluate`: the validation split's per-token loss and perplexity, now."""

    def evaluate():
        result = token_loss(causal_lm, rows, batch_size, label="scoring validation rows")
        return {"validation_token_loss": result["token_loss"], "validation_perplexity": result["perplexity"]}

    return evaluate


def token_loss(causal_lm, rows, batch_size=8, label=None):
    """Mean cross-entropy over the tokens that carry loss, and per-row means.

    Rows are scored in length order, each batch trimmed to its longest row
    (as in training), which skips most padding. With a `label`, progress
    (rows scored / total) is shown.

    Returns:
        dict with `token_loss` (sum of -log p over weighted tokens / their
        count), `perplexity` = exp(token_loss), `row_losses` (each row's mean,
        in the rows' own order; NaN for rows with no weighted token) and
        `tokens`.
    """
    trainable = [v.value for v in causal_lm.trainable_variables]
    non_trainable = [v.value for v in causal_lm.non_trainable_variables]
    remembered = _remembered_score(causal_lm, rows, batch_size, trainable + non_trainable)
    if remembered is not None:
        return remembered
    score = _scorer(causal_lm)
    order = np.argsort(rows.padding_mask.sum(axis=1), kind="stable")
    sums, counts = np.zeros(len(rows)), np.zeros(len(rows))
    progress = Progress(len(rows), label, unit="row", enabled=bool(label))
    for start in range(0, len(rows), batch_size):
        index = order[start : start + batch_size]
        x, labels, weights = batch_arrays(rows, index, batch_size)
        s, c = score(trainable, non_trainable, x["token_ids"], x["padding_mask"], labels, weights)
        sums[index] = np.asarray(s)[: len(index)]
        counts[index] = np.asarray(c)[: len(index)]
        progress.update(len(index))
    progress.close()
    total = float(counts.sum())
    mean = float(sums.sum() / total) if total else float("nan")
    with np.errstate(invalid="ignore", divide="ignore"):
        row_losses = sums / counts
    result = {
        "token_loss": mean,
        "perplexity": math.exp(mean) if math.isfinite(mean) and mean < 700 else float("inf"),
        "row_losses": row_losses,
        "tokens": int(total),
    }
    _remember_score(causal_lm, rows, batch_size, trainable + non_trainable, result)
    return dict(result, row_losses=row_losses.copy())


# The last split scored per model, with weak references to the rows and to the
# weight arrays it was scored with. A run scores validation at the end of
# training (an epoch's end or the last evaluation) and the pipeline's "after"
# scores the same rows with the same weights right after: the second is
# answered from here (100 rows of the 270M model: about a minute of CPU).
# Keyed by identity, since arrays cannot be dict keys; any assignment to a
# variable makes a new array, so a changed model is always scored again.
_LAST_SCORE = weakref.WeakKeyDictionary()


def _remember_score(causal_lm, rows, batch_size, values, result):
    _LAST_SCORE[causal_lm] = (weakref.ref(rows), batch_size, [weakref.ref(v) for v in values], result)


def _remembered_score(causal_lm, rows, batch_size, values):
    entry = _LAST_SCORE.get(causal_lm)
    if entry is None:
        return None
    rows_ref, size, refs, result = entry
    same = rows_ref() is rows and size == batch_size and len(refs) == len(values)
    if not same or any(ref() is not value for ref, value in zip(refs, values)):
        return None
    return dict(result, row_losses=result["row_losses"].copy())


_SCORERS = weakref.WeakKeyDictionary()


def _scorer(causal_lm):
    # One jitted scorer per model, so scoring every epoch reuses the compiled function.
    if causal_lm in _SCORERS:
        return _SCORERS[causal_lm]

    # A weak reference: a value of a WeakKeyDictionary that refers to its key
    # keeps the key alive, and with it every model ever scored (a rank sweep's
    # memory would grow with each rank).
    model = weakref.ref(causal_lm)

    @jax.jit
    def score(trainable, non_trainable, token_ids, padding_mask, labels, weights):
        logits, _ = model().stateless_call(trainable, non_trainable, model_inputs(model(), token_ids, padding_mask))
        return (token_nll(logits, labels) * weights).sum(axis=-1), weights.sum(axis=-1)

    _SCORERS[causal_lm] = score
    return score
