"""GRPO steps of gemma-lora beside TRL's GRPOTrainer on the same prompts: seconds a step, generation and update apart.

    python scripts/benchmark_grpo.py --trl-python /path/to/venv-with-torch/bin/python
    python scripts/benchmark_grpo.py --preset tiny --steps 2 --trl-python ...   # a smoke run

Both sides train rank-8 LoRA on all seven projections of the same model (the `demo` preset, Gemma 3
270M, and for TRL its transformers export written by `gemma-lora export --to hf`) on the category
task's first training prompts: 4 prompts a step, 8 completions each, at most 8 new tokens, temperature
1.0, beta 0, the dapo loss, one pass per batch, the exact_match reward against the row's answer.
gemma-lora runs its fast engine in float32 and in its default precision here (bfloat16 where the
CPU has bfloat16 units); TRL runs float32 on the CPU (torch's eager mode, transformers' generate).

Each side runs in its own process, TRL in the Python given by --trl-python (torch, transformers,
peft and trl installed: torch's CPU build exists for Python 3.11 only here). The first two steps
(compilation, warm-up) are not timed. Generation is what each spends sampling completions (TRL:
`GRPOTrainer._generate`; gemma-lora: its decoder), update the rest of the step (rewards,
advantages, log-probs, backward, optimizer). Both stop a completion at <eos> or after 8 tokens (no
stop string, unlike configs/category_grpo.toml's "\n", which TRL's generate would need a tokenizer
for). A difference that remains: TRL pads prompts to the longest of the batch, gemma-lora packs them.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS_PER_STEP, GENERATIONS, MAX_NEW, RANK = 4, 8, 8, 8
TARGETS = ["query", "key", "value", "attention_output", "ffw_gating", "ffw_gating_2", "ffw_linear"]
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LEARNING_RATE = 1e-4


def prompt_rows(preset, count):
    """The category task's first `count` training prompts and answers as gemma-lora splits them."""
    from gemma_lora.config import resolve_config
    from gemma_lora.data.dataset import load_examples, split

    config = resolve_config(overrides=dict(preset=preset, data="dolly-category", validation_rows=40))
    train = split(load_examples(config), config).train[:count]
    return [{"prompt": e.prompt, "answer": e.response} for e in train]


def gemma_lora_side(preset, steps, precision, rows_file):
    """Time GRPO steps of the package's fast engine; print one JSON line."""
    from gemma_lora import runtime

    runtime.quiet_startup()
    runtime.configure_runtime()
    from benchmark_preference import prepared_stepper, timed_step

    from gemma_lora.config import resolve_config

    rows = json.loads(Path(rows_file).read_text())
    data = Path(tempfile.mkdtemp()) / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = resolve_config(overrides=dict(
        preset=preset, data=str(data), data_format="prompt", objective="grpo", engine="fast", rewards=["exact_match"],
        batch_size=PROMPTS_PER_STEP, num_generations=GENERATIONS, max_new_tokens=MAX_NEW, temperature=1.0, beta=0.0,
        grpo_loss="dapo", lora_rank=RANK, lora_targets=TARGETS, learning_rate=LEARNING_RATE, shuffle=False,
        stop_strings=[], sequence_length=256, max_steps=steps + 2, answer_splits=[], prompts=[],
        checkpoint_every=None, validation_rows=0, test_rows=0, precision=precision,
        output_dir=str(Path(tempfile.mkdtemp()) / "run")))
    run, stepper, batches = prepared_stepper(config)
    stepper.verbose = False
    steps_seen = []
    for index in range(steps + 2):
        seconds = timed_step(stepper, batches, index)
        logs = stepper.step_logs()
        steps_seen.append((seconds, logs["sampling_seconds"], logs["reward"], logs["completion_length"]))
    report("gemma-lora " + run.precision, steps_seen[2:])


def trl_side(model_dir, steps, rows_file):
    """Time GRPO steps of TRL's GRPOTrainer on the transformers export; print one JSON line."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    rows = json.loads(Path(rows_file).read_text())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    def exact_match(completions, answer, **_):
        return [float(c.strip() == a.strip()) for c, a in zip(completions, answer)]

    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=PROMPTS_PER_STEP * GENERATIONS,
        num_generations=GENERATIONS, max_completion_length=MAX_NEW, temperature=1.0, beta=0.0, loss_type="dapo",
        learning_rate=LEARNING_RATE, max_steps=steps + 2, report_to=[], bf16=False, fp16=False, use_cpu=True,
        logging_steps=1, save_strategy="no", gradient_checkpointing=False, shuffle_dataset=False, seed=0,
        dataloader_num_workers=0,
    )
    peft_config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=HF_TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=exact_match, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, peft_config=peft_config)
    generation = []
    generate = trainer._generate

    def timed_generate(*a, **k):  # TRL's own sampling of the step's completions
        start = time.perf_counter()
        out = generate(*a, **k)
        generation.append(time.perf_counter() - start)
        return out

    trainer._generate = timed_generate
    steps_seen = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start, self.before = time.perf_counter(), len(generation)

        def on_step_end(self, *_, **__):
            steps_seen.append((time.perf_counter() - self.start, sum(generation[self.before :]), None, None))

    trainer.add_callback(StepTimes())
    trainer.train()
    rewards = [h.get("reward") for h in trainer.state.log_history if "reward" in h]
    lengths = [h.get("completions/mean_length") for h in trainer.state.log_history if "reward" in h]
    steps_seen = [(s, g, r, n) for (s, g, _, _), r, n in zip(steps_seen, rewards, lengths)]
    report(f"TRL {__import__('trl').__version__} (torch {torch.__version__}, float32)", steps_seen[2:])


def mean(values):
    values = [v for v in values if v is not None]
    return f"{sum(values) / len(values):.3g}" if values else "n/a"


def report(name, timed):
    seconds = [t[0] for t in timed]
    generation = [t[1] for t in timed]
    print(json.dumps({"side": name, "steps": len(timed), "seconds_per_step": sum(seconds) / len(seconds),
                      "generation_seconds": sum(generation) / len(timed),
                      "update_seconds": (sum(seconds) - sum(generation)) / len(timed),
                      "reward": [t[2] for t in timed], "completion_length": [t[3] for t in timed]}))


def export_model(preset, out):
    """The preset as a transformers folder (gemma-lora's own export, checked against transformers by the tests)."""
    from gemma_lora.model import presets

    subprocess.run([sys.executable, "-m", "gemma_lora.cli", "export", str(presets.resolve_preset(preset)), str(out),
                    "--to", "hf"], check=True, stdout=subprocess.DEVNULL)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side (after 2 untimed)")
    parser.add_argument("--trl-python", help="a Python with torch, transformers, peft and trl (TRL's side)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "gemma-lora":
        return gemma_lora_side(args.preset, args.steps, args.precision, args.rows)
    if args.child == "trl":
        return trl_side(args.model_dir, args.steps, args.rows)
    from gemma_lora import runtime

    runtime.quiet_startup()  # before keras-hub is imported: it keeps TensorFlow out and quiet
    runtime.configure_runtime()
    work = Path(tempfile.mkdtemp())
    rows_file = work / "rows.json"
    rows_file.write_text(json.dumps(prompt_rows(args.preset, PROMPTS_PER_STEP * (args.steps + 2))))
    runs = [[sys.executable, __file__, "--child", "gemma-lora", "--precision", p] for p in ("float32", "auto")]
    if args.trl_python:
        export_model(args.preset, work / "hf")
        runs.append([args.trl_python, __file__, "--child", "trl", "--model-dir", str(work / "hf")])
    else:
        print("no --trl-python: TRL's side is not measured")
    results = []
    for command in runs:
        out = subprocess.run([*command, "--preset", args.preset, "--steps", str(args.steps), "--rows", str(rows_file)],
                             capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{command[3]} side failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = results[-1]
    print(f"{PROMPTS_PER_STEP} prompts x {GENERATIONS} completions a step, <= {MAX_NEW} new tokens, rank {RANK}, "
          f"{args.steps} timed steps each, {args.preset}")
    for r in results:
        print(f"{r['side']}: {r['seconds_per_step']:.2f} s a step (generation {r['generation_seconds']:.2f} s, "
              f"update {r['update_seconds']:.2f} s), {base['seconds_per_step'] / r['seconds_per_step']:.2f}x "
              f"{base['side'].split(' (')[0]}'s speed; mean reward {mean(r['reward'])}, "
              f"mean completion length {mean(r['completion_length'])} tokens")


if __name__ == "__main__":
    main()
