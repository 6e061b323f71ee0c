"""Data: JSONL errors with line numbers, filter, splits, masks, KerasHub-equal recipe rows."""

import dataclasses
import gzip
import json

import numpy as np
import pytest
from conftest import write_jsonl

from gemma_lora import data
from gemma_lora.errors import ConfigError, DataError


def test_shipped_sample_is_the_documented_dolly_prefix():
    """The shipped file is byte for byte the 1,501-record sample (sha256 from its source README)."""
    import hashlib

    with gzip.open(data.resolve_data_path("dolly-sample"), "rb") as f:
        content = f.read()
    assert hashlib.sha256(content).hexdigest() == "8215d3536de52db8f2fa490ee4b7d94593ce336a354cfb4a6edc1a66840cab1c"
    assert content.count(b"\n") == 1501


def test_default_splits_of_the_shipped_sample_are_fixed_and_disjoint(make_config):
    config = make_config(limit=1000, validation_rows=100, test_rows=68)
    splits = data.split(data.load_examples(config), config)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (900, 100, 68)
    train, val, test = ({e.instruction + e.response for e in s} for s in (splits.train, splits.validation, splits.test))
    assert not (train & val) and not (train & test) and not (val & test)
    assert all(not e.context for e in splits.train + splits.validation + splits.test)
    assert splits.train[0].instruction == "Which is a species of fish? Tope or Rope"
    # The test split is every no-context row of the sample after the first 1,000.
    assert splits.test[-1].instruction == "Is a tomato a fruit or a vegetable?"


def test_recipe_trains_on_the_first_1000_rows_with_no_validation(make_config):
    config = make_config(recipe=True, limit=1000, test_rows=68)
    splits = data.split(data.load_examples(config), config)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (1000, 0, 68)


def test_include_context_keeps_context_rows_and_uses_the_context_template(make_config):
    config = make_config(include_context=True, limit=10, validation_rows=0, test_rows=0)
    examples = data.load_examples(config)
    assert examples[0].context.startswith("Virgin Australia")
    assert "Context:\nVirgin Australia" in data.prompt_text(examples[0], config)


@pytest.mark.parametrize("lines, match", [
    (['{"instruction": "a", "response": "b"}', '{"instruction": "a", "response": '], r":2: not valid JSON"),
    (['{"instruction": "a", "response": "b"}', '', '[1, 2]'], r":3: expected a JSON object"),
    (['{"response": "b"}'], r":1: missing field 'instruction'"),
    (['{"instruction": "a"}'], r":1: missing field 'response'"),
    (['{"instruction": "a", "response": 7}'], r":1: field 'response' must be a string, got int"),
    (['{"instruction": ["a"], "response": "b"}'], r":1: field 'instruction' must be a string, got list"),
])
def test_bad_rows_name_their_line(tmp_path, make_config, lines, match):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError, match=match):
        data.load_examples(make_config(data=str(path)))


def test_data_empty_after_filtering(tmp_path, make_config):
    path = write_jsonl(tmp_path / "ctx.jsonl", [{"instruction": "a", "context": "c", "response": "b"}])
    with pytest.raises(DataError, match="No rows left .* after filtering.*--include-context"):
        data.load_examples(make_config(data=str(path)))


def test_too_few_rows_for_validation(tmp_path, make_config):
    path = write_jsonl(tmp_path / "two.jsonl", [{"instruction": "a", "response": "b"}] * 2)
    config = make_config(data=str(path), limit=10, validation_rows=5)
    with pytest.raises(DataError, match=r"Only 2 rows to split into training, validation_rows=5 and test_rows=\d+: "
                                        r"at least \d+ are needed\. Lower validation_rows or test_rows"):
        data.split(data.load_examples(config), config)


def test_sequence_length_too_small_for_the_template(tiny_lm, make_config):
    config = make_config(sequence_length=8)
    with pytest.raises(ConfigError, match="sequence_length=8 is too small for the template"):
        data.tokenize_rows([data.Example("a", "b")], tiny_lm.preprocessor.tokenizer, config)


def test_response_only_weights_cover_exactly_the_response_and_eos(tiny_lm, make_config):
    tokenizer = tiny_lm.preprocessor.tokenizer
    config = make_config(sequence_length=64)
    example = data.Example("Name a colour.", "Blue is a colour.")
    rows = data.tokenize_rows([example], tokenizer, config)
    weighted = rows.labels[0][rows.weights[0] > 0].tolist()
    assert weighted[-1] == tokenizer.end_token_id
    assert tokenizer.detokenize([weighted[:-1]])[0] == "Blue is a colour."
    prompt_len = len(tokenizer([data.prompt_text(example, config)])[0])
    assert rows.weights[0, :prompt_len].sum() == 0  # no prompt token carries loss
    assert rows.weights[0, ~rows.padding_mask[0]].sum() == 0  # nor padding
    assert rows.token_ids[0, 0] == tokenizer.start_token_id
    np.testing.assert_array_equal(rows.labels[0, :-1][rows.padding_mask[0, 1:]], rows.token_ids[0, 1:][rows.padding_mask[0, 1:]])


def test_cut_rows_get_no_eos_outside_recipe_mode(tiny_lm, make_config):
    tokenizer = tiny_lm.preprocessor.tokenizer
    config = make_config(sequence_length=32)
    rows = data.tokenize_rows([data.Example("Say a lot.", "word " * 100)], tokenizer, config)
    assert rows.truncated == 1
    assert tokenizer.end_token_id not in rows.labels[0].tolist()
    assert rows.padding_mask[0].all()


def test_recipe_rows_equal_kerashub_preprocessing(tiny_lm, make_config):
    """Whole-sequence rows, truncation and <eos> exactly as GemmaCausalLMPreprocessor."""
    config = make_config(recipe=True, sequence_length=40)
    examples = [data.Example("Short?", "Yes."), data.Example("Long?", "very " * 80)]
    rows = data.tokenize_rows(examples, tiny_lm.preprocessor.tokenizer, config)
    preprocessor = tiny_lm.preprocessor
    preprocessor.sequence_length = 40
    x, y, sample_weight = preprocessor([data.full_text(e, config) for e in examples])
    np.testing.assert_array_equal(rows.token_ids, np.asarray(x["token_ids"]))
    np.testing.assert_array_equal(rows.padding_mask, np.asarray(x["padding_mask"]))
    np.testing.assert_array_equal(rows.labels, np.asarray(y))
    np.testing.assert_array_equal(rows.weights, np.asarray(sample_weight))
    assert rows.truncated == 1


def test_full_dolly_comes_from_the_hugging_face_cache(tmp_path, monkeypatch):
    """The download path, served offline from a pre-filled Hub cache."""
    cache = tmp_path / "hub"
    repo = cache / "datasets--databricks--databricks-dolly-15k"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    write_jsonl(snapshot / "databricks-dolly-15k.jsonl", [{"instruction": "hi", "context": "", "response": "yo"}])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    path = data.resolve_data_path("dolly")
    assert path.name == "databricks-dolly-15k.jsonl"
    assert json.loads(path.read_text())["response"] == "yo"


def test_missing_hub_file_offline_says_what_to_do(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(DataError, match="--data dolly-sample"):
        data.resolve_data_path("dolly")


def _explicit_sample_rows(limit):
    """The shipped sample read by hand, as the package read it before formats: no-context rows, in order."""
    examples = []
    with gzip.open(data.resolve_data_path("dolly-sample"), "rt", encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if not record["context"]:
                examples.append(data.Example(record["instruction"], record["response"]))
    return examples[:limit]


@pytest.mark.parametrize("options", [{}, {"data_format": "dolly"}, {"fields": {"instruction": "instruction"}}])
@pytest.mark.parametrize("recipe", [False, True])
def test_the_dolly_format_reads_the_shipped_sample_as_the_explicit_reading(tiny_lm, make_config, options, recipe):
    """Recipe fidelity: detected or given, the dolly path gives the explicit instruction/response reading's arrays."""
    config = make_config(recipe=recipe, limit=1000, validation_rows=0 if recipe else 100, test_rows=68, **options)
    dataset = data.read_dataset(config)
    explicit = _explicit_sample_rows(1068)
    assert dataset.format == "dolly" and dataset.examples == explicit
    tokenizer = tiny_lm.preprocessor.tokenizer
    ours = data.tokenize_rows(dataset.examples[:40], tokenizer, config)
    theirs = data.tokenize_rows(explicit[:40], tokenizer, config)
    for name in ("token_ids", "padding_mask", "labels", "weights"):
        np.testing.assert_array_equal(getattr(ours, name), getattr(theirs, name))


def test_the_shipped_category_task_is_what_its_script_builds(make_config):
    """dolly-category: the sample's records in order, each answer its record's category."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("make_dolly_category", f"{REPO}/scripts/make_dolly_category.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    shipped = data.resolve_data_path("dolly-category").read_bytes()
    assert shipped == script.build(data.resolve_data_path("dolly-sample"))
    with gzip.open(data.resolve_data_path("dolly-sample"), "rt") as f:
        categories = [json.loads(line)["category"] for line in f]
    config = make_config(data="dolly-category", limit=1000, validation_rows=100, test_rows=1000)
    dataset = data.read_dataset(config)
    assert dataset.format == "completion" and [e.response for e in dataset.examples] == categories
    test = data.split(dataset.examples, dataclasses.replace(config, test_rows=68)).test
    assert {e.response for e in test} == set(script.CATEGORIES)  # the default test rows hold all 8 labels
    assert all(e.prompt.endswith("Category:\n") for e in dataset.examples)


def test_exact_match_scores_a_known_toy_case():
    from gemma_lora.sampling import Sample
    from gemma_lora.training.reports import exact_match

    examples = [data.Example("q1", "open_qa"), data.Example("q2", "summarization"), data.Example("q3", " brainstorming\n")]
    answers = ["open_qa\n", "summarization, because", "brainstorming"]
    samples = [Sample(e.instruction, a, True, None, 3) for e, a in zip(examples, answers)]
    assert exact_match(samples, examples) == 2 / 3
    assert exact_match(samples[1:2], examples[1:2]) == 0.0


def test_a_small_file_gets_every_split_it_asks_for(tmp_path, make_config):
    path = write_jsonl(tmp_path / "own.jsonl", [{"instruction": f"Q{i}?", "response": f"A{i}."} for i in range(31)])
    config = make_config(data=str(path), limit=1000, validation_rows=4, test_rows=4)
    examples = data.load_examples(config)
    splits = data.split(examples, config)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (23, 4, 4)
    assert splits.train + splits.validation + splits.test == examples  # contiguous, in file order
    with pytest.raises(DataError, match="Only 31 rows to split .* at least 33 are needed"):
        data.split(examples, make_config(data=str(path), limit=1000, validation_rows=16, test_rows=16))


def test_a_file_with_enough_rows_keeps_todays_splits(make_config):
    config = make_config(limit=1000, validation_rows=20, test_rows=20)
    examples = data.load_examples(config)
    splits = data.split(examples, config)
    # The rows the demo has always used: train [0, 980), validation [980, 1000), test [1000, 1020).
    assert splits.train == examples[:980] and splits.validation == examples[980:1000]
    assert splits.test == examples[1000:1020]


def test_average_per_example_weighs_every_example_alike_and_keeps_the_total():
    from gemma_lora.data.tokenize import average_per_example

    weights = np.zeros((3, 8), np.float32)
    weights[0, 2:4] = 1  # a 2-token answer
    weights[1, 1:7] = 1  # a 6-token answer
    averaged = average_per_example(weights)
    sums = averaged.sum(axis=1)
    np.testing.assert_allclose(sums[:2], [4.0, 4.0])  # each the mean of 2 and 6
    assert sums[2] == 0  # a row without loss tokens stays without
    np.testing.assert_allclose(averaged.sum(), weights.sum())
    assert ((averaged > 0) == (weights > 0)).all()  # the same tokens carry loss


def test_loss_average_example_reweights_the_training_rows_only():
    """Training rows' loss tokens sum alike per example; held-out rows keep 0/1 weights (scores stay token means)."""
    from gemma_lora.config import resolve_config
    from gemma_lora.training.prepare import prepare

    config = resolve_config(overrides={"preset": "tiny", "limit": 60, "validation_rows": 10, "test_rows": 10,
                                       "loss_average": "example"})
    _, _, _, _, rows, _, _, _ = prepare(config, lambda line: None)
    sums = rows["train"].weights.sum(axis=1)
    np.testing.assert_allclose(sums, sums.mean(), rtol=1e-5)
    assert len(np.unique(rows["train"].padding_mask.sum(axis=1))) > 1  # the examples differ in length
    for name in ("validation", "test"):
        assert set(np.unique(rows[name].weights)) <= {0.0, 1.0}
