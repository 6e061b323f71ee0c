"""Chat data end to end: trained turns, instruct presets from the kagglehub cache, bad conversations."""

import json
import os

import pytest
from test_chat import FAST, bad_file, fill_kagglehub_cache, write_chat_file  # noqa: F401  (helpers and fixtures of the unit tests)

from gemma_lora.cli import main
from gemma_lora.model import presets


@pytest.mark.slow
def test_trained_answers_stop_at_end_of_turn_and_the_format_travels_with_the_adapter(tmp_path, capsys):
    """A chat fine-tune teaches the model to close its turn; generation stops there, and generate,
    merge and a merged preset know the format from adapter.json and metadata.json."""
    run_dir = tmp_path / "run"
    code = main(["train", "--preset", "tiny", "--data", str(write_chat_file(tmp_path / "chat.jsonl")),
                 "--sequence-length", "64", "--limit", "28", "--validation-rows", "4", "--test-rows", "4",
                 "--epochs", "5", "--learning-rate", "0.03", "--lora-rank", "8", "--max-new-tokens", "6",
                 "--checkpoint-every", "none", "--output-dir", str(run_dir)])
    out = capsys.readouterr().out
    assert code == 0
    assert "prompts: Gemma's chat format (conversation data)" in out
    assert "test answers ending with <end_of_turn> within 6 tokens (greedy): 0/4 (0%) before → 4/4 (100%) after" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["chat_format"] == "gemma"
    assert summary["answers_after"]["test"]["stop_tokens"] == ["<end_of_turn>", "<eos>"]
    answers = json.loads((run_dir / "answers.json").read_text())["test"]
    assert [(a["after"]["text"], a["after"]["stop_token"]) for a in answers] == [("OK.", "<end_of_turn>")] * 4
    assert json.loads((run_dir / "config.json").read_text())["chat"] is True
    meta = json.loads((run_dir / "adapter.json").read_text())
    assert meta["chat_format"] == "gemma" and meta["stop_strings"] == []

    adapter = str(run_dir / "adapter.lora.h5")
    assert main(["generate", "--prompt", "Name a colour.", "--adapter", adapter]) == 0
    out = capsys.readouterr().out
    assert "base tiny, Gemma's chat format" in out and "### Name a colour.\nOK.\n" in out
    # Without the chat format the same adapter is asked in the template, and does not stop.
    assert main(["generate", "--prompt", "Name a colour.", "--adapter", adapter, "--no-chat", "--max-new-tokens", "6"]) == 0
    assert "### Name a colour.\nOK.\n" not in capsys.readouterr().out

    merged = tmp_path / "merged"
    assert main(["merge", adapter, str(merged)]) == 0
    assert "records chat_format 'gemma'" in capsys.readouterr().out
    assert json.loads((merged / "metadata.json").read_text())["chat_format"] == "gemma"
    assert presets.chat_format_of(str(merged)) == "gemma"
    assert main(["generate", "--preset", str(merged), "--prompt", "Name a colour."]) == 0
    assert "### Name a colour.\nOK.\n" in capsys.readouterr().out
    assert main(["info", adapter]) == 0 and "prompts: Gemma's chat format" in capsys.readouterr().out


@pytest.mark.slow
def test_an_instruct_preset_resolves_offline_from_the_kagglehub_cache_and_trains_in_chat(tiny_preset, tmp_path, capsys):
    handle = "keras/gemma3/keras/gemma3_instruct_1b/3"
    cached = fill_kagglehub_cache(tiny_preset, handle)
    assert os.path.samefile(presets.resolve_preset("gemma3_instruct_1b"), cached)
    # Known by name, by kaggle:// handle (any version) and by its kagglehub cache directory.
    assert presets.chat_format_of("gemma3_instruct_1b") == "gemma"
    assert presets.chat_format_of(f"kaggle://{handle}") == presets.chat_format_of("kaggle://keras/gemma3/keras/gemma3_instruct_1b/9") == "gemma"
    assert presets.chat_format_of(cached) == "gemma"
    base = fill_kagglehub_cache(tiny_preset, "keras/gemma3/keras/gemma3_1b/3")
    assert presets.chat_format_of("kaggle://keras/gemma3/keras/gemma3_1b/3") is None and presets.chat_format_of(base) is None

    run_dir = tmp_path / "run"
    code = main(["train", "--preset", "gemma3_instruct_1b", "--sequence-length", "64", "--limit", "12",
                 "--validation-rows", "4", "--test-rows", "4", "--max-steps", "1", "--max-new-tokens", "4",
                 "--output-dir", str(run_dir)])
    out = capsys.readouterr().out
    assert code == 0 and "prompts: Gemma's chat format (an instruction-tuned preset)" in out
    assert json.loads((run_dir / "adapter.json").read_text())["chat_format"] == "gemma"
    # The same data on the base preset keeps the recipe's template.
    code = main(["train", "--preset", "kaggle://keras/gemma3/keras/gemma3_1b/3", "--sequence-length", "64",
                 "--limit", "12", "--validation-rows", "4", "--test-rows", "0", "--max-steps", "1",
                 "--max-new-tokens", "2", "--output-dir", str(tmp_path / "base")])
    assert code == 0 and "prompts: the template; --chat writes Gemma's chat turns instead" in capsys.readouterr().out
    assert json.loads((tmp_path / "base" / "adapter.json").read_text())["chat_format"] is None


@pytest.mark.parametrize("turns, match", [
    ([("user", "a"), ("assistant", "b"), ("user", "c")], "ends with a user turn"),
    ([("user", "a"), ("bot", "b")], "has role='bot'"),
    ([], "must be a non-empty list of turns"),
    ([("user", "a"), ("assistant", [{"type": "image", "image": "x.png"}])], "is image ('image'): gemma-lora trains on "
                                                                          "text only for now"),
])
def test_bad_conversations_stop_the_run_in_one_line_or_are_counted_with_skip_bad_rows(tmp_path, capsys, turns, match):
    out_dir = tmp_path / "run"
    code = main(["train", *FAST, "--data", bad_file(tmp_path, turns), "--output-dir", str(out_dir)])
    err = capsys.readouterr().err
    assert code == 2 and match in err and "bad.jsonl:1:" in err and err.count("\n") == 1
    assert not out_dir.exists()
    code = main(["train", *FAST, "--data", bad_file(tmp_path, turns), "--skip-bad-rows", "--output-dir", str(out_dir)])
    out = capsys.readouterr().out
    assert code == 0 and "; 1 bad records left out (--skip-bad-rows), the first: " in out and match in out
    assert json.loads((out_dir / "data.json").read_text())["bad_rows"] == 1
