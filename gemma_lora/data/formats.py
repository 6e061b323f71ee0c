"""What a record means: one small reader per data format, each turning a record into an `Example`.

The contract of the family:

    reader(row: Row) -> Example

A `Row` is one record as a source yielded it (a dict of column name to
value), with the user's `--field NAME=COLUMN` mapping applied and its place in
the file (for messages). A reader asks the row for its fields by the format's
own names (`row.text("output")`, `row.turns("messages")`); the row checks
presence, type and emptiness and raises a `DataError` that names the file and
line, the format and the keys found. `FORMATS` maps each name to its reader,
`FIELDS` to the fields it reads.

Formats, and how each becomes a training example (prompt → response):

    dolly       instruction, response, optional context: the template (context_template when a context)
    alpaca      instruction, output, optional input: as dolly, `input` taking the context's place
    completion  prompt, completion: the prompt as written (no template), loss on the completion
    messages    messages: [{role, content}, ...]     conversations, kept as (role, content) turns
    sharegpt    conversations: [{from, value}, ...]  for Gemma's chat format (chat.py)
                a content may also be a list of text parts, [{"type": "text", "text": ...}, ...]
                (transformers' form), joined as written; image, audio and video parts are refused
    text        text: no prompt, loss on every token (continued pre-training)
    preference  prompt?, chosen, rejected: a preference pair (`read_preference`); the chosen
                response is the example's response, the rejected one its `rejected`
    prompt      prompt, optional answer: a prompt to sample completions for (objective grpo),
                written as a completion's; the answer (or "") is what rewards compare with
"""

import dataclasses
import json
from dataclasses import dataclass

from gemma_lora.data.chat import conversation_problem
from gemma_lora.errors import DataError


@dataclass(frozen=True)
class Example:
    """One record, whatever format it came in: the prompt side and the response it teaches.

    `prompt` is None for templated records (dolly, alpaca, a conversation
    without the chat format): the prompt is the template filled with
    `instruction` and `context`. `completion` records carry their prompt as
    written, and `text` records an empty one (every token is the response).
    `conversation` keeps a messages/sharegpt record's turns as read, as
    ("system" | "user" | "assistant", content) pairs, for the chat format;
    its `instruction` is then the last user turn (a system message leading it
    when it is the first) and its `response` the last answer.
    """

    instruction: str
    response: str
    context: str = ""
    prompt: str | None = None
    conversation: tuple = ()
    # A preference pair's rejected response (the last model turn of a conversation); None otherwise.
    rejected: str | None = None
    # The record's own columns as read, (name, value) pairs, for GRPO's reward functions; None when not kept.
    columns: tuple | None = None


# Fields each format reads: (required, optional). A conversation's turns hold
# the keys in TURN_KEYS; `--field` can rename those too.
FIELDS = {
    "dolly": (("instruction", "response"), ("context",)),
    "alpaca": (("instruction", "output"), ("input",)),
    "completion": (("prompt", "completion"), ()),
    "messages": (("messages",), ()),
    "sharegpt": (("conversations",), ()),
    "text": (("text",), ()),
    "prompt": (("prompt",), ("answer",)),
    "preference": (("chosen", "rejected"), ("prompt",)),
}
TURN_KEYS = {"messages": ("role", "content"), "sharegpt": ("from", "value"), "preference": ("role", "content")}
# Content parts that are not text, by their `type` in transformers' message form (and OpenAI's).
MEDIA_PARTS = {"image": "image", "image_url": "image", "audio": "audio", "input_audio": "audio", "video": "video"}
# Speaker names in either conversation format → the role used here.
ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
}


def field_names(fmt):
    """Every name `--field` may map for format `fmt`."""
    required, optional = FIELDS[fmt]
    return (*required, *optional, *TURN_KEYS.get(fmt, ()))


class Row:
    """One record with the `--field` mapping applied; its accessors raise DataError naming the place."""

    def __init__(self, record, where, fmt, fields):
        self.record, self.where, self.fmt, self.fields = record, where, fmt, fields

    def fail(self, problem, fix=""):
        keys = ", ".join(map(str, self.record)) or "none"
        raise DataError(f"{self.where}: {problem} ({self.fmt} format; keys found: {keys}).{' ' + fix if fix else ''}")

    def column(self, name):
        return self.fields.get(name, name)

    def value(self, name, required=True):
        column = self.column(name)
        value = self.record.get(column)
        if value is None and required:
            if column != name:
                self.fail(f"missing column {column!r} (mapped onto {name!r} by --field {name}={column})",
                          "Check the column name.")
            self.fail(f"missing field {name!r}",
                      f"Add it, or map a column onto it with --field {name}=COLUMN.")
        return value

    def text(self, name, required=True):
        """A string field; a required one must hold more than white space."""
        value = self.value(name, required)
        if value is None:
            return ""
        if not isinstance(value, str):
            self.fail(f"field {name!r} must be a string, got {type(value).__name__}")
        if required and not value.strip():
            self.fail(f"field {name!r} is empty", "Fill it in or remove the record.")
        return value

    def turns(self, name):
        """A conversation: a non-empty list of turns → tuple of (role, content)."""
        turns = self.value(name)
        if isinstance(turns, str):
            # A CSV cell holds text only: a conversation there is written as JSON.
            try:
                turns = json.loads(turns)
            except json.JSONDecodeError:
                self.fail(f"field {name!r} is text that is not a JSON list of turns")
        if not isinstance(turns, list) or not turns:
            got = "an empty list" if isinstance(turns, list) else type(turns).__name__
            self.fail(f"field {name!r} must be a non-empty list of turns, got {got}")
        role_key, content_key = (self.column(k) for k in TURN_KEYS[self.fmt])
        conversation = []
        for number, turn in enumerate(turns, start=1):
            if not isinstance(turn, dict):
                self.fail(f"turn {number} of {name!r} must be an object with {role_key!r} and {content_key!r}, "
                          f"got {type(turn).__name__}")
            role, content = turn.get(role_key), turn.get(content_key)
            if role not in ROLES:
                self.fail(f"turn {number} of {name!r} has {role_key}={role!r}; known: {', '.join(ROLES)}",
                          f"If the turns name their speaker under another key, map it with --field "
                          f"{TURN_KEYS[self.fmt][0]}=KEY.")
            if isinstance(content, list):
                content = self.text_parts(content, f"turn {number} of {name!r}")
            if not isinstance(content, str):
                self.fail(f"turn {number} of {name!r} must have a string {content_key!r} or a list of text parts, "
                          f"got {type(content).__name__}")
            conversation.append((ROLES[role], content))
        return tuple(conversation)

    def text_parts(self, parts, where):
        """Content as a list of parts (transformers' and TRL's message form) → its text parts joined as written."""
        texts = []
        for number, part in enumerate(parts, start=1):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in MEDIA_PARTS:
                self.fail(f"part {number} of {where} is {MEDIA_PARTS[kind]} ({kind!r}): gemma-lora trains on text only "
                          "for now", "Drop the non-text parts, or leave out the rows that have them.")
            if kind != "text" or not isinstance(part.get("text"), str):
                self.fail(f"part {number} of {where} must be {{\"type\": \"text\", \"text\": ...}}, got {part!r:.60}")
            texts.append(part["text"])
        return "".join(texts)


def read_dolly(row):
    return Example(row.text("instruction"), row.text("response"), row.text("context", required=False))


def read_alpaca(row):
    return Example(row.text("instruction"), row.text("output"), row.text("input", required=False))


def read_completion(row):
    prompt = row.text("prompt")
    return Example(prompt, row.text("completion"), prompt=prompt)


def read_prompt(row):
    prompt = row.text("prompt")
    return Example(prompt, row.text("answer", required=False), prompt=prompt)


def read_text(row):
    return Example("", row.text("text"), prompt="")


def read_messages(row):
    return conversation_example(row, row.turns("messages"))


def read_sharegpt(row):
    return conversation_example(row, row.turns("conversations"))


def conversation_example(row, turns):
    """A conversation for Gemma's chat format; its last exchange as instruction and response.

    The conversation must fit Gemma's turns (`chat.conversation_problem`):
    an optional system message first, then user and assistant alternating,
    ending with the assistant. Without the chat format a single exchange goes
    through the instruction template, a system message folded into the
    instruction as Gemma's own chat template folds it into the first user
    turn (`dataset.read_dataset` refuses longer ones there).
    """
    problem = conversation_problem(turns)
    if problem:
        row.fail(*problem)
    system = turns[0][1] if turns[0][0] == "system" else ""
    users = [content for role, content in turns if role == "user"]
    answers = [content for role, content in turns if role == "assistant"]
    instruction = f"{system}\n\n{users[0]}" if len(users) == 1 and system.strip() else users[-1]
    return Example(instruction, answers[-1], conversation=turns)


def read_preference(row):
    """A preference pair in any of the three layouts TRL's datasets use, as an `Example` with `rejected` set.

    - explicit prompt: `prompt`, `chosen`, `rejected` strings. The prompt is an
      instruction: the template writes it (the chat format, a user turn).
    - implicit prompt: `chosen` and `rejected` full texts only; the prompt is
      their common beginning, cut back to the last white space in it (so no
      word is split between prompt and response), written as it is (no template).
    - conversational: `prompt` a message list and `chosen`/`rejected` one
      assistant message each, or `chosen`/`rejected` whole conversations that
      share every turn but their last, the assistant's.

    Chosen identical to rejected is a bad record (nothing to learn): the run
    stops naming it, or leaves it out and counts it with --skip-bad-rows.
    """
    chosen, rejected = row.value("chosen"), row.value("rejected")
    prompt = row.value("prompt", required=False)
    if isinstance(chosen, list) or isinstance(rejected, list) or isinstance(prompt, list):
        example = _conversation_pair(row, prompt)
    elif prompt is not None:
        example = Example(row.text("prompt"), row.text("chosen"), rejected=row.text("rejected"))
    else:
        example = _implicit_pair(row, row.text("chosen"), row.text("rejected"))
    if example.response.strip() == example.rejected.strip():
        row.fail("chosen and rejected are the same response, which teaches nothing",
                 "Remove the record, or pass --skip-bad-rows to leave such records out and count them.")
    return example


def _implicit_pair(row, chosen, rejected):
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    cut = max(chosen.rfind(space, 0, shared) for space in (" ", "\n", "\t")) + 1
    if shared == len(chosen) == len(rejected):
        cut = shared  # the same text: refused by the caller
    prompt = chosen[:cut]
    if not prompt.strip():
        row.fail("chosen and rejected share no prompt (no common beginning up to a white space)",
                 "Add a prompt field, or give chosen and rejected as prompt followed by response.")
    if not chosen[cut:].strip() or not rejected[cut:].strip():
        which = "chosen" if not chosen[cut:].strip() else "rejected"
        row.fail(f"field {which!r} has an empty response after the prompt the two texts share",
                 "Give both responses, or add a prompt field.")
    return Example(prompt, chosen[cut:], prompt=prompt, rejected=rejected[cut:])


def _conversation_pair(row, prompt):
    if prompt is not None:
        turns = row.turns("prompt")
        answers = {}
        for name in ("chosen", "rejected"):
            reply = row.turns(name)
            if len(reply) != 1 or reply[0][0] != "assistant":
                row.fail(f"field {name!r} must be one assistant message when prompt is a message list, got "
                         f"{', '.join(role for role, _ in reply)}", "Put earlier turns in the prompt.")
            answers[name] = reply[0][1]
    else:
        chosen, rejected = row.turns("chosen"), row.turns("rejected")
        if chosen[:-1] != rejected[:-1] or len(chosen) != len(rejected):
            row.fail("the chosen and rejected conversations must share every turn but their last",
                     "Give the shared turns as a prompt message list, or fix the conversations.")
        turns, answers = chosen[:-1], {"chosen": chosen[-1][1], "rejected": rejected[-1][1]}
        if not turns:
            row.fail("the chosen and rejected conversations hold one turn each, with no prompt before it",
                     "Start each conversation with the user's turn.")
    example = conversation_example(row, (*turns, ("assistant", answers["chosen"])))
    if not answers["rejected"].strip():
        row.fail("the rejected answer is empty", "Fill it in or remove the record.")
    return dataclasses.replace(example, rejected=answers["rejected"])


def exchanges(example):
    """How many user/assistant exchanges an example holds (1 for any non-conversation)."""
    return sum(role == "assistant" for role, _ in example.conversation) or 1


FORMATS = {
    "dolly": read_dolly,
    "alpaca": read_alpaca,
    "completion": read_completion,
    "messages": read_messages,
    "sharegpt": read_sharegpt,
    "text": read_text,
    "preference": read_preference,
    "prompt": read_prompt,
}


def parse(fmt, record, where, fields, keep_columns=False):
    """Read one record of format `fmt` into an `Example` (DataError names `where`); `keep_columns`: with its columns."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object (a record with named fields), got {type(record).__name__}.")
    example = FORMATS[fmt](Row(record, where, fmt, fields))
    return dataclasses.replace(example, columns=tuple(record.items())) if keep_columns else example


def check_fields(fmt, fields, how):
    """Refuse a --field name that the format does not read."""
    unknown = [name for name in fields if name not in field_names(fmt)]
    if unknown:
        raise DataError(
            f"--field {unknown[0]}=... does not apply to the {fmt} format ({how}); its fields are "
            f"{', '.join(field_names(fmt))}. Drop the mapping or choose the format with --data-format."
        )


def detect(record, where, fields):
    """The format of the first record, from its keys after the `--field` mapping.

    A record with every required field of a format is of that format; failing
    that, of the format it shares most fields with (its reader then names the
    missing one).

    Raises:
        DataError: no format fits; the message lists the formats and the
            mapping that would fit the keys found.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object (a record with named fields), got {type(record).__name__}.")
    present = {name for name in _all_names() if fields.get(name, name) in record}
    for fmt in ("preference", "messages", "sharegpt", "completion", "alpaca", "dolly", "prompt", "text"):
        if set(FIELDS[fmt][0]) <= present:
            return fmt
    # Some of a format's fields: that format, so the record's error names the missing one.
    overlap = {fmt: (len(present & set(req)), len(present & set(opt))) for fmt, (req, opt) in FIELDS.items()}
    best = max(overlap, key=overlap.get)
    if overlap[best][0]:
        return best
    keys = ", ".join(map(str, record)) or "none"
    known = "; ".join(
        f"{fmt} ({', '.join(required)}{''.join(f', {o}?' for o in optional)}"
        + (f" of {'/'.join(TURN_KEYS[fmt])} turns" if fmt in TURN_KEYS else "") + ")"
        for fmt, (required, optional) in FIELDS.items()
    )
    hint = suggest_mapping(record)
    raise DataError(
        f"{where}: cannot tell the data format from the keys found ({keys}). Formats and their fields: {known}. "
        + (f"This record would fit: {hint}." if hint else "Rename the columns, or map them with --field NAME=COLUMN.")
    )


def suggest_mapping(record):
    """The --data-format and --field flags under which `record` would read, or None."""
    texts = [k for k, v in record.items() if isinstance(v, str)]
    lists = [k for k, v in record.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
    if lists:
        key, turn = lists[0], record[lists[0]][0]
        fmt = "sharegpt" if {"from", "value"} <= set(turn) else "messages"
        flags = [f"--data-format {fmt}", f"--field {FIELDS[fmt][0][0]}={key}"]
        strings = [k for k, v in turn.items() if isinstance(v, str)]
        for name, guess in zip(TURN_KEYS[fmt], strings[:2]):
            if name not in turn and guess != name:
                flags.append(f"--field {name}={guess}")
        return " ".join(flags)
    if len(texts) >= 2:
        prompt = _pick(texts, _PROMPT_LIKE) or texts[0]
        completion = _pick([k for k in texts if k != prompt], _ANSWER_LIKE) or next(k for k in texts if k != prompt)
        return f"--data-format completion --field prompt={prompt} --field completion={completion}"
    if texts:
        return f"--data-format text --field text={texts[0]}"
    return None


_PROMPT_LIKE = ("prompt", "question", "query", "input", "instruction", "source", "problem", "src")
_ANSWER_LIKE = ("completion", "answer", "output", "response", "target", "label", "solution", "tgt")


def _pick(keys, likely):
    lowered = {k.lower(): k for k in keys}
    return next((lowered[name] for name in likely if name in lowered), None)


def _all_names():
    return {name for fmt in FIELDS for name in FIELDS[fmt][0] + FIELDS[fmt][1]}
