"""Prompt-only rows for objectives that write their own answers (GRPO): each prompt's token ids, its answer, its columns.

A row is any `Example` (every format the package reads; `prompt` records
need nothing else). Its prompt is written as the run writes prompts: the
template, a completion's prompt as written, or with the chat format the turns
up to the model's header, each preset in its own turn format. What a reward
function needs from the row travels with it: the reference answer (the
record's response, completion or `answer`; None where it has none), the
record's own columns (`Example.columns`) and where it was read.

The cut rule: a completion needs `max_new_tokens` positions after its prompt,
so a prompt longer than sequence_length - max_new_tokens keeps its end (the
tokens nearest the answer, after `<bos>`); the run says how many were cut.
"""

from dataclasses import dataclass

from gemma_lora.data import chat
from gemma_lora.data.control_tokens import encoder
from gemma_lora.data.tokenize import prompt_parts
from gemma_lora.errors import ConfigError


def prompt_ids(tokenizer, examples, config):
    """(token ids of each example's prompt, the ids that end an answer) for the template or the chat format.

    A prompt is text: a control token written in it (`<end_of_turn>`, ...)
    stays text and cannot end its turn early (control_tokens.py).
    """
    if chat.uses_chat(config, examples):
        marks = chat.markers(tokenizer)
        return chat.prompt_ids(examples, tokenizer, marks), marks.stop_ids
    prompts = encoder(tokenizer).encode([prompt_parts(e, config) for e in examples])
    return [[tokenizer.start_token_id, *ids] for ids in prompts], [tokenizer.end_token_id]


@dataclass
class PromptRows:
    """Tokenized prompts (`<bos>` first) with what rewards read: text, answer, columns, place."""

    prompts: list
    texts: list  # each prompt as the model reads it (template or turns included), for reward functions
    answers: list  # the reference answer, or None
    columns: list  # per row, a dict of the record's own columns
    places: list  # where each row was read ("data.jsonl:12")
    stop_ids: list  # the token ids that end a completion
    cut: int = 0  # prompts cut to fit sequence_length

    def __len__(self):
        return len(self.prompts)

    @property
    def has_answers(self):
        return any(answer is not None for answer in self.answers)


def tokenize_prompts(examples, tokenizer, config, places=None):
    """The rows' prompts as token ids, cut by the module's rule, with their answers and columns.

    Raises:
        ConfigError: sequence_length leaves no room for a prompt beside max_new_tokens.
    """
    room = config.sequence_length - config.max_new_tokens
    if room < 8:
        raise ConfigError(
            f"sequence_length={config.sequence_length} leaves {room} positions for a prompt beside "
            f"max_new_tokens={config.max_new_tokens} completion tokens: raise --sequence-length or lower "
            "--max-new-tokens."
        )
    prompts, stop_ids = prompt_ids(tokenizer, examples, config)
    cut = 0
    for i, ids in enumerate(prompts):
        if len(ids) > room:
            prompts[i] = [ids[0], *ids[len(ids) - room + 1:]]
            cut += 1
    texts = [_text(tokenizer, ids[1:]) for ids in prompts]
    answers = [e.response if e.response.strip() else None for e in examples]
    columns = [dict(e.columns or ()) for e in examples]
    return PromptRows(prompts, texts, answers, columns, list(places or [f"row {i}" for i in range(len(examples))]),
                      list(stop_ids), cut)


def _text(tokenizer, ids):
    if not ids:
        return ""
    text = tokenizer.detokenize([ids])[0]
    return text if isinstance(text, str) else text.decode("utf-8", "replace")
