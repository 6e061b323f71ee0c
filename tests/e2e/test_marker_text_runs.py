"""Marker text through the CLI: counted by default (data.json), refused with --marker-text error."""

import json

from test_marker_text import TINY_RUN, cli_rows  # noqa: F401  (helpers and fixtures of the unit tests)


def test_marker_text_is_counted_by_default_and_refused_with_error(tmp_path, tiny_preset, capsys):
    from gemma_lora.cli import main

    path = cli_rows(tmp_path / "chats.jsonl")
    assert main(["train", *TINY_RUN, "--data", str(path), "--output-dir", str(tmp_path / "kept")]) == 0
    out = capsys.readouterr().out
    assert "marker text: train 1 rows, validation 0 rows, test 0 rows hold a control token" in out
    assert json.loads((tmp_path / "kept" / "data.json").read_text())["marker_text_rows"] == \
        {"train": 1, "validation": 0, "test": 0}
    code = main(["train", *TINY_RUN, "--data", str(path), "--marker-text", "error", "--output-dir", str(tmp_path / "no")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert f"{path}:6: the text holds '<end_of_turn>', a control token" in err and "--marker-text error" in err
    assert not (tmp_path / "no").exists()
