"""Held-out answering: stock KerasHub `generate` against the package's decoder, same prompts.

    python scripts/benchmark_generate.py                      # demo (Gemma 3 270M), 68 test rows, 128 new tokens
    python scripts/benchmark_generate.py --preset tiny --rows 20 --max-new-tokens 16   # CPU smoke, seconds
    python scripts/benchmark_generate.py --adapter runs/<run>/adapter.lora.h5         # a fine-tuned model

Both answer the test split's instructions (the pipeline's template) greedily
up to --max-new-tokens, stopping at <eos>. "stock" is KerasHub's compiled
`generate` in batches of 16 rows of like length, prompt room rounded up to 64
tokens (what the package did before `gemma_lora.fast.decode`); "package" is
`gemma_lora.fast.decode.decode_tokens` as the pipeline calls it (its own
slot count, the bfloat16 shortlist where bfloat16 is native);
"package_float32" is the same decoder with 16 slots and every logit in
float32 (its settings before 2026-12-07). Each is called twice in the same
process: "first call" includes compilation, "second call" does not, and
"compile s" is their difference. Rows whose tokens differ from stock's and
from package_float32's are counted (float32 greedy decoding should agree
except at near-ties).
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gemma_lora import runtime  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--adapter", help="Apply this adapter first (a fine-tuned model ends its answers).")
    parser.add_argument("--rows", type=int, default=68, help="Test rows to answer (the shipped sample has 68).")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--variants", default="package,package_float32,stock")
    parser.add_argument("--slots", type=int, help="Rows the package decodes together (default: decode.auto_slots).")
    args = parser.parse_args()

    runtime.quiet_startup()
    runtime.configure_runtime()
    from gemma_lora import data
    from gemma_lora.config import resolve_config
    from gemma_lora.data import Example, prompt_text
    from gemma_lora.fast import decode
    from gemma_lora.model import loading, presets
    from gemma_lora.sampling import keras_hub_batch

    config = resolve_config(overrides=dict(preset=args.preset, sequence_length=256, test_rows=args.rows,
                                           max_new_tokens=args.max_new_tokens, stop_strings=[]))
    rows = data.split(data.load_examples(config), config).test[: args.rows]
    causal_lm = loading.load_causal_lm(presets.resolve_preset(config.preset), "float32", config.sequence_length)
    if args.adapter:
        from gemma_lora.adapters.store import load_adapter

        load_adapter(causal_lm, args.adapter)
    tokenizer = causal_lm.preprocessor.tokenizer
    eos, pad = tokenizer.end_token_id, tokenizer.pad_token_id
    prompts = [[tokenizer.start_token_id, *map(int, ids)]
               for ids in tokenizer([prompt_text(Example(e.instruction, ""), config) for e in rows])]

    def package():
        return decode.decode_tokens(causal_lm, prompts, args.max_new_tokens, [eos], slots=args.slots)

    def package_float32():
        return decode.decode_tokens(causal_lm, prompts, args.max_new_tokens, [eos], slots=16, shortlist=False)

    def stock():
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        outputs = [None] * len(prompts)
        for start in range(0, len(order), 16):
            batch = order[start : start + 16]
            for i, new in zip(batch, keras_hub_batch(causal_lm, [prompts[i] for i in batch], args.max_new_tokens, eos, pad)):
                outputs[i] = new
        return outputs

    results, tokens = [], {}
    for name in args.variants.split(","):
        run = {"package": package, "package_float32": package_float32, "stock": stock}[name]
        times = []
        for _ in range(2):
            start = time.perf_counter()
            out = run()
            times.append(time.perf_counter() - start)
        tokens[name] = out
        new = sum(map(len, out))
        results.append(dict(variant=name, rows=len(rows), new_tokens=new, first=times[0], second=times[1],
                            compile=times[0] - times[1], tps=new / times[1]))
        print(f"{name}: first call {times[0]:.1f} s, second {times[1]:.1f} s, {new} new tokens", flush=True)

    names = list(tokens)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            differ = sum(x != y for x, y in zip(tokens[a], tokens[b]))
            print(f"rows whose greedy tokens differ between {a} and {b}: {differ} of {len(rows)}")
    config_fast, _ = decode.inference_params(causal_lm)
    slots = args.slots or decode.auto_slots(config_fast, len(prompts), decode.cache_length(max(map(len, prompts)), args.max_new_tokens))
    print(f"\npreset {args.preset}{' + ' + args.adapter if args.adapter else ''}, {len(rows)} rows, "
          f"up to {args.max_new_tokens} new tokens, package slots {slots}, decode chunk {decode.CHUNK_STEPS} steps\n")
    print("| variant | rows | new tokens | first call s | second call s | compile s | new tokens/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['variant']} | {r['rows']} | {r['new_tokens']:,} | {r['first']:.1f} | {r['second']:.1f} | "
              f"{r['compile']:.1f} | {r['tps']:.0f} |")
    for a in results:
        for b in results:
            if b["variant"] == "stock" and a is not b or (a["variant"], b["variant"]) == ("package", "package_float32"):
                print(f"{a['variant']} against {b['variant']}: first call {b['first'] / a['first']:.2f}x faster, "
                      f"second call {b['second'] / a['second']:.2f}x faster")


if __name__ == "__main__":
    main()
