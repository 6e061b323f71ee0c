"""`gemma-lora export --to gguf` end to end."""

import gguf
from tiny_models import with_adapter

from gemma_lora.adapters import files, store
from gemma_lora.model import loading


def test_cli_exports_gguf_and_refuses_in_one_line(tmp_path, tiny_preset, make_config, capsys):
    from gemma_lora.cli import main

    source = with_adapter(loading.load_causal_lm(tiny_preset, "float32"), targets=("query", "value"))
    store.save_adapter(source, tmp_path, make_config(lora_alpha=8.0, lora_rank=4))
    adapter = str(tmp_path / files.ADAPTER_FILE)
    assert main(["export", adapter, str(tmp_path / "m.gguf"), "--to", "gguf", "--gguf-type", "q8_0"]) == 0
    assert "(q8_0) and" in capsys.readouterr().out
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert reader.get_field("general.base_model.0.name").contents() == "tiny"
    assert "Instruction:\n{{ .Prompt }}" in (tmp_path / "m.Modelfile").read_text()
    for argv, message in (
        (["--to", "gguf", "--gguf-type", "q4_k"], "Unknown GGUF type 'q4_k'"),
        (["--gguf-type", "f16"], "--gguf-type applies to --to gguf only"),
        (["--to", "gguf"], "m.gguf already exists"),
    ):
        assert main(["export", adapter, str(tmp_path / "m.gguf"), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.json", "adapter.lora.h5", "m.Modelfile", "m.gguf"]
