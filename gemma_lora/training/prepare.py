"""A run's setup: read the data, settle the chat format, load the model, enable LoRA, tokenize the splits.

`prepare` prints what it read and chose, one line each, and returns what
training needs; bad input stops it before the slow model load where it can.
In a job of several processes each reads its own copy of the data and the
preset, and if one cannot, all stop.
"""

import dataclasses
import hashlib
import json
import time
from pathlib import Path

from gemma_lora import data
from gemma_lora.data import chat
from gemma_lora.data.preference import tokenize_pairs
from gemma_lora.data.prompts import tokenize_prompts
from gemma_lora.data.tokenize import average_per_example
from gemma_lora.errors import ConfigError, DataError
from gemma_lora.model import loading, presets
from gemma_lora.model.layers import lora_layers
from gemma_lora.model.quantize import base_weight_bytes, quantize_base
from gemma_lora.parallel import distribute, hosts
from gemma_lora.run_files import DATA_FILE
from gemma_lora.training.batching import positions_per_epoch


def prepare(config, echo):
    """Check data, preset and model; return what training needs.

    The last value is the objective's own rows per split: preference pairs
    (`PairRows`), GRPO's prompts (`PromptRows`), or None for sft.
    """
    echo("config: " + json.dumps(config.to_dict()))

    def sources():
        dataset = data.read_dataset(config)  # Read data before the slow model load.
        echo(dataset.describe())
        if config.prefers and dataset.format != "preference":
            raise DataError(
                f"objective={config.objective} learns from preference pairs, and {dataset.source} reads as "
                f"{dataset.format} data. Each record needs chosen and rejected, and a prompt (or chosen and rejected "
                "texts that begin with the same prompt): give such data (docs/preference.md), or --objective sft."
            )
        if config.samples_completions and dataset.format in ("text", "preference"):
            raise DataError(
                f"objective=grpo samples its own answers to prompts, and {dataset.source} reads as {dataset.format} "
                "data, which has no prompt to answer (text) or is meant for dpo (preference). Give prompts "
                "(e.g. {\"prompt\": ...} records, with an answer where a reward compares with one; docs/rl.md)."
            )
        if dataset.format == "prompt" and not config.samples_completions:
            raise DataError(
                f"{dataset.source} reads as prompt data (prompts, no responses to learn from): that is for "
                "--objective grpo. For supervised fine-tuning give each prompt its completion."
            )
        if config.metric and dataset.format == "text":
            raise ConfigError(
                f"metric={config.metric!r} compares answers with references, and text data has neither; "
                "drop --metric or use prompt/answer data (e.g. --data-format completion)."
            )
        return dataset, data.split(dataset.examples, config), presets.resolve_preset(config.preset, config.preset_version)

    # Each host reads its own copy of the data and preset: if one cannot, all stop.
    dataset, splits, preset_dir = hosts.together("data and preset", sources)
    given = config.chat
    config = resolve_chat(config, dataset.format, preset_dir)
    echo(_describe_format(config, given, dataset.format, presets.chat_format_for(preset_dir)))
    where = loading.platform()
    # Process 0's CPU decides, so every process of a job computes alike.
    bf16_unit = hosts.first("bfloat16 units", loading.cpu_bf16) if where == "cpu" else None
    precision = config.resolved_precision(where, cpu_bf16=bf16_unit is not None)
    # Variables take their device layout when created, so before the load.
    plan = distribute.apply(config, preset_dir, precision, echo)
    if config.full_finetune and plan.kind == "model" and plan.processes > 1:
        raise ConfigError(
            "full_finetune saves the whole model, which model parallelism over several processes would have to "
            "gather onto every device first. Use distribution='data' (if the model fits one device) or LoRA."
        )
    echo(f"loading {config.preset} from {preset_dir}")
    causal_lm = loading.load_causal_lm(preset_dir, precision, config.sequence_length, frozen_base=not config.full_finetune)
    # Counted before quantizing: int4 packs two weights per stored number.
    base_parameters = loading.parameter_summary(causal_lm)["base_parameters"]
    stored = precision
    if config.precision == "auto" and where == "cpu" and precision != "float32":
        stored = (f"{precision}: bfloat16 base and activations on this CPU's {bf16_unit.upper().replace('_', '-')}, "
                  "float32 LoRA factors and optimizer; --precision float32 for float32 throughout")
    if config.quantize:

        quantize_base(causal_lm, config.quantize)
        stored = f"{precision}, base weights {config.quantize}: {base_weight_bytes(causal_lm) / 2**20:,.1f} MiB"
    if config.full_finetune:
        causal_lm.backbone.trainable = True  # Every weight, embeddings and norms included.
        method = "full fine-tune: every weight"
    elif config.init_adapter:
        config = start_from_adapter(causal_lm, config)
        method = (f"LoRA rank {config.lora_rank} on {', '.join(config.lora_targets)}, starting from "
                  f"{config.init_adapter}")
    else:
        loading.enable_lora(
            causal_lm, config.lora_rank, config.lora_alpha, config.lora_targets, seed=config.seed
        )
        method = f"LoRA rank {config.lora_rank} on {', '.join(config.lora_targets)}"
    parameters = {**loading.parameter_summary(causal_lm), "base_parameters": base_parameters}
    echo(
        f"model: {config.preset} ({stored}) — {parameters['base_parameters']:,} base parameters, "
        f"{parameters['trainable_parameters']:,} trainable ({method})"
    )
    tokenizer = causal_lm.preprocessor.tokenizer
    rows = {
        name: data.tokenize_rows(getattr(splits, name), tokenizer, config)
        for name in ("train", "validation", "test")
    }
    if config.loss_average == "example":
        rows["train"].weights = average_per_example(rows["train"].weights)
    refuse_marker_text(rows, dataset, config)
    pairs = tokenize_splits_with(tokenize_pairs, splits, dataset, tokenizer, config) if config.prefers else None
    if config.samples_completions:  # the objective's rows: prompts
        pairs = tokenize_splits_with(tokenize_prompts, splits, dataset, tokenizer, config)
    data_stats = describe_data(rows, config, pairs if config.prefers else None)
    if config.samples_completions:
        data_stats["lines"].append(
            "prompts: " + ", ".join(f"{name} {len(p)}" for name, p in pairs.items())
            + f"; {sum(p.cut for p in pairs.values())} cut to fit sequence_length={config.sequence_length} with "
            f"max_new_tokens={config.max_new_tokens} after them (a long prompt keeps its end); "
            f"{sum(a is not None for a in pairs['train'].answers)} of the training prompts have an answer"
        )
    data_stats["source"] = data.splits_record(dataset, splits)
    data_stats["source"]["marker_text_rows"] = {name: len(r.marker_text) for name, r in rows.items()}
    for line in data_stats["lines"]:
        echo(line)
    return config, causal_lm, parameters, splits, rows, data_stats, precision, pairs


def start_from_adapter(causal_lm, config):
    """Load `init_adapter` (a run directory or an adapter file) as the LoRA to train on; the config with its LoRA settings.

    Raises:
        AdapterError: no adapter there, or one trained on another base.
    """
    from gemma_lora.adapters.files import ADAPTER_FILE
    from gemma_lora.adapters.store import load_adapter
    from gemma_lora.errors import AdapterError

    path = Path(config.init_adapter)
    if path.is_dir():
        path = path / ADAPTER_FILE
    if not path.is_file():
        raise AdapterError(
            f"init_adapter={config.init_adapter}: no adapter there ({path} does not exist). Give a run directory "
            f"holding {ADAPTER_FILE}, or the adapter file itself."
        )
    meta = load_adapter(causal_lm, path, preset=config.preset) or {}
    layers = lora_layers(causal_lm)
    return dataclasses.replace(
        config, lora_rank=layers[0].lora_rank, lora_alpha=meta.get("alpha", config.lora_alpha),
        lora_targets=list(meta.get("targets", config.lora_targets)),
    )


def tokenize_splits_with(tokenize, splits, dataset, tokenizer, config):
    """Each split through `tokenize(examples, tokenizer, config, places)`, with where each record was read.

    `data.preference.tokenize_pairs` (preference pairs) or
    `data.prompts.tokenize_prompts` (GRPO's prompts). Rows are counted in
    the order read (train, validation, test follow each other).
    """
    out, offset = {}, 0
    for name in ("train", "validation", "test"):
        examples = getattr(splits, name)
        out[name] = tokenize(examples, tokenizer, config, dataset.places[offset : offset + len(examples)])
        offset += len(examples)
    return out


def refuse_marker_text(rows, dataset, config):
    """With marker_text="error", raise DataError naming the first row whose text holds a control token.

    Rows are counted in the order read (train, validation, test follow each
    other), so `dataset.places` names the record in its file.
    """
    if config.marker_text != "error":
        return
    offset = 0
    for name in ("train", "validation", "test"):
        if rows[name].marker_text:
            row, marker = rows[name].marker_text[0]
            place = dataset.places[offset + row] if offset + row < len(dataset.places) else f"{name} row {row}"
            raise DataError(
                f"{place}: the text holds {marker!r}, a control token of the tokenizer, written as text "
                f"(marker_text=error; {sum(len(r.marker_text) for r in rows.values())} rows hold such text). "
                "Remove it from the data, or drop --marker-text error to train it as plain text."
            )
        offset += len(rows[name])


def resolve_chat(config, data_format, preset_dir=None):
    """`config` with `chat` settled (and stop_strings, which depend on it), as config.json records it.

    A `chat` given is kept; None means on for conversation data and for
    instruction-tuned presets (`model.chat_format_of`), never for text data.

    Raises:
        ConfigError: chat on for text data.
    """


    chat = config.chat
    if chat is None:
        chat = data_format != "text" and (
            data_format in ("messages", "sharegpt") or presets.chat_format_of(config.preset, preset_dir) is not None
        )
    elif chat and data_format == "text":
        raise ConfigError(
            f"chat=True writes prompts and answers as turns, and {config.data} reads as text data (neither); "
            "drop --chat, or give prompt/answer data."
        )
    config = dataclasses.replace(config, chat=chat)
    return dataclasses.replace(config, stop_strings=config.resolved_stop_strings())


def _describe_format(config, given, data_format, chat_format="gemma"):
    """One line: how rows are written, and why (`chat_format`: the one the preset's model writes)."""
    if not config.chat:
        if data_format == "text":
            return "prompts: none (text data: each row is its text, loss on every token, no template)"
        name = "Gemma 4's" if chat_format == chat.GEMMA4 else "Gemma's"
        rows = ("as written (completion data: each row is its prompt followed by its completion, no template)"
                if data_format == "completion" else "the template")
        return f"prompts: {rows}" + (" (--no-chat)" if given is False else f"; --chat writes {name} chat turns instead")
    why = "--chat" if given else "conversation data" if data_format in ("messages", "sharegpt") else "an instruction-tuned preset"
    name, details = chat.describe(chat_format).split(": ", 1)
    return f"prompts: {name} ({why}): {details}"


def default_run_dir(config):
    name = Path(config.preset).name.replace("kaggle://", "").replace("/", "_")
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def describe_data(rows, config, pairs=None):
    """Counts per split, truncation, padding share and a fingerprint of the train tokens (and of the pairs')."""

    train_rows = rows["train"]
    fingerprint = hashlib.sha256(train_rows.token_ids.tobytes() + train_rows.weights.tobytes()).hexdigest()[:16]
    positions = positions_per_epoch(train_rows, config)
    lossless = int((train_rows.weights.sum(axis=1) == 0).sum()) if len(train_rows) else 0
    split_line = ("splits: " + ", ".join(f"{name} {len(r)} rows" for name, r in rows.items())
                  + f" (fixed splits of the rows read, in order; fingerprints in {DATA_FILE})")
    lines = [split_line]
    if not config.samples_completions:  # GRPO trains on its own completions: its prompts' line says what it reads
        lines.append(
            f"train tokens: {train_rows.real_tokens:,} real of {positions:,} positions an epoch "
            f"({train_rows.real_tokens / positions:.1%}), {train_rows.loss_tokens:,} carry loss; "
            f"{train_rows.truncated} rows longer than sequence_length={config.sequence_length} were cut"
            + (
                f" (whole exchanges kept from the start where the first fits: {train_rows.turns_cut} model turns left "
                "out or cut)" if config.chat
                else " (<eos> appended, as KerasHub)" if config.eos_after_truncation else " (no <eos> after cut text)"
            )
            + (f"; {lossless} of them kept no loss token (the cut fell before the response)" if lossless else "")
        )
    if pairs is not None:
        digest = hashlib.sha256()
        for split in pairs.values():
            for i in range(len(split)):
                for sequence in split.sequences(i):
                    digest.update(sequence["token_ids"].tobytes() + b"|")
        fingerprint = digest.hexdigest()[:16]
        lines.append(
            "pairs: " + ", ".join(f"{name} {len(p)}" for name, p in pairs.items())
            + f"; {sum(p.cut for p in pairs.values())} cut to fit sequence_length={config.sequence_length} (responses "
            "cut to the room the prompt leaves; a prompt over 3/4 of it keeps its end); loss on response tokens only"
        )
    marked = {name: len(r.marker_text) for name, r in rows.items()}
    if any(marked.values()):
        example = next(r.marker_text[0][1] for r in rows.values() if r.marker_text)
        lines.append(
            "marker text: " + ", ".join(f"{name} {n} rows" for name, n in marked.items())
            + f" hold a control token written as text (e.g. {example!r}); it is trained as the plain text it is, "
            "never as the token (--marker-text error refuses such data)"
        )
    return {
        "rows": {name: len(r) for name, r in rows.items()},
        "truncated": {name: r.truncated for name, r in rows.items()},
        "marker_text": marked,
        "turns_cut": {name: r.turns_cut for name, r in rows.items()},
        **({"pairs": {name: len(p) for name, p in pairs.items()}, "pairs_cut": {name: p.cut for name, p in pairs.items()}}
           if pairs is not None else {}),
        "real_token_fraction": train_rows.real_tokens / positions,
        "loss_tokens": train_rows.loss_tokens,
        "fingerprint": fingerprint,
        "lines": lines,
    }
