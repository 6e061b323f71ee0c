"""What a run reports and writes about its answers and samples, and the time of its phases.

Greedy answers to the held-out rows (the share that ends with the model's
stop token, exact match where asked), samples before and after, and the
files they go to (answers.json, samples.json, samples.md).
"""

import contextlib
import json
import math
import time

import numpy as np

from gemma_lora.data import chat
from gemma_lora.io import write_text_atomic
from gemma_lora.sampling import answer_endings, endings, generate
from gemma_lora.training.optim import describe


class Phases:
    """Wall-clock seconds of a run's phases (load, before, training, after), in order."""
    def __init__(self):
        self.seconds = {}
        self._open = None

    def start(self, name):
        self.stop()
        self._open = (name, time.perf_counter())

    def stop(self):
        if self._open:
            name, began = self._open
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - began, 1)
            self._open = None

    @contextlib.contextmanager
    def __call__(self, name):
        self.start(name)
        try:
            yield
        finally:
            self.stop()


def answer_and_sample(causal_lm, instructions, held_out, config, when):
    """Samples for `instructions` and greedy answers to the `held_out` splits' rows.

    With the greedy sampler both are one decoding pass (the rows share the
    batch); with top-k the samples are drawn in a second pass.

    Returns:
        (samples, {split: `sampling.endings` of its answers}).
    """
    chat_format = chat.format_of(causal_lm.preprocessor.tokenizer) if config.chat else None
    rows = sum(len(examples) for examples in held_out.values())
    if config.sampler == "greedy":
        label = f"{when}: answering {rows} held-out rows and {len(instructions)} samples"
        everything = instructions + [e for examples in held_out.values() for e in examples]
        out = generate(causal_lm, everything, config, label=label)
        samples, out = out[: len(instructions)], out[len(instructions) :]
        answers = {}
        for name, examples in held_out.items():
            answers[name], out = endings(out[: len(examples)], chat_format), out[len(examples) :]
        return samples, answers
    samples = generate(causal_lm, instructions, config, label=f"{when}: sampling {len(instructions)} prompts")
    answers = {
        name: answer_endings(causal_lm, examples, config, label=f"{when}: answering {len(examples)} {name} rows")
        for name, examples in held_out.items()
    }
    return samples, answers


def training_record(config, engine, train_stats):
    """How the adapter was trained: engine, batches, schedule and controls, steps, the kept step."""
    fields = ("batch_size", "grad_accumulation", "epochs", "max_steps", "learning_rate", "lr_schedule", "warmup_steps",
              "warmup_ratio", "weight_decay", "max_grad_norm", "eval_every", "keep_best", "sequence_length", "seed")
    record = {name: getattr(config, name) for name in fields}
    record.update(engine=engine, steps=train_stats["optimizer_steps"], optimizer_steps=train_stats["optimizer_steps"],
                  batches_done=train_stats["batches_done"])
    if "best_step" in train_stats:
        record["best_step"] = train_stats["best_step"]
    return record


def optimizer_line(config, total_steps):
    """What the optimizer does over the run, and when validation is scored."""
    line = describe(config, total_steps)
    if config.eval_every:
        line += f"; validation every {config.eval_every} steps" + (", keeping the best" if config.keep_best else "")
    return line


def exact_match(samples, examples):
    """Share of answers equal to their example's reference, white space at both ends ignored.

    An answer is what generation kept: cut at the model's stop token or the
    first stop string, so a right label followed by more text does not count.
    """
    if not examples:
        return float("nan")
    return sum(s.text.strip() == e.response.strip() for s, e in zip(samples, examples, strict=True)) / len(examples)


def standard_error(row_losses):
    """Standard error of the mean of per-row losses (rows without loss tokens skipped); None below 2 rows.

    An error bar for a split's loss: how much it would move with other rows
    drawn from the same data.
    """
    values = np.asarray(row_losses, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return None
    return float(values.std(ddof=1) / math.sqrt(len(values)))


def answers_record(answers, with_samples=False):
    return {
        name: {
            "rows": a["rows"],
            "stop_tokens": a["stop_tokens"],
            "model_ended_share": a["model_ended_share"],
            "ended_share": a["ended_share"],
            "looped_share": a["looped_share"],
            **({"exact_match": a["exact_match"]} if "exact_match" in a else {}),
            **({"samples": [s.to_dict() for s in a["samples"]]} if with_samples else {}),
        }
        for name, a in answers.items()
    }


def with_current_keys(answers):
    """A before.json's answers with today's keys; what an older file did not measure is None."""
    # Loops were not detected before looped_share: its samples read as not looped.
    answers = dict(answers, looped_share=answers.get("looped_share"))
    # A before.json written before the chat format counted <eos> only, as eos_share.
    if "model_ended_share" in answers:
        return answers
    return dict(answers, stop_tokens=["<eos>"], model_ended_share=answers.get("eos_share"))


def ending(sample, stop="stop string"):
    """How a `Sample`'s answer ended, in words.

    "ended by <eos>" (its stop token), "ended by stop string '...'" (`stop`
    names it), "looped, cut at N tokens" (`loops.looped`), or "cut at N tokens"
    (N: its new tokens).
    """
    if sample.stop_token:
        return f"ended by {sample.stop_token}"
    if sample.stop_string:
        return f"ended by {stop} {sample.stop_string!r}"
    return f"{'looped, ' if sample.looped else ''}cut at {sample.new_tokens} tokens"


def share(answers, key="model_ended_share"):
    n = answers["rows"]
    return f"{round(answers[key] * n)}/{n} ({answers[key]:.0%})"


def answer_lines(name, before, after, config):
    """What a run prints about a split's greedy answers: how many end with the stop token, loop, [match].

    Args:
        name: str, the split.
        before: its `answers_record`-like dict before training, or None
            (not answered before); a before.json from before loops were
            detected has `looped_share` None, and its line shows after only.
        after: the same after training.
        config: the `TrainConfig` (max_new_tokens, metric).

    Returns:
        list of str, each "<what>: <before> before → <after> after".
    """
    def change(key):
        was = f"{share(before, key)} before → " if before and before.get(key) is not None else ""
        return f"{was}{share(after, key)} after"

    lines = [f"{name} answers ending with {after['stop_tokens'][0]} within {config.max_new_tokens} tokens (greedy): "
             f"{change('model_ended_share')}",
             f"{name} answers that loop (greedy): {change('looped_share')}"]
    if config.metric == "exact_match":
        lines.append(f"{name} exact match of greedy answers: {change('exact_match')}")
    return lines


def write_answers(run_dir, examples, before, after):
    """answers.json: each held-out row's reference and greedy answers before/after."""
    record = {
        name: [
            {"instruction": e.instruction, "reference": e.response, "before": b and b.to_dict(), "after": a.to_dict()}
            for e, b, a in zip(rows, before.get(name, {}).get("samples", [None] * len(rows)), after[name]["samples"])
        ]
        for name, rows in examples.items()
    }
    write_text_atomic(run_dir / "answers.json", json.dumps(record, indent=2) + "\n")


def write_samples(run_dir, before, after):
    records = [
        {"instruction": b.instruction, "before": b and b.to_dict(), "after": a.to_dict()}
        for b, a in zip(before, after)
    ]
    write_text_atomic(run_dir / "samples.json", json.dumps(records, indent=2) + "\n")
    lines = []
    for b, a in zip(before, after):
        lines += [f"## {b.instruction}", ""]
        for when, s in (("before", b), ("after", a)):
            lines += [f"**{when}** ({ending(s)}):", "", "```", s.text, "```", ""]
    write_text_atomic(run_dir / "samples.md", "\n".join(lines))


def echo_samples(echo, when, samples):
    for s in samples:
        echo(f"[{when}] {s.instruction}\n{s.text.strip()}\n  ({ending(s, stop='stop')})")
