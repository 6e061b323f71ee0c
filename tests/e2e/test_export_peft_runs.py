"""`gemma-lora export --to peft` end to end."""

import json

from tiny_models import ALL_PROJECTIONS, with_adapter

from gemma_lora.adapters import files, store
from gemma_lora.export.peft import CONFIG_FILE
from gemma_lora.model import loading


def test_cli_exports_a_peft_adapter_and_notes_the_hub_base(tmp_path, tiny_preset, make_config, capsys):
    from gemma_lora.cli import main

    source = with_adapter(loading.load_causal_lm(tiny_preset, "float32"), targets=ALL_PROJECTIONS)
    store.save_adapter(source, tmp_path, make_config(lora_alpha=8.0, lora_rank=4, lora_targets=list(ALL_PROJECTIONS)))
    adapter = str(tmp_path / files.ADAPTER_FILE)
    assert main(["export", adapter, str(tmp_path / "peft"), "--to", "peft"]) == 0
    assert "as a PEFT adapter" in capsys.readouterr().out
    assert json.loads((tmp_path / "peft" / CONFIG_FILE).read_text())["rank_pattern"] == {"self_attn.q_proj": 16}
    assert not (tmp_path / "peft" / "base").exists()
    assert "`tiny` has no Hub checkpoint" in (tmp_path / "peft" / "README.md").read_text()
    for argv, message in (
        ([str(tmp_path / "merged"), str(tmp_path / "p2"), "--to", "peft"], "--to peft exports an adapter"),
        ([adapter, str(tmp_path / "p3"), "--with-base"], "--with-base applies to --to peft only"),
        ([adapter, str(tmp_path / "peft"), "--to", "peft"], "already exists"),
    ):
        assert main(["export", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert main(["export", adapter, str(tmp_path / "with_base"), "--to", "peft", "--with-base"]) == 0
    assert (tmp_path / "with_base" / "base" / "model.safetensors").is_file()
