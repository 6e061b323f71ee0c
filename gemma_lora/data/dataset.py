"""Read the configured data into examples, cut the fixed splits, and describe both for the run's records.

Splits of any dataset, whatever its format or file type (rows counted after
the context filter, in the order read):

    rows [0, limit - validation_rows)       train
    rows [limit - validation_rows, limit)   validation
    rows [limit, limit + test_rows)         test

With the defaults on the shipped sample (1,068 rows without context) that is
900 train / 100 validation / 68 test; the recipe trains on all first 1,000.
The test rows are the same in the shipped sample and the full Dolly file,
which starts with the same records. Reading stops once every split is filled.

A file with fewer than `limit + test_rows` rows still gets its held-out
splits: the test rows are its last `test_rows`, the validation rows the
`validation_rows` before them, and the rest trains (a 31-row file with 4 and
4 gives 23 / 4 / 4). The splits stay contiguous and in file order either way.
"""

import hashlib
import json
from dataclasses import asdict, dataclass, field

from gemma_lora.data.formats import check_fields, detect, exchanges, parse
from gemma_lora.data.sources import Source, file_type, read_records, resolve
from gemma_lora.errors import DataError


@dataclass
class Splits:
    train: list
    validation: list
    test: list


@dataclass
class Dataset:
    """The examples a run trains on, and how they were read."""

    examples: list
    data: str  # the spec as given (config.data)
    source: str  # the file, folder or Hub dataset read
    file_type: str  # jsonl, json, csv, parquet or hf
    format: str
    detected: bool  # the format was detected from the first record (not given)
    fields: dict = field(default_factory=dict)
    split: str | None = None  # the Hugging Face split read
    records_read: int = 0
    context_dropped: int = 0  # records with a context (dolly) or input (alpaca) left out
    bad_rows: int = 0  # records that did not fit their format, left out (skip_bad_rows)
    first_bad: str | None = None  # the first one's error
    places: list = field(default_factory=list)  # where each example was read ("data.jsonl:12"), for messages

    def describe(self):
        """One line: what was read, in which format, and what was left out."""
        how = "detected from the first record" if self.detected else "given"
        mapped = f", fields {', '.join(f'{k}={v}' for k, v in self.fields.items())}" if self.fields else ""
        split = f" [{self.split}]" if self.split else ""
        dropped = (
            f"; {self.context_dropped} with a context left out (--include-context keeps them)"
            if self.context_dropped else ""
        )
        if self.bad_rows:
            dropped += f"; {self.bad_rows} bad records left out (--skip-bad-rows), the first: {self.first_bad}"
        return (f"data: read {self.records_read:,} records of {self.source}{split} ({self.file_type}), "
                f"format {self.format} ({how}{mapped}){dropped}")


def read_dataset(config, path=None):
    """Read, check and filter the configured data, stopping once every split is filled.

    Args:
        config: a `TrainConfig` (data, data_format, fields, data_split,
            include_context, skip_bad_rows, chat, limit, test_rows).
        path: read this file instead of resolving `config.data`.

    Returns:
        A `Dataset`.

    Raises:
        DataError: the data cannot be read, a record does not fit its format
            (unless skip_bad_rows), a conversation of several exchanges with
            the chat format off, the file is empty, or nothing is left.
    """
    source = Source(file_type(path), str(path)) if path else resolve(config.data)
    split = (config.data_split or "train") if source.kind == "hf" else None
    fields = dict(config.fields)
    fmt = None if config.data_format == "auto" else config.data_format
    if fmt:
        check_fields(fmt, fields, "given with --data-format")
    wanted = config.limit + config.test_rows
    examples, places, read, dropped, bad, first_bad = [], [], 0, 0, 0, None
    records = read_records(source, split)
    try:
        for where, record in records:
            read += 1
            if read == 1 and config.data_format == "auto":
                fmt = detect(record, where, fields)
                check_fields(fmt, fields, f"detected from {where}")
            try:
                example = parse(fmt, record, where, fields, keep_columns=config.objective == "grpo")
            except DataError as error:
                if not config.skip_bad_rows:
                    raise
                bad, first_bad = bad + 1, first_bad or str(error)
                continue
            if config.chat is False and exchanges(example) > 1:
                raise DataError(
                    f"{where}: a conversation of {exchanges(example)} exchanges needs Gemma's chat format, and "
                    "chat is off (--no-chat); the instruction template holds one exchange. Drop --no-chat."
                )
            if example.context and not config.include_context:
                dropped += 1
                continue
            examples.append(example)
            places.append(where)
            if len(examples) >= wanted:
                break
    finally:
        records.close()
    if not read:
        raise DataError(
            f"{source.location}{f' [{split}]' if split else ''} holds no records (the file is empty, or holds only a "
            "header or white space). Give a data file with at least one record."
        )
    if not examples and bad and not dropped:
        raise DataError(f"No rows left in {source.location}: all {read} records are bad; the first: {first_bad}")
    if not examples:
        raise DataError(
            f"No rows left in {source.location} after filtering: "
            + (f"{bad} records are bad and the other " if bad else "all ")
            + f"{dropped} records have a {'context' if fmt == 'dolly' else 'non-empty input'} and rows with a context are "
            "dropped. Use --include-context, or a file with rows without context."
        )
    return Dataset(
        examples, config.data, source.location, source.kind, fmt, config.data_format == "auto",
        fields, split, read, dropped, bad, first_bad, places,
    )


def load_examples(config, path=None):
    """The examples the run trains, validates and tests on, in order (see `read_dataset`).

    Raises:
        DataError: as `read_dataset`.
    """
    return read_dataset(config, path).examples


def split(examples, config):
    """Cut examples into the fixed train / validation / test splits (see module doc).

    Raises:
        DataError: too few rows for every split asked for.
    """
    held_out = config.validation_rows + config.test_rows
    if len(examples) >= config.limit + config.test_rows:
        # Enough rows: the test rows follow the training pool.
        pool, test = examples[: config.limit], examples[config.limit : config.limit + config.test_rows]
    elif len(examples) > held_out:
        # Fewer: hold the test rows out of the end first, so every split exists.
        cut = len(examples) - config.test_rows
        pool, test = examples[:cut], examples[cut:]
    else:
        raise DataError(
            f"Only {len(examples)} rows to split into training, validation_rows={config.validation_rows} and "
            f"test_rows={config.test_rows}: at least {held_out + 1} are needed. Lower validation_rows or test_rows, "
            "or use more data."
        )
    cut = len(pool) - config.validation_rows
    return Splits(train=pool[:cut], validation=pool[cut:], test=test)


def fingerprint(examples):
    """sha256 (16 hex digits) of examples' content as read: the same records give the same value."""
    digest = hashlib.sha256()
    for example in examples:
        record = asdict(example)
        for name in ("rejected", "columns"):  # unset: hashed as before these existed, so fingerprints stay
            if record[name] is None:
                del record[name]
        digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False, default=str).encode() + b"\n")
    return digest.hexdigest()[:16]


def splits_record(dataset, splits):
    """What a run read and how it was split, for data.json and the adapter's metadata.

    Each split gives its rows as [start, end) in the order read (after the
    context filter) and a fingerprint of its examples; `fingerprint` covers
    all three in order.
    """
    start, ranges = 0, {}
    for name in ("train", "validation", "test"):
        examples = getattr(splits, name)
        ranges[name] = {"rows": [start, start + len(examples)], "fingerprint": fingerprint(examples)}
        start += len(examples)
    return {
        "data": dataset.data,
        "source": dataset.source,
        "file_type": dataset.file_type,
        "format": dataset.format,
        "format_detected": dataset.detected,
        "fields": dataset.fields,
        "hf_split": dataset.split,
        "records_read": dataset.records_read,
        "context_dropped": dataset.context_dropped,
        "bad_rows": dataset.bad_rows,
        "splits": ranges,
        "fingerprint": fingerprint(splits.train + splits.validation + splits.test),
    }
