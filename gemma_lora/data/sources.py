"""Where records come from: the shipped files, a local file of any common type, or a Hugging Face dataset.

The contract of the family:

    reader(path) -> iterator of (where, record)

`where` names the record for messages ("data.jsonl:12", "data.csv:5 (row 4)",
"data.parquet: row 7"); `record` is a dict of column name to value, or
whatever a line held (the format reader refuses what is not a dict). Every
reader streams: it holds one record (or one Parquet row group, or one read
buffer) at a time, so a large file is never copied into memory whole and
reading stops as soon as the run has the rows it needs. `READERS` maps a file
type to its reader.

Data specs (`--data`):

    dolly-sample, dolly-category,
    dolly-preference               shipped with the package (offline)
    dolly                          databricks-dolly-15k through the Hugging Face Hub cache
    PATH                           .jsonl / .json (a JSON array, or JSONL) / .csv / .tsv / .parquet; .gz for text files
    DIRECTORY                      a Hugging Face dataset folder (data files, or save_to_disk output), via `datasets`
    hf://OWNER/NAME                a Hugging Face Hub dataset, via `datasets` (cached; offline once cached)
"""

import csv
import gzip
import json
import re
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from gemma_lora.errors import DataError

DOLLY_REPO = "databricks/databricks-dolly-15k"
DOLLY_FILE = "databricks-dolly-15k.jsonl"
SAMPLE_FILE = "databricks-dolly-sample.jsonl.gz"
CATEGORY_FILE = "dolly-category.jsonl.gz"
# Preference pairs of the sample's 1,068 rows without context: Dolly's response chosen, the
# demo's SFT model's own greedy answer rejected (scripts/build_preference_demo.py).
PREFERENCE_FILE = "dolly-preference.jsonl.gz"
SHIPPED = {"dolly-sample": SAMPLE_FILE, "dolly-category": CATEGORY_FILE, "dolly-preference": PREFERENCE_FILE}
HF_PREFIX = "hf://"
DATASETS_EXTRA = 'pip install "gemma-lora[datasets]"'
PARQUET_EXTRA = 'pip install "gemma-lora[parquet]"'


@dataclass(frozen=True)
class Source:
    """A resolved data spec: what to read and how."""

    kind: str  # a key of READERS, or "hf" (a Hugging Face dataset, by name or folder)
    location: str  # a file or folder path, or a Hub dataset name


def resolve_data_path(spec):
    """Map a file data spec to a local file: shipped sample, Hub download, or a path.

    Raises:
        DataError: the file is missing or the download failed.
    """
    if spec in SHIPPED:
        return resources.files("gemma_lora") / "resources" / SHIPPED[spec]
    if spec == "dolly":
        return download_dolly()
    path = Path(spec)
    if not path.is_file():
        raise DataError(
            f"Data file not found: {path}. Give an existing data file (JSONL, JSON, CSV, Parquet), "
            "a dataset folder, hf://OWNER/NAME, or 'dolly-sample'."
        )
    return path


def resolve(spec):
    """The `Source` for a data spec (see the module doc).

    Raises:
        DataError: a file or folder that does not exist, or a failed download.
    """
    if spec.startswith(HF_PREFIX):
        name = spec[len(HF_PREFIX):].removeprefix("datasets/").strip("/")
        if not name:
            raise DataError(f"--data {spec} names no dataset. Use hf://OWNER/NAME, e.g. hf://{DOLLY_REPO}.")
        return Source("hf", name)
    if spec not in SHIPPED and spec != "dolly" and Path(spec).is_dir():
        return Source("hf", spec)
    path = resolve_data_path(spec)
    return Source(file_type(path), str(path))


def file_type(path):
    """The reader for a file, from its name; other names are read as JSON or JSONL."""
    name = str(path).lower().removesuffix(".gz")
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".csv", ".tsv")):
        return "csv"
    if name.endswith(".jsonl"):
        return "jsonl"
    return "json"  # .json, or any other name: a JSON array if it starts with "[", else JSONL


def download_dolly():
    """Fetch the full databricks-dolly-15k JSONL through the Hugging Face Hub cache.

    Works offline once cached (set HF_HUB_OFFLINE=1 to skip the network check).
    """
    import huggingface_hub

    try:
        return Path(
            huggingface_hub.hf_hub_download(repo_id=DOLLY_REPO, filename=DOLLY_FILE, repo_type="dataset")
        )
    except Exception as e:  # The hub raises many types (offline, HTTP, cache).
        raise DataError(
            f"Could not get {DOLLY_FILE} from the Hugging Face Hub dataset {DOLLY_REPO} "
            f"({type(e).__name__}). Go online once, or use the shipped offline sample "
            "with --data dolly-sample, or pass a local JSONL file with --data PATH."
        ) from None


def read_records(source, split=None):
    """Yield (where, record) from a `Source`; `split` picks a Hugging Face dataset's split.

    Raises:
        DataError: the file is not of its type, not UTF-8, or cannot be read.
    """
    if source.kind == "hf":
        return read_hf_dataset(source.location, split or "train")
    return READERS[source.kind](source.location)


def _open_text(path, newline=None):
    # utf-8-sig reads a file with or without a byte-order mark (Windows tools write one).
    path = str(path)
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline=newline)
    return open(path, encoding="utf-8-sig", newline=newline)


def _not_utf8(path, e):
    return DataError(f"{path}: not UTF-8 text ({e.reason}). Save the file as UTF-8.")


def read_jsonl(path):
    """Yield (where, record) for each non-blank line of a JSONL file (gzipped if it ends in .gz).

    Raises:
        DataError: a line is not JSON (the message gives the line).
    """
    try:
        with _open_text(path) as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{number}: not valid JSON ({e.msg}). Fix or remove that line.") from None
                yield f"{path}:{number}", record
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None
    except (OSError, EOFError) as e:  # gzip's errors on a damaged file are OSErrors too.
        raise DataError(f"{path}: cannot be read ({e}). Check the file.") from None


def read_json(path, chunk_size=1 << 20):
    """Yield (where, record) from a JSON array of records, or from JSONL under another name.

    The standard library's json parses a whole document at once, which would
    hold the file's text and every parsed record in memory together. This
    walks the array with `JSONDecoder.raw_decode` over a moving read buffer,
    one record at a time (a streaming parser such as ijson would be a new
    dependency for these few lines).

    Raises:
        DataError: the file is not a JSON array (the message gives the line).
    """
    try:
        with _open_text(path) as f:
            buffer = f.read(chunk_size)
            start = len(buffer) - len(buffer.lstrip())
            if not buffer[start:start + 1] == "[":
                f.close()
                yield from read_jsonl(path)
                return
            yield from _json_array(path, f, buffer, start + 1, chunk_size)
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot be read ({e}). Check the file.") from None


_SPACE = re.compile(r"[ \t\n\r]*")


def _json_array(path, f, buffer, position, chunk_size):
    """Records of the array whose "[" ends at buffer[position - 1]; see `read_json`."""
    decoder = json.JSONDecoder()
    line = 1 + buffer.count("\n", 0, position)  # the line of buffer[position]
    eof, records = False, 0

    def fail(problem, at_line):
        raise DataError(f"{path}:{at_line}: {problem}. A JSON data file holds one array of records: [{{...}}, {{...}}].")

    def read_more():
        # Keep the unread tail, drop what was consumed (copied once a chunk, not once a record).
        nonlocal buffer, position, eof
        chunk = f.read(chunk_size)
        eof = not chunk
        buffer, position = buffer[position:] + chunk, 0

    def next_char():
        # Skip white space, counting lines, reading on where the buffer runs out.
        nonlocal position, line
        while True:
            end = _SPACE.match(buffer, position).end()
            line += buffer.count("\n", position, end)
            position = end
            if position < len(buffer) or eof:
                return buffer[position] if position < len(buffer) else ""
            read_more()

    while True:
        char = next_char()
        if char == "]" and records == 0:
            break
        while True:
            try:
                record, end = decoder.raw_decode(buffer, position)
                break
            except json.JSONDecodeError as e:
                if eof:
                    fail(f"not valid JSON ({e.msg})" if char else "the file ends inside the array",
                         line + buffer.count("\n", position, e.pos))
                read_more()  # A record cut by the end of the buffer: read on and try again.
        records += 1
        yield f"{path}:{line}", record
        line += buffer.count("\n", position, end)
        position = end
        char = next_char()
        if char == "]":
            break
        if char != ",":
            fail(f"expected ',' or ']' after a record, found {char!r}" if char else "the file ends inside the array", line)
        position += 1
    position += 1
    if next_char():
        fail("text after the end of the array", line)


def read_csv(path):
    """Yield (where, record) for each row of a CSV (or, named .tsv, tab-separated) file with a header.

    Every value is a string, as CSV holds text; an empty cell is "".

    Raises:
        DataError: a row does not match the header, or the CSV is malformed.
    """
    delimiter = "\t" if str(path).lower().removesuffix(".gz").endswith(".tsv") else ","
    # A long document in one cell is ordinary for text data; the csv module's
    # default cap is 128 KiB per field.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        with _open_text(path, newline="") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            number, line = 0, 2
            try:
                for record in reader:
                    number += 1
                    where = f"{path}:{line} (row {number})"
                    if None in record:
                        raise DataError(f"{where}: {len(record[None])} more cell(s) than the header's "
                                        f"{len(reader.fieldnames)} columns. Quote cells that hold '{delimiter}'.")
                    yield where, record
                    line = reader.line_num + 1
            except csv.Error as e:
                raise DataError(f"{path}:{reader.line_num}: not valid CSV ({e}). Fix that line.") from None
    except UnicodeDecodeError as e:
        raise _not_utf8(path, e) from None
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot be read ({e}). Check the file.") from None


def read_parquet(path):
    """Yield (where, record) for each row of a Parquet file, one row group at a time.

    Raises:
        DataError: pyarrow is missing, or the file is not Parquet.
    """
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"Reading {path} needs pyarrow: {PARQUET_EXTRA}.") from None
    try:
        table = pq.ParquetFile(path)
        number = 0
        for batch in table.iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                number += 1
                yield f"{path}: row {number}", record
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e}).") from None


def read_hf_dataset(name, split):
    """Yield (where, record) from a Hugging Face dataset: a Hub name, or a local dataset folder.

    A Hub dataset is downloaded once into the `datasets` cache (memory-mapped
    Arrow files, read row by row) and read from there offline afterwards. A
    folder of data files is streamed from the files themselves, so no second
    copy is written; a folder written by `save_to_disk` is memory-mapped.

    Raises:
        DataError: `datasets` is missing, the dataset or split does not exist,
            or it is neither cached nor reachable.
    """
    try:
        import datasets
    except ImportError:
        raise DataError(f"Reading the Hugging Face dataset {name} needs the datasets library: {DATASETS_EXTRA}.") from None
    folder = Path(name)
    label = f"{name} [{split}]" if folder.is_dir() else f"{HF_PREFIX}{name} [{split}]"
    try:
        if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
            dataset = datasets.load_from_disk(str(folder))
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise DataError(f"{label}: no split {split!r}; it has {', '.join(dataset)}. Choose one with --split.")
                dataset = dataset[split]
        elif folder.is_dir():
            dataset = datasets.load_dataset(str(folder), split=split, streaming=True)
        else:
            dataset = datasets.load_dataset(name, split=split)
        for number, record in enumerate(dataset, start=1):
            yield f"{label}: row {number}", record
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (offline, missing, bad split, bad files).
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DataError(
            f"Could not read the Hugging Face dataset {label} ({type(e).__name__}: {message}). Check the name and "
            "--split; a Hub dataset needs the network once, then comes from the cache (HF_HUB_OFFLINE=1)."
        ) from None


READERS = {"jsonl": read_jsonl, "json": read_json, "csv": read_csv, "parquet": read_parquet}
