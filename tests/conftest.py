"""Test environment: JAX backend, no network, private caches, no credentials.

Every test runs offline. A test that opens a network connection fails with
`NetworkBlocked`. Tests marked `slow` run only with `--run-slow`.
"""

import os
import socket
import sys
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
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(_CACHE, "jax")
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
    from gemma_lora.model import tiny_preset_dir

    return tiny_preset_dir()


@pytest.fixture
def tiny_lm(tiny_preset):
    """A fresh tiny GemmaCausalLM (float32) loaded from the preset."""
    from gemma_lora.model import load_causal_lm

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
