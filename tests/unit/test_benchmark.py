"""scripts/benchmark.py builds the fast path's config for a shape the way
`fast.architecture` reads it off the matching KerasHub model, so the fast and
KerasHub variants of one shape time the same model."""

import importlib.util
from pathlib import Path

import pytest

from gemma_lora.fast import extract

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "benchmark.py"


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("shape", ["tiny", "tiny_gemma3", "tiny_gemma2"])
def test_fast_dims_describe_the_keras_model_of_the_shape(benchmark, shape):
    causal_lm = benchmark.keras_causal_lm(shape, "float32")
    read_off_keras = extract.FastConfig(**extract.architecture(causal_lm.backbone))
    assert extract.FastConfig(**benchmark.fast_dims(shape)) == read_off_keras


def test_tiny_gemma3_mixes_sliding_and_global_layers(benchmark):
    windows = [spec[0] for spec in benchmark.fast_dims("tiny_gemma3")["layer_attention"]]
    assert windows == [64, 64, 64, 64, 64, 0, 64]

