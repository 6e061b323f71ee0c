"""Gemma's chat format: a conversation as turns of token ids, with loss on the model's turns.

Gemma 1, 2 and 3 write a conversation as

    <bos><start_of_turn>user
    {system}\\n\\n{first user turn}<end_of_turn>
    <start_of_turn>model
    {answer}<end_of_turn>
    <start_of_turn>user
    {next user turn}<end_of_turn>
    <start_of_turn>model
    {next answer}<end_of_turn>

Gemma has no system role: a system message leads the first user turn,
followed by a blank line, as Gemma's own chat template writes it. Turn texts
are stripped of white space at both ends, as that template does.

Rows are built from token ids, never from a string template: each stretch of
text between two markers is encoded on its own and the markers are put in by
id. A turn's text is data: a marker written inside it (`<end_of_turn>`, any
control token of the vocabulary) stays text and never becomes a turn
boundary (`control_tokens.py`). A string template tokenized whole relies on
the vocabulary knowing `<start_of_turn>` as one piece; where it does not, the
marker splits into pieces silently. With Gemma's vocabulary (where the markers
are user-defined pieces, which cut the text before it is split into pieces)
both ways give the same ids for text without markers, except that the model's
header `model\\n` is tokenized apart from its answer here, as generation sees
it. `markers` checks that the tokenizer has each marker as a single token.

The loss weighs every model turn and its `<end_of_turn>`, nothing else (the
user turns, the headers and the line break after each turn are context).
Generation stops at `<end_of_turn>` (and `<eos>`).

Gemma 4 ("gemma4", the format of a `Gemma4Tokenizer`) has its own markers
and a real system role (Google's "Gemma 4 prompt formatting"):

    <bos><|turn>system
    {system}<turn|>
    <|turn>user
    {first user turn}<turn|>
    <|turn>model
    {answer}<turn|>
    ...

Rows are built the same way, the loss is on each model turn and its
`<turn|>`, and generation stops at `<turn|>` (KerasHub's Gemma4CausalLM
stops there too). An empty system message writes no system turn. Thinking
(`<|think|>` in the system turn, `<|channel>thought ... <channel|>` in the
answer) is not written: answers are trained and generated as plain text.
"""

from dataclasses import dataclass

from gemma_lora.data.control_tokens import encoder
from gemma_lora.errors import ConfigError, DataError

# adapter.json's `chat_format` (and a preset's metadata.json, for merged
# models): the name of the chat format an adapter was trained on, or null.
GEMMA = "gemma"
GEMMA4 = "gemma4"
CHAT_FORMATS = (GEMMA, GEMMA4)
START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"
# Each format's (start of turn, end of turn) markers.
TURN_MARKERS = {GEMMA: (START_OF_TURN, END_OF_TURN), GEMMA4: ("<|turn>", "<turn|>")}
# The package's roles (see formats.ROLES) → Gemma's.
GEMMA_ROLES = {"user": "user", "assistant": "model", "system": "system"}


def format_of(tokenizer):
    """The chat format a tokenizer's model was tuned on: "gemma4" for a Gemma4Tokenizer, else "gemma" (Gemma 1-3)."""
    return GEMMA4 if type(tokenizer).__name__ == "Gemma4Tokenizer" else GEMMA


def describe(fmt):
    """One phrase naming a format's turns and its end-of-turn marker, for the run's output."""
    start, end = TURN_MARKERS[fmt]
    name = "Gemma 4's chat format" if fmt == GEMMA4 else "Gemma's chat format"
    system = ", a system turn first" if fmt == GEMMA4 else ""
    return f"{name}: {start}user / model turns{system}, loss on each model turn and its {end}, answers stop at {end}"


@dataclass(frozen=True)
class Markers:
    """The token ids the chat format is built from."""

    bos: int
    eos: int
    start_of_turn: int
    end_of_turn: int
    format: str = GEMMA

    @property
    def stop_ids(self):
        """What ends a model turn in generation: the end-of-turn marker, and `<eos>` should the model write that."""
        return [self.end_of_turn, self.eos]

    @property
    def end_of_turn_token(self):
        """The end-of-turn marker as text: `<end_of_turn>`, or Gemma 4's `<turn|>`."""
        return TURN_MARKERS[self.format][1]

    @property
    def system_role(self):
        """Gemma 4 writes a system message as its own turn; Gemma 1-3 lead the first user turn with it."""
        return self.format == GEMMA4


def markers(tokenizer):
    """The chat format's token ids in `tokenizer` (its format: `format_of`), each checked to be one token of the vocabulary.

    Raises:
        ConfigError: the vocabulary has no single token for a marker (it is
            not a Gemma vocabulary).
    """
    fmt = format_of(tokenizer)
    ids = {}
    for name in TURN_MARKERS[fmt]:
        token_id = tokenizer.token_to_id(name)
        # SentencePiece answers an unknown piece with <unk>'s id.
        if token_id is None or tokenizer.id_to_token(int(token_id)) != name:
            pieces = len(list(tokenizer([name])[0]))
            which = "Gemma 4 vocabularies have" if fmt == GEMMA4 else "Gemma 1, 2 and 3 vocabularies have"
            raise ConfigError(
                f"The tokenizer has no single token for {name} (written as text it splits into {pieces} pieces), "
                f"so it cannot hold {'Gemma 4' if fmt == GEMMA4 else 'Gemma'}'s chat format. Use a Gemma preset "
                f"({which} the turn markers), or train without --chat."
            )
        ids[name] = int(token_id)
    start, end = TURN_MARKERS[fmt]
    return Markers(int(tokenizer.start_token_id), int(tokenizer.end_token_id), ids[start], ids[end], fmt)


def uses_chat(config, examples=()):
    """Whether the chat format applies: `config.chat` when set, else whether `examples` are conversations.

    The pipeline and the CLI settle `config.chat` before training (from the
    data and the preset, see `model.chat_format_of`); this default serves
    direct calls into `data` and `sampling`.
    """
    if config.chat is not None:
        return config.chat
    return any(example.conversation for example in examples)


def conversation_problem(turns):
    """What keeps (role, content) `turns` from being a Gemma conversation to learn from, or None.

    Returns:
        None, or (problem, fix) strings for a `DataError`.
    """
    roles = [role for role, _ in turns]
    listed = ", ".join(roles) if len(roles) <= 8 else ", ".join(roles[:8]) + ", ..."
    if "system" in roles[1:]:
        number = roles.index("system", 1) + 1
        return (f"turn {number} of {len(turns)} ({listed}) is a system message; only the first turn may be one "
                "(Gemma has no system role: it leads the first user turn)", "Move it to the start or merge it into a user turn.")
    exchange = roles[1:] if roles[0] == "system" else roles
    for index, role in enumerate(exchange):
        expected = "user" if index % 2 == 0 else "assistant"
        if role != expected:
            number = index + 1 + (len(roles) - len(exchange))
            return (f"turn {number} of {len(turns)} ({listed}) is {_article(role)} {role} turn where "
                    f"{_article(expected)} {expected} turn belongs: "
                    "turns must alternate user, assistant, user, ..., starting with the user",
                    "Merge consecutive turns of one speaker, or fix the roles.")
    if not exchange:
        return f"the conversation ({listed}) has no user or assistant turn", "Add a user turn and its answer."
    if exchange[-1] != "assistant":
        return (f"the conversation ({listed}) ends with a user turn, which leaves no answer to learn",
                "End it with the assistant's answer, or drop the last user turn.")
    for number, (role, content) in enumerate(turns, start=1):
        if role != "system" and not content.strip():
            return f"turn {number} of {len(turns)} ({listed}) is empty", "Fill it in or remove the record."
    return None


def _article(role):
    return "an" if role == "assistant" else "a"


def gemma_turns(example, system_role=False):
    """An example's turns as Gemma reads them: [(role, text)], user and model alternating, ending with the model.

    A conversation's turns, with a system message leading the first user
    turn (Gemma 1-3), or, with `system_role` (Gemma 4), as a ("system", text)
    turn of its own before it; any other example is one exchange: its prompt
    (the instruction, with a context after a blank line; a completion's
    prompt as written) and its response.

    Raises:
        DataError: a conversation that `conversation_problem` refuses, or a
            text example (it has no prompt to answer).
    """
    if example.conversation:
        problem = conversation_problem(example.conversation)
        if problem:
            raise DataError(f"A conversation cannot be written in Gemma's chat format: {problem[0]}. {problem[1]}")
        turns = list(example.conversation)
        system = ""
        if turns[0][0] == "system":
            (_, system), *turns = turns
        gemma = [(GEMMA_ROLES[role], content.strip()) for role, content in turns]
        if system.strip() and system_role:
            return [("system", system.strip()), *gemma]
        if system.strip():
            gemma[0] = ("user", f"{system}\n\n{gemma[0][1]}")
        return gemma
    if example.prompt == "":
        raise DataError(
            "Text data (loss on every token) has no prompts and answers to write as turns. Train it without --chat."
        )
    if example.prompt is not None:
        user = example.prompt
    else:
        user = f"{example.instruction}\n\n{example.context}" if example.context else example.instruction
    return [("user", user.strip()), ("model", example.response.strip())]


@dataclass
class Encoded:
    """One example in the chat format: token ids, the loss weight of predicting each, where exchanges end.

    `weights[t]` weighs the prediction of `ids[t + 1]` (KerasHub's shifted
    labels). `exchange_ends[k]` is the length of the ids that hold the first
    k + 1 exchanges whole (up to the model's `<end_of_turn>`).
    """

    ids: list
    weights: list
    exchange_ends: list


def encode(examples, tokenizer, marks, response_only=True):
    """Each example as a training row of the chat format (see `Encoded`).

    Args:
        examples: list of `Example`.
        tokenizer: a KerasHub tokenizer with the markers `marks`.
        marks: `Markers` from `markers(tokenizer)`.
        response_only: True weighs each model turn and its `<end_of_turn>`;
            False every next token (as the recipe's whole-sequence loss).

    Raises:
        DataError: as `gemma_turns`.
    """
    plans = [_row_plan(gemma_turns(e, marks.system_role), marks) for e in examples]
    out = []
    for plan, pieces in zip(plans, _tokenized(tokenizer, plans)):
        ids, weights, ends = [marks.bos], [], []
        for (item, weighed, closes), piece in zip(plan, pieces):
            ids += piece
            weights += [1.0 if weighed or not response_only else 0.0] * len(piece)
            if closes:
                ends.append(len(ids))
        out.append(Encoded(ids, weights, ends))
    return out


def prompt_ids(examples, tokenizer, marks):
    """Token ids that ask for each example's last model turn: the turns before it and the model's header.

    A string is one user turn. A conversation's earlier exchanges come whole
    (its context); the answer to its last user turn is what generation writes.
    """
    plans = []
    for example in examples:
        if isinstance(example, str):
            turns = [("user", example.strip()), ("model", "")]
        else:
            turns = gemma_turns(example, marks.system_role)
        plans.append(_row_plan(turns, marks)[:-2])  # everything before the last answer and its <end_of_turn>
    return [[marks.bos, *(t for piece in pieces for t in piece)] for pieces in _tokenized(tokenizer, plans)]


def _row_plan(turns, marks):
    """[(text or token id, carries loss, closes an exchange)] after <bos>, ending with the last answer and its <end_of_turn>."""
    plan = []
    for index, (role, text) in enumerate(turns):
        if index:
            plan.append(("\n", False, False))  # Gemma's line break after each <end_of_turn>
        if role in ("user", "system"):
            plan += [(marks.start_of_turn, False, False), (f"{role}\n{text}", False, False),
                     (marks.end_of_turn, False, False)]
        else:
            # The header apart from the answer: generation is given the header and writes the answer.
            plan += [(marks.start_of_turn, False, False), ("model\n", False, False), (text, True, False),
                     (marks.end_of_turn, True, True)]
    return plan


def _tokenized(tokenizer, plans):
    """Per plan, per item: its token ids (a marker's id, or its text encoded as text; every text in one call)."""
    texts = sorted({item for plan in plans for item, *_ in plan if isinstance(item, str) and item})
    ids = dict(zip(texts, encoder(tokenizer).encode(texts)))
    return [[[item] if isinstance(item, int) else ids.get(item, []) for item, *_ in plan] for plan in plans]
