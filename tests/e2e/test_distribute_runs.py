"""Training on 4 virtual CPU devices against one device.

tests/distributed_worker.py runs in a subprocess with 4 virtual CPU devices
(XLA_FLAGS must be set before JAX starts, and this process already started
JAX with one device).
"""

import json
import os
import subprocess
import sys

import keras
import pytest
from conftest import REPO
from test_distribute import DEVICES, ONE_DEVICE, mesh, planned_axes  # noqa: F401  (helpers and fixtures of the unit tests)

from gemma_lora.errors import ConfigError
from gemma_lora.parallel import distribute


@pytest.fixture(scope="module")
def trained():
    """Losses and variable shardings after a few steps: one device, data parallel, 2x2 model parallel."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    worker = os.path.join(REPO, "tests", "distributed_worker.py")
    done = subprocess.run([sys.executable, worker, "none", "data", "model:2", "fast/none", "fast/data", "fast/model:2",
                           "tiny_gemma2@none", "tiny_gemma2@model:2", "tiny_gemma4@none", "tiny_gemma4@model:2",
                           "fast/tiny_gemma4@none", "fast/tiny_gemma4@model:2"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def test_pipeline_refuses_more_parallelism_than_devices_and_leaves_nothing(make_config, tmp_path):
    from gemma_lora.training.run import run_training

    run_dir = tmp_path / "run"
    config = make_config(distribution="model", model_parallel=2, output_dir=str(run_dir))
    with pytest.raises(ConfigError, match="model_parallel=2 needs a device count"):
        run_training(config, echo=lambda line: None)
    assert not run_dir.exists()
    assert keras.distribution.distribution() is None  # the caller's (no) distribution is back


@pytest.mark.slow
def test_worker_saw_the_devices_and_trained(trained):
    from distributed_worker import STEPS

    single = trained["none"]
    assert single["devices"] == DEVICES and single["plan"]["kind"] == "none"
    assert trained["data"]["plan"] == {"kind": "data", "mesh": [DEVICES, 1]}
    assert trained["model:2"]["plan"] == {"kind": "model", "mesh": [2, 2]}
    assert trained["fast/model:2"]["plan"] == {"kind": "model", "mesh": [2, 2]}
    assert all(run["iterations"] == STEPS for run in trained.values())


@pytest.mark.slow
@pytest.mark.parametrize("setup", sorted(ONE_DEVICE))
def test_distributed_loss_matches_one_device(trained, setup):
    single, other = trained[ONE_DEVICE[setup]], trained[setup]
    tolerance = 1e-5 * abs(single["after"])  # float32 sums in another order
    # The steps moved the loss by far more than the tolerance, so a layout that
    # trained differently (a lost gradient reduction, a skipped shard) would show.
    assert abs(single["before"] - single["after"]) > 100 * tolerance
    assert other["after"] == pytest.approx(single["after"], abs=tolerance)


@pytest.mark.slow
@pytest.mark.parametrize("setup", ["fast/data", "fast/model:2"])
def test_the_fast_engine_on_four_devices_matches_one_device(trained, setup):
    single, other = trained["fast/none"], trained[setup]
    tolerance = 1e-5 * abs(single["after"])
    assert abs(trained["none"]["before"] - single["after"]) > 100 * tolerance  # the packed steps trained
    assert other["after"] == pytest.approx(single["after"], abs=tolerance)
    assert other["train_token_loss"] == pytest.approx(single["train_token_loss"], rel=1e-5)
    # Packing is the host's: the same examples in the same steps, whatever the devices.
    assert other["examples"] == single["examples"]
    assert other["iterations"] == single["iterations"]


@pytest.mark.slow
def test_data_parallel_replicates_every_variable(trained):
    for path, v in trained["data"]["variables"].items():
        assert v["devices"] == DEVICES and v["shard_shapes"] == [v["shape"]], path


@pytest.mark.slow
def test_model_parallel_shards_as_planned(trained, tiny_preset):
    layout_map = distribute.gemma_layout_map(mesh(2, 2), distribute.backbone_config(tiny_preset))
    sizes = {"batch": 2, "model": 2}
    variables = trained["model:2"]["variables"]
    for path, v in variables.items():
        axes = planned_axes(path, v["shape"], layout_map, variables)
        assert v["devices"] == DEVICES, path
        assert v["spec"] + [None] * (len(axes) - len(v["spec"])) == axes, path
        expected = [dim // sizes[a] if a else dim for dim, a in zip(v["shape"], axes)]
        assert v["shard_shapes"] == [expected], path
    query = variables["decoder_block_0/attention/query/kernel"]
    assert query["shard_shapes"][0][0] == query["shape"][0] // 2  # heads split over the model axis
    key = variables["decoder_block_0/attention/key/kernel"]
    assert key["shard_shapes"][0][0] == key["shape"][0] == 1  # the single KV head whole
    lora = variables["decoder_block_0/attention/query/lora_kernel_a"]
    assert lora["spec"] == query["spec"][:2] + [None]
    assert any(path.endswith("lora_kernel_a_momentum") for path in variables)


@pytest.mark.slow
def test_gemma2_model_parallel_splits_its_kv_heads(trained, tiny_gemma2_preset):
    """tiny_gemma2's 2 KV heads split over the 2-device model axis (tiny's single one cannot)."""
    variables = trained["tiny_gemma2@model:2"]["variables"]
    layout_map = distribute.gemma_layout_map(mesh(2, 2), distribute.backbone_config(tiny_gemma2_preset))
    for path, v in variables.items():
        axes = planned_axes(path, v["shape"], layout_map, variables)
        assert v["spec"] + [None] * (len(axes) - len(v["spec"])) == axes, path
    for layer in ("key", "value"):
        kernel = variables[f"decoder_block_0/attention/{layer}/kernel"]
        assert kernel["shape"][0] == 2 and kernel["shard_shapes"][0][0] == 1
    norm = variables["decoder_block_1/post_attention_norm/scale"]
    assert norm["devices"] == DEVICES and all(a is None for a in norm["spec"])  # replicated


@pytest.mark.slow
def test_gemma4_model_parallel_splits_heads_and_keeps_its_single_global_kv_head_whole(trained, tiny_gemma4_preset):
    """tiny_gemma4 on a 2 x 2 mesh: query heads and the sliding layer's 2 KV heads split, the global layer's
    one KV head (K = V) cannot, and both engines train to the one-device loss (test above)."""
    variables = trained["tiny_gemma4@model:2"]["variables"]
    layout_map = distribute.gemma_layout_map(mesh(2, 2), distribute.backbone_config(tiny_gemma4_preset))
    for path, v in variables.items():
        axes = planned_axes(path, v["shape"], layout_map, variables)
        assert v["spec"] + [None] * (len(axes) - len(v["spec"])) == axes, path
    assert variables["decoder_block_1/attention/query/kernel"]["shard_shapes"][0][0] == 2  # 4 heads over 2
    for block in (0, 1):  # gcd(2 KV heads, 1 global KV head) = 1: the key/value head axis stays whole
        key = variables[f"decoder_block_{block}/attention/key/kernel"]
        assert key["shard_shapes"][0][0] == key["shape"][0]
    assert "decoder_block_1/attention/value/kernel" not in variables  # K = V: no value projection
