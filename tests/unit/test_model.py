"""Model: preset resolution (tiny, directory, kagglehub cache), credentials, LoRA counts."""

import os
import shutil

import numpy as np
import pytest
import requests

from gemma_lora.errors import ConfigError, CredentialsError, PresetError
from gemma_lora.model import loading, presets

SECRET = "0123456789abcdef0123456789abcdef"


def hand_count_lora(backbone, rank, targets):
    """LoRA parameters of Keras' EinsumDense: A = kernel.shape[:-1] + (rank,), B = (rank, last)."""
    total = 0
    for layer in backbone._flatten_layers(include_self=False):
        if layer.name in targets and hasattr(layer, "enable_lora"):
            shape = layer.kernel.shape
            total += int(np.prod(shape[:-1])) * rank + rank * shape[-1]
    return total


@pytest.mark.parametrize("rank, targets", [(4, ("query", "value")), (8, ("query", "key", "value", "ffw_linear"))])
def test_trainable_parameters_match_the_hand_count(tiny_lm, rank, targets):
    base_before = sum(int(np.prod(w.shape)) for w in tiny_lm.backbone.weights)
    expected = hand_count_lora(tiny_lm.backbone, rank, targets)
    layers = loading.enable_lora(tiny_lm, rank, targets=targets)
    summary = loading.parameter_summary(tiny_lm)
    assert summary == {"base_parameters": base_before, "trainable_parameters": expected}
    assert len(layers) == 2 * len(targets)  # two decoder blocks


def test_alpha_is_applied_on_each_layer_and_scales_the_update(tiny_lm):
    layers = loading.enable_lora(tiny_lm, 4, alpha=16.0)
    assert all(layer.lora_alpha == 16.0 for layer in layers)
    layer = layers[0]
    layer.lora_kernel_b.assign(np.ones(layer.lora_kernel_b.shape, "float32"))
    update = np.asarray(layer.kernel) - np.asarray(layer._kernel)
    expected = 4.0 * np.matmul(np.asarray(layer.lora_kernel_a), np.asarray(layer.lora_kernel_b))
    np.testing.assert_allclose(update, expected, rtol=1e-5, atol=1e-5)


def test_unknown_target_layer(tiny_lm):
    with pytest.raises(ConfigError, match=r"lora_targets \['qkv'\] match no LoRA-able layer.*query"):
        loading.enable_lora(tiny_lm, 4, targets=("qkv",))


def test_unknown_preset():
    with pytest.raises(PresetError, match="Unknown preset 'gemma_2b_xx'.*Similar names: .*gemma_2b_en"):
        presets.resolve_preset("gemma_2b_xx")


def test_preset_directory_missing_files(tmp_path, tiny_preset):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_preset, broken)
    (broken / "tokenizer.json").unlink()
    for weights in broken.glob("model*.weights.h5"):
        weights.unlink()
    with pytest.raises(PresetError, match="missing tokenizer.json, model.weights.h5"):
        presets.resolve_preset(str(broken))
    with pytest.raises(PresetError, match="not found"):
        presets.resolve_preset(str(tmp_path / "nothing"))


def fill_kagglehub_cache(tiny_preset, version, model_name="gemma", variation="gemma_2b_en"):
    """Lay a tiny preset out as kagglehub caches keras/<model_name>/keras/<variation>/<version>."""
    root = os.path.join(os.environ["KAGGLEHUB_CACHE"], "models", "keras", model_name, "keras", variation)
    shutil.copytree(tiny_preset, os.path.join(root, str(version)), dirs_exist_ok=True)
    open(os.path.join(root, f"{version}.complete"), "w").close()
    return os.path.join(root, str(version))


def test_named_preset_loads_from_the_kagglehub_cache_offline(tiny_preset):
    """The recipe's version 2 by default, through kagglehub's own cache lookup."""
    cached = fill_kagglehub_cache(tiny_preset, 2)
    path = presets.resolve_preset("gemma_2b_en", version=2)
    assert os.path.samefile(path, cached)
    causal_lm = loading.load_causal_lm(path)
    assert causal_lm.backbone.num_layers == 2
    # No version given: gemma_2b_en still means the recipe's version 2, not KerasHub's 3.
    assert os.path.samefile(presets.resolve_preset("gemma_2b_en"), cached)
    # A kaggle:// handle with an explicit version resolves the same way.
    assert os.path.samefile(presets.resolve_preset("kaggle://keras/gemma/keras/gemma_2b_en/2"), cached)


GEMMA2_PRESETS = ("gemma2_2b_en", "gemma2_instruct_2b_en", "gemma2_9b_en", "gemma2_instruct_9b_en",
                  "gemma2_27b_en", "gemma2_instruct_27b_en")


def test_gemma2_presets_resolve_from_the_kagglehub_cache_offline(tiny_gemma2_preset):
    """Each Gemma 2 name KerasHub lists resolves through kagglehub's cache at KerasHub's version, no network."""
    import keras_hub

    for name in GEMMA2_PRESETS:
        handle = keras_hub.models.CausalLM.presets[name]["kaggle_handle"]  # kaggle://keras/gemma2/keras/<name>/<v>
        _, model_name, _, variation, version = handle.removeprefix("kaggle://").split("/")
        cached = fill_kagglehub_cache(tiny_gemma2_preset, version, model_name, variation)
        assert os.path.samefile(presets.resolve_preset(name), cached), name
    causal_lm = loading.load_causal_lm(presets.resolve_preset("gemma2_2b_en"))
    assert causal_lm.backbone.final_logit_soft_cap == 30.0  # the Gemma 2 placed there, loaded as one
    with pytest.raises(CredentialsError, match="kaggle://keras/gemma2/keras/gemma2_2b_en/99 needs Kaggle credentials"):
        presets.resolve_preset("gemma2_2b_en", version=99)  # not cached: a download, refused without credentials


def test_missing_credentials_say_what_to_do():
    with pytest.raises(CredentialsError, match="needs Kaggle credentials.*KAGGLE_USERNAME and KAGGLE_KEY.*kaggle.json"):
        presets.resolve_preset("gemma_2b_en", version=7)


def test_credentials_from_kaggle_json_and_consent_refusal_never_show_the_key(tmp_path, monkeypatch):
    """A 403 from Kaggle (simulated) says to accept the license; the key is never printed."""
    import kagglehub
    from kagglehub import exceptions

    config_dir = tmp_path / "kaggle"
    config_dir.mkdir()
    (config_dir / "kaggle.json").write_text('{"username": "someone", "key": "%s"}' % SECRET)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(config_dir))

    def refuse(handle, *args, **kwargs):
        response = requests.Response()
        response.status_code = 403
        raise exceptions.KaggleApiHTTPError("403 Client Error: Forbidden", response=response)

    monkeypatch.setattr(kagglehub, "model_download", refuse)
    with pytest.raises(CredentialsError) as error:
        presets.resolve_preset("gemma_2b_en", version=7)
    assert "HTTP 403" in str(error.value) and "accept the Gemma license" in str(error.value)
    assert "https://www.kaggle.com/models/keras/gemma " in str(error.value)
    assert SECRET not in str(error.value)
    with pytest.raises(CredentialsError, match="https://www.kaggle.com/models/keras/gemma2 while signed in"):
        presets.resolve_preset("gemma2_2b_en", version=7)  # Gemma 2's own consent form


def test_environment_credentials_are_found_and_not_echoed(monkeypatch):
    import kagglehub

    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", SECRET)
    seen = []

    def offline(handle, *args, **kwargs):
        seen.append(handle)
        raise requests.ConnectionError(f"no network (key {SECRET} must not leak)")

    monkeypatch.setattr(kagglehub, "model_download", offline)
    with pytest.raises(PresetError) as error:
        presets.resolve_preset("gemma_2b_en", version=7)
    assert seen == ["keras/gemma/keras/gemma_2b_en/7"]  # credentials found, download attempted
    assert SECRET not in str(error.value) and "ConnectionError" in str(error.value)
