"""Pack several short examples into each fixed-length row.

Padding every example to the sequence length wastes most of the compute on
real instruction data (Dolly rows average ~107 Gemma tokens against a 512-token
row). Packing puts several examples in one row; `segment_ids` tells the fast
path (`gemma_lora.fast`) which tokens may attend to which, and `positions`
restart at 0 per example so each one sees the rotary positions it would see
alone.

    rows = pack([(ids, weights), ...], sequence_length=512)
    real_token_fraction(rows)   # share of processed tokens that are not padding
"""

import numpy as np

from gemma_lora.errors import DataError


def pack(examples, sequence_length, pad_id=0):
    """Pack (token_ids, loss_weights) examples into rows, first-fit decreasing.

    Args:
        examples: sequence of (token_ids, loss_weights) pairs of equal-length
            int / float sequences. `loss_weights[i]` weighs the prediction made
            at position i, of token i+1 (KerasHub's convention after its
            one-token shift; for a per-token response mask r pass
            r[1:] + [0]). Examples longer than `sequence_length` are truncated.
        sequence_length: int, the row length.
        pad_id: int, default 0, token id written into padding.

    Returns:
        dict of numpy arrays, each (rows, sequence_length): "token_ids"
        (int32), "segment_ids" (int32; 0 = padding, 1..k = the k examples of
        the row, in placement order), "positions" (int32; 0.. within each
        example), "labels" (int32; the next token of the same example, 0 where
        there is none) and "loss_weights" (float32; the given weights, 0 on
        padding and on each example's last token, which has no next token
        within its example).

    Raises:
        DataError: no examples, an empty example, or token_ids and
            loss_weights of different lengths.
    """
    if sequence_length < 2:
        raise DataError(f"sequence_length must be >= 2. Received: {sequence_length}")
    items = []
    for index, (token_ids, loss_weights) in enumerate(examples):
        if len(token_ids) != len(loss_weights):
            raise DataError(
                f"Example {index} has {len(token_ids)} token ids but "
                f"{len(loss_weights)} loss weights; they must match."
            )
        if len(token_ids) == 0:
            raise DataError(f"Example {index} is empty; drop it before packing.")
        items.append(
            (
                np.asarray(token_ids[:sequence_length], np.int32),
                np.asarray(loss_weights[:sequence_length], np.float32),
            )
        )
    if not items:
        raise DataError("Nothing to pack: received no examples.")

    # First-fit decreasing: place long examples first so short ones fill the
    # gaps; stable sort keeps equal lengths in input order (reproducible rows).
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
    free = []  # room left in each row
    rows = []  # indices of the examples placed in each row
    for i in order:
        length = len(items[i][0])
        for r, room in enumerate(free):
            if room >= length:
                free[r] -= length
                rows[r].append(i)
                break
        else:
            free.append(sequence_length - length)
            rows.append([i])

    out = _empty_rows((len(rows), sequence_length), pad_id)
    for r, members in enumerate(rows):
        start = 0
        for segment, i in enumerate(members, start=1):
            start = _place(out, r, start, segment, *items[i])
    return out


def _empty_rows(shape, pad_id, extra=()):
    """The packed arrays of `pack` (and any `extra` float32 columns), all padding."""
    return {
        "token_ids": np.full(shape, pad_id, np.int32),
        "segment_ids": np.zeros(shape, np.int32),
        "positions": np.zeros(shape, np.int32),
        "labels": np.zeros(shape, np.int32),
        "loss_weights": np.zeros(shape, np.float32),
        **{k: np.zeros(shape, np.float32) for k in extra},
    }


def _place(out, row, start, segment, token_ids, loss_weights):
    """Write one example into `out`'s row from `start`, as segment `segment`; return where it ends."""
    end = start + len(token_ids)
    out["token_ids"][row, start:end] = token_ids
    out["segment_ids"][row, start:end] = segment
    out["positions"][row, start:end] = np.arange(len(token_ids))
    out["labels"][row, start : end - 1] = token_ids[1:]
    out["loss_weights"][row, start : end - 1] = loss_weights[:-1]
    return end


def real_token_fraction(packed):
    """Share of the processed tokens that belong to an example (not padding)."""
    return float(np.mean(packed["segment_ids"] > 0))


def pack_pairs(pairs, sequence_length, rows_per_batch, pairs_per_batch, pad_id=0):
    """Pack preference pairs into batches of `rows_per_batch` rows, each pair's two sequences in one batch.

    A preference loss compares a pair's chosen and rejected sequences, so both
    must be in the batch the step sees; they may sit in different rows. Pairs
    are taken in the order given (an epoch's order) and each sequence goes to
    the first row of the current batch with room; the batch closes when a
    pair does not fit or it holds `pairs_per_batch` pairs (a static size of
    the step).

    Args:
        pairs: sequence of (chosen, rejected), each a dict of equal-length
            per-position arrays: "token_ids", "loss_weights" (as `pack`: the
            weight at i weighs the prediction of token i + 1) and any others
            (e.g. the reference model's "reference_logps"), each at most
            `sequence_length` long.
        rows_per_batch: rows of each batch (>= 2: each sequence may fill a row).
        pairs_per_batch: the most pairs a batch may hold.

    Returns:
        A list of batches, dicts of (rows_per_batch, sequence_length) arrays: the
        columns of `pack` plus every extra one given, and "sequence_ids"
        (int32): at each loss-carrying position, 2p + 1 for the chosen sequence
        of the batch's p-th pair and 2p + 2 for its rejected one; 0 elsewhere.
        Also, as lists (not arrays): "pair_index", the index in `pairs` of each
        of the batch's pairs, in order, and "pair_places", each pair's
        (row, start, end) of its chosen and of its rejected sequence.
    """
    if rows_per_batch < 2:
        raise DataError(f"rows_per_batch must be >= 2 for preference pairs. Received: {rows_per_batch}")
    batches, members, free = [], [], [sequence_length] * rows_per_batch

    def close():
        batches.append(_lay_out(pairs, members, sequence_length, rows_per_batch, pad_id))

    for index, pair in enumerate(pairs):
        lengths = [len(side["token_ids"]) for side in pair]
        if max(lengths) > sequence_length or min(lengths) == 0:
            raise DataError(f"Pair {index} has sequences of {lengths} tokens; each must be 1..{sequence_length}.")
        placed = _first_fit(free, lengths)
        if placed is None or len(members) == pairs_per_batch:
            close()
            members, free = [], [sequence_length] * rows_per_batch
            placed = _first_fit(free, lengths)
        for length, row in zip(lengths, placed):
            free[row] -= length
        members.append((index, placed))
    if members:
        close()
    return batches


def _first_fit(free, lengths):
    """The rows the sequences of `lengths` would take, in turn, by first fit; None if one does not fit."""
    room, rows = list(free), []
    for length in lengths:
        row = next((r for r, left in enumerate(room) if left >= length), None)
        if row is None:
            return None
        room[row] -= length
        rows.append(row)
    return rows


def _lay_out(pairs, members, sequence_length, rows, pad_id):
    """One batch's arrays from its (pair index, rows of its two sequences)."""
    extra = [k for k in pairs[members[0][0]][0] if k not in ("token_ids", "loss_weights")]
    out = _empty_rows((rows, sequence_length), pad_id, extra)
    out["sequence_ids"] = np.zeros((rows, sequence_length), np.int32)
    used, segments, places = [0] * rows, [0] * rows, []
    for p, (index, placed) in enumerate(members):
        sides = []
        for side, (sequence, row) in enumerate(zip(pairs[index], placed)):
            weights = np.asarray(sequence["loss_weights"], np.float32)
            start, segments[row] = used[row], segments[row] + 1
            used[row] = _place(out, row, start, segments[row], np.asarray(sequence["token_ids"]), weights)
            out["sequence_ids"][row, start : used[row] - 1] = np.where(weights[:-1] > 0, 2 * p + 1 + side, 0)
            for k in extra:
                out[k][row, start : used[row] - 1] = np.asarray(sequence[k], np.float32)[:-1]
            sides.append((row, start, used[row]))
        places.append(tuple(sides))
    out["pair_index"] = [index for index, _ in members]
    out["pair_places"] = places
    return out
