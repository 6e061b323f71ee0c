"""Gemma 2 through the CLI on both engines."""

import pytest

from gemma_lora.adapters import files


@pytest.mark.slow
def test_cli_trains_gemma2_on_both_engines_and_generates(tmp_path, capsys):
    from gemma_lora.cli import main

    common = ["--preset", "tiny_gemma2", "--max-steps", "2", "--limit", "24", "--validation-rows", "4",
              "--test-rows", "4", "--sequence-length", "64", "--max-new-tokens", "6"]
    for engine in ("keras", "fast"):
        assert main(["train", *common, "--engine", engine, "--output-dir", str(tmp_path / engine)]) == 0
        out = capsys.readouterr().out
        assert f"engine: {engine}" in out and "[after] What should I do on a trip to Europe?" in out
        assert (tmp_path / engine / files.ADAPTER_FILE).is_file()
    assert main(["generate", "--adapter", str(tmp_path / "fast" / files.ADAPTER_FILE), "--prompt", "Hi",
                 "--max-new-tokens", "4"]) == 0
    assert "### Hi" in capsys.readouterr().out
