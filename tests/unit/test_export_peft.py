"""PEFT adapter export: exact for KerasHub's per-head LoRA, checked by PEFT itself.

A tiny adapter at rank 8 on all seven projections with alpha != rank, on a
Gemma (4 query heads, 1 KV head), a Gemma 3 and a Gemma 2 (4 query heads, 2 KV heads):
`peft.PeftModel.from_pretrained` on the exported base gives the Keras
adapter model's logits, unmerged and after `merge_and_unload` (needs torch
and peft: skipped without them; CI runs this file in its Python 3.11 venv).
Without torch, the factor algebra is checked against KerasHub's own update.
"""

import json

import numpy as np
import pytest
from tiny_models import exportable, logits, token_ids, with_adapter

from gemma_lora.errors import ExportError
from gemma_lora.export import Provenance
from gemma_lora.export.hf import HF_MODULES, hf_weight
from gemma_lora.export.peft import CONFIG_FILE, WEIGHTS_FILE, export_peft, peft_factors
from gemma_lora.model import layers, loading

RANK, ALPHA = 8, 20.0
SHAPES = ("gemma-1kv", "gemma3", "gemma2")


@pytest.fixture(scope="module", params=SHAPES)
def exported(request, tmp_path_factory):
    """(LoRA model, token ids, exported folder with base/) per architecture."""
    tmp = tmp_path_factory.mktemp(f"peft-{request.param}")
    lora, preset, _ = exportable(request.param, tmp, rank=RANK, alpha=ALPHA)
    base = loading.load_causal_lm(preset, "float32")
    out = export_peft(lora, tmp / "peft", Provenance("tiny-base", "a.lora.h5"), base=base)
    return lora, token_ids(lora), out


def test_factors_multiply_to_kerashubs_update_for_every_layer(exported):
    """B·A·(alpha/rank) of the PEFT factors equals the update KerasHub adds to the transformers weight."""
    lora, _, out = exported
    from safetensors.numpy import load_file

    tensors = load_file(str(out / WEIGHTS_FILE))
    config = json.loads((out / CONFIG_FILE).read_text())
    with_lora = layers.lora_layers(lora)
    assert len(tensors) == 2 * len(with_lora) == 2 * 7 * len(lora.backbone.transformer_layers)
    for layer in with_lora:
        module, layout = HF_MODULES[layer.name]
        a, b = np.asarray(layer.lora_kernel_a), np.asarray(layer.lora_kernel_b)
        update = hf_weight(np.asarray(layer.kernel) - np.asarray(layer._kernel), layout)  # what Keras adds
        lora_a, lora_b = peft_factors(a, b, layout)
        rank = config["rank_pattern"].get(module, config["r"])
        alpha = config["alpha_pattern"].get(module, config["lora_alpha"])
        assert lora_a.shape[0] == rank == (a.shape[0] * RANK if layout == "heads_in" else RANK)
        np.testing.assert_allclose(alpha / rank * lora_b @ lora_a, update, atol=1e-6 * np.abs(update).max())


def test_peft_gives_the_keras_adapter_models_logits_unmerged_and_merged(exported):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    lora, ids, out = exported
    want = logits(lora, ids)
    tolerance = 1e-4 * np.abs(want).max()
    base = transformers.AutoModelForCausalLM.from_pretrained(str(out / "base"), dtype=torch.float32)
    with torch.no_grad():
        plain = base(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    tuned = peft.PeftModel.from_pretrained(base, str(out))
    tuned.eval()
    with torch.no_grad():
        unmerged = tuned(torch.tensor(ids, dtype=torch.long)).logits.numpy()
        merged = tuned.merge_and_unload()(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(unmerged, want, atol=tolerance)
    np.testing.assert_allclose(merged, want, atol=tolerance)
    assert np.abs(plain - want).max() > 100 * tolerance  # the adapter changes the logits


def test_config_names_the_base_and_keeps_the_trained_alpha(exported):
    _, _, out = exported
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["r"] == RANK and config["lora_alpha"] == ALPHA and not config["use_rslora"]
    assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert config["base_model_name_or_path"] == str((out / "base").resolve())
    assert "heads x 8" in (out / "README.md").read_text()


@pytest.mark.slow
def test_refuses_a_quantized_base_and_no_lora_and_leaves_nothing(tmp_path, tiny_preset):
    quantized = with_adapter(loading.load_causal_lm(tiny_preset, "float32", quantize="int8"), targets=("query",))
    with pytest.raises(ExportError, match="trained on a base stored as int8.*--to hf or --to gguf"):
        export_peft(quantized, tmp_path / "a", Provenance("tiny"))
    with pytest.raises(ExportError, match="no LoRA layers"):
        export_peft(loading.load_causal_lm(tiny_preset, "float32"), tmp_path / "b", Provenance("tiny"))
    embedding = loading.load_causal_lm(tiny_preset, "float32")
    loading.enable_lora(embedding, 4, None, ("query", "token_embedding"))
    with pytest.raises(ExportError, match="token_embedding has no PEFT counterpart"):
        export_peft(embedding, tmp_path / "c", Provenance("tiny"))
    lora, _, _ = exportable("gemma-softcap-only", tmp_path / "m", targets=("query",))
    with pytest.raises(ExportError, match="some of Gemma 2's features .* not both post norms"):
        export_peft(lora, tmp_path / "d", Provenance("tiny"))
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_google_presets_point_at_their_hub_checkpoints():
    from gemma_lora.export.peft import readme

    config = {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj"], "rank_pattern": {}, "base_model_name_or_path": "x"}
    assert "google/gemma-2b" in readme(Provenance("gemma_2b_en", "a.lora.h5"), config, False)
    assert "`google/gemma-2-2b-it`" in readme(Provenance("gemma2_instruct_2b_en", "a.lora.h5"), config, False)
    # KerasHub's 27B scales queries unlike Google's checkpoint: no Hub base is promised for it.
    assert "has no Hub checkpoint" in readme(Provenance("gemma2_27b_en", "a.lora.h5"), config, False)
    assert "not Google's google/gemma-3-270m" in readme(Provenance("demo", "a.lora.h5"), config, False)
