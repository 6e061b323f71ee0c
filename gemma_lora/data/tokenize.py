"""Examples → template → fixed-length token arrays with loss weights, for `fit`.

Tokenization happens once, here, into NumPy arrays; KerasHub's string
preprocessing is not used for training because it needs tf.data or grain,
cannot mask prompt tokens and cannot shuffle (see docs/quality.md).

With the template, a row is `<bos>`, the prompt, the response, `<eos>`. The
prompt is the template filled with an example's instruction (and context),
or, for `completion` and `text` data, the example's own prompt as written
(empty for text). With `response_only_loss` the loss weights sit on the
response and its `<eos>` only; otherwise on every next token (the recipe).
With Gemma's chat format (`chat.py`) a row is the example's turns, the loss on
each model turn and its `<end_of_turn>`.

Data text is text: a control token written in an instruction, context,
response or turn (`<end_of_turn>`, `<bos>`, ...) is encoded as ordinary
pieces, never as the token (`control_tokens.py`); the template's own text is
the config's, and a marker written there stays a marker. `TokenizedRows`
records the rows whose text held such strings (`marker_text`).
"""

import string
from dataclasses import dataclass

import numpy as np

from gemma_lora.data.chat import encode, markers, uses_chat
from gemma_lora.data.control_tokens import Part, encoder
from gemma_lora.data.formats import Example
from gemma_lora.errors import ConfigError


@dataclass
class TokenizedRows:
    """Training arrays: `x` for the model, `labels` and `weights` for the loss.

    `weights[i, t]` is 1 where the token `labels[i, t]` counts towards the
    loss: response tokens (or every real token for whole-sequence loss),
    never padding.
    """

    token_ids: np.ndarray  # (rows, sequence_length) int32
    padding_mask: np.ndarray  # (rows, sequence_length) bool
    labels: np.ndarray  # (rows, sequence_length) int32, next token
    weights: np.ndarray  # (rows, sequence_length) float32
    truncated: int  # rows cut at sequence_length
    real_tokens: int  # non-padding input positions
    # Chat rows are cut after their last whole exchange that fits: the model
    # turns left out (or cut, where not even the first exchange fits).
    turns_cut: int = 0
    # (row, the first control-token string its data text holds) of each row whose text held one.
    marker_text: tuple = ()

    def __len__(self):
        return len(self.token_ids)

    @property
    def x(self):
        return {"token_ids": self.token_ids, "padding_mask": self.padding_mask}

    @property
    def loss_tokens(self):
        return int(self.weights.sum())


def prompt_text(example, config):
    """The text before the response (what generation is given): the template filled, or the example's own prompt."""
    return "".join(part.text for part in prompt_parts(example, config))


def prompt_parts(example, config):
    """`prompt_text` as `Part`s: the template's own text (not data) and the example's fields (data)."""
    if example.prompt is not None:
        return [Part(example.prompt)]
    template = config.context_template if example.context else config.template
    head = template[: template.index("{response}")]
    values = {"instruction": example.instruction, "context": example.context}
    formatter = string.Formatter()
    parts = []
    for literal, name, spec, conversion in formatter.parse(head):
        if literal:
            parts.append(Part(literal, data=False))
        if name is not None:
            value = formatter.convert_field(formatter.get_field(name, (), values)[0], conversion)
            parts.append(Part(formatter.format_field(value, spec or "")))
    return parts


def full_text(example, config):
    return prompt_text(example, config) + example.response


def example_texts(example):
    """Every text of an example that comes from the data (fields and turns)."""
    texts = [example.instruction, example.response, example.context, example.prompt or ""]
    return texts + [content for _, content in example.conversation]


def tokenize_rows(examples, tokenizer, config):
    """Tokenize examples into fixed-length training arrays.

    Whole-sequence mode (the recipe) tokenizes the full text in one piece and
    truncates exactly as KerasHub's `GemmaCausalLMPreprocessor`: `<bos>`,
    text cut to sequence_length - 1 tokens, `<eos>`. Response-only mode
    tokenizes prompt and response separately so the boundary is exact, and
    by default gives no `<eos>` to a row whose text was cut.

    With the chat format (`config.chat`, or conversation examples when it is
    None) a row too long for sequence_length keeps its whole exchanges from
    the start; where not even the first fits, it is cut mid-turn (nothing
    appended, whatever eos_after_truncation says).

    Raises:
        ConfigError: sequence_length cannot hold even the empty template; the
            tokenizer lacks the chat format's markers.
        DataError: chat format for text data, or a conversation it cannot hold.
    """
    text = encoder(tokenizer)
    marker_text = tuple(
        (row, found[0]) for row, example in enumerate(examples)
        if (found := [m for t in example_texts(example) for m in text.marker_text(t)])
    )
    if uses_chat(config, examples):
        rows = _chat_rows(examples, tokenizer, config)
        rows.marker_text = marker_text
        return rows
    bos, eos = tokenizer.start_token_id, tokenizer.end_token_id
    if any(e.prompt is None for e in examples):
        check_sequence_length(tokenizer, config)
    if config.response_only_loss:
        prompts = text.encode([prompt_parts(e, config) for e in examples])
        responses = text.encode([e.response for e in examples])
    else:
        prompts = [[] for _ in examples]
        responses = text.encode([[*prompt_parts(e, config), Part(e.response)] for e in examples])

    sequences, truncated = [], 0
    seq = config.sequence_length
    for prompt, response in zip(prompts, responses):
        ids = [bos, *prompt, *response, eos]
        # Loss weight of predicting ids[t + 1] from ids[..t]: response and <eos> only,
        # or every next token in whole-sequence mode.
        target_weight = [0.0] * len(prompt) + [1.0] * (len(response) + 1)
        if len(ids) > seq + 1:
            truncated += 1
            if config.eos_after_truncation:
                ids = ids[:seq] + [eos]
                target_weight = target_weight[: seq - 1] + [1.0]
            else:
                ids = ids[: seq + 1]
                target_weight = target_weight[:seq]
        sequences.append((ids, target_weight))
    rows = _rows(sequences, tokenizer.pad_token_id, seq, truncated)
    rows.marker_text = marker_text
    return rows


def _chat_rows(examples, tokenizer, config):
    """Rows of Gemma's chat format, each cut after its last whole exchange that fits."""
    seq = config.sequence_length
    sequences, truncated, turns_cut = [], 0, 0
    for row in encode(examples, tokenizer, markers(tokenizer), config.response_only_loss):
        ids, weights = row.ids, row.weights
        if len(ids) > seq + 1:  # A row holds seq inputs and their seq next tokens.
            truncated += 1
            fits = [end for end in row.exchange_ends if end <= seq + 1]
            end = fits[-1] if fits else seq + 1
            turns_cut += len(row.exchange_ends) - len(fits)
            ids, weights = ids[:end], weights[: end - 1]
        sequences.append((ids, weights))
    return _rows(sequences, tokenizer.pad_token_id, seq, truncated, turns_cut)


def average_per_example(weights):
    """`loss_average = "example"`: each row's weights times (mean row weight / its own), rows of no weight unchanged.

    The batch loss stays a weighted token mean (the loop's `nll / weight`),
    so this is the whole change: every example's loss tokens together weigh
    the same, and the total weight (hence the learning rate's meaning) does not move.
    Training rows only: scores stay token means, comparable across runs.
    """
    sums = weights.sum(axis=1, keepdims=True)
    mean = sums[sums > 0].mean() if (sums > 0).any() else 1.0
    return np.where(sums > 0, weights * (mean / np.maximum(sums, 1e-12)), weights).astype(np.float32)


def _rows(sequences, pad, seq, truncated, turns_cut=0):
    """Fixed-length arrays from (ids, weights) sequences of at most seq + 1 ids (weights: one fewer)."""
    n = len(sequences)
    token_ids = np.full((n, seq), pad, dtype=np.int32)
    labels = np.full((n, seq), pad, dtype=np.int32)
    weights = np.zeros((n, seq), dtype=np.float32)
    padding_mask = np.zeros((n, seq), dtype=bool)
    for i, (ids, target_weight) in enumerate(sequences):
        # Like KerasHub: the row is ids padded to seq + 1, inputs are its first
        # seq positions (a final <eos> is an input too), labels the last seq.
        length = min(len(ids), seq)
        token_ids[i, :length] = ids[:length]
        padding_mask[i, :length] = True
        labels[i, : len(ids) - 1] = ids[1:]
        weights[i, : len(ids) - 1] = target_weight
    return TokenizedRows(token_ids, padding_mask, labels, weights, truncated, int(padding_mask.sum()), turns_cut)


def check_sequence_length(tokenizer, config):
    """Raise ConfigError if the template alone fills the sequence length (templated examples only)."""
    empty = Example(instruction="", response="", context="x" if config.include_context else "")
    overhead = len(encoder(tokenizer).encode([prompt_parts(empty, config)])[0]) + 2  # <bos>, <eos>
    if config.sequence_length <= overhead:
        raise ConfigError(
            f"sequence_length={config.sequence_length} is too small for the template: its fixed "
            f"text with <bos> and <eos> takes {overhead} tokens, leaving no room for an instruction "
            f"and a response. Use a sequence_length well above {overhead} (e.g. 256 or 512)."
        )
