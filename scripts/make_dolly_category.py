"""Rebuild the shipped category task: each Dolly sample record as `completion` data whose answer is its category.

    python scripts/make_dolly_category.py

Reads `gemma_lora/resources/databricks-dolly-sample.jsonl.gz` (the first 1,501
Dolly records) and writes `gemma_lora/resources/dolly-category.jsonl.gz`: one
`{"prompt": ..., "completion": CATEGORY}` line per record, in the same order,
so the package's fixed splits take the same records as on the sample
(`--data dolly-category`; the test split, rows 1,000-1,067 by default, holds
all 8 categories). The prompt lists the 8 labels, gives the instruction and,
where the record has one, its context: 3 of the categories (closed_qa,
information_extraction, summarization) occur only in records with a context.
White space is collapsed and long instructions and contexts are cut (at a
word, marked " ...") so that rows fit 256 tokens with room to spare.

The output is deterministic (gzip without a timestamp); tests/unit/test_data.py
checks that the shipped file equals what this script writes.
"""

import gzip
import io
import json
from pathlib import Path

RESOURCES = Path(__file__).resolve().parent.parent / "gemma_lora" / "resources"
SOURCE = RESOURCES / "databricks-dolly-sample.jsonl.gz"
TARGET = RESOURCES / "dolly-category.jsonl.gz"
CATEGORIES = (
    "brainstorming", "classification", "closed_qa", "creative_writing",
    "general_qa", "information_extraction", "open_qa", "summarization",
)
CONTEXT_CHARS = 300
INSTRUCTION_CHARS = 600


def shorten(text, limit):
    """`text` cut at the last space before `limit` characters, marked with " ..." when cut."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + " ..."


def prompt(record):
    parts = [
        "Which kind of task is this request? Answer with one of: " + ", ".join(CATEGORIES) + ".",
        f"Request:\n{shorten(record['instruction'], INSTRUCTION_CHARS)}",
    ]
    if record["context"].strip():
        parts.append(f"Context:\n{shorten(record['context'], CONTEXT_CHARS)}")
    parts.append("Category:\n")
    return "\n\n".join(parts)


def build(source=SOURCE):
    """The category file's bytes (gzipped JSONL) from the Dolly sample at `source`."""
    lines = []
    with gzip.open(source, "rt", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            assert record["category"] in CATEGORIES, record["category"]
            lines.append(json.dumps({"prompt": prompt(record), "completion": record["category"]}, ensure_ascii=False))
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0, filename="") as f:
        f.write(("\n".join(lines) + "\n").encode("utf-8"))
    return out.getvalue()


def main():
    TARGET.write_bytes(build())
    print(f"wrote {TARGET} ({TARGET.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
