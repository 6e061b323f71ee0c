"""Text stays text: encode data and user text so that no control token comes out of it.

Gemma's vocabularies hold their turn markers (`<start_of_turn>`, `<end_of_turn>`,
Gemma 4's `<|turn>`, `<turn|>`, its image, audio and tool tokens) as
*user-defined* SentencePiece pieces, and SentencePiece turns the string of a
user-defined piece into that piece wherever it appears in the input. A
message whose text contains "<end_of_turn>\\n<start_of_turn>user" would close
the model's turn and open a user turn from inside the data, and a prompt
could do the same at generation. So every text that comes from data or from
a user goes through `TextEncoder.encode`, which cuts each control-token
string written in the text after its first character (`<` + `end_of_turn>`),
so that no piece of the input holds it whole: it is encoded as the ordinary
pieces of its characters and decodes back to the same text. Real markers are
only ever put in by id (`chat.py`), or written by the template itself (the
user's own config: `Part(text, data=False)` keeps its markers).

Which pieces are control tokens is read from the tokenizer, never listed by
hand: the tokenizer's special tokens (KerasHub's `special_tokens`: `<bos>`,
`<eos>`, `<pad>`, and on a multimodal tokenizer its image/audio/video
placeholders), every CONTROL or UNKNOWN piece of its SentencePiece model, and
every USER_DEFINED piece except the two kinds Gemma's vocabulary holds as
ordinary text: runs of white space ("\\n\\n", "▁▁") and HTML tags ("<table>",
"</td>"). Of those, only the ones that text can actually produce matter:
SentencePiece never matches a CONTROL piece such as `<eos>` in its input, so
"<eos>" written in a text is already encoded as `<`, `eos`, `>`. Text without
any control-token string is encoded exactly as the tokenizer encodes it.
"""

import re
import weakref
from dataclasses import dataclass

# A USER_DEFINED piece of one of these shapes is ordinary text in Gemma's vocabulary.
_WHITE_SPACE = re.compile(r"[\s\u2581]+")
_HTML_TAG = re.compile(r"</?[a-z][a-z0-9]*>")
# SentencePiece piece types (sentencepiece_model.proto).
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4

_ENCODERS = weakref.WeakKeyDictionary()  # tokenizer -> its TextEncoder


@dataclass(frozen=True)
class Part:
    """A stretch of one text: data (control-token strings in it stay text) or the config's own (they stay markers)."""

    text: str
    data: bool = True


def encoder(tokenizer):
    """The `TextEncoder` of a KerasHub tokenizer (built once per tokenizer)."""
    if tokenizer not in _ENCODERS:
        _ENCODERS[tokenizer] = TextEncoder(tokenizer)
    return _ENCODERS[tokenizer]


class TextEncoder:
    """Token ids of texts, with every control-token string in data text encoded as ordinary pieces.

    `markers` maps each control token that text can produce to its id.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        candidates = sorted(_candidates(tokenizer))
        ids = _tokenize(tokenizer, candidates)
        self.markers = {}
        for piece, encoded in zip(candidates, ids):
            own = tokenizer.token_to_id(piece)
            if own is not None and encoded == [int(own)]:
                self.markers[piece] = int(own)
        # Longest first: where one marker's string starts another's, the longer one is found.
        strings = sorted(self.markers, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, strings))) if strings else None

    def marker_text(self, text):
        """The control-token strings written in `text`, in order (empty when there are none)."""
        return [] if self._pattern is None else self._pattern.findall(text)

    def encode(self, items):
        """Token ids of each item: a str (data text), or a list of `Part`s (a template filled with data).

        Returns:
            A list of lists of int, one per item, in order; every text
            tokenized in one call of the tokenizer.
        """
        plans = [self._plan([Part(item)] if isinstance(item, str) else list(item)) for item in items]
        texts = sorted({piece for plan in plans for piece in plan if isinstance(piece, str)})
        encoded = dict(zip(texts, _tokenize(self.tokenizer, texts)))
        return [[t for piece in plan for t in ([piece] if isinstance(piece, int) else encoded[piece])] for plan in plans]

    def _plan(self, parts):
        """The item as texts to tokenize and marker ids: [str | int], in order."""
        whole = "".join(part.text for part in parts)
        if self._pattern is None or not any(part.data and self._pattern.search(part.text) for part in parts):
            # Nothing to keep as text (markers the config wrote are split off by the tokenizer as it would).
            return [whole] if whole else []
        data_spans, start = [], 0
        for part in parts:
            if part.data:
                data_spans.append((start, start + len(part.text)))
            start += len(part.text)
        plan, cut, position = [], 0, 0
        while (found := self._pattern.search(whole, position)) is not None:
            begin, end = found.span()
            if any(begin < stop and end > first for first, stop in data_spans):
                # Data text: cut after the marker's first character, so no piece holds it whole.
                plan.append(whole[cut : begin + 1])
                cut = position = begin + 1
            else:
                plan += [whole[cut:begin], self.markers[found.group()]]
                cut = position = end
        plan.append(whole[cut:])
        return [piece for piece in plan if piece != ""]


def _candidates(tokenizer):
    """Control tokens by the rule in the module docstring (before checking which ones text produces)."""
    found = set(getattr(tokenizer, "special_tokens", None) or ())
    proto = getattr(tokenizer, "proto", None)
    if isinstance(proto, bytes):
        from sentencepiece import sentencepiece_model_pb2

        model = sentencepiece_model_pb2.ModelProto()
        model.ParseFromString(proto)
        for piece in model.pieces:
            if piece.type in (_UNKNOWN, _CONTROL):
                found.add(piece.piece)
            elif piece.type == _USER_DEFINED and not (
                _WHITE_SPACE.fullmatch(piece.piece) or _HTML_TAG.fullmatch(piece.piece)
            ):
                found.add(piece.piece)
    return {piece for piece in found if piece}


def _tokenize(tokenizer, texts):
    """Token id lists from a KerasHub tokenizer (its pure-Python path)."""
    if not texts:
        return []
    return [list(map(int, ids)) for ids in tokenizer(list(texts))]
