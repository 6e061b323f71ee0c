"""Preference pairs → token ids: each pair's prompt once, its chosen and rejected responses, and the cut rule.

A pair is an `Example` whose `response` is the chosen answer and `rejected`
the other (`formats.read_preference`). Its prompt is written as the run
writes prompts (the template, or the chat format's turns up to the model's
header, `chat.prompt_ids`) and encoded once; each response is encoded after
it with its end token (`<eos>`, or the chat format's end of turn). The loss
of a preference objective is on the response tokens only.

The cut rule, for a sequence (prompt + response) longer than sequence_length:

1. A prompt of sequence_length tokens or more is refused (DataError naming
   the record): there would be no room for an answer.
2. A prompt that leaves fewer than a quarter of the sequence for the
   responses keeps its end (the tokens nearest the answer, after `<bos>`),
   cut to three quarters of the sequence.
3. Each response is cut to the room left, losing its end token.

The run says how many pairs were cut (`PairRows.cut`).
"""

import dataclasses
from dataclasses import dataclass

import numpy as np

from gemma_lora.data import chat
from gemma_lora.data.control_tokens import encoder
from gemma_lora.data.tokenize import prompt_parts
from gemma_lora.errors import DataError


@dataclass
class PairRows:
    """Tokenized pairs: per pair its prompt ids (`<bos>` first) and its two responses' ids (end token last)."""

    prompts: list
    chosen: list
    rejected: list
    cut: int = 0  # pairs with a sequence cut to fit sequence_length
    # Per pair, the reference model's log p at each position of its (chosen, rejected)
    # sequences (aligned as the loss weights), once computed (`training.preference`).
    reference: list | None = None

    def __len__(self):
        return len(self.prompts)

    def sequences(self, index):
        """The pair's (chosen, rejected) sequences, as `packing.pack_pairs` takes them."""
        return tuple(_sequence(self.prompts[index], response) for response in (self.chosen[index], self.rejected[index]))

    @property
    def shortest(self):
        """The fewest tokens a pair's two sequences take together (bounds the pairs a batch can hold)."""
        return min(2 * len(p) + len(c) + len(r) for p, c, r in zip(self.prompts, self.chosen, self.rejected))


def _sequence(prompt, response):
    ids = np.asarray([*prompt, *response], np.int32)
    weights = np.zeros(len(ids), np.float32)
    weights[len(prompt) - 1 : len(ids) - 1] = 1.0  # position t weighs the prediction of token t + 1
    return {"token_ids": ids, "loss_weights": weights}


def tokenize_pairs(examples, tokenizer, config, places=None):
    """Each pair's prompt and responses as token ids, cut to fit sequence_length (see the module doc).

    Args:
        examples: `Example`s with `rejected` set.
        tokenizer: the preset's KerasHub tokenizer.
        config: the run's config (chat, template, sequence_length).
        places: where each example was read ("data.jsonl:12"), for errors.

    Raises:
        DataError: a prompt of sequence_length tokens or more.
    """
    if chat.uses_chat(config, examples):
        prompts, chosen, rejected = _chat_pairs(examples, tokenizer)
    else:
        text = encoder(tokenizer)
        prompts = [[tokenizer.start_token_id, *ids] for ids in text.encode([prompt_parts(e, config) for e in examples])]
        eos = [tokenizer.end_token_id]
        chosen = [ids + eos for ids in text.encode([e.response for e in examples])]
        rejected = [ids + eos for ids in text.encode([e.rejected for e in examples])]
    seq, cut = config.sequence_length, 0
    for i, prompt in enumerate(prompts):
        if len(prompt) >= seq:
            where = places[i] if places else f"pair {i}"
            raise DataError(
                f"{where}: the prompt takes {len(prompt)} tokens, sequence_length={seq} leaves no room for a response. "
                "Raise --sequence-length or shorten the prompt."
            )
        if len(prompt) + max(len(chosen[i]), len(rejected[i])) <= seq:
            continue
        cut += 1
        if seq - len(prompt) < seq // 4:
            prompts[i] = prompt = [prompt[0], *prompt[len(prompt) - (seq - seq // 4 - 1):]]
        room = seq - len(prompt)
        chosen[i], rejected[i] = chosen[i][:room], rejected[i][:room]
    return PairRows(prompts, chosen, rejected, cut)


def _chat_pairs(examples, tokenizer):
    """(prompts, chosen, rejected) in the chat format: the turns up to the model's header, then each answer."""
    marks = chat.markers(tokenizer)
    prompts = chat.prompt_ids(examples, tokenizer, marks)
    sides = []
    for answers in (examples, [_with_rejected_answer(e) for e in examples]):
        full = [row.ids for row in chat.encode(answers, tokenizer, marks)]
        # A full row starts with its prompt: the answer is the rest (the answer's text and its end of turn).
        sides.append([ids[len(prompt):] for ids, prompt in zip(full, prompts)])
    return prompts, *sides


def _with_rejected_answer(example):
    """The example with its rejected response as the answer (the last model turn of a conversation)."""
    if example.conversation:
        turns = (*example.conversation[:-1], ("assistant", example.rejected))
        return dataclasses.replace(example, response=example.rejected, conversation=turns)
    return dataclasses.replace(example, response=example.rejected)
