"""Export to a Hugging Face transformers folder: logits match per architecture, wrong ones refused, CLI.

KerasHub's Gemma exporter keeps only the first key/value head and drops
Gemma 2's soft caps and post norms; each architecture the package trains is
loaded by transformers here (Gemma with one and with four KV heads, Gemma 3,
Gemma 3 with a final soft cap, Gemma 2, Gemma 2 with 27B's query-scale
config), and a Gemma with soft caps but no post norms is refused.
"""

import json

import keras_hub
import numpy as np
import pytest
from tiny_models import exportable, tiny_causal_lm, token_ids
from tiny_models import logits as tiny_logits

from gemma_lora.adapters import merge
from gemma_lora.errors import ExportError
from gemma_lora.export import export_transformers
from gemma_lora.model import loading

TOKEN_IDS = np.array([[2, 300, 301, 302, 4, 5, 6, 7]], "int32")
TARGETS = ("query", "value", "ffw_linear")


def logits(causal_lm):
    return np.asarray(causal_lm({"token_ids": TOKEN_IDS, "padding_mask": np.ones_like(TOKEN_IDS, bool)}))


def with_adapter(causal_lm, seed=0):
    """LoRA with non-zero B factors, a stand-in for training."""
    layers = loading.enable_lora(causal_lm, 4, 8.0, TARGETS, seed=seed)
    rng = np.random.default_rng(seed)
    for layer in layers:
        layer.lora_kernel_b.assign(rng.normal(0, 0.1, layer.lora_kernel_b.shape).astype("float32"))
    return causal_lm


@pytest.fixture(scope="module")
def exported(tiny_preset, tmp_path_factory):
    """(LoRA model's logits, base logits, exported folder) for one merged tiny model."""
    source = with_adapter(loading.load_causal_lm(tiny_preset, "float32"))
    out = export_transformers(merge.merged_model(source, tiny_preset), tmp_path_factory.mktemp("export") / "hf")
    return logits(source), logits(loading.load_causal_lm(tiny_preset, "float32")), out


def test_transformers_gives_the_keras_models_logits(exported):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    want, base, out = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    with torch.no_grad():
        got = hf(torch.tensor(TOKEN_IDS, dtype=torch.long)).logits.numpy()
    tolerance = 1e-4 * np.abs(want).max()
    np.testing.assert_allclose(got, want, atol=tolerance)
    assert np.abs(got - base).max() > 100 * tolerance  # the adapter's update is in the export
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tokenizer("Hello").input_ids[0] == 2  # <bos>, as KerasHub's preprocessor adds


@pytest.fixture(scope="module", params=["gemma-4kv", "gemma3", "gemma3-softcap", "gemma2", "gemma2-query-scale"])
def architecture_export(request, tmp_path_factory):
    """(architecture, token ids, LoRA model's logits, exported folder) per architecture."""
    pytest.importorskip("torch")  # the test loads the export with transformers: no export to build without it
    pytest.importorskip("transformers")
    tmp = tmp_path_factory.mktemp(request.param)
    lora, _, plain = exportable(request.param, tmp)
    ids = token_ids(plain)
    return request.param, ids, tiny_logits(lora, ids), export_transformers(plain, tmp / "hf")


def test_every_trained_architecture_gives_the_keras_logits_in_transformers(architecture_export):
    """Several KV heads (each its own k/v rows), Gemma 2 and 3 sliding/global layers, soft caps, post norms."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    name, ids, want, out = architecture_export
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert type(hf).__name__ == json.loads((out / "config.json").read_text())["architectures"][0]
    with torch.no_grad():
        got = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), err_msg=name)


@pytest.mark.parametrize("shape", ["gemma2", "gemma2-query-scale"])
def test_gemma2_config_says_what_keras_computes(shape, tmp_path):
    """model_type gemma2, both caps, the window and its layers, the query scale KerasHub uses, four norms."""
    from gemma_lora.export.hf import hf_config, hf_weights

    backbone = tiny_causal_lm(shape).backbone
    config = hf_config(backbone)
    assert config["model_type"] == "gemma2" and config["architectures"] == ["Gemma2ForCausalLM"]
    assert (config["attn_logit_softcapping"], config["final_logit_softcapping"]) == (5.0, 3.0)
    assert config["sliding_window"] == 8 and config["layer_types"] == ["sliding_attention", "full_attention"]
    assert config["num_key_value_heads"] == 2
    # keras-hub 0.32 scales by head_dim even where the backbone's config asks for hidden/heads (16).
    assert config["query_pre_attn_scalar"] == (32 if shape == "gemma2-query-scale" else 16)
    weights = hf_weights(backbone)
    block = backbone.transformer_layers[1]
    for hf_name, norm in (("input_layernorm", block.pre_attention_norm), ("post_attention_layernorm", block.post_attention_norm),
                          ("pre_feedforward_layernorm", block.pre_ffw_norm), ("post_feedforward_layernorm", block.post_ffw_norm)):
        np.testing.assert_array_equal(weights[f"model.layers.1.{hf_name}.weight"], np.asarray(norm.scale))


def test_gemma3_query_scale_is_the_one_keras_computes():
    """KerasHub's Gemma 3 config writes the backbone's hidden/heads; its attention scales by head_dim."""
    from gemma_lora.export.hf import hf_config

    backbone = tiny_causal_lm("gemma3-query-scale").backbone
    assert not backbone.query_head_dim_normalize and backbone.transformer_layers[0].attention.query_head_dim_normalize
    assert hf_config(backbone)["query_pre_attn_scalar"] == backbone.head_dim != backbone.hidden_dim // backbone.num_query_heads


def test_a_gemma_with_soft_caps_but_no_post_norms_is_refused_before_anything_is_written(tmp_path):
    _, _, plain = exportable("gemma-softcap-only", tmp_path)
    with pytest.raises(ExportError, match="some of Gemma 2's features \\(logit soft caps\\) but not both post norms"):
        export_transformers(plain, tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf*"))


def test_keras_hubs_transformers_importer_reads_the_folder_back(exported):
    """Without torch: KerasHub's importer (separate code from its exporter) gives the same logits."""
    want, _, out = exported
    assert json.loads((out / "config.json").read_text())["architectures"] == ["GemmaForCausalLM"]
    assert {"model.safetensors", "tokenizer.model", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    reloaded = keras_hub.models.CausalLM.from_preset(str(out))
    np.testing.assert_allclose(logits(reloaded), want, atol=1e-5 * np.abs(want).max())


@pytest.mark.slow
def test_refuses_lora_quantized_and_unsupported_models(tmp_path, tiny_preset):
    with pytest.raises(ExportError, match="still has LoRA enabled on 6 layers.*Merge first"):
        export_transformers(with_adapter(loading.load_causal_lm(tiny_preset, "float32")), tmp_path / "a")
    with pytest.raises(ExportError, match="stored as int8.*merged"):
        export_transformers(loading.load_causal_lm(tiny_preset, "float32", quantize="int8"), tmp_path / "b")
    backbone = keras_hub.models.GPTNeoXBackbone(
        vocabulary_size=16, num_layers=1, num_heads=2, hidden_dim=8, intermediate_dim=16, max_sequence_length=8
    )
    other = keras_hub.models.GPTNeoXCausalLM(backbone=backbone, preprocessor=None)
    with pytest.raises(ExportError, match="cannot export a GPTNeoXBackbone.*GemmaBackbone"):
        export_transformers(other, tmp_path / "c")
    assert list(tmp_path.iterdir()) == []  # nothing half-written
