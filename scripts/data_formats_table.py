"""Every data format from every file type, on the same Dolly rows: records read, examples kept, loss tokens.

    python scripts/data_formats_table.py [--rows 200] [--preset tiny]

Writes the first ROWS no-context records of the shipped Dolly sample in each
format's own shape (dolly, alpaca, completion with the template filled in as
its prompt, messages, sharegpt, text) and each file type (JSONL, JSON array,
CSV, Parquet, a Hugging Face dataset folder) into a temporary directory, reads
each through the package as `gemma-lora train --data FILE` would (format
detected), tokenizes it with the preset's tokenizer and prints a Markdown
table. dolly, alpaca and completion should carry the same loss tokens (the
same responses after the same prompts); messages and sharegpt take Gemma's
chat format (one exchange each), as the dolly file read with --chat; text
carries loss on every token. "same arrays as dolly JSONL" means the file gave
token ids, labels and loss weights identical to those of the dolly-format
JSONL file (conversations: of that file with --chat; text: of the text JSONL
file). Needs pyarrow and datasets (`.[test]`).
"""

import argparse
import csv
import dataclasses
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

FILE_TYPES = ("jsonl", "json", "csv", "parquet", "hf folder")
TEMPLATE_HEAD = "Instruction:\n{instruction}\n\nResponse:\n"


def shapes(instruction, response):
    return {
        "dolly": {"instruction": instruction, "context": "", "response": response},
        "alpaca": {"instruction": instruction, "input": "", "output": response},
        "completion": {"prompt": TEMPLATE_HEAD.format(instruction=instruction), "completion": response},
        "messages": {"messages": [{"role": "user", "content": instruction}, {"role": "assistant", "content": response}]},
        "sharegpt": {"conversations": [{"from": "human", "value": instruction}, {"from": "gpt", "value": response}]},
        "text": {"text": TEMPLATE_HEAD.format(instruction=instruction) + response},
    }


def write(directory, file_type, rows):
    directory.mkdir(parents=True)
    if file_type == "jsonl":
        path = directory / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif file_type == "json":
        path = directory / "data.json"
        path.write_text(json.dumps(rows, indent=1))
    elif file_type == "csv":
        path = directory / "data.csv"
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows({k: v if isinstance(v, str) else json.dumps(v) for k, v in r.items()} for r in rows)
    elif file_type == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = directory / "data.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path = directory / "dataset"
        (path / "data").mkdir(parents=True)
        (path / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--preset", default="tiny", help="whose tokenizer counts the tokens (tiny or demo)")
    args = parser.parse_args()

    import keras_hub
    import numpy as np

    from gemma_lora import data
    from gemma_lora.config import resolve_config
    from gemma_lora.errors import GemmaLoraError
    from gemma_lora.model import presets

    preset_dir = presets.resolve_preset(args.preset)
    tokenizer = keras_hub.tokenizers.Tokenizer.from_preset(str(preset_dir))
    sample = []
    with gzip.open(data.resolve_data_path("dolly-sample"), "rt", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if not record["context"]:
                sample.append((record["instruction"], record["response"]))
            if len(sample) == args.rows:
                break
    print(f"{args.rows} no-context Dolly records in each shape; tokenizer of {args.preset}; sequence_length 512; "
          "response-only loss (the package defaults)\n")
    print("| format | file type | records read | examples | loss tokens | result |")
    print("|---|---|---:|---:|---:|---|")
    references = {}  # the arrays of dolly JSONL (with --chat for conversations; text: of text JSONL)
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in data.FORMATS:
            rows = [shapes(i, r)[fmt] for i, r in sample]
            group = {"text": "text", "messages": "dolly --chat", "sharegpt": "dolly --chat"}.get(fmt, "dolly")
            for file_type in FILE_TYPES:
                spec = write(Path(tmp) / fmt / file_type.replace(" ", "-"), file_type, rows)
                config = resolve_config(overrides=dict(data=spec, limit=len(rows), validation_rows=0, test_rows=0))
                start = time.perf_counter()
                try:
                    dataset = data.read_dataset(config)
                    tokenized = data.tokenize_rows(dataset.examples, tokenizer, config)
                except GemmaLoraError as e:
                    print(f"| {fmt} | {file_type} | | | | error: {e} |")
                    continue
                seconds = time.perf_counter() - start
                arrays = [tokenized.token_ids, tokenized.labels, tokenized.weights]
                if fmt == "dolly" and file_type == "jsonl":
                    chat = data.tokenize_rows(dataset.examples, tokenizer, dataclasses.replace(config, chat=True))
                    references["dolly --chat"] = [chat.token_ids, chat.labels, chat.weights]
                if group not in references:
                    references[group], same = arrays, "the reference arrays"
                else:
                    equal = all(np.array_equal(a, b) for a, b in zip(arrays, references[group]))
                    same = f"{'same' if equal else 'DIFFERENT'} arrays as {group} JSONL"
                result = f"ok: {dataset.format} detected, {same} ({seconds:.2f} s)"
                print(f"| {fmt} | {file_type} | {dataset.records_read:,} | {len(dataset.examples):,} | "
                      f"{tokenized.loss_tokens:,} | {result} |")


if __name__ == "__main__":
    main()
