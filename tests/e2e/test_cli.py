"""The `gemma-lora` command end to end, and every bad input: one line, exit 2, no files."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, write_jsonl

from gemma_lora.cli import main

FAST = ["--preset", "tiny", "--sequence-length", "64", "--limit", "12", "--validation-rows", "4",
        "--test-rows", "4", "--batch-size", "4", "--max-new-tokens", "4"]


@pytest.mark.slow
def test_train_end_to_end_through_the_console_script(tmp_path):
    """The installed entry point runs a short fine-tune and writes the whole run directory."""
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    result = subprocess.run(
        [sys.executable, "-m", "gemma_lora.cli", "train", *FAST, "--max-steps", "2",
         "--prompt", "Name a colour.", "--output-dir", str(run_dir)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # Quiet by default: no TensorFlow, absl, oneDNN or CUDA start-up lines.
    for noise in ("absl", "cuInit", "tensorflow", "TF_ENABLE_ONEDNN_OPTS", "cuda", "LOG(INFO)"):
        assert noise not in result.stderr, result.stderr[-2000:]
    out = result.stdout
    # One progress bar whose total is the steps the run takes (2 of an epoch's 2).
    assert "training: 100%" in out and "2/2 [" in out and "token_loss=" in out
    assert "135,488 base parameters, 2,816 trainable" in out
    assert "[before] What should I do on a trip to Europe?" in out and "[after] Name a colour." in out
    assert "validation token loss" in out and "test token loss" in out
    for name in ("config.json", "metrics.csv", "samples.json", "samples.md", "adapter.lora.h5", "adapter.json", "summary.json"):
        assert (run_dir / name).is_file(), name
    assert not [p for p in run_dir.iterdir() if ".tmp" in p.name]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["preset"] == "tiny" and config["max_steps"] == 2
    samples = json.loads((run_dir / "samples.json").read_text())
    assert [s["instruction"] for s in samples][-1] == "Name a colour." and len(samples) == 3
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train"]["steps"] == 2 and summary["data"]["rows"] == {"train": 8, "validation": 4, "test": 4}
    assert "validation_token_loss" in (run_dir / "metrics.csv").read_text()
    answers = json.loads((run_dir / "answers.json").read_text())["test"]
    assert len(answers) == 4 and all(a["reference"] and a["after"]["stop_token"] in (None, "<eos>") for a in answers)
    ended = sum(a["after"]["stop_token"] == "<eos>" for a in answers) / 4
    looped = sum(a["after"]["looped"] for a in answers) / 4
    assert summary["answers_after"] == {"test": {"rows": 4, "stop_tokens": ["<eos>"], "model_ended_share": ended,
                                                 "ended_share": summary["answers_after"]["test"]["ended_share"],
                                                 "looped_share": looped}}
    assert summary["chat_format"] is None and json.loads((run_dir / "config.json").read_text())["chat"] is False
    assert "test answers ending with <eos> within 4 tokens (greedy)" in out
    assert "test answers that loop (greedy): " in out
    meta = json.loads((run_dir / "adapter.json").read_text())
    assert meta["rank"] == 4 and meta["alpha"] == 4 and meta["base_preset"] == "tiny" and meta["chat_format"] is None


def test_recipe_flag_prints_the_recipe_settings(tmp_path, capsys):
    code = main(["train", "--recipe", "--preset", "tiny", "--limit", "2", "--test-rows", "0",
                 "--sequence-length", "48", "--max-new-tokens", "2", "--output-dir", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert code == 0
    assert '"batch_size": 1' in out and '"learning_rate": 5e-05' in out and '"shuffle": false' in out
    assert "(<eos> appended, as KerasHub)" in out


def test_info_shows_a_preset(tmp_path, capsys):
    assert main(["info", "tiny"]) == 0
    assert "GemmaBackbone: num_layers 2" in capsys.readouterr().out
    assert main(["info", "tiny", "--json"]) == 0
    assert '"num_layers": 2' in capsys.readouterr().out


def test_generate_with_an_adapter(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", *FAST, "--max-steps", "1", "--output-dir", str(run_dir)]) == 0
    capsys.readouterr()
    code = main(["generate", "--preset", "tiny", "--max-new-tokens", "3", "--prompt", "Hi?",
                 "--adapter", str(run_dir / "adapter.lora.h5")])
    assert code == 0 and "### Hi?" in capsys.readouterr().out
    assert main(["info", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "base model: tiny" in out and "LoRA rank 4" in out and "validation token loss: " in out


def bad_file(tmp_path, lines):
    return str(write_jsonl(tmp_path / "data.jsonl", lines))


BAD_INPUTS = {
    "malformed JSON line": (lambda t: ["--data", bad_file(t, ['{"instruction": "a", "response": "b"}', "{oops"])], r"data.jsonl:2: not valid JSON"),
    "missing instruction": (lambda t: ["--data", bad_file(t, ['{"response": "b"}'])], r":1: missing field 'instruction'"),
    "missing response": (lambda t: ["--data", bad_file(t, ['{"instruction": "b"}'])], r":1: missing field 'response'"),
    "non-string field": (lambda t: ["--data", bad_file(t, ['{"instruction": 1, "response": "b"}'])], r"field 'instruction' must be a string"),
    "empty after filtering": (lambda t: ["--data", bad_file(t, ['{"instruction": "a", "context": "c", "response": "b"}'])], r"No rows left"),
    "empty data file": (lambda t: ["--data", bad_file(t, [])], r"data.jsonl holds no records \(the file is empty"),
    "unknown data shape": (lambda t: ["--data", bad_file(t, ['{"question": "a", "answer": "b"}'])],
                           r"data.jsonl:1: cannot tell the data format .* would fit: --data-format completion --field prompt=question --field completion=answer"),
    "multi-turn conversation without chat": (
        lambda t: ["--no-chat", "--data", bad_file(t, [{"messages": [{"role": r, "content": "x"} for r in ("user", "assistant") * 2]}])],
        r"data.jsonl:1: a conversation of 2 exchanges needs Gemma's chat format, and chat is off \(--no-chat\)"),
    "conversation ending with the user": (
        lambda t: ["--data", bad_file(t, [{"messages": [{"role": r, "content": "x"} for r in ("user", "assistant", "user")]}])],
        r"data.jsonl:1: the conversation \(user, assistant, user\) ends with a user turn.*\(messages format; keys found: messages\)"),
    "chat on text data": (lambda t: ["--chat", "--data-format", "text"], r"chat=True writes prompts and answers as turns"),
    "empty required field": (lambda t: ["--data", bad_file(t, ['{"prompt": "a", "completion": " "}'])], r"data.jsonl:1: field 'completion' is empty \(completion format"),
    "missing mapped column": (lambda t: ["--data", bad_file(t, ['{"q": "a", "a": "b"}']), "--field", "prompt=question", "--field", "completion=a"],
                              r"data.jsonl:1: missing column 'question' \(mapped onto 'prompt' by --field prompt=question\)"),
    "field of another format": (lambda t: ["--data-format", "dolly", "--field", "prompt=q"], r"fields has prompt=q: 'prompt' is no field of the dolly format"),
    "unknown data format": (lambda t: ["--data-format", "chatml"], r"data_format='chatml' must be one of auto, dolly, alpaca"),
    "split of a file": (lambda t: ["--split", "test"], r"data_split='test' picks a split of a Hugging Face dataset"),
    "metric on text data": (lambda t: ["--data", bad_file(t, ['{"text": "a b c"}'] * 20), "--metric", "exact_match"],
                            r"metric='exact_match' compares answers with references, and text data has neither"),
    "limit <= 0": (lambda t: ["--limit", "0"], r"limit=0 must be > 0"),
    "sequence length too small": (lambda t: ["--sequence-length", "10"], r"sequence_length=10 is too small for the template"),
    "rank <= 0": (lambda t: ["--lora-rank", "0"], r"lora_rank=0 must be > 0"),
    "alpha <= 0": (lambda t: ["--lora-alpha", "-1"], r"lora_alpha=-1.0 must be > 0"),
    "unknown target layer": (lambda t: ["--lora-targets", "query", "qkv_proj"], r"unknown layer name\(s\) \['qkv_proj'\]"),
    "unknown preset": (lambda t: ["--preset", "gemma_9z_en"], r"Unknown preset 'gemma_9z_en'"),
    "preset directory missing files": (lambda t: ["--preset", str(t / "empty_preset")], r"empty_preset is missing config.json"),
    "missing credentials": (lambda t: ["--preset", "gemma_2b_en", "--preset-version", "9"], r"needs Kaggle credentials"),
    "unwritable output directory": (lambda t: ["--output-dir", str(t / "afile" / "run")], r"(not writable|Cannot write|is a file)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_leaves_no_files(tmp_path, capsys, case):
    (tmp_path / "empty_preset").mkdir()
    (tmp_path / "afile").write_text("not a directory")
    make_args, pattern = BAD_INPUTS[case]
    args = make_args(tmp_path)
    output = ["--output-dir", str(tmp_path / "run")] if "--output-dir" not in args else []
    code = main(["train", *FAST, *args, *output])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("gemma-lora: error: ") and err.count("\n") == 1, err
    import re

    assert re.search(pattern, err), err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_debug_shows_the_traceback(tmp_path):
    from gemma_lora.errors import ConfigError

    with pytest.raises(ConfigError):
        main(["--debug", "train", "--lora-rank", "0"])


def test_kaggle_403_consent_answer(tmp_path, capsys, monkeypatch):
    """Kaggle's 403 before the license is accepted (simulated): one line, exit 2, key never shown."""
    import kagglehub
    import requests
    from kagglehub import exceptions

    secret = "fedcba9876543210fedcba9876543210"
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", secret)

    def refuse(handle, *args, **kwargs):
        response = requests.Response()
        response.status_code = 403
        raise exceptions.KaggleApiHTTPError(f"403 Forbidden for {secret}", response=response)

    monkeypatch.setattr(kagglehub, "model_download", refuse)
    code = main(["train", *FAST, "--preset", "gemma_2b_en", "--preset-version", "9", "--output-dir", str(tmp_path / "run")])
    captured = capsys.readouterr()
    assert code == 2 and captured.err.count("\n") == 1
    assert "HTTP 403" in captured.err and "accept the Gemma license" in captured.err
    assert secret not in captured.err + captured.out
    assert not (tmp_path / "run").exists()


def test_field_flags_collect_a_mapping_and_refuse_a_malformed_one(capsys):
    from gemma_lora.cli import build_parser

    args = build_parser().parse_args(["train", "--field", "prompt=question", "--field", "completion=answer", "--split", "test"])
    assert args.fields == {"prompt": "question", "completion": "answer"} and args.data_split == "test"
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--field", "prompt"])
    assert exit_.value.code == 2 and "--field expects NAME=COLUMN, got 'prompt'" in capsys.readouterr().err


def test_completion_data_with_the_exact_match_metric(tmp_path, capsys):
    """A completion file trains, its held-out answers are scored before and after, and the run records its data."""
    rows = [{"prompt": f"Colour of item {i}?\nAnswer:", "completion": " blue" if i % 2 else " red"} for i in range(20)]
    data_file = write_jsonl(tmp_path / "colours.jsonl", rows)
    run_dir = tmp_path / "run"
    assert main(["train", *FAST, "--data", str(data_file), "--metric", "exact_match", "--max-steps", "1",
                 "--output-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "format completion (detected from the first record)" in out
    assert "test exact match of greedy answers: " in out
    summary = json.loads((run_dir / "summary.json").read_text())
    answers = json.loads((run_dir / "answers.json").read_text())["test"]
    for when in ("before", "after"):
        matches = [a[when]["text"].strip() == a["reference"].strip() for a in answers]
        assert summary[f"answers_{when}"]["test"]["exact_match"] == sum(matches) / len(answers)
    assert [a["instruction"] for a in answers] == [r["prompt"] for r in rows[12:16]]  # answered from the prompt as written
    record = json.loads((run_dir / "data.json").read_text())
    assert record["format"] == "completion" and record["records_read"] == 16
    assert {k: v["rows"] for k, v in record["splits"].items()} == {"train": [0, 8], "validation": [8, 12], "test": [12, 16]}
    meta = json.loads((run_dir / "adapter.json").read_text())
    assert meta["data_format"] == "completion" and meta["data_source"] == record
