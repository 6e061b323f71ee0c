"""The adapter commands end to end: `gemma-lora merge` and `info` on a trained run."""

import json

from test_adapters import fresh, save, trained_like  # noqa: F401  (helpers and fixtures of the unit tests)


def test_cli_merge_and_info(tmp_path, tiny_preset, make_config, capsys):
    from gemma_lora.cli import main

    path = save(trained_like(fresh(tiny_preset)), tmp_path, make_config)
    assert main(["merge", str(path), str(tmp_path / "merged")]) == 0
    assert "no LoRA" in capsys.readouterr().out
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "rank 4, 4 LoRA layers" in out and "base model: tiny" in out
    assert main(["info", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["base_preset"] == "tiny"
    assert main(["merge", str(tmp_path / "adapter.h5"), str(tmp_path / "m2")]) == 2
    assert "must end in .lora.h5" in capsys.readouterr().err
