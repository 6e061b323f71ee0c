"""Data formats × file types: rows read, loss weights on the response only, --field, detection, Hugging Face datasets."""

import csv
import gzip
import json

import numpy as np
import pytest
from conftest import write_jsonl

from gemma_lora import data
from gemma_lora.data import sources
from gemma_lora.errors import DataError

QA = [
    ("Name a colour.", "Blue is a colour."),
    ("Count to three.", "One, two, three."),
    ("Say hello to the team.", "Hello, team!"),
]


def records(fmt, qa=QA):
    """The same questions and answers in each format's own shape."""
    shapes = {
        "dolly": lambda q, a: {"instruction": q, "context": "", "response": a},
        "alpaca": lambda q, a: {"instruction": q, "input": "", "output": a},
        "completion": lambda q, a: {"prompt": f"Q: {q}\nA:", "completion": f" {a}"},
        "messages": lambda q, a: {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
        "sharegpt": lambda q, a: {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]},
        "text": lambda q, a: {"text": f"{q} {a}"},
        "preference": lambda q, a: {"prompt": q, "chosen": a, "rejected": "I will not say."},
        "prompt": lambda q, a: {"prompt": f"Q: {q}\nA:", "answer": f" {a}"},
    }
    return [shapes[fmt](q, a) for q, a in qa]


def write(directory, file_type, rows, name="data"):
    """Write record dicts as a file (or dataset folder) of `file_type`; return the --data spec."""
    directory.mkdir(parents=True, exist_ok=True)
    if file_type == "jsonl":
        return str(write_jsonl(directory / f"{name}.jsonl", rows))
    if file_type == "json":
        path = directory / f"{name}.json"
        path.write_text(json.dumps(rows, indent=2))
        return str(path)
    if file_type == "csv":
        path = directory / f"{name}.csv"
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            for row in rows:  # CSV holds text: a conversation goes in as JSON.
                writer.writerow({k: v if isinstance(v, str) else json.dumps(v) for k, v in row.items()})
        return str(path)
    if file_type == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = directory / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)  # several row groups
        return str(path)
    if file_type == "hf folder":
        folder = directory / name
        (folder / "data").mkdir(parents=True)
        write_jsonl(folder / "data" / "train.jsonl", rows)
        return str(folder)
    raise ValueError(file_type)


FILE_TYPES = ("jsonl", "json", "csv", "parquet", "hf folder")


@pytest.fixture(scope="module")
def tokenizer(tiny_preset):
    import keras_hub

    return keras_hub.models.GemmaTokenizer.from_preset(str(tiny_preset))


def loaded(make_config, spec, **overrides):
    config = make_config(data=spec, limit=len(QA), validation_rows=0, test_rows=0, sequence_length=96, **overrides)
    return config, data.read_dataset(config)


def weighted_text(tokenizer, rows, i, stop="<eos>"):
    """The tokens that carry loss in row i, decoded (the final stop token checked and dropped)."""
    weighted = rows.labels[i][rows.weights[i] > 0].tolist()
    assert weighted[-1] == tokenizer.token_to_id(stop)
    return tokenizer.detokenize([weighted[:-1]])[0]


def prompt_ids(tokenizer, example, config):
    """The prompt's token ids after <bos>: the template's, or the chat format's turns up to the model's answer."""
    if data.chat.uses_chat(config, [example]):
        return data.chat.prompt_ids([example], tokenizer, data.chat.markers(tokenizer))[0][1:]
    text = data.prompt_text(example, config)
    return list(tokenizer([text])[0]) if text else []


@pytest.mark.parametrize("file_type", FILE_TYPES)
@pytest.mark.parametrize("fmt", list(data.FORMATS))
def test_each_format_from_each_file_type(tmp_path, make_config, tokenizer, fmt, file_type):
    spec = write(tmp_path, file_type, records(fmt))
    config, dataset = loaded(make_config, spec)
    assert dataset.format == fmt and dataset.detected
    assert dataset.records_read == len(dataset.examples) == len(QA)
    rows = data.tokenize_rows(dataset.examples, tokenizer, config)
    # Conversations take Gemma's chat format: they end with <end_of_turn> instead of <eos>.
    stop = "<end_of_turn>" if fmt in ("messages", "sharegpt") else "<eos>"
    for i, example in enumerate(dataset.examples):
        prompt = prompt_ids(tokenizer, example, config)
        inputs = int(rows.padding_mask[i].sum())  # <bos>, prompt, response, stop token
        assert rows.token_ids[i, 1 : len(prompt) + 1].tolist() == prompt
        # Predicting each response token and the stop token carries loss; the prompt and the padding none.
        assert rows.weights[i, : len(prompt)].sum() == 0
        assert rows.weights[i, len(prompt) : inputs - 1].all() and rows.weights[i, inputs - 1 :].sum() == 0
        assert weighted_text(tokenizer, rows, i, stop) == example.response
        if fmt == "text":
            assert not prompt and rows.weights[i].sum() == inputs - 1  # every token after <bos>, and <eos>
    expected = [a if fmt not in ("completion", "prompt") else f" {a}" for _, a in QA]
    if fmt == "text":
        expected = [f"{q} {a}" for q, a in QA]
    assert [e.response for e in dataset.examples] == expected


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("fmt", ["alpaca", "messages", "sharegpt"])
def test_instruction_formats_give_the_dolly_arrays(tmp_path, make_config, tokenizer, fmt, chat):
    """The same content as alpaca, messages or sharegpt trains on the very arrays of the dolly reading,
    with the template (--no-chat) and with Gemma's chat format (--chat): one exchange each."""
    config, dolly = loaded(make_config, write(tmp_path / "dolly", "jsonl", records("dolly")), chat=chat)
    _, other = loaded(make_config, write(tmp_path / fmt, "jsonl", records(fmt)), chat=chat)
    ours, theirs = (data.tokenize_rows(d.examples, tokenizer, config) for d in (dolly, other))
    stop = "<end_of_turn>" if chat else "<eos>"
    assert all(weighted_text(tokenizer, ours, i, stop) == a for i, (_, a) in enumerate(QA))
    for name in ("token_ids", "padding_mask", "labels", "weights"):
        np.testing.assert_array_equal(getattr(ours, name), getattr(theirs, name))


def test_alpaca_input_sits_on_the_prompt_side(tmp_path, make_config, tokenizer):
    rows = [{"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
            {"instruction": "Name a colour.", "input": "", "output": "Blue"}]
    spec = write(tmp_path, "jsonl", rows)
    config, dataset = loaded(make_config, spec, include_context=True)
    first = dataset.examples[0]
    assert first.context == "Good morning"
    assert "Context:\nGood morning" in data.prompt_text(first, config)
    tokenized = data.tokenize_rows(dataset.examples, tokenizer, config)
    assert weighted_text(tokenizer, tokenized, 0) == "Bonjour"
    # Without --include-context, a record with an input is left out, as a Dolly record with a context.
    _, filtered = loaded(make_config, spec)
    assert [e.instruction for e in filtered.examples] == ["Name a colour."] and filtered.context_dropped == 1


def test_completion_prompt_is_used_as_written(tmp_path, make_config):
    config, dataset = loaded(make_config, write(tmp_path, "jsonl", records("completion")))
    assert data.prompt_text(dataset.examples[0], config) == "Q: Name a colour.\nA:"
    assert data.full_text(dataset.examples[0], config) == "Q: Name a colour.\nA: Blue is a colour."


def test_a_system_message_is_folded_into_the_instruction_and_the_turns_are_kept(tmp_path, make_config):
    turns = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour."},
             {"role": "assistant", "content": "Blue."}]
    _, dataset = loaded(make_config, write(tmp_path, "jsonl", [{"messages": turns}] * 3))
    example = dataset.examples[0]
    assert example.instruction == "Answer briefly.\n\nName a colour." and example.response == "Blue."
    assert example.conversation == (("system", "Answer briefly."), ("user", "Name a colour."), ("assistant", "Blue."))


def test_content_given_as_text_parts_reads_as_the_same_conversation(tmp_path, make_config):
    as_parts = [{"role": "user", "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "colour."}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}]
    as_text = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    _, parts = loaded(make_config, write(tmp_path, "jsonl", [{"messages": as_parts}] * 3))
    _, text = loaded(make_config, write(tmp_path / "t", "jsonl", [{"messages": as_text}] * 3))
    assert parts.format == text.format == "messages"
    assert parts.examples[0].conversation == text.examples[0].conversation == (("user", "Name a colour."),
                                                                               ("assistant", "Blue."))


@pytest.mark.parametrize("turns, match", [
    ([("user", "a")], r":1: the conversation \(user\) ends with a user turn, which leaves no answer to learn"),
    ([("user", "a"), ("assistant", "b"), ("user", "c")], r"ends with a user turn.*End it with the assistant's answer"),
    ([("user", "a"), ("robot", "b")], r"turn 2 of 'messages' has role='robot'; known: system, user"),
    ([("user", "a"), ("assistant", "  ")], r"turn 2 of 2 \(user, assistant\) is empty"),
    ([], r"field 'messages' must be a non-empty list of turns, got an empty list"),
    ([("user", "a"), ("assistant", 5)], r"turn 2 of 'messages' must have a string 'content' or a list of text parts, "
                                        r"got int"),
    ([("user", [{"type": "image", "image": "cat.png"}, {"type": "text", "text": "What is it?"}]), ("assistant", "A cat.")],
     r"part 1 of turn 1 of 'messages' is image \('image'\): gemma-lora trains on text only for now "
     r"\(messages format; keys found: messages\)\. Drop the non-text parts"),
    ([("user", "a"), ("assistant", [{"type": "input_audio", "input_audio": {}}])], r"part 1 of turn 2 .* is audio"),
    ([("user", "a"), ("assistant", ["b"])], r"part 1 of turn 2 of 'messages' must be \{\"type\": \"text\", \"text\": \.\.\.\}, "
                                            r"got 'b'"),
    ([("user", "a"), ("assistant", [{"type": "text", "text": 3}])], r"part 1 of turn 2 .* must be \{\"type\": \"text\""),
    ([("user", "a"), ("user", "b"), ("assistant", "c")], r"turn 2 of 3 \(user, user, assistant\) is a user turn where "
                                                         r"an assistant turn belongs: turns must alternate"),
    ([("assistant", "a"), ("user", "b"), ("assistant", "c")], r"turn 1 of 3 .* is an assistant turn where a user turn"),
    ([("user", "a"), ("system", "b"), ("assistant", "c")], r"turn 2 of 3 \(user, system, assistant\) is a system message"),
    ([("system", "a")], r"\(system\) has no user or assistant turn"),
])
def test_bad_conversations_are_refused_naming_the_place(tmp_path, make_config, turns, match):
    rows = [{"messages": [{"role": r, "content": c} for r, c in turns]}]
    with pytest.raises(DataError, match=match) as error:
        loaded(make_config, write(tmp_path, "jsonl", rows))
    assert "messages format; keys found: messages" in str(error.value) and "\n" not in str(error.value)


def test_field_mapping_renames_columns_of_any_file(tmp_path, make_config, tokenizer):
    rows = [{"question": f"Q: {q}\nA:", "answer": f" {a}", "id": str(i)} for i, (q, a) in enumerate(QA)]
    spec = write(tmp_path, "csv", rows)
    config, dataset = loaded(make_config, spec, fields={"prompt": "question", "completion": "answer"})
    assert dataset.format == "completion" and dataset.detected  # detected under the mapping
    assert [e.prompt for e in dataset.examples] == [r["question"] for r in rows]
    tokenized = data.tokenize_rows(dataset.examples, tokenizer, config)
    assert weighted_text(tokenizer, tokenized, 2) == " Hello, team!"


def test_field_mapping_renames_the_keys_of_turns(tmp_path, make_config):
    rows = [{"chat": [{"speaker": "user", "says": q}, {"speaker": "assistant", "says": a}]} for q, a in QA]
    _, dataset = loaded(make_config, write(tmp_path, "parquet", rows), data_format="messages",
                        fields={"messages": "chat", "role": "speaker", "content": "says"})
    assert [(e.instruction, e.response) for e in dataset.examples] == QA


def test_an_unknown_shape_lists_the_formats_and_the_mapping_that_fits(tmp_path, make_config):
    rows = [{"id": 1, "question": f"{q}\n", "answer": a} for q, a in QA]
    spec = write(tmp_path, "jsonl", rows)
    with pytest.raises(DataError) as error:
        loaded(make_config, spec)
    message = str(error.value)
    assert "data.jsonl:1: cannot tell the data format from the keys found (id, question, answer)" in message
    assert all(fmt in message for fmt in data.FORMATS) and "\n" not in message
    hint = message.split("This record would fit: ")[1].rstrip(".")
    assert hint == "--data-format completion --field prompt=question --field completion=answer"
    # The suggested flags do read the file.
    from gemma_lora.cli import build_parser

    args = build_parser().parse_args(["train", *hint.split()])
    _, dataset = loaded(make_config, spec, data_format=args.data_format, fields=args.fields)
    assert [e.response for e in dataset.examples] == [a for _, a in QA]


def test_an_unknown_conversation_shape_suggests_its_format(tmp_path, make_config):
    rows = [{"dialog": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in QA]
    with pytest.raises(DataError, match=r"would fit: --data-format sharegpt --field conversations=dialog\."):
        loaded(make_config, write(tmp_path, "jsonl", rows))


@pytest.mark.parametrize("rows, options, match", [
    ([{"instruction": "a", "output": ""}], {}, r"data.jsonl:1: field 'output' is empty \(alpaca format; keys found: instruction, output\)"),
    ([{"prompt": "a", "completion": 3}], {}, r"field 'completion' must be a string, got int \(completion format"),
    ([{"prompt": "a", "completion": "b"}, {"prompt": "a", "answer": "b"}], {},
     r"data.jsonl:2: missing field 'completion' \(completion format; keys found: prompt, answer\)\. .*--field completion=COLUMN"),
    ([{"q": "a", "a": "b"}], {"fields": {"prompt": "question", "completion": "a"}, "data_format": "completion"},
     r"missing column 'question' \(mapped onto 'prompt' by --field prompt=question\)"),
    ([{"instruction": "a", "response": "b"}], {"fields": {"prompt": "instruction"}},
     r"--field prompt=... does not apply to the dolly format \(detected from .*data.jsonl:1\)"),
    ([{"text": "a"}], {"data_format": "completion"}, r"data.jsonl:1: missing field 'prompt' \(completion format; keys found: text\)"),
])
def test_bad_records_name_file_line_format_and_keys(tmp_path, make_config, rows, options, match):
    with pytest.raises(DataError, match=match) as error:
        loaded(make_config, write(tmp_path, "jsonl", rows), **options)
    assert "\n" not in str(error.value)


# --- file types -----------------------------------------------------------------------------


def test_a_json_array_is_streamed_record_by_record_across_read_buffers(tmp_path):
    rows = [{"text": "x" * n, "n": n} for n in range(1, 40)]
    path = tmp_path / "big.json"
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
    for chunk_size in (3, 17, 1 << 20):
        read = list(sources.read_json(path, chunk_size=chunk_size))
        assert [r for _, r in read] == rows
        assert [w for w, _ in read][:2] == [f"{path}:2", f"{path}:3"]  # the line each record starts on


@pytest.mark.parametrize("text, match", [
    ('[{"text": "a"},\n {"text": }]', r":2: not valid JSON"),
    ('[{"text": "a"}\n {"text": "b"}]', r":2: expected ',' or ']' after a record"),
    ('[{"text": "a"},\n', r"the file ends inside the array"),
    ('[{"text": "a"}] x', r"text after the end of the array"),
])
def test_a_broken_json_array_names_the_line(tmp_path, text, match):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DataError, match=match):
        list(sources.read_json(path, chunk_size=4))


def test_json_named_files_holding_jsonl_and_gzipped_files_are_read(tmp_path, make_config):
    write_jsonl(tmp_path / "lines.json", records("dolly"))
    assert len(loaded(make_config, str(tmp_path / "lines.json"))[1].examples) == 3
    with gzip.open(tmp_path / "rows.csv.gz", "wt") as f:
        f.write("prompt,completion\n" + "".join(f'"{q}","{a}"\n' for q, a in QA))
    assert [e.response for e in loaded(make_config, str(tmp_path / "rows.csv.gz"))[1].examples] == [a for _, a in QA]


@pytest.mark.parametrize("file_type", ["jsonl", "json", "csv"])
def test_a_byte_order_mark_is_accepted(tmp_path, make_config, file_type):
    spec = write(tmp_path, file_type, records("dolly"))
    with open(spec, "rb") as f:
        content = f.read()
    with open(spec, "wb") as f:
        f.write(b"\xef\xbb\xbf" + content)
    _, dataset = loaded(make_config, spec)
    assert dataset.format == "dolly" and dataset.examples[0].instruction == QA[0][0]


@pytest.mark.parametrize("name, content", [
    ("empty.jsonl", ""), ("blank.jsonl", "\n\n  \n"), ("empty.json", "[]"), ("header.csv", "prompt,completion\n"),
])
def test_an_empty_file_has_its_own_message(tmp_path, make_config, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=rf"{name} holds no records \(the file is empty"):
        loaded(make_config, str(tmp_path / name))


def test_a_csv_row_with_more_cells_than_the_header(tmp_path, make_config):
    (tmp_path / "d.csv").write_text('prompt,completion\n"a","b"\n"c","d",e\n')
    with pytest.raises(DataError, match=r"d.csv:3 \(row 2\): 1 more cell\(s\) than the header's 2 columns"):
        loaded(make_config, str(tmp_path / "d.csv"))


def test_a_file_that_is_not_parquet(tmp_path, make_config):
    (tmp_path / "d.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"d.parquet: not a readable Parquet file"):
        loaded(make_config, str(tmp_path / "d.parquet"))


def test_reading_stops_once_the_splits_are_filled(tmp_path, make_config):
    """Rows past limit + test_rows are never read (a bad one there goes unnoticed)."""
    path = write_jsonl(tmp_path / "d.jsonl", records("dolly") + ["{broken"])
    _, dataset = loaded(make_config, str(path))
    assert dataset.records_read == 3


# --- Hugging Face datasets (offline) ----------------------------------------------------------


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """A private, empty `datasets` cache."""
    import datasets

    cache = tmp_path / "hf-datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def test_a_local_dataset_folder_with_a_split(tmp_path, make_config, hf_cache):
    folder = tmp_path / "folder"
    (folder / "data").mkdir(parents=True)
    write_jsonl(folder / "data" / "train.jsonl", records("completion"))
    write_jsonl(folder / "data" / "test.jsonl", records("completion", QA[:1]))
    _, dataset = loaded(make_config, str(folder), data_split="test")
    assert dataset.file_type == "hf" and dataset.split == "test" and len(dataset.examples) == 1
    assert not list(hf_cache.rglob("*.arrow"))  # streamed from the files: no second copy written
    with pytest.raises(DataError, match=r"Could not read the Hugging Face dataset .*folder \[nope\].*Bad split: nope"):
        loaded(make_config, str(folder), data_split="nope")


def test_a_folder_written_by_save_to_disk(tmp_path, make_config, hf_cache):
    import datasets

    splits = datasets.DatasetDict({
        "train": datasets.Dataset.from_list(records("sharegpt")),
        "validation": datasets.Dataset.from_list(records("sharegpt", QA[:2])),
    })
    splits.save_to_disk(str(tmp_path / "saved"))
    _, dataset = loaded(make_config, str(tmp_path / "saved"), data_split="validation")
    assert dataset.format == "sharegpt" and [(e.instruction, e.response) for e in dataset.examples] == QA[:2]
    with pytest.raises(DataError, match=r"no split 'test'; it has train, validation\. Choose one with --split"):
        loaded(make_config, str(tmp_path / "saved"), data_split="test")


def test_a_hub_dataset_by_name_from_a_prefilled_cache(tmp_path, make_config, hf_cache):
    """hf://OWNER/NAME offline, as after a first download: datasets' own cache layout, built offline."""
    import glob
    import shutil

    from datasets.packaged_modules.json.json import Json

    write_jsonl(tmp_path / "train.jsonl", records("alpaca"))
    builder = Json(cache_dir=str(tmp_path / "build"), dataset_name="tiny",
                   data_files={"train": str(tmp_path / "train.jsonl")})
    builder.download_and_prepare()
    prepared = glob.glob(str(tmp_path / "build" / "tiny" / "*" / "0.0.0"))[0]
    shutil.copytree(prepared, hf_cache / "someone___tiny" / "default" / "0.0.0" / "0123456789abcdef")
    _, dataset = loaded(make_config, "hf://someone/tiny")
    assert dataset.format == "alpaca" and [(e.instruction, e.response) for e in dataset.examples] == QA
    with pytest.raises(DataError, match=r"hf://someone/absent \[train\].*HF_HUB_OFFLINE"):
        loaded(make_config, "hf://someone/absent")


def test_without_the_datasets_library_the_message_names_the_extra(tmp_path, make_config, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r'needs the datasets library: pip install "gemma-lora\[datasets\]"'):
        loaded(make_config, "hf://someone/tiny")


def test_fingerprints_follow_the_content_not_the_file_type(tmp_path, make_config):
    config = make_config(limit=2, validation_rows=1, test_rows=1)
    records_by_type = []
    for file_type in ("jsonl", "parquet"):
        spec = write(tmp_path / file_type, file_type, records("dolly"))
        dataset = data.read_dataset(make_config(data=spec, limit=2, validation_rows=1, test_rows=1))
        records_by_type.append(data.splits_record(dataset, data.split(dataset.examples, config)))
    jsonl, parquet = records_by_type
    assert jsonl["splits"] == parquet["splits"] and jsonl["fingerprint"] == parquet["fingerprint"]
    assert jsonl["splits"]["train"]["rows"] == [0, 1] and jsonl["splits"]["test"]["rows"] == [2, 3]
    assert len({s["fingerprint"] for s in jsonl["splits"].values()}) == 3


def test_the_python_api_reads_what_the_cli_reads(tmp_path):
    """TrainConfig(data=..., data_format=..., fields=...) and load_examples, as the package exports them."""
    import gemma_lora

    rows = [{"q": q, "a": a} for q, a in QA]
    spec = write(tmp_path, "parquet", rows)
    config = gemma_lora.TrainConfig(data=spec, data_format="completion", fields={"prompt": "q", "completion": "a"},
                                    limit=2, validation_rows=1, test_rows=1)
    examples = gemma_lora.load_examples(config)
    assert [(e.prompt, e.response) for e in examples] == QA
    assert gemma_lora.read_dataset(config).examples == examples
    assert [e.response for e in gemma_lora.split(examples, config).test] == [QA[2][1]]


def test_the_config_names_exactly_the_formats_the_data_layer_reads():
    from gemma_lora.config import DATA_FORMATS, FORMAT_FIELD_NAMES
    from gemma_lora.data.formats import FIELDS, FORMATS

    assert set(DATA_FORMATS) - {"auto"} == set(FORMATS) == set(FIELDS)
    # --field may also rename a conversation's inner keys (role/content, from/value), which FIELDS does not list.
    for fmt, (required, optional) in FIELDS.items():
        assert set(required) | set(optional) <= set(FORMAT_FIELD_NAMES[fmt]), fmt
