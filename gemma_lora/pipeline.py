"""One fine-tuning run end to end: config → data → model → train → samples → adapter.

    from gemma_lora import TrainConfig, run_training
    result = run_training(TrainConfig(preset="tiny", sequence_length=128, max_steps=5))

The run directory receives config.json, data.json (what was read, its format,
the fixed splits and their fingerprints), before.json (losses and samples
before training), checkpoints/, metrics.csv, samples.json/.md, answers.json
(greedy held-out answers before/after), adapter.lora.h5 + adapter.json and
summary.json.
A full fine-tune (`full_finetune=True`) writes the whole model as a KerasHub
preset in model/ instead of the adapter.

In a job of several processes (`gemma_lora.hosts`) every process runs this
same sequence on its share of each batch; process 0 alone prints and writes
the run directory, from arrays gathered over the processes.
"""

import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from gemma_lora import hosts, runtime
from gemma_lora.config import RECIPE_PROMPTS, save_config
from gemma_lora.errors import TrainingError
from gemma_lora.io import prepare_output_dir, read_json, write_text_atomic


@dataclass
class RunResult:
    run_dir: Path
    parameters: dict
    data: dict
    before: dict  # split -> token loss before training
    after: dict  # split -> token loss after training
    train: dict  # steps, seconds, tokens/s
    samples: list = field(default_factory=list)
    adapter: Path | None = None
    # "before"/"after" -> split -> {rows, stop_tokens, model_ended_share, ended_share[, exact_match]} of greedy held-out answers
    answers: dict = field(default_factory=dict)
    after_sem: dict = field(default_factory=dict)  # split -> standard error of `after` over rows
    model_dir: Path | None = None  # the saved preset of a full fine-tune


def run_training(config, echo=print, resume=False):
    """Fine-tune as `config` says and write the run directory.

    Args:
        config: a validated `TrainConfig`.
        echo: where progress lines go (print by default).
        resume: continue the run in `config.output_dir` from its newest
            checkpoint (the config must be that run's own config.json).

    In a job of several processes (joined first, `hosts.join`) every
    process calls it with the same config; only process 0 echoes and writes.

    Raises:
        GemmaLoraError subclasses for bad input; TrainingError on a NaN loss
        (the last good checkpoint is kept); KeyboardInterrupt after Ctrl-C,
        once a checkpoint is saved; HostsError when the processes of a job
        disagree (config, data) or one of them is lost mid-run.
    """
    runtime.configure_runtime(
        memory_fraction=config.memory_fraction,
        seed=config.seed,
        compilation_cache_dir=config.compilation_cache,
    )
    import keras

    hosts.require_joined()
    hosts.check_same("config", config.to_dict(),
                     "Start every process with the same command and config file (only --process-id differs).")
    if not hosts.is_main():
        from gemma_lora.progress import mute

        echo = _silent
        mute()
    # The run sets Keras' global distribution (before the model is built, see
    # _prepare); put back whatever the caller had once the run ends.
    previous = keras.distribution.distribution()
    try:
        return _run_training(config, echo, resume)
    except Exception as error:
        lost = hosts.lost_peer(error)
        if lost is None:
            raise
        raise lost from None
    finally:
        keras.distribution.set_distribution(previous)


def _silent(*args, **kwargs):
    pass


def _run_training(config, echo, resume):
    # Imported after the runtime is configured: these import Keras.
    from gemma_lora import checkpoints, fast_train, model, train
    from gemma_lora.adapters import ADAPTER_FILE, recorded_chat_format, save_adapter, save_preset
    from gemma_lora.sampling import Sample

    phases = Phases()
    train.require_tensorboard(config)
    main = hosts.is_main()  # the process that writes (every process, when it runs alone)
    # Process 0 makes or checks the run directory; the others get its path (or its error).
    if resume:
        run_dir, checkpoint = map(Path, hosts.first("run to resume", lambda: list(map(str, _resumable(Path(config.output_dir))))))
    else:
        run_dir, checkpoint = Path(hosts.first("run directory", lambda: str(_new_run_dir(config)))), None
    hosts.note_run_dir(run_dir)  # named in the line a job prints if one of its processes vanishes
    try:
        with phases("load"):
            config, causal_lm, parameters, splits, rows, data_stats, precision = _prepare(config, echo)
        hosts.check_same("training data", data_stats["fingerprint"],
                         f"Give every process the same data ({config.data}) and tokenizer (the preset).")
        engine = fast_train.resolve_engine(causal_lm, config, model.platform())  # --engine fast it cannot run: refused
    except BaseException:
        if main and not resume and not any(run_dir.iterdir()):
            run_dir.rmdir()  # Bad input leaves nothing behind.
        raise
    echo(f"run directory: {run_dir}")
    total_steps = train.total_steps(rows["train"], config, engine)
    train.compile_for_training(causal_lm, config, total_steps)
    if engine == "fast":
        packed = fast_train.packed_stats(rows["train"], config)
        data_stats["packed_real_token_fraction"] = packed["real_token_fraction"]
        echo(
            f"engine: fast (packed rows, gemma_lora.fast): {packed['steps_per_epoch']} steps an epoch of "
            f"{config.batch_size} rows x {config.sequence_length} (about "
            f"{len(rows['train']) / packed['steps_per_epoch']:.1f} examples a step), "
            f"{packed['real_token_fraction']:.1%} real tokens"
        )
    else:
        echo("engine: keras (keras.Model.fit)" if config.recipe else "engine: keras (KerasHub's model, one jitted step)")
    echo(optimizer_line(config, total_steps))
    scored = {name: r for name, r in rows.items() if name != "train" and len(r)}
    instructions = list(RECIPE_PROMPTS) + list(config.prompts)
    # Text data has no prompts to answer.
    answered = {
        name: getattr(splits, name)
        for name in config.answer_splits
        if getattr(splits, name) and data_stats["source"]["format"] != "text"
    }

    def score(when):
        # The batch size of the scoring during training, so the end-of-training validation score is reused.
        return {name: train.token_loss(causal_lm, r, max(config.batch_size, 8), label=f"{when}: scoring {name} rows")
                for name, r in scored.items()}

    def answer_all(when):
        held_out = answered if when == "after" or config.answer_before else {}
        samples, answers = answer_and_sample(causal_lm, instructions, held_out, config, when)
        if config.metric == "exact_match":
            for name, a in answers.items():
                a["exact_match"] = exact_match(a["samples"], answered[name])
        return samples, answers

    if resume:
        saved = hosts.first("scores before training", lambda: read_json(
            run_dir / BEFORE_FILE, TrainingError, "Without it the run cannot resume: start it again in a new directory."))
        before, samples_before = saved["token_loss"], [Sample.from_dict(s) for s in saved["samples"]]
        answers_before = {
            name: dict(_with_current_keys(a), samples=[Sample.from_dict(s) for s in a["samples"]])
            for name, a in saved["answers"].items()
        }
        start, global_step = checkpoints.restore_checkpoint(causal_lm, checkpoint)
        echo(f"resuming from {checkpoint.name}: step {global_step}, epoch {start.epoch + 1}")
    else:
        if main:
            save_config(config, run_dir / "config.json")
            write_text_atomic(run_dir / DATA_FILE, json.dumps(data_stats["source"], indent=2) + "\n")
        with phases("before"):
            before = {name: s["token_loss"] for name, s in score("before").items()}
            samples_before, answers_before = answer_all("before")
        record = {
            "token_loss": before,
            "samples": [s.to_dict() for s in samples_before],
            "answers": _answers_record(answers_before, with_samples=True),
        }
        if main:
            write_text_atomic(run_dir / BEFORE_FILE, json.dumps(record, indent=2) + "\n")
        start, global_step = train.Position(), 0
    _echo_samples(echo, "before", samples_before)

    callbacks = train.callbacks_for_run(run_dir, {"validation": rows["validation"]}, config, start_step=global_step,
                                        write=main)
    # The checkpointer counts batches; checkpoint_every counts optimizer steps.
    accumulation = config.grad_accumulation
    checkpointer = checkpoints.Checkpointer(
        run_dir, config.checkpoint_every and config.checkpoint_every * accumulation,
        train.steps_per_epoch(rows["train"], config, engine), global_step,
    )
    best = checkpoints.BestKeeper(run_dir) if config.keep_best else None
    evaluate = (
        train.validation_scores(causal_lm, rows["validation"], max(config.batch_size, 8))
        if config.eval_every and len(rows["validation"]) else None
    )
    with phases("training"), train.Timer() as timer:
        train.fit(
            causal_lm,
            rows["train"],
            config,
            callbacks=[checkpointer, *callbacks, *([best] if best else [])],
            start=start,
            engine=engine,
            precision=precision,
            evaluate=evaluate,
        )
    if checkpointer.bad_step is not None:
        kept = (
            f"The last good checkpoint, {checkpointer.last_saved or checkpoints.latest_checkpoint(run_dir)}, is kept: "
            f"lower learning_rate in {run_dir / 'config.json'} and run `gemma-lora train --resume {run_dir}`."
            if checkpoints.latest_checkpoint(run_dir)
            else "No checkpoint was saved before it; lower --learning-rate and start again."
        )
        raise TrainingError(f"The training loss became NaN at step {checkpointer.bad_step}; training stopped. {kept}")
    if checkpointer.interrupted:
        echo(
            f"interrupted: checkpoint {checkpointer.last_saved} saved at step {checkpointer.global_step}; "
            f"continue with `gemma-lora train --resume {run_dir}`"
        )
        raise KeyboardInterrupt
    # The time includes compilation and the validation scoring during training.
    batches = checkpointer.global_step - global_step
    steps = checkpointer.global_step // accumulation - global_step // accumulation
    examples, real_tokens = train.examples_trained(rows["train"], config, engine, global_step + 1, checkpointer.global_step)
    train_stats = {
        "steps": checkpointer.global_step // accumulation,
        "steps_this_session": steps,
        "batches_this_session": batches,
        "examples_this_session": examples,
        "seconds": round(timer.seconds, 2),
        "real_tokens_per_second": round(real_tokens / timer.seconds, 1),
    }
    if best is not None:
        kept = best.restore(causal_lm)
        if kept:
            train_stats["best_step"], train_stats["best_validation_token_loss"] = kept
            echo(f"keeping the best step's adapter: step {kept[0]} (validation token loss {kept[1]:.4f}) of "
                 f"{train_stats['steps']}")
    phases.start("after")
    scores = score("after")
    after = {name: s["token_loss"] for name, s in scores.items()}
    after_sem = {name: standard_error(s["row_losses"]) for name, s in scores.items()}
    for name in scored:
        echo(f"{name} token loss (response tokens{'' if config.response_only_loss else ' and prompt'}): "
             f"{before[name]:.4f} before → {after[name]:.4f} after ({len(rows[name])} rows)")
    echo(
        f"trained {steps} steps ({examples} examples) in {timer.seconds:.1f} s, compilation and validation included "
        f"({train_stats['real_tokens_per_second']:,} real tokens/s)"
    )

    samples_after, answers_after = answer_all("after")
    for name in answers_after:
        was = f"{_share(answers_before[name])} before → " if name in answers_before else ""
        echo(f"{name} answers ending with {answers_after[name]['stop_tokens'][0]} within {config.max_new_tokens} "
             f"tokens (greedy): {was}{_share(answers_after[name])} after")
        if config.metric == "exact_match":
            was = f"{_share(answers_before[name], 'exact_match')} before → " if name in answers_before else ""
            echo(f"{name} exact match of greedy answers: {was}{_share(answers_after[name], 'exact_match')} after")
    _echo_samples(echo, "after", samples_after)
    phases.stop()
    # Every process has finished its part: process 0 writes the results.
    hosts.barrier("end of the run")
    if main:
        write_answers(run_dir, answered, answers_before, answers_after)
        write_samples(run_dir, samples_before, samples_after)

    model_dir = adapter = None
    if config.full_finetune:
        # Every weight changed, so there is no adapter: the run keeps the whole model.
        with hosts.whole(causal_lm.weights):
            model_dir = (save_preset(causal_lm, run_dir / MODEL_DIR, recorded_chat_format(config, causal_lm.preprocessor.tokenizer)) if main
                         else run_dir / MODEL_DIR)
        echo(f"fine-tuned model (a KerasHub preset, usable as --preset): {model_dir}")
    else:
        extra = {
            "data": config.data,
            "data_fingerprint": data_stats["fingerprint"],
            "data_format": data_stats["source"]["format"],
            "data_source": data_stats["source"],
            "split": {k: len(v) for k, v in rows.items()},
            "validation_token_loss": after.get("validation"),
            "test_token_loss": after.get("test"),
            "training": training_record(config, engine, train_stats),
        }
        # LoRA factors sharded over several processes are gathered whole for the writing.
        with hosts.whole(causal_lm.trainable_variables):
            adapter = save_adapter(causal_lm, run_dir, config, extra=extra) if main else run_dir / ADAPTER_FILE
        echo(f"adapter: {adapter}")
    summary = {
        "parameters": parameters,
        "precision": precision,
        "engine": engine,
        "quantize": config.quantize,
        "chat_format": recorded_chat_format(config, causal_lm.preprocessor.tokenizer),
        "data": {k: v for k, v in data_stats.items() if k != "lines"},
        "token_loss_before": before,
        "token_loss_after": after,
        "answers_before": _answers_record(answers_before),
        "answers_after": _answers_record(answers_after),
        "token_loss_after_sem": after_sem,
        "train": train_stats,
        "phases_seconds": phases.seconds,
    }
    if main:
        write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    echo("time: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in phases.seconds.items()))
    return RunResult(
        run_dir, parameters, summary["data"], before, after, train_stats,
        samples=list(zip(samples_before, samples_after)), adapter=adapter,
        answers={"before": summary["answers_before"], "after": summary["answers_after"]},
        after_sem=after_sem, model_dir=model_dir,
    )


BEFORE_FILE = "before.json"
DATA_FILE = "data.json"
MODEL_DIR = "model"


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
    from gemma_lora.data import chat
    from gemma_lora.sampling import answer_endings, endings, generate

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
    record.update(engine=engine, steps=train_stats["steps"])
    if "best_step" in train_stats:
        record["best_step"] = train_stats["best_step"]
    return record


def optimizer_line(config, total_steps):
    """What the optimizer does over the run, and when validation is scored."""
    from gemma_lora.optim import describe

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
    import numpy as np

    values = np.asarray(row_losses, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return None
    return float(values.std(ddof=1) / math.sqrt(len(values)))


def _new_run_dir(config):
    # Made first so an unwritable path fails before the slow model load.
    return prepare_output_dir(config.output_dir or default_run_dir(config))


def _resumable(run_dir):
    """Check a run directory can be resumed (its adapter and newest checkpoint readable); return it and that checkpoint."""
    from gemma_lora.run_files import resumable

    return run_dir, resumable(run_dir)


def _prepare(config, echo):
    """Check data, preset and model; return what training needs."""
    from gemma_lora import data, distribute, model
    from gemma_lora.errors import ConfigError

    echo("config: " + json.dumps(config.to_dict()))

    def sources():
        dataset = data.read_dataset(config)  # Read data before the slow model load.
        echo(dataset.describe())
        if config.metric and dataset.format == "text":
            raise ConfigError(
                f"metric={config.metric!r} compares answers with references, and text data has neither; "
                "drop --metric or use prompt/answer data (e.g. --data-format completion)."
            )
        return dataset, data.split(dataset.examples, config), model.resolve_preset(config.preset, config.preset_version)

    # Each host reads its own copy of the data and preset: if one cannot, all stop.
    dataset, splits, preset_dir = hosts.together("data and preset", sources)
    given = config.chat
    config = resolve_chat(config, dataset.format, preset_dir)
    echo(_describe_format(config, given, dataset.format, model.chat_format_for(preset_dir)))
    precision = config.resolved_precision(model.platform())
    # Variables take their device layout when created, so before the load.
    plan = distribute.apply(config, preset_dir, precision, echo)
    if config.full_finetune and plan.kind == "model" and plan.processes > 1:
        raise ConfigError(
            "full_finetune saves the whole model, which model parallelism over several processes would have to "
            "gather onto every device first. Use distribution='data' (if the model fits one device) or LoRA."
        )
    echo(f"loading {config.preset} from {preset_dir}")
    causal_lm = model.load_causal_lm(preset_dir, precision, config.sequence_length, frozen_base=not config.full_finetune)
    # Counted before quantizing: int4 packs two weights per stored number.
    base_parameters = model.parameter_summary(causal_lm)["base_parameters"]
    stored = precision
    if config.quantize:
        from gemma_lora.quantize import base_weight_bytes, quantize_base

        quantize_base(causal_lm, config.quantize)
        stored = f"{precision}, base weights {config.quantize}: {base_weight_bytes(causal_lm) / 2**20:,.1f} MiB"
    if config.full_finetune:
        causal_lm.backbone.trainable = True  # Every weight, embeddings and norms included.
        method = "full fine-tune: every weight"
    else:
        model.enable_lora(
            causal_lm, config.lora_rank, config.lora_alpha, config.lora_targets, seed=config.seed
        )
        method = f"LoRA rank {config.lora_rank} on {', '.join(config.lora_targets)}"
    parameters = {**model.parameter_summary(causal_lm), "base_parameters": base_parameters}
    echo(
        f"model: {config.preset} ({stored}) — {parameters['base_parameters']:,} base parameters, "
        f"{parameters['trainable_parameters']:,} trainable ({method})"
    )
    tokenizer = causal_lm.preprocessor.tokenizer
    rows = {
        name: data.tokenize_rows(getattr(splits, name), tokenizer, config)
        for name in ("train", "validation", "test")
    }
    refuse_marker_text(rows, dataset, config)
    data_stats = describe_data(rows, config)
    data_stats["source"] = data.splits_record(dataset, splits)
    data_stats["source"]["marker_text_rows"] = {name: len(r.marker_text) for name, r in rows.items()}
    for line in data_stats["lines"]:
        echo(line)
    return config, causal_lm, parameters, splits, rows, data_stats, precision


def refuse_marker_text(rows, dataset, config):
    """With marker_text="error", raise DataError naming the first row whose text holds a control token.

    Rows are counted in the order read (train, validation, test follow each
    other), so `dataset.places` names the record in its file.
    """
    from gemma_lora.errors import DataError

    if config.marker_text != "error":
        return
    offset = 0
    for name in ("train", "validation", "test"):
        if rows[name].marker_text:
            row, marker = rows[name].marker_text[0]
            place = dataset.places[offset + row] if offset + row < len(dataset.places) else f"{name} row {row}"
            raise DataError(
                f"{place}: the text holds {marker!r}, a control token of the tokenizer, written as text "
                f"(marker_text=error; {sum(len(r.marker_text) for r in rows.values())} rows hold such text). "
                "Remove it from the data, or drop --marker-text error to train it as plain text."
            )
        offset += len(rows[name])


def resolve_chat(config, data_format, preset_dir=None):
    """`config` with `chat` settled (and stop_strings, which depend on it), as config.json records it.

    A `chat` given is kept; None means on for conversation data and for
    instruction-tuned presets (`model.chat_format_of`), never for text data.

    Raises:
        ConfigError: chat on for text data.
    """
    import dataclasses

    from gemma_lora import model
    from gemma_lora.errors import ConfigError

    chat = config.chat
    if chat is None:
        chat = data_format != "text" and (
            data_format in ("messages", "sharegpt") or model.chat_format_of(config.preset, preset_dir) is not None
        )
    elif chat and data_format == "text":
        raise ConfigError(
            f"chat=True writes prompts and answers as turns, and {config.data} reads as text data (neither); "
            "drop --chat, or give prompt/answer data."
        )
    config = dataclasses.replace(config, chat=chat)
    return dataclasses.replace(config, stop_strings=config.resolved_stop_strings())


def _describe_format(config, given, data_format, chat_format="gemma"):
    """One line: how rows are written, and why (`chat_format`: the one the preset's model writes)."""
    from gemma_lora.data import chat

    if not config.chat:
        if data_format == "text":
            return "prompts: none (text data: each row is its text, loss on every token, no template)"
        name = "Gemma 4's" if chat_format == chat.GEMMA4 else "Gemma's"
        rows = ("as written (completion data: each row is its prompt followed by its completion, no template)"
                if data_format == "completion" else "the template")
        return f"prompts: {rows}" + (" (--no-chat)" if given is False else f"; --chat writes {name} chat turns instead")
    why = "--chat" if given else "conversation data" if data_format in ("messages", "sharegpt") else "an instruction-tuned preset"
    name, details = chat.describe(chat_format).split(": ", 1)
    return f"prompts: {name} ({why}): {details}"


def default_run_dir(config):
    name = Path(config.preset).name.replace("kaggle://", "").replace("/", "_")
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def describe_data(rows, config):
    """Counts per split, truncation, padding share and a fingerprint of the train tokens."""
    from gemma_lora.train import positions_per_epoch

    train_rows = rows["train"]
    fingerprint = hashlib.sha256(train_rows.token_ids.tobytes() + train_rows.weights.tobytes()).hexdigest()[:16]
    positions = positions_per_epoch(train_rows, config)
    lossless = int((train_rows.weights.sum(axis=1) == 0).sum()) if len(train_rows) else 0
    lines = [
        "splits: " + ", ".join(f"{name} {len(r)} rows" for name, r in rows.items())
        + f" (fixed splits of the rows read, in order; fingerprints in {DATA_FILE})",
        f"train tokens: {train_rows.real_tokens:,} real of {positions:,} positions an epoch "
        f"({train_rows.real_tokens / positions:.1%}), {train_rows.loss_tokens:,} carry loss; "
        f"{train_rows.truncated} rows longer than sequence_length={config.sequence_length} were cut"
        + (
            f" (whole exchanges kept from the start where the first fits: {train_rows.turns_cut} model turns left "
            "out or cut)" if config.chat
            else " (<eos> appended, as KerasHub)" if config.eos_after_truncation else " (no <eos> after cut text)"
        )
        + (f"; {lossless} of them kept no loss token (the cut fell before the response)" if lossless else ""),
    ]
    marked = {name: len(r.marker_text) for name, r in rows.items()}
    if any(marked.values()):
        example = next(r.marker_text[0][1] for r in rows.values() if r.marker_text)
        lines.append(
            "marker text: " + ", ".join(f"{name} {n} rows" for name, n in marked.items())
            + f" hold a control token written as text (e.g. {example!r}); it is trained as the plain text it is, "
            "never as the token (--marker-text error refuses such data)"
        )
    return {
        "rows": {name: len(r) for name, r in rows.items()},
        "truncated": {name: r.truncated for name, r in rows.items()},
        "marker_text": marked,
        "turns_cut": {name: r.turns_cut for name, r in rows.items()},
        "real_token_fraction": train_rows.real_tokens / positions,
        "loss_tokens": train_rows.loss_tokens,
        "fingerprint": fingerprint,
        "lines": lines,
    }


def _answers_record(answers, with_samples=False):
    return {
        name: {
            "rows": a["rows"],
            "stop_tokens": a["stop_tokens"],
            "model_ended_share": a["model_ended_share"],
            "ended_share": a["ended_share"],
            **({"exact_match": a["exact_match"]} if "exact_match" in a else {}),
            **({"samples": [s.to_dict() for s in a["samples"]]} if with_samples else {}),
        }
        for name, a in answers.items()
    }


def _with_current_keys(answers):
    # A before.json written before the chat format counted <eos> only, as eos_share.
    if "model_ended_share" in answers:
        return answers
    return dict(answers, stop_tokens=["<eos>"], model_ended_share=answers.get("eos_share"))


def _share(answers, key="model_ended_share"):
    n = answers["rows"]
    return f"{round(answers[key] * n)}/{n} ({answers[key]:.0%})"


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
    for record in records:
        lines += [f"## {record['instruction']}", ""]
        for when in ("before", "after"):
            s = record[when]
            ending = s["stop_token"] or (f"stop string {s['stop_string']!r}" if s["stop_string"] else "length limit")
            lines += [f"**{when}** (ended by {ending}):", "", "```", s["text"], "```", ""]
    write_text_atomic(run_dir / "samples.md", "\n".join(lines))


def _echo_samples(echo, when, samples):
    for s in samples:
        ending = s.stop_token or (f"stop {s.stop_string!r}" if s.stop_string else "length limit")
        echo(f"[{when}] {s.instruction}\n{s.text.strip()}\n  (ended by {ending})")
