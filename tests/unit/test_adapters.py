"""Adapters: save → reload identical logits, stock interop both ways, checks, merge (checklist 3, 4, 6)."""

import warnings

import keras_hub
import numpy as np
import pytest

from gemma_lora.adapters import files, merge, store
from gemma_lora.errors import AdapterError, OutputError
from gemma_lora.model import layers, loading

TOKENS = {"token_ids": np.array([[2, 300, 301, 302, 4, 5, 6, 7]], "int32"), "padding_mask": np.ones((1, 8), bool)}


def trained_like(causal_lm, rank=4, alpha=None, targets=("query", "value"), seed=0):
    """Enable LoRA and give every factor random non-zero values (a stand-in for training)."""
    layers = loading.enable_lora(causal_lm, rank, alpha, targets, seed=seed)
    rng = np.random.default_rng(seed)
    for layer in layers:
        layer.lora_kernel_b.assign(rng.normal(0, 0.5, layer.lora_kernel_b.shape).astype("float32"))
    return causal_lm


def logits(causal_lm):
    return np.asarray(causal_lm(TOKENS))


def save(causal_lm, directory, make_config, **overrides):
    config = make_config(**overrides)
    store.save_adapter(causal_lm, directory, config)
    return directory / files.ADAPTER_FILE


def fresh(tiny_preset):
    return loading.load_causal_lm(tiny_preset, "float32")


def test_save_then_load_into_a_fresh_base_gives_identical_logits(tmp_path, tiny_preset, make_config):
    source = trained_like(fresh(tiny_preset), rank=8, alpha=32.0, targets=("query", "key", "value", "ffw_linear"))
    path = save(source, tmp_path, make_config, lora_rank=8, lora_alpha=32.0, lora_targets=["query", "key", "value", "ffw_linear"])
    target = fresh(tiny_preset)
    assert not np.allclose(logits(target), logits(source))
    meta = store.load_adapter(target, path)
    np.testing.assert_array_equal(logits(target), logits(source))
    assert meta["alpha"] == 32.0 and meta["stock_loader_compatible"] is False
    assert meta["backbone_shape"]["num_layers"] == 2


def test_stock_loader_reads_our_adapter(tmp_path, tiny_preset, make_config):
    source = trained_like(fresh(tiny_preset))
    path = save(source, tmp_path, make_config)
    target = fresh(tiny_preset)
    target.backbone.load_lora_weights(str(path))
    np.testing.assert_array_equal(logits(target), logits(source))


def test_our_loader_reads_a_stock_adapter_and_warns_about_missing_metadata(tmp_path, tiny_preset):
    source = trained_like(fresh(tiny_preset))
    path = tmp_path / "stock.lora.h5"
    source.backbone.save_lora_weights(str(path))
    target = fresh(tiny_preset)
    with pytest.warns(UserWarning, match="No stock.json beside .* stock KerasHub adapter"):
        assert store.load_adapter(target, path) is None
    np.testing.assert_array_equal(logits(target), logits(source))


def test_stock_loader_would_be_wrong_for_other_alpha_but_ours_is_right(tmp_path, tiny_preset, make_config):
    source = trained_like(fresh(tiny_preset), alpha=16.0)
    path = save(source, tmp_path, make_config, lora_alpha=16.0)
    stock = fresh(tiny_preset)
    stock.backbone.load_lora_weights(str(path))
    assert not np.allclose(logits(stock), logits(source), atol=1e-4)  # silently wrong
    ours = fresh(tiny_preset)
    store.load_adapter(ours, path)
    np.testing.assert_array_equal(logits(ours), logits(source))


def test_adapter_of_another_base(tmp_path, tiny_preset, make_config):
    path = save(trained_like(fresh(tiny_preset)), tmp_path, make_config)
    other = keras_hub.models.GemmaCausalLM(
        backbone=keras_hub.models.GemmaBackbone(
            vocabulary_size=1024, num_layers=2, num_query_heads=4, num_key_value_heads=1,
            hidden_dim=32, intermediate_dim=64, head_dim=8,
        ),
        preprocessor=None,
    )
    with pytest.raises(AdapterError, match="trained on another base model .*hidden_dim 64 vs 32"):
        store.load_adapter(other, path)
    # Without the metadata the shapes still give it away.
    (tmp_path / files.METADATA_FILE).unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(AdapterError, match="does not fit this model"):
            store.load_adapter(other, path)


def test_rank_mismatch(tmp_path, tiny_preset, make_config):
    path = save(trained_like(fresh(tiny_preset), rank=4), tmp_path, make_config)
    target = fresh(tiny_preset)
    loading.enable_lora(target, 8)
    with pytest.raises(AdapterError, match="rank-4 adapter .* already has rank-8 LoRA"):
        store.load_adapter(target, path)


def test_wrong_extension_and_corrupt_file(tmp_path, tiny_preset, make_config):
    path = save(trained_like(fresh(tiny_preset)), tmp_path, make_config)
    renamed = tmp_path / "adapter.h5"
    renamed.write_bytes(path.read_bytes())
    with pytest.raises(AdapterError, match=r"must end in .lora.h5.*Received: .*adapter.h5"):
        store.load_adapter(fresh(tiny_preset), renamed)
    path.write_bytes(path.read_bytes()[: 400])  # truncated
    with pytest.raises(AdapterError, match="not a readable LoRA adapter"):
        store.load_adapter(fresh(tiny_preset), path)


def test_merged_model_has_no_lora_and_the_adapter_models_logits(tmp_path, tiny_preset, make_config):
    source = trained_like(fresh(tiny_preset), alpha=8.0, targets=("query", "value", "ffw_gating"))
    out = merge.merge_adapter(source, tiny_preset, tmp_path / "merged")
    merged = keras_hub.models.CausalLM.from_preset(str(out))
    assert not layers.lora_layers(merged)
    np.testing.assert_allclose(logits(merged), logits(source), rtol=1e-5, atol=1e-5)
    with pytest.raises(OutputError, match="already exists"):
        merge.merge_adapter(source, tiny_preset, out)


def test_disk_full_while_saving_leaves_nothing_corrupt(tmp_path, tiny_preset, make_config, monkeypatch):
    causal_lm = trained_like(fresh(tiny_preset))

    def full_disk(self, filepath):
        with open(filepath, "wb") as f:
            f.write(b"\x89HDF partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(causal_lm.backbone), "save_lora_weights", full_disk)
    with pytest.raises(OutputError, match="No space left on device"):
        store.save_adapter(causal_lm, tmp_path, make_config())
    assert list(tmp_path.iterdir()) == []


def test_same_shape_other_preset_name_warns(tmp_path, tiny_preset, make_config):
    path = save(trained_like(fresh(tiny_preset)), tmp_path, make_config)
    with pytest.warns(UserWarning, match="trained on 'tiny'; loading it onto 'my_tiny_copy'"):
        store.load_adapter(fresh(tiny_preset), path, preset="my_tiny_copy")
