"""Load exports with libraries this package did not write and print their greedy answers.

    gemma-lora export RUN/adapter.lora.h5 out/model.gguf --to gguf
    gemma-lora export RUN/adapter.lora.h5 out/peft --to peft --with-base
    python scripts/check_exports.py --gguf out/model.gguf --peft out/peft --hf out/hf
    gemma-lora generate --preset demo --adapter RUN/adapter.lora.h5 --prompt "..."   # the package's own

Needs torch, transformers, gguf and (for --peft) peft: `pip install ".[hf]"`
(CPU: torch==2.13.0 on Python 3.11). Each export is loaded the way a user
would: transformers' GGUF loader (`from_pretrained(dir, gguf_file=...)`),
PEFT on the transformers base, or a plain transformers folder; the prompt is
put in the package's default template and decoded greedily.
"""

import argparse
from pathlib import Path

TEMPLATE = "Instruction:\n{instruction}\n\nResponse:\n"


def greedy(model, tokenizer, prompt, max_new_tokens):
    import torch

    ids = tokenizer(TEMPLATE.format(instruction=prompt), return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", help="A .gguf file from `gemma-lora export --to gguf`.")
    parser.add_argument("--peft", help="A folder from `gemma-lora export --to peft --with-base`.")
    parser.add_argument("--hf", help="A folder from `gemma-lora export --to hf`.")
    parser.add_argument("--prompt", default="What should I do on a trip to Europe?")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()

    import torch
    import transformers

    if args.gguf:
        path = Path(args.gguf)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                  dtype=torch.float32)
        print(f"### transformers GGUF loader ({path})\n{greedy(model, tokenizer, args.prompt, args.max_new_tokens)}\n")
    if args.peft:
        import peft

        base_dir = Path(args.peft) / "base"
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(base_dir))
        base = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        model = peft.PeftModel.from_pretrained(base, args.peft)
        print(f"### PEFT adapter on the transformers base ({args.peft})\n"
              f"{greedy(model, tokenizer, args.prompt, args.max_new_tokens)}\n")
    if args.hf:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.hf)
        model = transformers.AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32)
        print(f"### transformers folder ({args.hf})\n{greedy(model, tokenizer, args.prompt, args.max_new_tokens)}\n")


if __name__ == "__main__":
    main()
