"""Rebuild the tiny SentencePiece vocabulary used by the `tiny` preset.

    python scripts/make_tiny_vocab.py

The vocabulary is trained on the shipped Dolly sample so that the tiny preset
tokenizes the real data into plausible lengths. It is checked in
(`gemma_lora/resources/tiny_vocab.spm`) so tests do not depend on the
SentencePiece trainer's version; this script is how it was made.
"""

import gzip
import io
import json
from pathlib import Path

import sentencepiece

RESOURCES = Path(__file__).resolve().parent.parent / "gemma_lora" / "resources"


def main():
    with gzip.open(RESOURCES / "databricks-dolly-sample.jsonl.gz", "rt") as f:
        texts = []
        for line in f:
            record = json.loads(line)
            texts += [record["instruction"], record["response"]]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=1024,
        model_type="bpe",
        # Gemma's special-token layout: KerasHub's GemmaTokenizer looks these
        # pieces up by name, and generation stops on <eos>.
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        byte_fallback=True,
        # Keep "\n" as a piece so the template's line breaks survive, and
        # Gemma's turn markers as single pieces for the chat format (user-
        # defined, as in Gemma's own vocabulary: text holding a marker
        # tokenizes to it too).
        user_defined_symbols=["\n", "<start_of_turn>", "<end_of_turn>"],
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        split_digits=True,
        character_coverage=1.0,
        num_threads=1,
        seed_sentencepiece_size=100_000,
    )
    out = RESOURCES / "tiny_vocab.spm"
    out.write_bytes(model.getvalue())
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
