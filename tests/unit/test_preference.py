"""Preference pairs: each layout read from each file type, the pair tokens and their loss masks, the cut rule,
pair packing, the objectives' formulas, and bad input (one line, exit 2, nothing written)."""

import re

import numpy as np
import pytest
from conftest import write_jsonl
from test_data_formats import FILE_TYPES, write

from gemma_lora import data
from gemma_lora.cli import main
from gemma_lora.data import chat, packing
from gemma_lora.data.preference import tokenize_pairs
from gemma_lora.errors import DataError
from gemma_lora.training import objectives

PROMPT, CHOSEN, REJECTED = "Name a colour.", "Blue is a colour.", "Colour colour colour colour."
LAYOUTS = {
    "explicit": {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED},
    "implicit": {"chosen": f"Q: {PROMPT}\nA: {CHOSEN}", "rejected": f"Q: {PROMPT}\nA: {REJECTED}"},
    "conversational": {"prompt": [{"role": "user", "content": PROMPT}],
                       "chosen": [{"role": "assistant", "content": CHOSEN}],
                       "rejected": [{"role": "assistant", "content": REJECTED}]},
    "conversations sharing all but the last turn": {
        "chosen": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": CHOSEN}],
        "rejected": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": REJECTED}]},
}


@pytest.fixture(scope="module")
def tokenizer(tiny_preset):
    import keras_hub

    return keras_hub.models.GemmaTokenizer.from_preset(str(tiny_preset))


def read(make_config, spec, **overrides):
    config = make_config(data=spec, limit=3, validation_rows=0, test_rows=0, sequence_length=96, **overrides)
    return config, data.read_dataset(config)


@pytest.mark.parametrize("file_type", FILE_TYPES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_layout_reads_from_each_file_type(tmp_path, make_config, layout, file_type):
    if file_type == "csv" and layout.startswith("conversation"):
        pytest.skip("a CSV cell holds text; message lists are read from JSON, JSONL, Parquet and datasets")
    _, dataset = read(make_config, write(tmp_path, file_type, [LAYOUTS[layout]] * 3))
    assert dataset.format == "preference" and dataset.detected and len(dataset.examples) == 3
    example = dataset.examples[0]
    if layout == "implicit":  # the shared beginning, cut back to its last white space
        assert (example.prompt, example.response, example.rejected) == (f"Q: {PROMPT}\nA: ", CHOSEN, REJECTED)
    else:
        assert (example.instruction, example.response, example.rejected) == (PROMPT, CHOSEN, REJECTED)
        assert bool(example.conversation) == layout.startswith("conversation")


def test_the_field_map_renames_preference_columns(tmp_path, make_config):
    rows = [{"question": PROMPT, "good": CHOSEN, "bad": REJECTED}] * 3
    spec = str(write_jsonl(tmp_path / "d.jsonl", rows))
    _, dataset = read(make_config, spec, fields={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert (dataset.examples[0].response, dataset.examples[0].rejected) == (CHOSEN, REJECTED)


def decoded(tokenizer, ids):
    return tokenizer.detokenize([list(ids)])[0]


@pytest.mark.parametrize("chat_on", [False, True])
def test_pair_tokens_prompt_once_and_loss_on_each_response_only(tmp_path, make_config, tokenizer, chat_on):
    config, dataset = read(make_config, str(write_jsonl(tmp_path / "d.jsonl", [LAYOUTS["explicit"]] * 3)), chat=chat_on)
    pairs = tokenize_pairs(dataset.examples, tokenizer, config)
    example = dataset.examples[0]
    if chat_on:
        marks = chat.markers(tokenizer)
        assert pairs.prompts[0] == chat.prompt_ids([example], tokenizer, marks)[0]
        end = marks.end_of_turn
    else:
        assert pairs.prompts[0] == [tokenizer.start_token_id, *map(int, tokenizer([data.prompt_text(example, config)])[0])]
        end = tokenizer.end_token_id
    for response, text in ((pairs.chosen[0], CHOSEN), (pairs.rejected[0], REJECTED)):
        assert response[-1] == end and decoded(tokenizer, response[:-1]) == text
    for sequence, response in zip(pairs.sequences(0), (pairs.chosen[0], pairs.rejected[0])):
        ids, weights = sequence["token_ids"], sequence["loss_weights"]
        assert ids.tolist() == pairs.prompts[0] + response
        # Token by token: the position before each response token predicts it and carries loss; nothing else does.
        targets = [ids[t + 1] for t in np.flatnonzero(weights)]
        assert targets == response and weights.sum() == len(response)


def test_the_cut_rule_keeps_the_prompts_end_and_cuts_responses(make_config, tokenizer):
    config = make_config(sequence_length=160)
    long = " ".join(f"word{i}" for i in range(80))
    examples = [data.Example(long[:200], "short answer", rejected=long), data.Example("hi", "ok", rejected="no")]
    pairs = tokenize_pairs(examples, tokenizer, config)
    assert pairs.cut == 1
    prompt = pairs.prompts[0]
    full = tokenize_pairs([data.Example(long[:200], "x", rejected="y")], tokenizer, make_config(sequence_length=512)).prompts[0]
    assert prompt[0] == tokenizer.start_token_id and prompt[1:] == full[len(full) - len(prompt) + 1:]  # its end
    assert len(full) > 160 * 3 // 4 and len(prompt) == 160 * 3 // 4  # it took over 3/4 of the sequence: cut to 3/4
    chosen, rejected = pairs.sequences(0)
    assert len(rejected["token_ids"]) == 160 and rejected["loss_weights"].sum() == 160 // 4  # cut to the room left
    assert chosen["token_ids"][-1] == tokenizer.end_token_id  # the short answer keeps its end
    with pytest.raises(DataError, match=r"the prompt takes \d+ tokens, sequence_length=160 leaves no room"):
        tokenize_pairs([data.Example(long, "a", rejected="b")], tokenizer, config)


def sequence(n, start):
    return {"token_ids": np.arange(start, start + n), "loss_weights": np.r_[np.zeros(2), np.ones(n - 3), 0.0]}


def test_pack_pairs_keeps_each_pairs_sequences_in_one_batch():
    pairs = [(sequence(10 + i % 7, 100 * i), sequence(20 - i % 5, 100 * i + 50)) for i in range(30)]
    batches = packing.pack_pairs(pairs, 32, rows_per_batch=3, pairs_per_batch=4)
    seen = []
    for batch in batches:
        assert len(batch["pair_index"]) <= 4
        for p, index in enumerate(batch["pair_index"]):
            for side in (0, 1):
                at = batch["sequence_ids"] == 2 * p + 1 + side
                # Its loss positions predict exactly its own tokens.
                want = pairs[index][side]["token_ids"][np.flatnonzero(pairs[index][side]["loss_weights"]) + 1]
                assert batch["labels"][at].tolist() == want.tolist()
        seen += batch["pair_index"]
    assert seen == list(range(30))


def test_dpo_and_simpo_follow_their_formulas():
    rng = np.random.default_rng(0)
    logps, reference = -rng.uniform(5, 50, (6, 2)), -rng.uniform(5, 50, (6, 2))
    counts = rng.integers(3, 20, (6, 2)).astype(np.float32)
    log_sigmoid = lambda x: -np.log1p(np.exp(-x))  # noqa: E731
    z = 0.3 * ((logps[:, 0] - reference[:, 0]) - (logps[:, 1] - reference[:, 1]))
    losses, _, _ = objectives.DPO(beta=0.3, label_smoothing=0.1).losses(logps, counts, reference)
    np.testing.assert_allclose(losses, -0.9 * log_sigmoid(z) - 0.1 * log_sigmoid(-z), rtol=1e-5)
    means = logps / counts
    z = 2.0 * (means[:, 0] - means[:, 1]) - 0.5
    losses, rewards, _ = objectives.SimPO(beta=2.0, gamma=0.5).losses(logps, counts, None)
    np.testing.assert_allclose(losses, -log_sigmoid(z), rtol=1e-5)
    np.testing.assert_allclose(rewards, 2.0 * means, rtol=1e-5)


def bad_file(tmp_path, rows):
    return str(write_jsonl(tmp_path / "data.jsonl", rows))


PAIR = {"prompt": "a question", "chosen": "a good answer", "rejected": "a bad answer"}
BAD_INPUTS = {
    "no rejected": (lambda t: ["--data", bad_file(t, [{"prompt": "q", "chosen": "a"}] * 8), "--data-format", "preference"],
                    r"data.jsonl:1: missing field 'rejected' \(preference format"),
    "dolly data for dpo": (lambda t: ["--data", "dolly-sample"],
                           r"objective=dpo learns from preference pairs, and .* reads as dolly data\. Each record needs "
                           r"chosen and rejected"),
    "chosen identical to rejected": (lambda t: ["--data", bad_file(t, [dict(PAIR, rejected="a good answer")] * 8)],
                                     r"data.jsonl:1: chosen and rejected are the same response.*--skip-bad-rows"),
    "empty response": (lambda t: ["--data", bad_file(t, [dict(PAIR, chosen=" ")] * 8)], r"data.jsonl:1: field 'chosen' is empty"),
    "prompt longer than the sequence": (
        lambda t: ["--data", bad_file(t, [dict(PAIR, prompt="word " * 200)] * 8)],
        r"data.jsonl:1: the prompt takes \d+ tokens, sequence_length=64 leaves no room for a response"),
    "roles that do not alternate": (
        lambda t: ["--data", bad_file(t, [{"prompt": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                                          "chosen": [{"role": "assistant", "content": "c"}],
                                          "rejected": [{"role": "assistant", "content": "d"}]}] * 8)],
        r"data.jsonl:1: turn 2 of 3 .* is a user turn where an assistant turn belongs"),
    "beta <= 0": (lambda t: ["--data", bad_file(t, [PAIR] * 8), "--beta", "0"], r"beta=0.0 must be > 0"),
    "keras engine": (lambda t: ["--data", bad_file(t, [PAIR] * 8), "--engine", "keras"],
                     r"objective=dpo runs on the fast engine, and the Keras engine trains sft only\. Use --engine fast"),
    "init adapter of another base": (lambda t: ["--data", bad_file(t, [PAIR] * 8), "--init-adapter", other_adapter(t)],
                                     r"was trained on another base model"),
    "init adapter missing": (lambda t: ["--data", bad_file(t, [PAIR] * 8), "--init-adapter", str(t / "nothing")],
                             r"init_adapter=.*nothing: no adapter there"),
}


def other_adapter(tmp_path):
    """An adapter trained on tiny_gemma2 (another base than tiny)."""
    run = tmp_path / "other"
    assert main(["train", "--preset", "tiny_gemma2", "--sequence-length", "64", "--limit", "8", "--validation-rows", "0",
                 "--test-rows", "2", "--max-steps", "1", "--answer-splits", "--prompts", "--max-new-tokens", "2",
                 "--output-dir", str(run)]) == 0
    return str(run)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_preference_input_is_one_line_exit_2_and_leaves_no_files(tmp_path, capsys, case):
    make_args, pattern = BAD_INPUTS[case]
    args = make_args(tmp_path)
    capsys.readouterr()
    code = main(["train", "--preset", "tiny", "--sequence-length", "64", "--limit", "6", "--validation-rows", "1",
                 "--test-rows", "1", "--objective", "dpo", *args, "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("gemma-lora: error: ") and err.count("\n") == 1, err
    assert re.search(pattern, err), err
    assert not (tmp_path / "run").exists()


def test_identical_pairs_are_counted_and_left_out_with_skip_bad_rows(tmp_path, make_config):
    rows = [PAIR, dict(PAIR, rejected=PAIR["chosen"]), PAIR, PAIR]
    _, dataset = read(make_config, bad_file(tmp_path, rows), skip_bad_rows=True)
    assert dataset.bad_rows == 1 and len(dataset.examples) == 3
    assert "chosen and rejected are the same response" in dataset.first_bad
