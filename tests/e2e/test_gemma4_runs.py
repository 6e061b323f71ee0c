"""Gemma 4 through the CLI: training on both engines, its chat format, quantizing refused."""

import json

import keras
import numpy as np
import pytest
from test_chat import write_chat_file  # noqa: E402
from test_gemma4 import fresh, logits  # noqa: F401  (helpers and fixtures of the unit tests)

from gemma_lora.adapters import files
from gemma_lora.errors import ConfigError
from gemma_lora.model import presets


@pytest.mark.slow
def test_quantizing_is_refused_and_why(tiny_gemma4_preset, tmp_path, capsys):
    """KerasHub's Gemma 4 block reads `ffw_gating.kernel` itself: quantized, that is the raw int8 array,
    and the logits are far from the float model's (int8 rounding alone moves them by about 1%)."""
    from gemma_lora.cli import main

    with pytest.raises(ConfigError, match=r"Gemma 4 cannot be quantized in KerasHub 0.32: .*ops.matmul\(x, "
                                          r"ffw_gating.kernel\).*Train it without --quantize"):
        fresh(tiny_gemma4_preset, quantize="int8")
    assert main(["train", "--preset", "tiny_gemma4", "--quantize", "int4", "--max-steps", "1", "--limit", "8",
                 "--validation-rows", "0", "--test-rows", "0", "--output-dir", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Gemma 4 cannot be quantized" in err and not (tmp_path / "q").exists()
    causal_lm = fresh(tiny_gemma4_preset)
    reference = logits(causal_lm)
    causal_lm.backbone.quantize("int8", config=keras.quantizers.Int8QuantizationConfig(activation_quantizer=None))
    assert np.abs(logits(causal_lm) - reference).max() > 0.1 * np.abs(reference).max()


@pytest.mark.slow  # the chat test below runs the same CLI (train, generate, merge); CI smoke-trains tiny_gemma4 too
def test_cli_trains_gemma4_and_generates(tmp_path, capsys):
    from gemma_lora.cli import main

    common = ["--preset", "tiny_gemma4", "--max-steps", "2", "--limit", "24", "--validation-rows", "4",
              "--test-rows", "4", "--sequence-length", "64", "--max-new-tokens", "6"]
    assert main(["train", *common, "--output-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "engine: keras" in out and "[after] What should I do on a trip to Europe?" in out
    assert main(["generate", "--adapter", str(tmp_path / "run" / files.ADAPTER_FILE), "--prompt", "Hi",
                 "--max-new-tokens", "4"]) == 0
    assert "### Hi" in capsys.readouterr().out


@pytest.mark.slow
def test_gemma4_answers_stop_at_turn_end_and_the_format_travels_with_the_adapter(tmp_path, capsys):
    """A chat fine-tune of tiny_gemma4 closes its turns with <turn|>; generation stops there, and adapter.json,
    a merged preset, generate and the instruction-tuned default all say gemma4."""
    from gemma_lora.cli import main

    run_dir = tmp_path / "run"
    code = main(["train", "--preset", "tiny_gemma4", "--data", str(write_chat_file(tmp_path / "chat.jsonl")),
                 "--sequence-length", "64", "--limit", "28", "--validation-rows", "4", "--test-rows", "4",
                 "--epochs", "5", "--learning-rate", "0.03", "--lora-rank", "8", "--max-new-tokens", "6",
                 "--checkpoint-every", "none", "--output-dir", str(run_dir)])
    out = capsys.readouterr().out
    assert code == 0
    assert ("prompts: Gemma 4's chat format (conversation data): <|turn>user / model turns, a system turn first, "
            "loss on each model turn and its <turn|>, answers stop at <turn|>") in out
    assert "test answers ending with <turn|> within 6 tokens (greedy): 0/4 (0%) before → 4/4 (100%) after" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["chat_format"] == "gemma4" and summary["answers_after"]["test"]["stop_tokens"] == ["<turn|>", "<eos>"]
    answers = json.loads((run_dir / "answers.json").read_text())["test"]
    assert [(a["after"]["text"], a["after"]["stop_token"]) for a in answers] == [("OK.", "<turn|>")] * 4
    adapter = str(run_dir / "adapter.lora.h5")
    assert json.loads((run_dir / "adapter.json").read_text())["chat_format"] == "gemma4"
    assert main(["generate", "--prompt", "Name a colour.", "--adapter", adapter]) == 0
    assert "### Name a colour.\nOK.\n" in capsys.readouterr().out
    merged = tmp_path / "merged"
    assert main(["merge", adapter, str(merged)]) == 0
    assert "records chat_format 'gemma4'" in capsys.readouterr().out
    assert presets.chat_format_of(str(merged)) == "gemma4"
    assert main(["generate", "--preset", str(merged), "--prompt", "Name a colour."]) == 0
    out = capsys.readouterr().out
    assert "prompts as user turns of Gemma 4's chat format, answers stop at <turn|>" in out
    assert "### Name a colour.\nOK.\n" in out
    assert main(["info", adapter]) == 0 and "prompts: Gemma 4's chat format" in capsys.readouterr().out


@pytest.mark.slow  # the engines' equality is tested above; CI smoke-trains tiny_gemma4 with --engine fast
def test_cli_trains_gemma4_on_the_fast_engine(tmp_path, capsys):
    from gemma_lora.cli import main

    assert main(["train", "--preset", "tiny_gemma4", "--engine", "fast", "--max-steps", "2", "--limit", "24",
                 "--validation-rows", "4", "--test-rows", "4", "--sequence-length", "64", "--max-new-tokens", "6",
                 "--output-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "engine: fast" in out and (tmp_path / "run" / files.ADAPTER_FILE).is_file()
