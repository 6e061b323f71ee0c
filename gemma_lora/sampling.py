"""Prompts in, text out (the package's `generate`): greedy or top-k, stopping at <eos> and at stop strings.

Prompts are tokenized here and handed to KerasHub's compiled `generate` as
token arrays, so the output tokens show whether the model itself ended its
answer with `<eos>` (a string output would hide that).
"""

import weakref
from dataclasses import asdict, dataclass

import numpy as np

from gemma_lora import runtime
from gemma_lora.data import Example, prompt_text

runtime.ensure_runtime()

import keras_hub  # noqa: E402


_SAMPLERS = weakref.WeakKeyDictionary()  # model -> the sampler settings it was given


@dataclass
class Sample:
    instruction: str
    text: str  # the answer, cut at <eos> or the first stop string
    ended_with_eos: bool  # the model ended the answer with <eos> (before any stop string)
    stop_string: str | None  # the stop string the answer was cut at, if any
    new_tokens: int

    @property
    def ended(self):
        return self.ended_with_eos or self.stop_string is not None

    def to_dict(self):
        return asdict(self)


def make_sampler(config):
    if config.sampler == "greedy":
        return keras_hub.samplers.GreedySampler()
    return keras_hub.samplers.TopKSampler(k=config.top_k, seed=config.seed)


def generate(causal_lm, instructions, config, batch_size=8):
    """Answer each instruction with the configured template, sampler and limits.

    Args:
        causal_lm: a KerasHub CausalLM with a preprocessor (for its tokenizer).
        instructions: list of str.
        config: a `TrainConfig` (template, sampler, max_new_tokens, stop_strings).
        batch_size: prompts generated together.

    Returns:
        A list of `Sample`, one per instruction.
    """
    return _generate(causal_lm, instructions, [Example(i, "") for i in instructions], config, batch_size)


def _generate(causal_lm, labels, examples, config, batch_size):
    """Answer each example's prompt (`prompt_text`); `labels` name the samples."""
    sampler_key = (config.sampler, config.top_k, config.seed)
    if _SAMPLERS.get(causal_lm) != sampler_key or causal_lm.generate_function is None:
        # A new sampler needs a new compiled generate function; the same one is
        # reused, so samples after training cost no second compilation.
        causal_lm.sampler = make_sampler(config)
        causal_lm.generate_function = None
        _SAMPLERS[causal_lm] = sampler_key
    tokenizer = causal_lm.preprocessor.tokenizer
    samples = []
    for start in range(0, len(examples), batch_size):
        batch = slice(start, start + batch_size)
        samples += _generate_batch(causal_lm, tokenizer, labels[batch], examples[batch], config)
    return samples


def _generate_batch(causal_lm, tokenizer, instructions, examples, config):
    bos, eos, pad = tokenizer.start_token_id, tokenizer.end_token_id, tokenizer.pad_token_id
    prompts = [[bos, *map(int, ids)] for ids in tokenizer([prompt_text(e, config) for e in examples])]
    # Prompt room rounded up to a multiple of 64: generate compiles once per
    # input shape, and the prompts of a batch vary in length.
    length = -(-max(map(len, prompts)) // 64) * 64 + config.max_new_tokens
    token_ids = np.full((len(prompts), length), pad, dtype=np.int32)
    padding_mask = np.zeros((len(prompts), length), dtype=bool)
    for row, ids in enumerate(prompts):
        token_ids[row, : len(ids)] = ids
        padding_mask[row, : len(ids)] = True
    # With token arrays, KerasHub's generate must not run the string
    # preprocessor; detach it for the call only.
    inputs = {"token_ids": token_ids, "padding_mask": padding_mask}
    if isinstance(causal_lm, keras_hub.models.Gemma3CausalLM):
        # Gemma 3's generate returns its `images` input; without one it returns
        # None, which KerasHub 0.32's output normalisation cannot concatenate.
        # Zero images (a static 0 on that axis) means text only.
        inputs["images"] = np.zeros((len(prompts), 0, 1, 1, 3), "float32")
    preprocessor = causal_lm.preprocessor
    causal_lm.preprocessor = None
    try:
        output = causal_lm.generate(inputs, stop_token_ids=[eos])
    finally:
        causal_lm.preprocessor = preprocessor
    out_ids = np.asarray(output["token_ids"])
    samples = []
    for row, (instruction, ids) in enumerate(zip(instructions, prompts)):
        new = out_ids[row, len(ids) : len(ids) + config.max_new_tokens].tolist()
        ended = eos in new
        if ended:
            new = new[: new.index(eos)]
        text = tokenizer.detokenize([new])[0] if new else ""
        text = text if isinstance(text, str) else text.decode("utf-8", "replace")
        text, stop = cut_at_stop_strings(text, config.stop_strings)
        # An answer cut at a stop string did not end with <eos> at its own end.
        samples.append(Sample(instruction, text, ended and stop is None, stop, len(new) + int(ended)))
    return samples


def answer_endings(causal_lm, examples, config, batch_size=16):
    """Greedy-answer held-out rows and count how the answers end.

    The share that the model itself ends with `<eos>` within
    `max_new_tokens` is the measure that matters: a user's answer should stop
    on its own, and stop strings only tidy up one that does not.

    Returns:
        dict with `rows`, `eos_share` (ended by <eos>), `ended_share` (by
        <eos> or a stop string) and `samples` (the `Sample`s, in row order).
    """
    import dataclasses

    greedy = dataclasses.replace(config, sampler="greedy")
    # Each row is answered from its whole prompt (context, or a completion
    # prompt as written); prompts of like length share a batch.
    prompts = [prompt_text(e, config) for e in examples]
    order = sorted(range(len(examples)), key=lambda i: len(prompts[i]))
    answers = _generate(causal_lm, [examples[i].instruction for i in order], [examples[i] for i in order], greedy, batch_size)
    samples = [None] * len(examples)
    for i, sample in zip(order, answers):
        samples[i] = sample
    n = len(samples)
    return {
        "rows": n,
        "eos_share": sum(s.ended_with_eos for s in samples) / n if n else float("nan"),
        "ended_share": sum(s.ended for s in samples) / n if n else float("nan"),
        "samples": samples,
    }


def cut_at_stop_strings(text, stop_strings):
    """Cut `text` at the earliest stop string; return (text, the stop string or None)."""
    cuts = [(text.find(s), s) for s in stop_strings if s in text]
    if not cuts:
        return text, None
    position, stop = min(cuts)
    return text[:position], stop
