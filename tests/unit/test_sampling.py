"""Sampling: one sample per prompt, length limit, stop strings, deterministic greedy, held-out answer endings."""

from gemma_lora.sampling import cut_at_stop_strings, generate


def test_cut_at_the_earliest_stop_string():
    text = "Paris.\nInstruction:\nMore\n\nResponse:"
    assert cut_at_stop_strings(text, ["\n\nResponse:", "\nInstruction:"]) == ("Paris.", "\nInstruction:")
    assert cut_at_stop_strings("Paris.", ["\nInstruction:"]) == ("Paris.", None)


def test_greedy_samples_are_deterministic_and_bounded(tiny_lm, make_config):
    config = make_config(max_new_tokens=6, stop_strings=["\nInstruction:"])
    prompts = ["Name a colour.", "Explain the process of photosynthesis in a way that a child could understand."]
    first = generate(tiny_lm, prompts, config, batch_size=2)
    again = generate(tiny_lm, prompts[::-1], config, batch_size=1)
    assert [s.instruction for s in first] == prompts
    assert all(s.new_tokens <= 6 for s in first)
    assert [s.text for s in first] == [s.text for s in again[::-1]]  # batching and order do not matter
    assert all(not s.ended or s.stop_token == "<eos>" or s.stop_string for s in first)


def test_samples_follow_weight_changes_without_recompiling(tiny_lm, make_config):
    """The compiled decoding functions are reused, and they read the current weights (LoRA included)."""
    import numpy as np

    from gemma_lora.fast import decode
    from gemma_lora.model import loading

    config = make_config(max_new_tokens=8)
    layers = loading.enable_lora(tiny_lm, 4, seed=0)
    before = generate(tiny_lm, ["Name a colour."], config)[0].text
    traces = dict(decode.TRACES)
    rng = np.random.default_rng(0)
    for layer in layers:
        layer.lora_kernel_b.assign(rng.normal(0, 2.0, layer.lora_kernel_b.shape).astype("float32"))
    after = generate(tiny_lm, ["Name a colour."], config)[0].text
    assert decode.TRACES == traces
    assert after != before


def test_answer_endings_keeps_row_order_and_counts_its_samples(tiny_lm, make_config):
    from gemma_lora.data import Example
    from gemma_lora.sampling import answer_endings

    config = make_config(max_new_tokens=6, sampler="top_k")  # answers are greedy regardless
    examples = [Example("A much longer instruction about colours and shapes?", "r"), Example("Hi?", "r"), Example("Name one.", "r")]
    result = answer_endings(tiny_lm, examples, config, batch_size=2)
    assert [s.instruction for s in result["samples"]] == [e.instruction for e in examples]
    assert result["rows"] == 3
    assert result["model_ended_share"] == sum(s.ended_by_model for s in result["samples"]) / 3
    assert result["stop_tokens"] == ["<eos>"]
    assert result["ended_share"] == sum(s.ended for s in result["samples"]) / 3
    greedy = generate(tiny_lm, [e.instruction for e in examples], make_config(max_new_tokens=6))
    assert [s.text for s in result["samples"]] == [s.text for s in greedy]


def test_the_package_generate_stays_the_function_after_the_run_loads():
    import gemma_lora
    import gemma_lora.training.run  # noqa: F401  (imports the sampling module)

    assert callable(gemma_lora.generate) and gemma_lora.generate is generate
