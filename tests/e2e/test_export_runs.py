"""`gemma-lora export --to hf` end to end."""

import keras_hub
import numpy as np
from test_export import TARGETS, logits, with_adapter  # noqa: F401  (helpers and fixtures of the unit tests)

from gemma_lora.adapters import files, merge, store
from gemma_lora.model import loading


def test_cli_exports_an_adapter_and_a_merged_preset(tmp_path, tiny_preset, make_config, capsys):
    from gemma_lora.cli import main

    source = with_adapter(loading.load_causal_lm(tiny_preset, "float32"))
    store.save_adapter(source, tmp_path, make_config(lora_alpha=8.0, lora_targets=list(TARGETS)))
    adapter = tmp_path / files.ADAPTER_FILE
    assert main(["export", str(adapter), str(tmp_path / "hf")]) == 0
    assert "merged into tiny (float32 weights, no LoRA)" in capsys.readouterr().out
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert main(["export", str(adapter), str(tmp_path / "hf")]) == 2
    assert "already exists" in capsys.readouterr().err
    merged = merge.merge_adapter(source, tiny_preset, tmp_path / "merged")
    assert main(["export", str(merged), str(tmp_path / "hf2")]) == 0
    reloaded = keras_hub.models.CausalLM.from_preset(str(tmp_path / "hf2"))
    np.testing.assert_allclose(logits(reloaded), logits(source), atol=1e-5 * np.abs(logits(source)).max())
