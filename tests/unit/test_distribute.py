"""Several devices: the auto rule, clear errors and a layout for every Gemma (2 included).

The sharded training itself runs in tests/e2e/test_distribute_runs.py (a subprocess with 4
virtual CPU devices: XLA_FLAGS must be set before JAX starts).
"""

import types

import keras
import pytest

from gemma_lora.errors import ConfigError
from gemma_lora.parallel import distribute

DEVICES = 4


def gpus(n):
    return [types.SimpleNamespace(platform="gpu")] * n


def mesh(batch, model):
    # Device names only: a LayoutMap needs no real devices until variables are placed.
    return keras.distribution.DeviceMesh((batch, model), ("batch", "model"), [f"cpu:{i}" for i in range(batch * model)])


# --- config and the auto rule ------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    ({"distribution": "pipeline"}, "distribution='pipeline' must be one of auto, none, data, model"),
    ({"distribution": "data", "model_parallel": 2}, "applies to distribution='model' only"),
    ({"distribution": "model", "model_parallel": 0}, "model_parallel=0 must be >= 1"),
])
def test_bad_distribution_settings_are_config_errors(make_config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_config(**overrides)


def test_parameter_count_is_read_from_the_weights_file(tiny_preset, tiny_lm):
    from gemma_lora.model.loading import parameter_summary

    assert distribute.parameter_count(tiny_preset) == parameter_summary(tiny_lm)["base_parameters"]


def test_auto_picks_by_device_count_and_memory(make_config, tiny_preset):
    config = make_config(batch_size=8)
    weights = distribute.parameter_count(tiny_preset) * 4  # float32

    def plan(devices, memory, precision="float32"):
        p = distribute.choose_plan(config, tiny_preset, precision, gpus(devices), memory)
        return p.kind, p.mesh

    assert plan(1, weights / 100) == ("none", (1, 1))  # one device: nothing to distribute
    fits = weights / distribute.FITS_SHARE
    assert plan(4, fits) == ("data", (4, 1))
    assert plan(4, None) == ("data", (4, 1))  # memory unknown (CPU): assumed to fit
    # Just too big for one device: the smallest model axis on which a share fits.
    assert plan(4, fits * 0.99) == ("model", (2, 2))
    assert plan(4, fits / 3) == ("model", (1, 4))
    assert plan(4, fits / 100) == ("model", (1, 4))  # never fits: all devices on the model axis
    assert plan(4, fits * 0.99, "bfloat16") == ("data", (4, 1))  # half the bytes per weight
    # A batch of 8 does not split over 16 replicas: the batch axis shrinks to 8.
    assert plan(16, fits) == ("model", (8, 2))


def test_none_and_explicit_choices(make_config):
    def plan(**overrides):
        p = distribute.choose_plan(make_config(**overrides), devices=gpus(DEVICES))
        return p.kind, p.mesh

    assert plan(distribution="none") == ("none", (1, 1))
    assert plan(distribution="data") == ("data", (4, 1))
    assert plan(distribution="model") == ("model", (1, 4))
    assert plan(distribution="model", model_parallel=2) == ("model", (2, 2))


@pytest.mark.parametrize("overrides, message", [
    ({"distribution": "model", "model_parallel": 8},
     r"model_parallel=8 needs a device count it divides, but 4 device\(s\) are visible.*run where more devices"),
    ({"distribution": "model", "model_parallel": 3}, r"model_parallel=3 .* Use a model_parallel that divides 4"),
    ({"distribution": "data", "batch_size": 6}, r"batch_size=6 does not split over the 4 .*multiple of 4 \(e.g. 8\)"),
    ({"distribution": "model", "model_parallel": 2, "batch_size": 3}, r"batch_size=3 .* 2 data-parallel replicas"),
])
def test_impossible_layouts_name_cause_and_fix(make_config, overrides, message):
    with pytest.raises(ConfigError, match=message):
        distribute.choose_plan(make_config(**overrides), devices=gpus(DEVICES))


# --- the layout map ----------------------------------------------------------------------

# gemma_2b_en's shapes as listed in keras-hub #1613 (its single KV head broke KerasHub's map).
GEMMA_2B = {"vocabulary_size": 256000, "num_query_heads": 8, "num_key_value_heads": 1,
            "hidden_dim": 2048, "intermediate_dim": 32768, "head_dim": 256}
GEMMA_2B_SHAPES = {
    "token_embedding/embeddings": (256000, 2048),
    "decoder_block_0/attention/query/kernel": (8, 2048, 256),
    "decoder_block_0/attention/key/kernel": (1, 2048, 256),
    "decoder_block_0/attention/value/kernel": (1, 2048, 256),
    "decoder_block_0/attention/attention_output/kernel": (8, 256, 2048),
    "decoder_block_0/ffw_gating/kernel": (2048, 16384),
    "decoder_block_0/ffw_gating_2/kernel": (2048, 16384),
    "decoder_block_0/ffw_linear/kernel": (16384, 2048),
}


@pytest.mark.parametrize("shape", [(1, 2), (1, 8), (2, 4), (4, 2)])
def test_gemma_2b_layout_divides_every_sharded_dimension(shape):
    layout_map = distribute.gemma_layout_map(mesh(*shape), GEMMA_2B)
    sizes = dict(zip(("batch", "model"), shape))
    for path, dims in GEMMA_2B_SHAPES.items():
        axes = layout_map[path].axes
        assert len(axes) == len(dims), path
        for axis, dim in zip(axes, dims):
            assert axis is None or dim % sizes[axis] == 0, (path, axes, dims)
    query = layout_map["decoder_block_17/attention/query/kernel"].axes
    key = layout_map["decoder_block_17/attention/key/kernel"].axes
    assert query[0] == "model"  # 8 query heads split over the model axis ...
    assert key[0] is None  # ... the one KV head cannot be (keras-hub #1613)


# KerasHub's Gemma 2 presets (hidden, heads, KV heads, head_dim, intermediate_dim = 2 x FFN width):
# several KV heads each, and a hidden size (2304, 3584, 4608) that is no power of two.
GEMMA2 = {
    "gemma2_2b_en": dict(GEMMA_2B, num_query_heads=8, num_key_value_heads=4, hidden_dim=2304, intermediate_dim=18432),
    "gemma2_9b_en": dict(GEMMA_2B, num_query_heads=16, num_key_value_heads=8, hidden_dim=3584, intermediate_dim=28672),
    "gemma2_27b_en": dict(GEMMA_2B, num_query_heads=32, num_key_value_heads=16, hidden_dim=4608,
                          intermediate_dim=73728, head_dim=128),
}


def gemma_shapes(c, block=3):
    """Every kernel's and the embedding's shape of a GemmaBackbone config `c` (one block stands for all)."""
    n, k, d, h, f = (c["num_query_heads"], c["num_key_value_heads"], c["hidden_dim"], c["head_dim"],
                     c["intermediate_dim"] // 2)
    prefix = f"decoder_block_{block}"
    return {
        "token_embedding/embeddings": (c["vocabulary_size"], d),
        f"{prefix}/attention/query/kernel": (n, d, h),
        f"{prefix}/attention/key/kernel": (k, d, h),
        f"{prefix}/attention/value/kernel": (k, d, h),
        f"{prefix}/attention/attention_output/kernel": (n, h, d),
        f"{prefix}/ffw_gating/kernel": (d, f),
        f"{prefix}/ffw_gating_2/kernel": (d, f),
        f"{prefix}/ffw_linear/kernel": (f, d),
    }


@pytest.mark.parametrize("preset", sorted(GEMMA2))
@pytest.mark.parametrize("shape", [(1, 4), (2, 2), (4, 1), (2, 4)])
def test_gemma2_layouts_cover_every_kernel_and_shard_its_kv_heads(preset, shape):
    c = GEMMA2[preset]
    layout_map = distribute.gemma_layout_map(mesh(*shape), c)
    sizes = dict(zip(("batch", "model"), shape))
    for path, dims in gemma_shapes(c).items():
        layout = layout_map[path]
        assert layout is not None and len(layout.axes) == len(dims), path
        for axis, dim in zip(layout.axes, dims):
            assert axis is None or dim % sizes[axis] == 0, (path, layout.axes, dims)
    # Several KV heads: split over the model axis like the query heads (KerasHub's map would too,
    # and Gemma 2's post norms, unmatched, are replicated).
    for layer in ("query", "key", "value"):
        assert layout_map[f"decoder_block_0/attention/{layer}/kernel"].axes[0] == "model"
    assert layout_map["decoder_block_0/post_ffw_norm/scale"] is None


def test_layout_shards_kv_heads_when_they_divide():
    gemma_7b = dict(GEMMA_2B, num_query_heads=16, num_key_value_heads=16, hidden_dim=3072)
    assert distribute.gemma_layout_map(mesh(1, 4), gemma_7b)["decoder_block_0/attention/value/kernel"].axes[0] == "model"


@pytest.mark.parametrize("layer", ["attention/query", "attention/value", "attention/attention_output", "ffw_linear"])
def test_lora_factors_follow_their_kernel(layer):
    layout_map = distribute.gemma_layout_map(mesh(2, 2), GEMMA_2B)
    kernel = layout_map[f"decoder_block_5/{layer}/kernel"].axes
    assert layout_map[f"decoder_block_5/{layer}/lora_kernel_a"].axes == (*kernel[:-1], None)
    assert layout_map[f"decoder_block_5/{layer}/lora_kernel_b"].axes == (None, kernel[-1])


# --- real training on 4 virtual devices --------------------------------------------------


# Each distributed setup and the one-device run of the same preset it must match.
ONE_DEVICE = {"data": "none", "model:2": "none", "tiny_gemma2@model:2": "tiny_gemma2@none",
              "tiny_gemma4@model:2": "tiny_gemma4@none", "fast/tiny_gemma4@model:2": "fast/tiny_gemma4@none"}


def planned_axes(path, shape, layout_map, variables):
    # AdamW's slots ("adam_w_2/decoder_block_0_attention_query_lora_kernel_a_momentum")
    # are created with their variable's layout; anything unmatched is replicated.
    prefix, _, name = path.partition("/")
    if prefix.startswith("adam_w") and name.endswith(("_momentum", "_velocity")):
        slot_of = name.rsplit("_", 1)[0]
        path = next(p for p in variables if p.replace("/", "_") == slot_of)
    planned = layout_map[path]
    return list(planned.axes) if planned is not None else [None] * len(shape)
