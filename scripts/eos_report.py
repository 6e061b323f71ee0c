"""How well a model learned to end: reference lengths, and -log p(<eos>) at each reference's end.

    python scripts/eos_report.py                                   # the base demo model
    python scripts/eos_report.py runs/A/adapter.lora.h5 runs/B/adapter.lora.h5   # and these adapters

With configs/demo.toml's data and splits (--validation-rows rows of the
validation split): the response + <eos> lengths of each split (and the share
that fits in --max-new-tokens), then per model the mean -log p(<eos>) after
each whole reference response, scored row by row in float32, and the mean
per-row loss of the response's other tokens. Rows longer than the sequence
length are left out. docs/quality.md, "Answers that end", shows its output.
"""

import argparse
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gemma_lora import runtime  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapters", nargs="*", help=".lora.h5 adapters of the demo base")
    parser.add_argument("--validation-rows", type=int, default=40)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    runtime.quiet_startup()
    runtime.configure_runtime()
    import numpy as np

    from gemma_lora import data
    from gemma_lora.adapters.store import load_adapter
    from gemma_lora.config import resolve_config
    from gemma_lora.data import prompt_text
    from gemma_lora.model import loading, presets

    overrides = tomllib.loads((ROOT / "configs" / "demo.toml").read_text())
    config = resolve_config(overrides={**overrides, "validation_rows": args.validation_rows})
    splits = data.split(data.load_examples(config), config)
    seq = config.sequence_length

    def load(adapter):
        causal_lm = loading.load_causal_lm(presets.resolve_preset(config.preset), "float32", seq)
        if adapter:
            load_adapter(causal_lm, adapter)
        return causal_lm

    tokenizer = load(None).preprocessor.tokenizer
    for name in ("train", "validation", "test"):
        lengths = np.array([len(tokenizer(e.response)) + 1 for e in getattr(splits, name)])
        print(f"{name}: {len(lengths)} rows, response + <eos> median {int(np.median(lengths))} tokens, "
              f"{(lengths <= args.max_new_tokens).mean():.0%} fit in {args.max_new_tokens}")
    for adapter in [None, *args.adapters]:
        causal_lm = load(adapter)
        eos, rest = [], []
        for example in splits.validation:
            prompt = [tokenizer.start_token_id, *map(int, tokenizer(prompt_text(example, config)))]
            response = [*map(int, tokenizer(example.response)), tokenizer.end_token_id]
            if len(prompt) + len(response) > seq + 1:
                continue
            ids = np.asarray([prompt + response], np.int32)
            logits = np.asarray(causal_lm({"token_ids": ids, "padding_mask": np.ones_like(ids, bool)}), np.float64)[0]
            top = logits.max(-1, keepdims=True)
            logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
            targets = ids[0, 1:]
            response_logp = logp[np.arange(len(targets)), targets][len(prompt) - 1 :]
            eos.append(-response_logp[-1])
            rest.append(-response_logp[:-1].mean())
        print(f"{adapter or 'base'}: {len(eos)} validation rows, -log p(<eos>) at the reference's end "
              f"{np.mean(eos):.3f}, mean per-row loss of the other response tokens {np.mean(rest):.4f}", flush=True)


if __name__ == "__main__":
    main()
