"""Test environment: JAX backend, no network, private caches, no credentials.

Every test runs offline. A test that opens a network connection fails with
`NetworkBlocked`. Tests marked `slow` run only with `--run-slow`.
"""

import os
import socket
import tempfile

# Before anything imports Keras or JAX.
os.environ["KERAS_BACKEND"] = "jax"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["HF_HUB_OFFLINE"] = "1"
_CACHE = tempfile.mkdtemp(prefix="gemma-lora-tests-")
os.environ["GEMMA_LORA_CACHE"] = os.path.join(_CACHE, "gemma_lora")
os.environ["KAGGLEHUB_CACHE"] = os.path.join(_CACHE, "kagglehub")
os.environ["HF_HOME"] = os.path.join(_CACHE, "hf")
os.environ["KAGGLE_CONFIG_DIR"] = os.path.join(_CACHE, "kaggle-config")  # no ~/.kaggle
# Tests compile the same tiny programs many times, in this process and in the
# CLI subprocesses: a shared persistent compilation cache pays for each once.
# The package's own default place for it (compilation_cache="auto"), so runs and tests share one.
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(_CACHE, "gemma_lora", "jax")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
    os.environ.pop(name, None)

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class NetworkBlocked(RuntimeError):
    pass


_real_connect = socket.socket.connect


def _guarded_connect(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1") or host.startswith("/")):
        return _real_connect(self, address)
    raise NetworkBlocked(f"test tried to reach the network: {address!r}")


socket.socket.connect = _guarded_connect


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="Run tests marked slow.")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --run-slow to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_preset():
    """Directory of the tiny preset (built once per test session)."""
    from gemma_lora.model.presets import tiny_preset_dir

    return tiny_preset_dir()


@pytest.fixture(scope="session")
def tiny_gemma2_preset():
    """Directory of the tiny_gemma2 preset (Gemma 2's architecture; built once per test session)."""
    from gemma_lora.model.presets import TINY_GEMMA2, tiny_preset_dir

    return tiny_preset_dir(TINY_GEMMA2)


@pytest.fixture(scope="session")
def tiny_gemma4_preset():
    """Directory of the tiny_gemma4 preset (Gemma 4's text architecture; built once per test session)."""
    from gemma_lora.model.presets import TINY_GEMMA4, tiny_preset_dir

    return tiny_preset_dir(TINY_GEMMA4)


@pytest.fixture
def tiny_lm(tiny_preset):
    """A fresh tiny GemmaCausalLM (float32) loaded from the preset."""
    from gemma_lora.model.loading import load_causal_lm

    return load_causal_lm(tiny_preset, "float32", sequence_length=64)


@pytest.fixture
def make_config():
    """TrainConfig for fast tiny runs; keyword arguments override."""
    from gemma_lora.config import resolve_config

    def make(recipe=False, **overrides):
        values = dict(preset="tiny", sequence_length=64, limit=24, validation_rows=4, test_rows=4,
                      batch_size=4, max_new_tokens=8)
        if recipe:
            values.update(limit=8, validation_rows=0, test_rows=4, batch_size=1)
        values.update(overrides)
        return resolve_config(overrides=values, recipe=recipe)

    return make


def write_jsonl(path, lines):
    """Write raw lines (strings are written as is, dicts as JSON)."""
    import json

    with open(path, "w") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


# The tiny settings the notebooks use (their SMOKE dict), so the rank-sweep
# notebook test resumes this sweep instead of training it again.
TINY_SWEEP = dict(preset="tiny", sequence_length=64, limit=24, validation_rows=4, test_rows=4,
                  max_new_tokens=8, max_steps=2)
TINY_SWEEP_RANKS = (2, 4)


def live_models():
    """How many GemmaCausalLM objects are alive (after a full garbage collection)."""
    import gc

    import keras_hub

    gc.collect()
    return sum(isinstance(o, keras_hub.models.GemmaCausalLM) for o in gc.get_objects())


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory, tiny_preset):
    """A finished rank sweep on tiny: dict with dir, rows, config, printed lines, models alive before/after."""
    from gemma_lora.config import resolve_config
    from gemma_lora.sweep import rank_sweep

    directory = tmp_path_factory.mktemp("sweep") / "sweep"
    config = resolve_config(overrides=TINY_SWEEP)
    lines = []
    before = live_models()
    rows = rank_sweep(config, TINY_SWEEP_RANKS, output_dir=directory, echo=lines.append)
    return {"dir": directory, "rows": rows, "config": config, "lines": lines,
            "models_before": before, "models_after": live_models()}


# Tiny Gemma 1 and Gemma 3 causal LMs built in memory (no tokenizer): the
# fast path's and the decoder's tests compare them with KerasHub's own math.
TINY_VOCAB = 128


def build_tiny_gemma(seed=0, num_key_value_heads=1, num_query_heads=2):
    """A 2-layer GemmaCausalLM (float32) with LoRA rank 4 on query/value, non-zero B factors and norm scales."""
    import keras
    import keras_hub
    import numpy as np

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=TINY_VOCAB,
        num_layers=2,
        num_query_heads=num_query_heads,
        num_key_value_heads=num_key_value_heads,
        hidden_dim=32,
        intermediate_dim=64,
        head_dim=16,
        dtype="float32",
    )
    lm = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    backbone.enable_lora(4)
    rng = np.random.default_rng(seed)
    # Non-zero LoRA B factors and norm scales, so a wrong formula shows.
    for block in backbone.transformer_layers:
        for layer in (block.attention.query_dense, block.attention.value_dense):
            b = layer.lora_kernel_b
            b.assign(rng.normal(0, 0.2, b.shape).astype("float32"))
        for norm in (block.pre_attention_norm, block.pre_ffw_norm):
            norm.scale.assign(rng.normal(0, 0.2, norm.scale.shape).astype("float32"))
    return lm


def build_tiny_gemma3(seed=0, **overrides):
    """Six layers: five sliding-window layers (window 4) and one global layer
    with RoPE wavelength 1e6 scaled by 8, as KerasHub lays out Gemma 3.
    `overrides`: other Gemma3Backbone arguments (e.g. soft caps)."""
    import keras
    import keras_hub
    import numpy as np

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.Gemma3Backbone(
        vocabulary_size=TINY_VOCAB,
        image_size=16,
        num_layers=6,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=32,
        intermediate_dim=64,
        head_dim=16,
        use_post_ffw_norm=True,
        use_post_attention_norm=True,
        use_sliding_window_attention=True,
        sliding_window_size=4,
        global_rope_scaling_factor=8.0,
        dtype="float32",
        **overrides,
    )
    lm = keras_hub.models.Gemma3CausalLM(backbone=backbone, preprocessor=None)
    backbone.enable_lora(4)
    rng = np.random.default_rng(seed)
    # Every norm scale (pre, post, query, key) and LoRA B non-zero.
    for weight in backbone.weights:
        if weight.name in ("scale", "lora_kernel_b"):
            weight.assign(rng.normal(0, 0.3, weight.shape).astype("float32"))
    return lm


def build_tiny_gemma2(seed=0, attention_logit_soft_cap=5.0, final_logit_soft_cap=3.0):
    """A 4-layer Gemma 2 (GemmaBackbone): layers 0 and 2 slide (window 4), 1 and 3 are global;
    post norms; 4 query heads over 2 KV heads; both soft caps, small enough to bind on these
    random weights (a cap far above every logit would change nothing and test nothing)."""
    import keras
    import keras_hub
    import numpy as np

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=TINY_VOCAB,
        num_layers=4,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=32,
        intermediate_dim=64,
        head_dim=16,
        use_post_ffw_norm=True,
        use_post_attention_norm=True,
        attention_logit_soft_cap=attention_logit_soft_cap,
        final_logit_soft_cap=final_logit_soft_cap,
        use_sliding_window_attention=True,
        sliding_window_size=4,
        dtype="float32",
    )
    lm = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    backbone.enable_lora(4)
    rng = np.random.default_rng(seed)
    # Every norm scale (pre and post) and LoRA B non-zero, so a dropped one shows.
    for weight in backbone.weights:
        if weight.name in ("scale", "lora_kernel_b"):
            weight.assign(rng.normal(0, 0.3, weight.shape).astype("float32"))
    return lm
