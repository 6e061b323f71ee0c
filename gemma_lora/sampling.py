"""Prompts in, text out (the package's `generate`): greedy or top-k, stopping at the model's stop token and at stop strings.

Prompts are templated (or written as a user turn of Gemma's chat format) and
tokenized here. The model's own stop token is `<eos>` with the template, and
`<end_of_turn>` (Gemma 4: `<turn|>`), or `<eos>`, with the chat format.

Gemma 1, 2 and 3 text models and Gemma 4's dense text stack decode with `gemma_lora.fast.decode` (a key/value
cache, continuous batching, compiled once per shape; why not KerasHub's
`generate` is said there); other models (quantized bases, architectures the
fast path does not implement) go through KerasHub's compiled `generate` in
fixed-size batches. Either way the output tokens show whether the model
itself ended its answer with its stop token (a string output would hide that),
and whether an answer that did not end loops (`gemma_lora.loops`).
"""

import dataclasses
import weakref
from dataclasses import asdict, dataclass

import numpy as np

from gemma_lora import loops, runtime
from gemma_lora.data import Example, chat
from gemma_lora.data.prompts import prompt_ids
from gemma_lora.fast import decode
from gemma_lora.parallel import hosts
from gemma_lora.progress import Progress

runtime.ensure_runtime()

import keras  # noqa: E402
import keras_hub  # noqa: E402

# Rows KerasHub's generate answers together (the package's decoder picks its
# own, `decode.auto_slots`).
SLOTS = 16
_SAMPLERS = weakref.WeakKeyDictionary()  # model -> the sampler settings its KerasHub generate was compiled with


@dataclass
class Sample:
    instruction: str
    text: str  # the answer, cut at the model's stop token or the first stop string
    # The stop token the model ended the answer with (before any stop string):
    # "<eos>", or "<end_of_turn>" with the chat format; None if it did not end it.
    stop_token: str | None
    stop_string: str | None  # the stop string the answer was cut at, if any
    new_tokens: int
    # The answer ran to the token limit repeating itself (`loops.looped`); records
    # written before this field read as False.
    looped: bool = False

    @property
    def ended_by_model(self):
        """The model ended the answer itself, with its stop token."""
        return self.stop_token is not None

    @property
    def ended(self):
        return self.ended_by_model or self.stop_string is not None

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, record):
        """A Sample from `to_dict`'s record, or from one written before `stop_token` (its `ended_with_eos`)."""
        record = dict(record)
        if "ended_with_eos" in record:
            record["stop_token"] = "<eos>" if record.pop("ended_with_eos") else None
        return cls(**record)


def generate(causal_lm, instructions, config, batch_size=None, label=None):
    """Answer each instruction with the configured template or chat format, sampler and limits.

    Args:
        causal_lm: a KerasHub CausalLM with a preprocessor (for its tokenizer).
        instructions: list of str (templated as instructions, or a user turn
            with the chat format), or of `data.Example`s, answered from their
            whole prompt (`data.prompt_text`: the context, or a completion's prompt
            as written; with the chat format, a conversation's turns before
            its last answer).
        config: a `TrainConfig` (chat, template, sampler, top_k, seed,
            max_new_tokens, stop_strings). With `config.chat` None, the chat
            format is used for conversation examples (`chat.uses_chat`).
        batch_size: rows decoded together; None: the decoder's choice
            (`decode.auto_slots`), or SLOTS with KerasHub's generate.
        label: str or None; with a label, progress (rows done / total) is shown.

    Returns:
        A list of `Sample`, one per instruction, in order.
    """
    tokenizer = causal_lm.preprocessor.tokenizer
    examples = [i if isinstance(i, Example) else Example(i, "") for i in instructions]
    chat_format = chat.uses_chat(config, examples)
    prompts, stop_ids = prompt_ids(tokenizer, examples, config)
    stop_strings = config.resolved_stop_strings(chat_format)
    progress = Progress(len(prompts), label, unit="row", enabled=bool(label and prompts))

    ended = stop_string_check(tokenizer, stop_strings)

    try:
        outputs = decode.decode_tokens(
            causal_lm, prompts, config.max_new_tokens, stop_ids, greedy=config.sampler == "greedy",
            top_k=config.top_k, seed=config.seed, slots=batch_size, ended=ended,
            progress=lambda done, tokens: progress.update(done - progress.n, tokens=tokens),
        )
    except decode.Unsupported:
        outputs = _keras_hub_generate(causal_lm, prompts, config, batch_size or SLOTS, progress, stop_ids)
    progress.close()
    return [sample_of(tokenizer, e.instruction, new, config, stop_ids, stop_strings) for e, new in zip(examples, outputs)]


def sample_of(tokenizer, instruction, new, config, stop_ids, stop_strings):
    new = list(new[: config.max_new_tokens])
    at = next((i for i, token in enumerate(new) if token in stop_ids), None)
    stop_token = None
    if at is not None:
        stop_token, new = tokenizer.id_to_token(new[at]), new[:at]
    text, stop = cut_at_stop_strings(_detokenize(tokenizer, new), stop_strings)
    looped = loops.looped(new, ended=stop_token is not None or stop is not None)
    # An answer cut at a stop string did not end with the stop token at its own end.
    return Sample(instruction, text, stop_token if stop is None else None, stop, len(new) + int(at is not None), looped)


def stop_string_check(tokenizer, stop_strings):
    """The decoder's `ended(row, tokens)`: a stop string in the text so far ends the row now, not at max_new_tokens."""

    def ended(row, tokens):
        return bool(stop_strings) and cut_at_stop_strings(_detokenize(tokenizer, tokens), stop_strings)[1] is not None

    return ended


def _detokenize(tokenizer, ids):
    if not ids:
        return ""
    text = tokenizer.detokenize([ids])[0]
    return text if isinstance(text, str) else text.decode("utf-8", "replace")


def make_sampler(config):
    if config.sampler == "greedy":
        return keras_hub.samplers.GreedySampler()
    return keras_hub.samplers.TopKSampler(k=config.top_k, seed=config.seed)


def _keras_hub_generate(causal_lm, prompts, config, batch_size, progress, stop_ids):
    """New tokens per prompt from KerasHub's `generate`, in batches of exactly `batch_size` rows.

    The last batch is padded with copies of a prompt, and prompt room is
    rounded up to a multiple of 64, so a second call compiles nothing new.
    """
    sampler_key = (config.sampler, config.top_k, config.seed)
    if _SAMPLERS.get(causal_lm) != sampler_key or causal_lm.generate_function is None:
        # A new sampler needs a new compiled generate function; the same one is
        # reused, so samples after training cost no second compilation.
        causal_lm.sampler = make_sampler(config)
        causal_lm.generate_function = None
        _SAMPLERS[causal_lm] = sampler_key
    pad = causal_lm.preprocessor.tokenizer.pad_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # like lengths share a batch
    outputs = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = [prompts[i] for i in rows]
        batch += [batch[-1]] * (batch_size - len(batch))
        for i, new in zip(rows, keras_hub_batch(causal_lm, batch, config.max_new_tokens, stop_ids, pad)):
            outputs[i] = new
        progress.update(len(rows))
    return outputs


def keras_hub_batch(causal_lm, prompts, max_new_tokens, stop_ids, pad=0):
    """The new tokens KerasHub's compiled `generate` writes after each prompt (up to the first of `stop_ids`, kept).

    `stop_ids`: a list of token ids (or one id, e.g. `<eos>`'s).
    """
    stop_ids = [stop_ids] if isinstance(stop_ids, int) else list(stop_ids)
    length = -(-max(map(len, prompts)) // 64) * 64 + max_new_tokens
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
    # In a job of several processes KerasHub would split the rows over every
    # process's devices, and its output, spread over the hosts, could not be
    # read back as NumPy: every process decodes all the rows instead.
    distribution = keras.distribution.distribution()
    if hosts.several():
        keras.distribution.set_distribution(None)
    try:
        output = causal_lm.generate(inputs, stop_token_ids=stop_ids)
    finally:
        causal_lm.preprocessor = preprocessor
        keras.distribution.set_distribution(distribution)
    out_ids = np.asarray(output["token_ids"])
    results = []
    for row, ids in enumerate(prompts):
        new = out_ids[row, len(ids) : len(ids) + max_new_tokens].tolist()
        at = next((i for i, token in enumerate(new) if token in stop_ids), None)
        results.append(new if at is None else new[: at + 1])
    return results


def answer_endings(causal_lm, examples, config, batch_size=None, label=None):
    """Greedy-answer held-out rows (each from its whole prompt) and count how the answers end.

    The share that the model itself ends with its stop token (`<eos>`, or
    `<end_of_turn>` with the chat format) within `max_new_tokens` is the
    measure that matters: a user's answer should stop on its own, and stop
    strings only tidy up one that does not.

    Returns:
        `endings` of the answers.
    """
    greedy = dataclasses.replace(config, sampler="greedy")
    examples = list(examples)
    samples = generate(causal_lm, examples, greedy, batch_size, label=label)
    chat_format = chat.format_of(causal_lm.preprocessor.tokenizer) if chat.uses_chat(config, examples) else None
    return endings(samples, chat_format)


def endings(samples, chat_format=None):
    """How a list of `Sample`s ended.

    Args:
        samples: list of `Sample`.
        chat_format: None, or the chat format they were generated with
            ("gemma", "gemma4"; True means "gemma").

    Returns:
        dict with `rows`, `model_ended_share` (the share the model ended with
        its stop token), `ended_share` (by its stop token or a stop string),
        `stop_tokens` (the tokens that count: ["<end_of_turn>", "<eos>"] with
        Gemma's chat format, ["<turn|>", "<eos>"] with Gemma 4's, else
        ["<eos>"]) and `samples` (in row order).
    """
    n = len(samples)
    fmt = chat.GEMMA if chat_format is True else chat_format
    return {
        "rows": n,
        "stop_tokens": [chat.TURN_MARKERS[fmt][1], "<eos>"] if fmt else ["<eos>"],
        "model_ended_share": sum(s.ended_by_model for s in samples) / n if n else float("nan"),
        "ended_share": sum(s.ended for s in samples) / n if n else float("nan"),
        "looped_share": sum(s.looped for s in samples) / n if n else float("nan"),
        "samples": samples,
    }


def cut_at_stop_strings(text, stop_strings):
    """Cut `text` at the earliest stop string; return (text, the stop string or None)."""
    cuts = [(text.find(s), s) for s in stop_strings if s in text]
    if not cuts:
        return text, None
    position, stop = min(cuts)
    return text[:position], stop
