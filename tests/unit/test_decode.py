"""The package's decoder: KerasHub's greedy tokens, one compilation, continuous batching, stops."""

import dataclasses

import numpy as np
import pytest
from conftest import TINY_VOCAB, build_tiny_gemma, build_tiny_gemma2, build_tiny_gemma3

from gemma_lora.fast import decode
from gemma_lora.model import loading
from gemma_lora.sampling import keras_hub_batch

MAX_NEW = 12
EOS = 1  # the tiny models built here have no tokenizer; any id can play <eos>


@pytest.fixture(scope="module")
def gemma():
    return build_tiny_gemma(seed=3)


@pytest.fixture(scope="module")
def gemma3():
    return build_tiny_gemma3(seed=3)


@pytest.fixture(scope="module")
def gemma2():
    return build_tiny_gemma2(seed=3)


def prompts(seed, lengths):
    rng = np.random.default_rng(seed)
    return [[2, *map(int, rng.integers(3, TINY_VOCAB, n - 1))] for n in lengths]


def assert_same_greedy_tokens(lm, mine, theirs, prompts):
    """Equal tokens, except where KerasHub's top two logits tie within float noise (then equal up to there)."""
    for prompt, a, b in zip(prompts, mine, theirs):
        if a == b:
            continue
        step = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
        ids = np.asarray([prompt + a[:step]], np.int32)
        logits = np.asarray(lm({"token_ids": ids, "padding_mask": np.ones_like(ids, bool)}))[0, -1]
        assert abs(logits[a[step]] - logits[b[step]]) < 1e-5, (step, a, b)


@pytest.mark.parametrize("which", ["gemma", "gemma3", "gemma2"])
def test_greedy_tokens_equal_kerashub_generate(which, gemma, gemma3, gemma2):
    """Same prompts, same batch layout: the decoder writes the tokens KerasHub's generate writes.

    Gemma 2 and 3's local layers see 4 tokens back, far fewer than a prompt and
    its answer; Gemma 2's attention soft cap binds on its tiny weights.
    """
    lm = {"gemma": gemma, "gemma3": gemma3, "gemma2": gemma2}[which]
    batch = prompts(0, [5, 17, 9, 33])
    mine = decode.decode_tokens(lm, batch, MAX_NEW, [EOS], slots=4)
    theirs = keras_hub_batch(lm, batch, MAX_NEW, EOS)
    assert all(len(t) == MAX_NEW or t[-1] == EOS for t in mine)
    assert_same_greedy_tokens(lm, mine, theirs, batch)


def test_second_call_with_other_row_counts_compiles_nothing(gemma):
    decode.decode_tokens(gemma, prompts(1, [6, 20, 11]), MAX_NEW, [EOS], slots=4)
    traces = dict(decode.TRACES)
    decode.decode_tokens(gemma, prompts(2, [7, 9, 30, 12, 8, 15, 4]), MAX_NEW, [EOS], slots=4)
    decode.decode_tokens(gemma, prompts(3, [10]), MAX_NEW, [EOS], slots=4)
    assert decode.TRACES == traces


def test_more_rows_than_slots_give_each_row_its_own_answer(gemma):
    """Rows refill freed slots (continuous batching); each answer equals the row decoded alone."""
    rows = prompts(4, [3, 40, 8, 8, 25, 6, 12, 19, 5])
    together = decode.decode_tokens(gemma, rows, MAX_NEW, [EOS], slots=3)
    alone = [decode.decode_tokens(gemma, [row], MAX_NEW, [EOS], slots=3)[0] for row in rows]
    assert together == alone


def test_a_stop_token_ends_its_row_and_is_kept(gemma):
    rows = prompts(5, [9, 14, 6])
    free = decode.decode_tokens(gemma, rows, MAX_NEW, [], slots=4)
    assert all(len(t) == MAX_NEW for t in free)
    stop = free[1][3]  # row 1's fourth token
    stopped = decode.decode_tokens(gemma, rows, MAX_NEW, [stop], slots=4)
    assert stopped[1] == free[1][: free[1].index(stop) + 1]
    for got, full in zip(stopped, free):  # every row stops at its first `stop`, or runs on unchanged
        assert got == (full[: full.index(stop) + 1] if stop in full else full)


def test_a_row_the_host_ends_stops_early(gemma):
    rows = prompts(6, [9, 14])
    full = decode.decode_tokens(gemma, rows, MAX_NEW, [], slots=2)
    cut = decode.decode_tokens(gemma, rows, MAX_NEW, [], slots=2, ended=lambda row, tokens: row == 0 and len(tokens) >= 2)
    assert cut[1] == full[1]
    assert 2 <= len(cut[0]) < MAX_NEW and cut[0] == full[0][: len(cut[0])]


@pytest.mark.slow
def test_gemma2_decoding_applies_both_soft_caps(gemma2):
    """Each decoded step's logits are the model's: the attention cap inside, the final cap outside."""
    import jax.numpy as jnp

    config, frozen = decode.inference_params(gemma2)
    assert (config.attention_logit_soft_cap, config.final_logit_soft_cap) == (5.0, 3.0)
    prompt = prompts(8, [12])[0]
    caches = decode.empty_cache(config, 1, decode.CACHE_MULTIPLE)
    ids = np.asarray([prompt], np.int32)
    positions = jnp.arange(len(prompt))[None]
    h, _ = decode._forward(config, frozen, caches, None, jnp.asarray(ids), positions, jnp.ones(ids.shape, bool))
    raw = np.asarray(h[0], np.float64) @ np.asarray(frozen["embedding"], np.float64).T
    logits = config.final_logit_soft_cap * np.tanh(raw / config.final_logit_soft_cap)
    want = np.asarray(gemma2({"token_ids": ids, "padding_mask": np.ones_like(ids, bool)}))[0]
    np.testing.assert_allclose(logits, want, atol=1e-5 * np.abs(want).max())
    for table in (None, decode.shortlist_table(config, frozen)):
        top, _ = decode._next_token(config, frozen, h[0, -1:], decode.Sampling(greedy=False, top_k=3), decode.jax.random.key(0), table)
        assert int(top[0]) in np.argsort(want[-1])[-3:]


@pytest.mark.parametrize("which", ["gemma", "gemma3", "gemma2"])
def test_the_bfloat16_shortlist_writes_the_float32_decoders_tokens(which, gemma, gemma3, gemma2):
    """The token is chosen by float32 logits among bfloat16's top SHORTLIST: the same greedy answers."""
    lm = {"gemma": gemma, "gemma3": gemma3, "gemma2": gemma2}[which]
    rows = prompts(9, [5, 17, 9, 33, 12, 3])
    exact = decode.decode_tokens(lm, rows, MAX_NEW, [EOS], slots=4, shortlist=False)
    short = decode.decode_tokens(lm, rows, MAX_NEW, [EOS], slots=4, shortlist=True)
    assert_same_greedy_tokens(lm, short, exact, rows)


def test_shortlist_only_for_float32_models_where_bfloat16_is_native(gemma):
    config, frozen = decode.inference_params(gemma)
    assert not decode.bfloat16_native("cpu", None)
    assert decode.bfloat16_native("cpu", "amx_bf16") and decode.bfloat16_native("gpu", None)
    table = decode.shortlist_table(config, frozen)
    assert table.dtype == "bfloat16" and table.shape == frozen["embedding"].shape
    bf16 = dataclasses.replace(config, dtype="bfloat16")
    assert decode.shortlist_table(bf16, frozen) is None


def test_a_short_row_beside_a_long_prompt_reads_only_the_cache_it_filled(gemma):
    """A 150-token prompt makes a 256-long cache; the short row decodes first, over a 128-long span,
    and writes KerasHub's tokens for it; the long row after it still sees its whole prompt."""
    rows = prompts(10, [6, 150])
    mine = decode.decode_tokens(gemma, rows, MAX_NEW, [EOS], slots=1)
    assert decode.cache_length(150, MAX_NEW) == 2 * decode.CACHE_MULTIPLE
    for row, tokens in zip(rows, mine):
        assert_same_greedy_tokens(gemma, [tokens], keras_hub_batch(gemma, [row], MAX_NEW, EOS), [row])


def test_auto_slots_equal_waves_and_a_cache_budget(gemma):
    config, _ = decode.inference_params(gemma)
    assert decode.auto_slots(config, 20, 128) == 20  # every row at once
    assert decode.auto_slots(config, 200, 128) == 100  # two equal waves, not 128 + 72
    assert decode.auto_slots(config, 3, 128) == 3
    assert decode.auto_slots(config, 1024, 128) == decode.MAX_SLOTS
    per_position = sum(2 * k.size * k.dtype.itemsize for k, _ in decode.empty_cache(config, 1, 1))
    fits_32 = decode.CACHE_BYTES // (32 * per_position)  # a cache length at which 32 rows fill the budget
    assert decode.auto_slots(config, 64, fits_32) == 32
    assert decode.auto_slots(config, 64, 8 * fits_32) == decode.MIN_SLOTS  # 4 would fit: never fewer than 16


def test_top_k_samples_only_from_the_top_k(gemma):
    rows = prompts(7, [8, 8])
    sampled = decode.decode_tokens(gemma, rows, MAX_NEW, [], greedy=False, top_k=1, seed=3, slots=2)
    assert sampled == decode.decode_tokens(gemma, rows, MAX_NEW, [], slots=2)  # top-1 is greedy
    varied = [decode.decode_tokens(gemma, rows, MAX_NEW, [], greedy=False, top_k=50, seed=s, slots=2) for s in (1, 2)]
    assert varied[0] != varied[1]


@pytest.mark.slow
def test_quantized_and_unsupported_models_are_named(tiny_preset):
    lm = loading.load_causal_lm(tiny_preset, "float32", quantize="int8")
    assert "quantized" in decode.unsupported_reason(lm)
    with pytest.raises(decode.Unsupported):
        decode.decode_tokens(lm, [[2, 3]], 2, [EOS])


def _model_log_probs(lm, prompt, new, temperature):
    """log softmax(logits / temperature) of each new token, from the Keras model on the whole sequence at once."""
    ids = np.asarray([prompt + new], np.int32)
    logits = np.asarray(lm({"token_ids": ids, "padding_mask": np.ones_like(ids, bool)}), np.float64)[0]
    logits = logits[len(prompt) - 1 : len(prompt) - 1 + len(new)] / temperature
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    return log_probs[np.arange(len(new)), new]


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (5, 1.0), (0, 0.9)])
def test_each_sampled_tokens_log_prob_is_the_models_at_the_temperature(gemma, top_k, top_p):
    """Over the full softmax at the temperature, whatever top-k / top-p cut the draw to (what GRPO's loss computes)."""
    config, frozen = decode.inference_params(gemma)
    rows = prompts(11, [5, 9, 5])
    sampling = decode.Sampling(greedy=False, top_k=top_k, temperature=0.7, top_p=top_p)
    tokens, logps = decode.generate(config, frozen, rows, MAX_NEW, [], sampling, seed=4, slots=2)
    for prompt, new, logp in zip(rows, tokens, logps):
        assert len(new) == len(logp) == MAX_NEW
        np.testing.assert_allclose(logp, _model_log_probs(gemma, prompt, new, 0.7), atol=2e-4)


def test_top_p_draws_only_from_the_nucleus(gemma):
    config, frozen = decode.inference_params(gemma)
    row = prompts(5, [6])[0]
    greedy, _ = decode.generate(config, frozen, [row], MAX_NEW, [], decode.Sampling(), slots=1)
    tiny_p = decode.Sampling(greedy=False, temperature=1.0, top_p=1e-6)  # the top token alone reaches it
    assert decode.generate(config, frozen, [row], MAX_NEW, [], tiny_p, seed=9, slots=1)[0] == greedy
    ids = np.asarray([row], np.int32)
    logits = np.asarray(gemma({"token_ids": ids, "padding_mask": np.ones_like(ids, bool)}), np.float64)[0, -1]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    nucleus = set(order[: int(np.searchsorted(np.cumsum(probs[order]), 0.3)) + 1].tolist())
    firsts = decode.generate(config, frozen, [row] * 64, 1, [], decode.Sampling(greedy=False, top_p=0.3), seed=2)[0]
    assert {new[0] for new in firsts} <= nucleus and len(nucleus) < TINY_VOCAB // 4


def test_identical_prompts_copy_one_prefill_and_still_draw_apart(gemma):
    """A GRPO group: greedy copies write the lone prompt's tokens; sampled copies differ from one another."""
    config, frozen = decode.inference_params(gemma)
    row, other = prompts(13, [7, 4])
    alone, _ = decode.generate(config, frozen, [row, other], MAX_NEW, [], decode.Sampling(), slots=2)
    copies, _ = decode.generate(config, frozen, [row, other, row, row], MAX_NEW, [], decode.Sampling(), slots=4)
    assert copies == [alone[0], alone[1], alone[0], alone[0]]
    sampled, logps = decode.generate(config, frozen, [row] * 4, MAX_NEW, [], decode.Sampling(greedy=False), seed=1)
    assert len({tuple(t) for t in sampled}) == 4
    for new, logp in zip(sampled, logps):
        np.testing.assert_allclose(logp, _model_log_probs(gemma, row, new, 1.0), atol=2e-4)
