"""Your data → the examples a run trains on → fixed splits → token arrays that feed `fit`.

The pieces, in the order the data flows through them:

    sources.py   where records come from: the shipped Dolly files, a JSONL / JSON / CSV /
                 Parquet file, or a Hugging Face dataset; each reader yields (where, record)
    formats.py   what a record means: one reader per format (dolly, alpaca, completion,
                 messages, sharegpt, text) turning a record into an `Example`; detection, --field
    dataset.py   read the configured data, filter, cut the fixed splits, fingerprint them
    chat.py      Gemma's chat format: an `Example`'s turns as token ids, loss on the model's turns
    tokenize.py  an `Example` → template or chat turns → token ids, labels and loss weights

    from gemma_lora import data
    examples = data.load_examples(config)
    splits = data.split(examples, config)
    rows = data.tokenize_rows(splits.train, tokenizer, config)
"""

from gemma_lora.data import chat
from gemma_lora.data.dataset import (
    Dataset,
    Splits,
    fingerprint,
    load_examples,
    read_dataset,
    split,
    splits_record,
)
from gemma_lora.data.formats import FIELDS, FORMATS, Example
from gemma_lora.data.sources import (
    DOLLY_FILE,
    DOLLY_REPO,
    SAMPLE_FILE,
    SHIPPED,
    download_dolly,
    read_jsonl,
    resolve_data_path,
)
from gemma_lora.data.tokenize import (
    TokenizedRows,
    check_sequence_length,
    full_text,
    prompt_text,
    tokenize_rows,
)

__all__ = [
    "DOLLY_FILE",
    "DOLLY_REPO",
    "FIELDS",
    "FORMATS",
    "SAMPLE_FILE",
    "SHIPPED",
    "Dataset",
    "Example",
    "Splits",
    "TokenizedRows",
    "chat",
    "check_sequence_length",
    "download_dolly",
    "fingerprint",
    "full_text",
    "load_examples",
    "prompt_text",
    "read_dataset",
    "read_jsonl",
    "resolve_data_path",
    "split",
    "splits_record",
    "tokenize_rows",
]
