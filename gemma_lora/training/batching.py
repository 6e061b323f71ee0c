"""A run's rows as batches for KerasHub's model: length-bucketed epochs, each batch trimmed to its longest row.

Used by the Keras engine's training and by scoring (`scoring.token_loss`);
the fast engine packs rows instead (`fast_engine.py`).
"""

import dataclasses

import numpy as np

from gemma_lora.training.loop import epoch_order

# Batch lengths are rounded up to a multiple of this: a handful of shapes
# (each compiles the train step once) instead of one per batch.
LENGTH_MULTIPLE = 64


# Rows are sorted by length within windows of this many batches: batches of
# rows of like length waste little on padding, and the epoch stays shuffled.
SORT_WINDOW_BATCHES = 32


def epoch_batches(rows, config, epoch):
    """The row indices of each batch of an epoch, in training order.

    With `bucket_by_length` (the default) rows are drawn in the epoch's order,
    sorted by length within windows of `SORT_WINDOW_BATCHES` batches, cut into
    batches, and the batches put in an order drawn from (seed, epoch). Each
    batch is then only as long as its longest row (rounded up to
    `LENGTH_MULTIPLE`): on Dolly at sequence_length 512 about 42% of the
    positions of a fixed-length batch are real tokens, against 80-90% here.
    Without it (the recipe), batches are consecutive rows of the epoch order.
    """
    order = epoch_order(len(rows), config, epoch)
    size = config.batch_size
    if not config.bucket_by_length:
        return [order[i : i + size] for i in range(0, len(order), size)]
    lengths = rows.padding_mask.sum(axis=1)
    window = size * SORT_WINDOW_BATCHES
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i : i + size] for i in range(0, len(chunk), size)]
    shuffled = np.random.default_rng([config.seed, epoch, 1]).permutation(len(batches))
    return [batches[i] for i in shuffled] if config.shuffle else batches


def batch_arrays(rows, index, batch_size, trim=True, share=None):
    """`(x, labels, weights)` of the rows at `index`, padded to `batch_size` rows.

    With `trim`, positions past the batch's longest row (rounded up to
    `LENGTH_MULTIPLE`) are dropped: they are padding in every row. With
    `share` = (start, stop), only those rows of the padded batch are built
    (one process's share of a global batch), as long as the whole batch's.
    """
    length = batch_length(rows, index, trim)
    start, stop = share or (0, batch_size)
    part = pad_rows(take(rows, index[start:stop]), stop - start)
    if length < part.token_ids.shape[1]:
        part = dataclasses.replace(
            part,
            token_ids=part.token_ids[:, :length],
            padding_mask=part.padding_mask[:, :length],
            labels=part.labels[:, :length],
            weights=part.weights[:, :length],
        )
    return part.x, part.labels, part.weights


def batch_length(rows, index, trim=True):
    """Positions of the batch of the rows at `index`: its longest row rounded up to `LENGTH_MULTIPLE`, or all."""
    full = rows.token_ids.shape[1]
    if not trim:
        return full
    # A padding row shows one position (pad_rows), so a batch is at least that long.
    longest = max(int(rows.padding_mask[index].sum(axis=1).max(initial=0)), 1)
    return min(-(-longest // LENGTH_MULTIPLE) * LENGTH_MULTIPLE, full)


def positions_per_epoch(rows, config):
    """Token positions (real and padding) the first epoch's batches hold."""
    return sum(
        config.batch_size * batch_arrays(rows, index, config.batch_size, config.bucket_by_length)[1].shape[1]
        for index in epoch_batches(rows, config, 0)
    )


def take(rows, index):
    """The rows at `index` (a NumPy index array), as new `TokenizedRows`."""
    return dataclasses.replace(
        rows,
        token_ids=rows.token_ids[index],
        padding_mask=rows.padding_mask[index],
        labels=rows.labels[index],
        weights=rows.weights[index],
    )


def pad_rows(rows, batch_size):
    """Add all-padding rows (weight 0) up to a multiple of `batch_size` rows.

    A short last batch has a new shape, which would compile the train step a
    second time; a padding row adds nothing to the loss.
    """
    extra = -len(rows) % batch_size if len(rows) else batch_size  # a process's share may hold no row at all
    if not extra:
        return rows

    def grow(array):
        return np.concatenate([array, np.zeros((extra, *array.shape[1:]), array.dtype)])

    # One visible position per padding row: attention over a fully masked row
    # could give NaN, and NaN times a zero weight is still NaN.
    padding_mask = grow(rows.padding_mask)
    padding_mask[len(rows) :, 0] = True
    return dataclasses.replace(
        rows,
        token_ids=grow(rows.token_ids),
        padding_mask=padding_mask,
        labels=grow(rows.labels),
        weights=grow(rows.weights),
    )


def batch_contents(rows, index):
    """(examples, real tokens) in the batch of rows `index`."""
    return len(index), int(rows.padding_mask[index].sum())
