"""One LoRA training step on the CPU: the package's engines against Hugging Face PEFT, same shape, same run.

    python scripts/benchmark_cpu.py --peft-python /path/to/py311-with-torch/bin/python
    python scripts/benchmark_cpu.py --shape tiny_gemma3 --steps 2 --warmup 1     # smoke, seconds

Shape: Gemma 3 270M (18 layers, hidden 640, 4 query heads, 1 KV head, head_dim 256,
FFN 2048, vocabulary 262,144; KerasHub's layer layout, random weights), a batch of
4 rows x 256 tokens with no padding, LoRA rank 8 (alpha 8) on all seven projections,
AdamW, the loss on every position. Each variant runs in its own process (one at a
time, so they do not share the cores); a variant's figure is the median of
`--steps` steps after `--warmup` warm-up steps, each closed by a device sync.
The table gives every variant's seconds per step and its speed against PEFT
eager (>1 = faster), all from this one run.

Variants:
- keras: the package's Keras engine (`train.KerasEngine`: KerasHub's model, one
  jitted step with Keras' AdamW), float32.
- fast: the fast engine (`fast_train.FastEngine`, rows unpacked: one example a
  row), float32; `fast_*` change one lever (`--xla-flags` for XLA's, or a
  `FastConfig` field), listed in `LEVERS`.
- peft_*: transformers + PEFT on torch (needs `--peft-python`, a Python with
  torch, transformers and peft): eager float32, `torch.compile`, bfloat16 autocast.
Variants doing other work than "every position, float32" are marked so in the table.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

TARGETS = ("query", "key", "value", "attention_output", "ffw_gating", "ffw_gating_2", "ffw_linear")
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> (engine, environment/options, the work it does if not the same as the others)
LEVERS = {
    "keras": ("keras", {}, None),
    "fast": ("fast", {}, None),
    "fast_onednn": ("fast", {"xla_flags": "--xla_cpu_use_onednn=true"}, None),
    "fast_chunk_256": ("fast", {"loss_chunk": 256}, None),
    "fast_chunk_4096": ("fast", {"loss_chunk": 4096}, None),
    "fast_bf16": ("fast", {"dtype": "bfloat16"}, "bfloat16 base and activations"),
    "fast_logits_bf16": ("fast", {"logits_dtype": "bfloat16"}, "bfloat16 logits"),
    "peft_eager": ("peft", {}, None),
    "peft_compile": ("peft", {"compile": True}, None),
    "peft_bf16": ("peft", {"autocast": True}, "bfloat16 autocast"),
}
DEFAULT = "keras,fast,fast_onednn,peft_eager,peft_compile,peft_bf16"


def time_steps(step, steps, warmup):
    """(first step s, median of `steps` timed steps s) of `step()`, which returns after a sync."""
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def run_package(name, shape, batch, seq, steps, warmup):
    engine, options, _ = LEVERS[name]
    options = dict(options)
    if options.get("xla_flags"):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + options.pop("xla_flags")).strip()
    os.environ["KERAS_BACKEND"] = "jax"
    import jax
    import keras
    import numpy as np
    from benchmark import SHAPES, keras_causal_lm

    from gemma_lora.config import resolve_config
    from gemma_lora.data import TokenizedRows
    from gemma_lora.model import loading
    from gemma_lora.training import engines, fast_engine

    keras.utils.set_random_seed(0)
    causal_lm = keras_causal_lm(shape, "float32")
    loading.enable_lora(causal_lm, 8, targets=TARGETS, seed=0)
    config = resolve_config(overrides=dict(preset="tiny", sequence_length=seq, batch_size=batch, lora_rank=8,
                                           lora_targets=list(TARGETS), learning_rate=2e-4, shuffle=False,
                                           bucket_by_length=False))
    engines.compile_for_training(causal_lm, config)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, SHAPES[shape]["vocabulary_size"], (batch, seq + 1)).astype("int32")
    rows = TokenizedRows(tokens[:, :-1], np.ones((batch, seq), bool), tokens[:, 1:], np.ones((batch, seq), "float32"),
                         truncated=0, real_tokens=batch * seq)
    scale = 1.0 / (batch * seq)
    if engine == "keras":
        stepper = engines.KerasEngine().stepper(causal_lm, engines.KerasEngine().plan(rows, config))
        batch_of = np.arange(batch)
    else:
        dtype = options.pop("dtype", "float32")
        engine = engines.FastEngine()
        stepper = engine.stepper(causal_lm, engine.plan(rows, config), "float32" if dtype == "float32" else "mixed_bfloat16")
        if options:  # one FastConfig lever: rebuild the step with it
            import dataclasses

            stepper.fast_config = dataclasses.replace(stepper.fast_config, **options)
            stepper._step = jax.jit(fast_engine._fast_train_step(stepper.fast_config, stepper.paths, stepper.optimizer),
                                    donate_argnums=(0, 1))
        batch_of = {"token_ids": rows.token_ids, "segment_ids": np.ones((batch, seq), "int32"),
                    "positions": np.tile(np.arange(seq, dtype="int32"), (batch, 1)), "labels": rows.labels,
                    "loss_weights": rows.weights}
    losses = []

    def step():
        losses.append(stepper.step(batch_of, scale)[2])  # floats: the step has synced

    first, median = time_steps(step, steps, warmup)
    return {"variant": name, "first_s": first, "step_s": median, "loss": losses[-1],
            "versions": f"jax {jax.__version__}, keras {keras.__version__}",
            "trainable": int(sum(np.prod(v.shape) for v in causal_lm.trainable_variables))}


def run_peft(name, shape, batch, seq, steps, warmup):
    import peft
    import torch
    import transformers

    _, options, _ = LEVERS[name]
    from benchmark import SHAPES

    dims = SHAPES[shape]
    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(
        vocab_size=dims["vocabulary_size"], hidden_size=dims["hidden_dim"], intermediate_size=dims["intermediate_dim"],
        num_hidden_layers=dims["num_layers"], num_attention_heads=dims["num_query_heads"],
        num_key_value_heads=dims["num_key_value_heads"], head_dim=dims["head_dim"],
        sliding_window=dims["sliding_window_size"], attn_implementation="sdpa",
    )
    model = transformers.Gemma3ForCausalLM(config)
    lora = peft.LoraConfig(r=8, lora_alpha=8, target_modules=PEFT_TARGETS, lora_dropout=0.0, bias="none",
                           task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01)
    forward = torch.compile(model) if options.get("compile") else model
    ids = torch.randint(1, dims["vocabulary_size"], (batch, seq))
    losses = []

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(options.get("autocast"))):
            loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))

    first, median = time_steps(step, steps, warmup)
    return {"variant": name, "first_s": first, "step_s": median, "loss": losses[-1],
            "versions": f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
                        f"{torch.get_num_threads()} threads",
            "trainable": int(sum(p.numel() for p in params))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=DEFAULT, help=f"comma-separated, from {', '.join(LEVERS)}")
    parser.add_argument("--shape", default="gemma3_270m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peft-python", help="A Python with torch, transformers and peft for the peft_* variants.")
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run = run_peft if LEVERS[args.child][0] == "peft" else run_package
        result = run(args.child, args.shape, args.batch, args.seq, args.steps, args.warmup)
        print("RESULT " + json.dumps(result), flush=True)
        return
    rows = []
    for name in args.variants.split(","):
        python = args.peft_python if LEVERS[name][0] == "peft" else sys.executable
        if python is None:
            rows.append({"variant": name, "error": "no --peft-python given"})
            continue
        command = [python, __file__, "--child", name, "--shape", args.shape, "--batch", str(args.batch),
                   "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        try:
            proc = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env)
            out = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired:
            out = f"timed out after {args.timeout} s"
        line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
        row = json.loads(line[7:]) if line else {"variant": name, "error": " ".join(out.strip().splitlines()[-1:])}
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = next((r["step_s"] for r in rows if r["variant"] == "peft_eager" and "step_s" in r), None)
    print(f"\nshape {args.shape}, batch {args.batch} x {args.seq}, LoRA rank 8 on 7 projections, median of "
          f"{args.steps} steps after {args.warmup}\n")
    print("| variant | work | s/step | first step s | loss | vs PEFT eager |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        work = LEVERS[r["variant"]][2] or "float32, every position"
        if "error" in r:
            print(f"| {r['variant']} | {work} | failed: {r['error']} | | | |")
            continue
        ratio = f"{base / r['step_s']:.2f}x" if base else "n/a"
        print(f"| {r['variant']} | {work} | {r['step_s']:.2f} | {r['first_s']:.1f} | {r['loss']:.3f} | {ratio} |")
    for r in rows:
        if "versions" in r:
            print(f"{r['variant']}: {r['versions']}, {r['trainable']:,} trainable parameters")


if __name__ == "__main__":
    main()
