"""The fast engine of `train` (engine="fast"): packed epochs, training, checkpoints, choice.

The math of the fast step is checked against KerasHub in test_fast.py; these
tests check what wiring it into the pipeline must keep: every example seen
once per epoch with its loss weights, a run that learns, checkpoints that
resume to the uninterrupted result, and a clear refusal where it cannot run.
"""

import keras
import keras_hub
import numpy as np
import pytest
from test_resume import CrashAt, adapter_arrays, assert_same_adapter

from gemma_lora.config import resolve_config
from gemma_lora.data import TokenizedRows
from gemma_lora.errors import ConfigError
from gemma_lora.model import presets
from gemma_lora.training import engines, fast_engine
from gemma_lora.training.run import run_training

SEQ = 32


def synthetic_rows(lengths, seed=0):
    """Rows of the given lengths: prompt of 3 tokens, response weighted, last position unweighted."""
    rng = np.random.default_rng(seed)
    n = len(lengths)
    token_ids = np.zeros((n, SEQ), np.int32)
    padding_mask = np.zeros((n, SEQ), bool)
    labels = np.zeros((n, SEQ), np.int32)
    weights = np.zeros((n, SEQ), np.float32)
    for i, length in enumerate(lengths):
        ids = rng.integers(1, 100, length + 1)
        token_ids[i, :length], padding_mask[i, :length] = ids[:length], True
        labels[i, : length - 1] = ids[1:length]
        weights[i, 3 : length - 1] = 1.0
    return TokenizedRows(token_ids, padding_mask, labels, weights, 0, int(padding_mask.sum()))


def test_a_packed_epoch_holds_every_example_once_with_its_weights():
    lengths = [5, 9, 30, 12, 7, 20, 6, 8, 11, 16, 4, 25, 10]
    rows = synthetic_rows(lengths)
    config = resolve_config(overrides=dict(preset="tiny", sequence_length=SEQ, batch_size=3, seed=1))
    batches = fast_engine.epoch_batches(rows, config, epoch=0)
    assert {b["token_ids"].shape for b in batches} == {(3, SEQ)}  # one shape: one compile
    stacked = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    assert (stacked["segment_ids"] > 0).sum() == sum(lengths)
    assert stacked["loss_weights"].sum() == rows.weights.sum()
    # Packing saved rows: fewer packed rows than examples.
    assert len(stacked["token_ids"]) < len(lengths)
    # Every example's tokens appear as one contiguous segment.
    found = sorted(
        tuple(row[seg == s]) for row, seg in zip(stacked["token_ids"], stacked["segment_ids"]) for s in set(seg) - {0}
    )
    assert found == sorted(tuple(rows.token_ids[i, :n]) for i, n in enumerate(lengths))
    # A pure function of (seed, epoch): a resumed run rebuilds the same batches.
    again = fast_engine.epoch_batches(rows, config, epoch=0)
    assert all(np.array_equal(a["token_ids"], b["token_ids"]) for a, b in zip(batches, again))
    other = fast_engine.epoch_batches(rows, config, epoch=1)
    assert any(not np.array_equal(a["token_ids"], b["token_ids"]) for a, b in zip(batches, other))
    assert engines.FastEngine().plan(rows, config).steps_per_epoch == len(batches)


RUN = dict(limit=20, validation_rows=4, test_rows=2, batch_size=2, epochs=2, checkpoint_every=3,
           learning_rate=5e-3, max_new_tokens=2, sequence_length=128, engine="fast")


def test_the_fast_engine_trains_and_resumes_to_the_uninterrupted_result(tmp_path, make_config, monkeypatch):
    lines = []
    run_training(make_config(**RUN, output_dir=str(tmp_path / "ref")), echo=lines.append)
    assert any(line.startswith("engine: fast") for line in lines)
    summary = __import__("json").loads((tmp_path / "ref" / "summary.json").read_text())
    assert summary["engine"] == "fast"
    # Packing fills rows better than length-bucketed padding does.
    assert summary["data"]["packed_real_token_fraction"] > summary["data"]["real_token_fraction"]
    assert summary["token_loss_after"]["validation"] < summary["token_loss_before"]["validation"]
    reference = adapter_arrays(tmp_path / "ref")

    config = make_config(**RUN, output_dir=str(tmp_path / "run"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(config, echo=lambda *a: None, callbacks=[CrashAt(7)])
    # The checkpoint (Keras format: weights and AdamW slots) holds the fast state.
    lines = []
    run_training(config, echo=lines.append, resume=True)
    assert any("resuming from step-00000006.npz: 6 optimizer steps (6 batches) done" in line for line in lines)
    assert_same_adapter(adapter_arrays(tmp_path / "run"), reference)


def _gemma1_lm():
    keras.utils.set_random_seed(0)
    return presets.build_tiny_causal_lm()


def test_auto_picks_fast_on_gpu_and_keras_on_cpu():
    lm = _gemma1_lm()
    config = resolve_config(overrides=dict(preset="tiny"))
    assert engines.choose(lm, config, "gpu").name == "fast"
    assert engines.choose(lm, config, "cpu").name == "keras"
    forced = resolve_config(overrides=dict(preset="tiny", engine="fast"))
    assert engines.choose(lm, forced, "cpu").name == "fast"
    keras_only = resolve_config(overrides=dict(preset="tiny", engine="keras"))
    assert engines.choose(lm, keras_only, "gpu").name == "keras"


def test_engine_fast_is_refused_where_it_cannot_run():
    lm = _gemma1_lm()
    quantized = resolve_config(overrides=dict(preset="tiny", engine="fast", quantize="int8"))
    with pytest.raises(ConfigError, match=r"quantize.*--engine keras"):
        engines.choose(lm, quantized, "gpu")
    assert engines.choose(lm, resolve_config(overrides=dict(preset="tiny", quantize="int8")), "gpu").name == "keras"
    backbone = keras_hub.models.GemmaBackbone(  # dropout: the fast path has none
        vocabulary_size=64, num_layers=1, num_query_heads=2, num_key_value_heads=1, hidden_dim=16,
        intermediate_dim=32, head_dim=8, dropout=0.1)
    dropout = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    with pytest.raises(ConfigError, match=r"Gemma 1, 2 and 3 \(text\) only.*dropout.*--engine keras"):
        engines.choose(dropout, resolve_config(overrides=dict(preset="tiny", engine="fast")), "gpu")
    assert engines.choose(dropout, resolve_config(overrides=dict(preset="tiny")), "gpu").name == "keras"
    with pytest.raises(ConfigError, match="engine='turbo' must be one of auto, keras, fast"):
        resolve_config(overrides=dict(preset="tiny", engine="turbo"))
