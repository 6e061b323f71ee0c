"""Train the tiny model a few steps under several layouts on virtual CPU devices; print JSON.

Run by tests/unit/test_distribute.py in a subprocess: JAX fixes its device count
when it starts, and the test process already started it with one device. A
setup is a layout (none, data, model:M), trained by the Keras engine, or by
the fast engine (packed rows) with the prefix fast/.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/distributed_worker.py none data model:2 fast/data

A setup is `[engine/][preset@]kind[:model_parallel]`, the engine "keras" and the preset
"tiny" unless named (e.g. tiny_gemma2@model:2, fast/tiny_gemma2@data).
"""

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import keras  # noqa: E402

from gemma_lora import data  # noqa: E402
from gemma_lora.config import resolve_config  # noqa: E402
from gemma_lora.model import loading, presets
from gemma_lora.parallel import distribute
from gemma_lora.training import engines, scoring

STEPS = 3
# A large learning rate, so that a few steps move the loss far more than the
# float tolerance the tests compare with (a layout that dropped a gradient
# all-reduce would show).
OVERRIDES = dict(preset="tiny", sequence_length=32, limit=16, validation_rows=0, test_rows=0,
                 batch_size=4, max_steps=STEPS, learning_rate=1e-2, lora_targets=["query", "value", "ffw_linear"])


def run(setup):
    engine, _, layout = setup.rpartition("/")
    engine = engine or "keras"
    name, _, layout = layout.rpartition("@")
    name = name or "tiny"
    kind, _, m = layout.partition(":")
    config = resolve_config(overrides=dict(OVERRIDES, preset=name, distribution=kind,
                                           **({"model_parallel": int(m)} if m else {})))
    preset = presets.tiny_preset_dir(name)
    plan = distribute.choose_plan(config, preset)
    keras.distribution.set_distribution(distribute.make_distribution(plan, distribute.backbone_config(preset)))
    causal_lm = loading.load_causal_lm(preset, "float32", config.sequence_length)
    loading.enable_lora(causal_lm, config.lora_rank, targets=config.lora_targets, seed=config.seed)
    rows = data.tokenize_rows(data.split(data.load_examples(config), config).train, causal_lm.preprocessor.tokenizer, config)
    engines.compile_for_training(causal_lm, config)
    # The loss before training is the same under every layout; scored once, on one device.
    before = scoring.token_loss(causal_lm, rows, config.batch_size)["token_loss"] if kind == "none" else None
    history = engines.fit(causal_lm, rows, config, verbose=0, engine=engines.ENGINES[engine]())
    after = scoring.token_loss(causal_lm, rows, config.batch_size)["token_loss"]
    variables = causal_lm.backbone.weights + causal_lm.optimizer.variables
    keras.distribution.set_distribution(None)
    return {
        "plan": {"kind": plan.kind, "mesh": list(plan.mesh)},
        "devices": len(jax.devices()),
        "before": before,
        "after": after,
        "iterations": int(causal_lm.optimizer.iterations.value),
        # The training steps' own loss, and the examples they held (packed rows, with the fast engine).
        "train_token_loss": history.history["token_loss"][-1],
        "examples": engines.ENGINES[engine]().plan(rows, config).examples_trained(1, STEPS)[0],
        "variables": {
            v.path: {
                "shape": list(v.shape),
                "spec": _spec(v.value.sharding),
                "shard_shapes": sorted({tuple(s.data.shape) for s in v.value.addressable_shards}),
                "devices": len(v.value.sharding.device_set),
            }
            for v in variables
        },
    }


def _spec(sharding):
    # One device (no distribution) has a SingleDeviceSharding, without a spec.
    spec = getattr(sharding, "spec", ())
    return [a if a is None or isinstance(a, str) else list(a) for a in spec]


if __name__ == "__main__":
    print("RESULT " + json.dumps({setup: run(setup) for setup in sys.argv[1:]}))
