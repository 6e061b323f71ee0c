"""The fast JAX path computes what KerasHub's GemmaCausalLM and Gemma3CausalLM compute.

A tiny GemmaBackbone (vocab 128, 2 layers, hidden 32), a tiny text-only
Gemma3Backbone (6 layers: sliding-window and global) and a tiny Gemma 2 (a
GemmaBackbone with post norms, alternating window-4 and global layers, 2 KV
heads and both soft caps) in float32 are the references; the fast path runs in
float32 for exact comparisons and in bfloat16 where the check is only about
behaviour.
"""

import dataclasses
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from conftest import REPO  # noqa: E402

sys.path.insert(0, os.path.join(REPO, "scripts"))
import fast_trainer  # noqa: E402  (scripts/: the benchmark's own trainer)
from conftest import TINY_VOCAB as VOCAB  # noqa: E402
from conftest import build_tiny_gemma, build_tiny_gemma2, build_tiny_gemma3
from numerics import assert_close_at_scale  # noqa: E402

from gemma_lora.data.packing import pack, real_token_fraction  # noqa: E402
from gemma_lora.errors import ConfigError  # noqa: E402
from gemma_lora.fast import extract, forward  # noqa: E402

SEQ = 16

# Jitted once per config: eager dispatch of every op would dominate the run time.
_logits = jax.jit(forward.logits, static_argnums=0)
_loss_sums = jax.jit(forward.loss_sums, static_argnums=0)


@pytest.fixture(scope="module")
def lm():
    return build_tiny_gemma()


@pytest.fixture(scope="module")
def params(lm):
    # loss_chunk=7 does not divide the token count: exercises chunk padding.
    return extract.extract_params(lm, dtype="float32", loss_chunk=7)


def _keras_logits(lm, token_ids, padding_mask):
    out = lm({"token_ids": token_ids, "padding_mask": padding_mask})
    return np.asarray(out, np.float64)


def _unpacked_batch(rng, lengths):
    """Rows holding one example each, padded at the end."""
    examples = []
    for length in lengths:
        ids = rng.integers(1, VOCAB, length)
        examples.append((ids, np.ones(length)))
    rows = [pack([e], SEQ) for e in examples]
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


@pytest.mark.parametrize("scan_layers", [False, True])
def test_logits_match_kerashub_float32(lm, params, scan_layers):
    config, frozen, lora = params
    if scan_layers:
        config, frozen, lora = extract.extract_params(
            lm, dtype="float32", loss_chunk=7, scan_layers=True
        )
    batch = _unpacked_batch(np.random.default_rng(1), [SEQ, 11, 5])
    real = batch["segment_ids"] > 0
    ref = _keras_logits(lm, batch["token_ids"], real.astype("int32"))
    got = np.asarray(
        _logits(
            config, frozen, lora, batch["token_ids"], batch["segment_ids"], batch["positions"]
        )
    )
    # Only real positions: KerasHub lets padding queries attend to real tokens,
    # the fast path keeps padding to itself; nothing reads padding outputs.
    err = np.abs(got - ref)[real].max() / np.abs(ref[real]).max()
    assert err < 1e-5


def test_bfloat16_path_is_close_to_float32(lm):
    config, frozen, lora = extract.extract_params(lm, dtype="bfloat16")
    assert frozen["embedding"].dtype == jnp.bfloat16
    assert lora[0]["query"]["lora_kernel_a"].dtype == jnp.float32
    batch = _unpacked_batch(np.random.default_rng(2), [SEQ, SEQ])
    ref = _keras_logits(lm, batch["token_ids"], np.ones((2, SEQ), "int32"))
    got = np.asarray(
        _logits(
            config, frozen, lora, batch["token_ids"], batch["segment_ids"], batch["positions"]
        )
    )
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 3e-2


def test_lora_shapes_match_keras(lm, params):
    config, _, lora = params
    for target in config.lora_targets:
        for i, block in enumerate(lm.backbone.transformer_layers):
            layer = extract.layer_of(block, target)
            for name in ("lora_kernel_a", "lora_kernel_b"):
                keras_value = np.asarray(getattr(layer, name).value)
                mine = extract.layer_lora(config, lora, i)[target][name]
                np.testing.assert_array_equal(np.asarray(mine), keras_value)
    trainable = sum(x.size for x in jax.tree.leaves(lora))
    # Per layer: query A (2 heads x 32 x 4) + B (4 x 16), value A (1 x 32 x 4) + B.
    assert trainable == 2 * (2 * 32 * 4 + 4 * 16 + 32 * 4 + 4 * 16)


def _reference_nll(logits, labels, weights):
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    return -jnp.sum(picked * weights), jnp.sum(weights)


def test_loss_matches_loss_from_kerashub_logits(lm, params):
    config, frozen, lora = params
    rng = np.random.default_rng(3)
    batch = _unpacked_batch(rng, [SEQ, 9, 13])
    batch["loss_weights"] *= rng.uniform(0.5, 2.0, batch["loss_weights"].shape)
    ref_logits = _keras_logits(lm, batch["token_ids"], (batch["segment_ids"] > 0).astype("int32"))
    ref_nll, ref_weight = _reference_nll(ref_logits, batch["labels"], batch["loss_weights"])
    nll, weight = _loss_sums(config, frozen, lora, batch)
    np.testing.assert_allclose(float(weight), float(ref_weight), rtol=1e-6)
    np.testing.assert_allclose(float(nll), float(ref_nll), rtol=1e-5)


def test_loss_gradient_matches_autodiff(params):
    # The loss' hand-written backward (dh computed with the forward) must give
    # the gradient plain autodiff through full logits gives.
    config, frozen, lora = params
    batch = _unpacked_batch(np.random.default_rng(4), [SEQ, 10])

    def fused(lora):
        nll, weight = _loss_sums(config, frozen, lora, batch)
        return nll / weight

    def plain(lora):
        out = _logits(
            config, frozen, lora, batch["token_ids"], batch["segment_ids"], batch["positions"]
        )
        nll, weight = _reference_nll(out, batch["labels"], batch["loss_weights"])
        return nll / weight

    got, want = jax.jit(jax.grad(fused))(lora), jax.jit(jax.grad(plain))(lora)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert_close_at_scale(np.asarray(g), np.asarray(w), rtol=1e-4)


def test_pack_labels_weights_and_positions():
    prompt_then_response = ([5, 6, 7, 8], [0.0, 0.0, 1.0, 1.0])
    short = ([9, 10], [1.0, 1.0])
    rows = pack([short, prompt_then_response], sequence_length=8)
    assert rows["token_ids"].shape == (1, 8)
    # Longest first, then the short one, then padding.
    np.testing.assert_array_equal(rows["token_ids"][0], [5, 6, 7, 8, 9, 10, 0, 0])
    np.testing.assert_array_equal(rows["segment_ids"][0], [1, 1, 1, 1, 2, 2, 0, 0])
    np.testing.assert_array_equal(rows["positions"][0], [0, 1, 2, 3, 0, 1, 0, 0])
    # Labels never cross into the next example.
    np.testing.assert_array_equal(rows["labels"][0], [6, 7, 8, 0, 10, 0, 0, 0])
    # Prompt weights kept as given; last token of each example and padding 0.
    np.testing.assert_array_equal(rows["loss_weights"][0], [0, 0, 1, 0, 1, 0, 0, 0])
    assert real_token_fraction(rows) == 6 / 8


def test_pack_fills_rows_and_truncates():
    examples = [([1] * n, [1.0] * n) for n in (5, 3, 4, 2, 12)]
    rows = pack(examples, sequence_length=8)
    # 12 is cut to 8; 5+3 and 4+2 fill the other rows first-fit decreasing.
    assert rows["token_ids"].shape == (3, 8)
    assert real_token_fraction(rows) == (8 + 8 + 6) / 24


def test_packed_example_does_not_see_its_neighbour(lm, params):
    config, frozen, lora = params
    rng = np.random.default_rng(5)
    first = rng.integers(1, VOCAB, 9)
    second = rng.integers(1, VOCAB, 6)
    rows = pack([(first, np.ones(9)), (second, np.ones(6))], SEQ)
    assert rows["segment_ids"][0, 9] == 2  # `second` sits after `first`.
    packed = np.asarray(
        _logits(config, frozen, lora, rows["token_ids"], rows["segment_ids"], rows["positions"])
    )[0, 9:15]
    alone = _keras_logits(lm, second[None].astype("int32"), np.ones((1, 6), "int32"))[0]
    np.testing.assert_allclose(packed, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("build", [build_tiny_gemma, build_tiny_gemma2], ids=["gemma", "gemma2"])
def test_training_lowers_loss_compiles_once_keeps_base_and_writes_back(build):
    lm = build(seed=7)
    config, frozen, lora = extract.extract_params(lm, dtype="float32", loss_chunk=16)
    frozen_before = jax.tree.map(np.array, frozen)
    lora_before = jax.tree.map(np.array, lora)
    rng = np.random.default_rng(6)
    batch = pack([(rng.integers(1, VOCAB, n), np.ones(n)) for n in (9, 7, 16, 12)], SEQ)
    # Same shapes, other contents and packing: must not trigger a recompile.
    other = pack([(rng.integers(1, VOCAB, n), np.ones(n)) for n in (5, 6, 16, 4, 3)], SEQ)
    step = fast_trainer.make_train_step(config, fast_trainer.AdamW(learning_rate=1e-2, weight_decay=0.01))
    opt_state = step.init(lora)
    losses = []
    for i in range(10):
        lora, opt_state, sums = step(frozen, lora, opt_state, other if i % 2 else batch)
        if i % 2 == 0:
            losses.append(float(sums["nll_sum"] / sums["weight_sum"]))
    assert losses[-1] < losses[0] - 0.1
    assert step.traces == 1  # compiled once
    for before, after in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(before, np.asarray(after))
    for before, after in zip(jax.tree.leaves(lora_before), jax.tree.leaves(lora)):
        assert not np.array_equal(before, np.asarray(after))

    fast_trainer.write_back(lm, config, lora)
    want = np.asarray(
        _logits(config, frozen, lora, batch["token_ids"], batch["segment_ids"], batch["positions"])
    )
    # Unpacked row: the first row of `batch` holds one 16-token example.
    assert batch["segment_ids"][0].tolist() == [1] * SEQ
    got = _keras_logits(lm, batch["token_ids"][:1], np.ones((1, SEQ), "int32"))
    np.testing.assert_allclose(want[:1], got, rtol=1e-5, atol=1e-5)


def test_adamw_matches_keras():
    rng = np.random.default_rng(9)
    params = {
        "w": {"lora_kernel_a": rng.normal(size=(3, 2)).astype("float32")},
        "norm": {"scale": rng.normal(size=(4,)).astype("float32")},
    }
    grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype("float32"), params) for _ in range(3)]
    ours = fast_trainer.AdamW(learning_rate=0.1, weight_decay=0.1)
    state, mine = ours.init(params), params
    for g in grads:
        mine, state = ours.update(mine, g, state)

    variables = {
        "a": keras.Variable(params["w"]["lora_kernel_a"], name="lora_kernel_a"),
        "s": keras.Variable(params["norm"]["scale"], name="scale"),
    }
    theirs = keras.optimizers.AdamW(learning_rate=0.1, weight_decay=0.1)
    theirs.exclude_from_weight_decay(var_names=["bias", "scale"])
    for g in grads:
        theirs.apply(
            [g["w"]["lora_kernel_a"], g["norm"]["scale"]], [variables["a"], variables["s"]]
        )
    np.testing.assert_allclose(mine["w"]["lora_kernel_a"], variables["a"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(mine["norm"]["scale"], variables["s"].numpy(), rtol=1e-6)


# ------------------------------------------------------------------ Gemma 3


@pytest.fixture(scope="module")
def gemma3_lm():
    return build_tiny_gemma3()


def test_gemma3_logits_match_kerashub_float32(gemma3_lm):
    config, frozen, lora = extract.extract_params(gemma3_lm, dtype="float32")
    assert [spec[0] for spec in config.layer_attention] == [4, 4, 4, 4, 4, 0]
    assert config.query_key_norm and config.post_attention_norm and config.post_ffw_norm
    batch = _unpacked_batch(np.random.default_rng(11), [SEQ, 11, 5])
    real = batch["segment_ids"] > 0
    ref = _keras_logits(gemma3_lm, batch["token_ids"], real.astype("int32"))

    def relative_error(config):
        got = np.asarray(
            _logits(config, frozen, lora, batch["token_ids"], batch["segment_ids"], batch["positions"])
        )
        return np.abs(got - ref)[real].max() / np.abs(ref[real]).max()

    assert relative_error(config) < 1e-5
    # The window and the global layer's RoPE matter at this size: dropping
    # either is caught.
    all_global = ((0, 10_000.0, 1.0),) * 6
    assert relative_error(dataclasses.replace(config, layer_attention=all_global)) > 1e-3
    unscaled = config.layer_attention[:5] + ((0, 1_000_000.0, 1.0),)
    assert relative_error(dataclasses.replace(config, layer_attention=unscaled)) > 1e-4


def test_gemma3_packed_examples_match_each_alone(gemma3_lm):
    config, frozen, lora = extract.extract_params(gemma3_lm, dtype="float32")
    rng = np.random.default_rng(12)
    first, second = rng.integers(1, VOCAB, 9), rng.integers(1, VOCAB, 6)
    rows = pack([(first, np.ones(9)), (second, np.ones(6))], SEQ)
    packed = np.asarray(
        _logits(config, frozen, lora, rows["token_ids"], rows["segment_ids"], rows["positions"])
    )[0]
    for example, start in ((first, 0), (second, 9)):
        alone = _keras_logits(gemma3_lm, example[None].astype("int32"), np.ones((1, len(example)), "int32"))[0]
        np.testing.assert_allclose(packed[start : start + len(example)], alone, rtol=1e-5, atol=1e-5)


def test_gemma3_with_soft_caps_matches_kerashub_float32():
    """Gemma3Backbone takes Gemma 2's soft caps too (no preset sets them); the same code applies them."""
    lm = build_tiny_gemma3(attention_logit_soft_cap=5.0, final_logit_soft_cap=3.0)
    config, frozen, lora = extract.extract_params(lm, dtype="float32")
    assert (config.attention_logit_soft_cap, config.final_logit_soft_cap) == (5.0, 3.0)
    batch = _unpacked_batch(np.random.default_rng(15), [SEQ, 11])
    real = batch["segment_ids"] > 0
    ref = _keras_logits(lm, batch["token_ids"], real.astype("int32"))
    got = np.asarray(_logits(config, frozen, lora, batch["token_ids"], batch["segment_ids"], batch["positions"]))
    assert np.abs(got - ref)[real].max() / np.abs(ref[real]).max() < 1e-5


def test_gemma3_layers_that_differ_cannot_be_scanned(gemma3_lm):
    with pytest.raises(ConfigError, match="scan_layers needs every layer to attend alike"):
        extract.extract_params(gemma3_lm, dtype="float32", scan_layers=True)


def test_dropout_is_refused_with_the_reason():
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=VOCAB, num_layers=1, num_query_heads=2, num_key_value_heads=1,
        hidden_dim=16, intermediate_dim=32, head_dim=8, dropout=0.1,
    )
    lm = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    with pytest.raises(ConfigError, match=r"Gemma 1, 2 and 3 \(text\) only.*dropout.*Keras path"):
        extract.extract_params(lm)


# ------------------------------------------------------------------ Gemma 2


@pytest.fixture(scope="module")
def gemma2_lm():
    return build_tiny_gemma2()


@pytest.fixture(scope="module")
def gemma2_params(gemma2_lm):
    return extract.extract_params(gemma2_lm, dtype="float32", loss_chunk=7)


def test_gemma2_is_read_as_kerashub_builds_it(gemma2_params):
    config, frozen, lora = gemma2_params
    assert [spec[0] for spec in config.layer_attention] == [4, 0, 4, 0]  # layer 0 slides, then every other
    assert config.post_attention_norm and config.post_ffw_norm and not config.query_key_norm
    assert (config.attention_logit_soft_cap, config.final_logit_soft_cap) == (5.0, 3.0)
    assert config.num_key_value_heads == 2
    assert {"post_attention_norm", "post_ffw_norm"} <= set(frozen["layers"][0])
    assert [forward.attention_path(config, i) for i in range(4)] == ["soft-capped"] * 4


@pytest.mark.slow
def test_gemma2_logits_match_kerashub_float32_and_need_every_feature(gemma2_lm, gemma2_params):
    """Within 1e-5; leaving out either soft cap, the window or the post norms breaks the match."""
    config, frozen, lora = gemma2_params
    batch = _unpacked_batch(np.random.default_rng(11), [SEQ, 11, 5])
    real = batch["segment_ids"] > 0
    ref = _keras_logits(gemma2_lm, batch["token_ids"], real.astype("int32"))

    def relative_error(config):
        got = np.asarray(
            _logits(config, frozen, lora, batch["token_ids"], batch["segment_ids"], batch["positions"])
        )
        return np.abs(got - ref)[real].max() / np.abs(ref[real]).max()

    assert relative_error(config) < 1e-5
    # Slices of 5 queries (not dividing 16): the sliced attention gives the same logits.
    assert relative_error(dataclasses.replace(config, attention_chunk=5)) < 1e-5
    for broken in (
        dict(attention_logit_soft_cap=None),
        dict(final_logit_soft_cap=None),
        dict(layer_attention=((0, 10_000.0, 1.0),) * 4),
        dict(post_attention_norm=False, post_ffw_norm=False),
    ):
        assert relative_error(dataclasses.replace(config, **broken)) > 1e-3, broken


@pytest.mark.slow
def test_gemma2_packed_examples_match_each_alone(gemma2_lm, gemma2_params):
    config, frozen, lora = gemma2_params
    config = dataclasses.replace(config, attention_chunk=6)  # slices that straddle the examples
    rng = np.random.default_rng(12)
    first, second = rng.integers(1, VOCAB, 9), rng.integers(1, VOCAB, 6)
    rows = pack([(first, np.ones(9)), (second, np.ones(6))], SEQ)
    packed = np.asarray(
        _logits(config, frozen, lora, rows["token_ids"], rows["segment_ids"], rows["positions"])
    )[0]
    for example, start in ((first, 0), (second, 9)):
        alone = _keras_logits(gemma2_lm, example[None].astype("int32"), np.ones((1, len(example)), "int32"))[0]
        np.testing.assert_allclose(packed[start : start + len(example)], alone, rtol=1e-5, atol=1e-5)


def test_gemma2_loss_matches_kerashub_and_its_gradient_autodiff(gemma2_lm, gemma2_params):
    """The loss head's hand-written gradient goes through the final soft cap; the sliced
    attention's recomputation gives autodiff's gradient."""
    config, frozen, lora = gemma2_params
    rng = np.random.default_rng(13)
    batch = _unpacked_batch(rng, [SEQ, 9, 13])
    batch["loss_weights"] *= rng.uniform(0.5, 2.0, batch["loss_weights"].shape)
    ref_logits = _keras_logits(gemma2_lm, batch["token_ids"], (batch["segment_ids"] > 0).astype("int32"))
    ref_nll, _ = _reference_nll(ref_logits, batch["labels"], batch["loss_weights"])
    nll, weight = _loss_sums(config, frozen, lora, batch)
    np.testing.assert_allclose(float(nll), float(ref_nll), rtol=1e-5)

    sliced = dataclasses.replace(config, attention_chunk=5)

    def fused(lora):
        nll, weight = _loss_sums(sliced, frozen, lora, batch)
        return nll / weight

    def plain(lora):
        out = _logits(config, frozen, lora, batch["token_ids"], batch["segment_ids"], batch["positions"])
        nll, weight = _reference_nll(out, batch["labels"], batch["loss_weights"])
        return nll / weight

    got, want = jax.jit(jax.grad(fused))(lora), jax.jit(jax.grad(plain))(lora)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert_close_at_scale(np.asarray(g), np.asarray(w), rtol=1e-4)


def test_gemma2_bfloat16_path_is_close_to_float32(gemma2_lm):
    config, frozen, lora = extract.extract_params(gemma2_lm, dtype="bfloat16")
    batch = _unpacked_batch(np.random.default_rng(14), [SEQ, SEQ])
    ref = _keras_logits(gemma2_lm, batch["token_ids"], np.ones((2, SEQ), "int32"))
    got = np.asarray(_logits(config, frozen, lora, batch["token_ids"], batch["segment_ids"], batch["positions"]))
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 3e-2


def test_cudnn_attention_is_refused_for_soft_capped_layers(gemma2_lm):
    with pytest.raises(ConfigError, match=r"attention='cudnn' cannot apply .* soft cap \(5;.*attention='auto'"):
        extract.extract_params(gemma2_lm, attention="cudnn")
