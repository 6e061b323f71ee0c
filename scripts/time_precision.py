"""Time LoRA training steps on the CPU per dtype policy (evidence for docs/precision.md).

    for p in float32 bfloat16 mixed_bfloat16; do python scripts/time_precision.py $p; done

One precision per process, so each gets a fresh JAX runtime. Random weights and
tokens: only speed is measured here.
"""

import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

BATCH, LENGTH, VOCAB, STEPS = 4, 256, 8192, 12


def main(precision):
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=VOCAB, num_layers=4, num_query_heads=4, num_key_value_heads=1,
        hidden_dim=512, intermediate_dim=2048, head_dim=128, dtype=precision,
    )
    causal_lm = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    backbone.enable_lora(4)
    optimizer = keras.optimizers.AdamW(5e-5, weight_decay=0.01)
    optimizer.exclude_from_weight_decay(var_names=["bias", "scale"])
    causal_lm.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy()],
    )
    rows = BATCH * STEPS
    x = {
        "token_ids": np.random.randint(0, VOCAB, (rows, LENGTH)).astype("int32"),
        "padding_mask": np.ones((rows, LENGTH), bool),
    }
    y = np.random.randint(0, VOCAB, (rows, LENGTH)).astype("int32")
    # keras.Model.fit on arrays: KerasHub's fit would build a dataset pipeline.
    keras.Model.fit(causal_lm, x, y, batch_size=BATCH, epochs=1, verbose=0, steps_per_epoch=2)  # warm-up
    start = time.perf_counter()
    keras.Model.fit(causal_lm, x, y, batch_size=BATCH, epochs=1, verbose=0)
    seconds = time.perf_counter() - start
    print(f"{precision}: {STEPS / seconds:.2f} steps/s, {STEPS * BATCH * LENGTH / seconds:.0f} tokens/s")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "float32")
