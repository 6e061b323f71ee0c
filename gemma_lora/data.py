"""Dolly-style JSONL → filtered, templated, tokenized arrays that feed `fit`.

Tokenization happens once, here, into NumPy arrays; KerasHub's string
preprocessing is not used for training because it needs tf.data or grain,
cannot mask prompt tokens and cannot shuffle (see ../shared/quality-notes.md).

Splits of a dataset (rows counted after the context filter, in file order):

    rows [0, limit - validation_rows)       train
    rows [limit - validation_rows, limit)   validation
    rows [limit, limit + test_rows)         test

With the defaults on the shipped sample (1,068 rows without context) that is
900 train / 100 validation / 68 test; the recipe trains on all first 1,000.
The test rows are the same in the shipped sample and the full Dolly file,
which starts with the same records.
"""

import gzip
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from gemma_lora.errors import ConfigError, DataError

DOLLY_REPO = "databricks/databricks-dolly-15k"
DOLLY_FILE = "databricks-dolly-15k.jsonl"
SAMPLE_FILE = "databricks-dolly-sample.jsonl.gz"
REQUIRED_FIELDS = ("instruction", "response")


@dataclass(frozen=True)
class Example:
    instruction: str
    response: str
    context: str = ""


@dataclass
class Splits:
    train: list
    validation: list
    test: list


@dataclass
class TokenizedRows:
    """Training arrays: `x` for the model, `labels` and `weights` for the loss.

    `weights[i, t]` is 1 where the token `labels[i, t]` counts towards the
    loss: response tokens (or every real token for whole-sequence loss),
    never padding.
    """

    token_ids: np.ndarray  # (rows, sequence_length) int32
    padding_mask: np.ndarray  # (rows, sequence_length) bool
    labels: np.ndarray  # (rows, sequence_length) int32, next token
    weights: np.ndarray  # (rows, sequence_length) float32
    truncated: int  # rows cut at sequence_length
    real_tokens: int  # non-padding input positions

    def __len__(self):
        return len(self.token_ids)

    @property
    def x(self):
        return {"token_ids": self.token_ids, "padding_mask": self.padding_mask}

    @property
    def loss_tokens(self):
        return int(self.weights.sum())


def resolve_data_path(spec):
    """Map a data spec to a local file: shipped sample, Hub download, or a path.

    Raises:
        DataError: the file is missing or the download failed.
    """
    if spec == "dolly-sample":
        return resources.files("gemma_lora") / "resources" / SAMPLE_FILE
    if spec == "dolly":
        return download_dolly()
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"Data file not found: {path}. Give an existing JSONL file or 'dolly-sample'.")
    return path


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


def read_jsonl(path):
    """Yield (line_number, record) from a JSONL file (gzipped if it ends in .gz).

    Streams the file; blank lines are skipped.

    Raises:
        DataError: a line is not JSON or not an object (the message gives the line).
    """
    path_str = str(path)
    opener = gzip.open if path_str.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{path_str}:{number}: not valid JSON ({e.msg}). Fix or remove that line."
                    ) from None
                if not isinstance(record, dict):
                    raise DataError(
                        f"{path_str}:{number}: expected a JSON object with 'instruction' and "
                        f"'response', got {type(record).__name__}."
                    )
                yield number, record
    except UnicodeDecodeError as e:
        raise DataError(f"{path_str}: not UTF-8 text ({e.reason}). Save the file as UTF-8.") from None


def parse_example(path, number, record):
    """Check one record's fields and turn it into an `Example`."""
    for name in REQUIRED_FIELDS:
        if name not in record:
            raise DataError(
                f"{path}:{number}: missing field {name!r}. Every row needs 'instruction' and 'response'."
            )
    for name in (*REQUIRED_FIELDS, "context"):
        if name in record and record[name] is not None and not isinstance(record[name], str):
            raise DataError(
                f"{path}:{number}: field {name!r} must be a string, got {type(record[name]).__name__}."
            )
    return Example(record["instruction"], record["response"], record.get("context") or "")


def load_examples(config, path=None):
    """Read, check and filter the configured dataset, stopping once every split is filled.

    Rows with a context are dropped unless `config.include_context`.

    Raises:
        DataError: bad rows, or nothing left after filtering.
    """
    path = path or resolve_data_path(config.data)
    wanted = config.limit + config.test_rows
    examples = []
    for number, record in read_jsonl(path):
        example = parse_example(path, number, record)
        if example.context and not config.include_context:
            continue
        examples.append(example)
        if len(examples) >= wanted:
            break
    if not examples:
        raise DataError(
            f"No rows left in {path} after filtering"
            + ("" if config.include_context else " (rows with a context are dropped)")
            + ". Use a file with rows without context, or --include-context."
        )
    return examples


def split(examples, config):
    """Cut examples into the fixed train / validation / test splits (see module doc)."""
    pool = examples[: config.limit]
    n_val = config.validation_rows if len(pool) > config.validation_rows else 0
    if config.validation_rows and not n_val:
        raise DataError(
            f"Only {len(pool)} rows to train on, too few to hold out validation_rows="
            f"{config.validation_rows}. Lower validation_rows or use more data."
        )
    cut = len(pool) - n_val
    return Splits(
        train=pool[:cut],
        validation=pool[cut:],
        test=examples[config.limit : config.limit + config.test_rows],
    )


def prompt_text(example, config):
    """The templated text up to the response (what generation is given)."""
    template = config.context_template if example.context else config.template
    head = template[: template.index("{response}")]
    return head.format(instruction=example.instruction, context=example.context)


def full_text(example, config):
    return prompt_text(example, config) + example.response


def tokenize_rows(examples, tokenizer, config):
    """Tokenize examples into fixed-length training arrays.

    Whole-sequence mode (the recipe) tokenizes the full text in one piece and
    truncates exactly as KerasHub's `GemmaCausalLMPreprocessor`: `<bos>`,
    text cut to sequence_length - 1 tokens, `<eos>`. Response-only mode
    tokenizes prompt and response separately so the boundary is exact, and
    by default gives no `<eos>` to a row whose text was cut.

    Raises:
        ConfigError: sequence_length cannot hold even the empty template.
    """
    seq = config.sequence_length
    bos, eos, pad = tokenizer.start_token_id, tokenizer.end_token_id, tokenizer.pad_token_id
    check_sequence_length(tokenizer, config)
    if config.response_only_loss:
        prompts = _tokenize(tokenizer, [prompt_text(e, config) for e in examples])
        responses = _tokenize(tokenizer, [e.response for e in examples])
    else:
        prompts = [[] for _ in examples]
        responses = _tokenize(tokenizer, [full_text(e, config) for e in examples])

    n = len(examples)
    token_ids = np.full((n, seq), pad, dtype=np.int32)
    labels = np.full((n, seq), pad, dtype=np.int32)
    weights = np.zeros((n, seq), dtype=np.float32)
    padding_mask = np.zeros((n, seq), dtype=bool)
    truncated = 0
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        ids = [bos, *prompt, *response, eos]
        # Loss weight of predicting ids[t + 1] from ids[..t]: response and <eos> only,
        # or every next token in whole-sequence mode.
        target_weight = [0.0] * len(prompt) + [1.0] * (len(response) + 1)
        if len(ids) > seq + 1:
            truncated += 1
            if config.eos_after_truncation:
                ids = ids[:seq] + [eos]
                target_weight = target_weight[: seq - 1] + [1.0]
            else:
                ids = ids[: seq + 1]
                target_weight = target_weight[:seq]
        # Like KerasHub: the row is ids padded to seq + 1, inputs are its first
        # seq positions (a final <eos> is an input too), labels the last seq.
        length = min(len(ids), seq)
        token_ids[i, :length] = ids[:length]
        padding_mask[i, :length] = True
        labels[i, : len(ids) - 1] = ids[1:]
        weights[i, : len(ids) - 1] = target_weight
    return TokenizedRows(token_ids, padding_mask, labels, weights, truncated, int(padding_mask.sum()))


def check_sequence_length(tokenizer, config):
    """Raise ConfigError if the template alone fills the sequence length."""
    empty = Example(instruction="", response="", context="x" if config.include_context else "")
    overhead = len(_tokenize(tokenizer, [prompt_text(empty, config)])[0]) + 2  # <bos>, <eos>
    if config.sequence_length <= overhead:
        raise ConfigError(
            f"sequence_length={config.sequence_length} is too small for the template: its fixed "
            f"text with <bos> and <eos> takes {overhead} tokens, leaving no room for an instruction "
            f"and a response. Use a sequence_length well above {overhead} (e.g. 256 or 512)."
        )


def _tokenize(tokenizer, texts):
    """Token id lists from a KerasHub tokenizer (runs on its pure-Python path)."""
    if not texts:
        return []
    return [list(map(int, ids)) for ids in tokenizer(texts)]
