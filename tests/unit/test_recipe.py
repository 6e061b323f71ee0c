"""Recipe mode is the classic KerasHub recipe, step for step, on the tiny preset."""

import keras
import keras_hub
import numpy as np

from gemma_lora import data
from gemma_lora.model import layers, loading
from gemma_lora.training import engines


class LossRecorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.losses = []

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["loss"]))


def lora_values(causal_lm):
    return [np.array(v) for layer in layers.lora_layers(causal_lm) for v in (layer.lora_kernel_a, layer.lora_kernel_b)]


def test_recipe_mode_equals_a_hand_written_stock_run(tiny_preset, make_config):
    config = make_config(recipe=True, limit=6, test_rows=0, sequence_length=48)
    examples = data.split(data.load_examples(config), config).train
    texts = [data.full_text(e, config) for e in examples]

    # The classic recipe, written against stock KerasHub (its seed set only so
    # both runs start from the same LoRA initialisation).
    stock = keras_hub.models.GemmaCausalLM.from_preset(str(tiny_preset))
    keras.utils.set_random_seed(config.seed)
    stock.backbone.enable_lora(rank=4)
    stock.preprocessor.sequence_length = 48
    optimizer = keras.optimizers.AdamW(learning_rate=5e-5, weight_decay=0.01)
    optimizer.exclude_from_weight_decay(var_names=["bias", "scale"])
    stock.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        optimizer=optimizer,
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy()],
    )
    stock_losses = LossRecorder()
    # Stock KerasHub's string preprocessor, run eagerly: fit(texts) would map it
    # inside tf.data, where (with TensorFlow installed but the tokenizer built on
    # the Python path) tensorflow-text cannot find its SentencePiece resource.
    x, y, sample_weight = stock.preprocessor(texts)
    stock.preprocessor = None
    stock.fit(x, y, sample_weight=sample_weight, epochs=1, batch_size=1, callbacks=[stock_losses], verbose=0)

    ours = loading.load_causal_lm(tiny_preset, config.precision, config.sequence_length)
    loading.enable_lora(ours, config.lora_rank, config.lora_alpha, config.lora_targets, seed=config.seed)
    rows = data.tokenize_rows(examples, ours.preprocessor.tokenizer, config)
    assert rows.truncated > 0  # the truncation quirk is exercised
    engines.compile_for_training(ours, config)
    our_losses = LossRecorder()
    engines.fit(ours, rows, config, callbacks=[our_losses], verbose=0)

    assert len(our_losses.losses) == len(stock_losses.losses) == 6
    np.testing.assert_allclose(our_losses.losses, stock_losses.losses, rtol=1e-5)
    for mine, theirs in zip(lora_values(ours), lora_values(stock)):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-7)
