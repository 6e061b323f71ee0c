"""Time Hugging Face PEFT LoRA on gemma_2b's shape: the peer of benchmark.py.

    python scripts/benchmark_peft.py                 # GPU only (torch, transformers, peft)
    python scripts/benchmark_peft.py --variants bf16_compile

Settings are those recorded in docs/perf.md: random weights, LoRA
r=4 alpha=4 on q_proj/v_proj with float32 adapters, autocast to bfloat16,
torch AdamW(5e-5, weight decay 0.01) over the LoRA parameters, loss from
`model(input_ids=ids, labels=ids)`, TF32 allowed, 3 warm-up and 20 timed steps
closed by a CUDA sync. Each variant runs in a fresh process so its peak memory
(`torch.cuda.max_memory_allocated`) is its own.
"""

import argparse
import json
import subprocess
import sys
import time

VARIANTS = {
    # name -> (weights dtype, batch, torch.compile)
    "fp32_eager": ("float32", 1, False),
    "bf16_eager": ("bfloat16", 8, False),
    "bf16_compile": ("bfloat16", 8, True),
}


def run_child(name, seq, steps, warmup):
    import peft
    import torch
    import transformers

    dtype_name, batch, compiled = VARIANTS[name]
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    config = transformers.GemmaConfig(
        vocab_size=256000,
        hidden_size=2048,
        intermediate_size=16384,
        num_hidden_layers=18,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=256,
        attn_implementation="sdpa",
    )
    with torch.device("cuda"):
        model = transformers.GemmaForCausalLM(config)
    model = model.to(getattr(torch, dtype_name))
    lora = peft.LoraConfig(
        r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
        bias="none", task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(model, lora)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # adapters stay float32
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.01)
    forward = torch.compile(model) if compiled else model
    ids = torch.randint(1, 256000, (batch, seq), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    result = {
        "variant": name,
        "batch": batch,
        "tokens_per_s": batch * seq * steps / elapsed,
        "step_ms": elapsed / steps * 1e3,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "first_step_s": first,
        "trainable": sum(p.numel() for p in params),
        "loss": float(loss),
        "versions": f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}",
    }
    print("RESULT " + json.dumps(result), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=300)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child(args.child, args.seq, args.steps, args.warmup)
    rows = []
    for name in args.variants.split(","):
        command = [sys.executable, __file__, "--child", name, "--seq", str(args.seq),
                   "--steps", str(args.steps), "--warmup", str(args.warmup)]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
            out = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired:
            out = f"timed out after {args.timeout} s"
        line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
        row = json.loads(line[7:]) if line else {"variant": name, "error": out.strip().splitlines()[-1:]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print("| PEFT variant | batch | tok/s | step ms | peak GiB | first step s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | failed: {r['error']} | | | | |")
        else:
            print(f"| {r['variant']} | {r['batch']} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | "
                  f"{r['peak_gib']:.1f} | {r['first_step_s']:.1f} |")


if __name__ == "__main__":
    main()
