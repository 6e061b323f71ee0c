"""One fine-tuning run, step by step: `Run(config)`, then setup → score_before → fit → score_after → save.

    import gemma_lora
    gemma_lora.configure_runtime()
    result = gemma_lora.train(gemma_lora.TrainConfig(preset="tiny", sequence_length=128, max_steps=5))

    run = gemma_lora.Run(config)       # or step by step, as the notebooks do
    run.setup()                        # data, model, LoRA, tokenized splits, run directory
    run.score_before()                 # held-out losses, greedy answers, samples
    run.fit()                          # the training loop, with checkpoints
    run.score_after()
    result = run.save()                # adapter (or model/), samples, answers, summary.json

Each step prints what the CLI prints. The run directory receives
config.json, data.json (what was read, its format, the fixed splits and their
fingerprints), before.json (losses and samples before training; a resume
reuses them), checkpoints/, metrics.csv, samples.json/.md, answers.json,
adapter.lora.h5 + adapter.json (or model/, a full fine-tune's preset) and
summary.json, written last.

In a job of several processes (`parallel.hosts`) every process runs the same
steps on its share of each batch; process 0 alone prints and writes the run
directory, from arrays gathered over the processes.
"""

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from gemma_lora import runtime
from gemma_lora.config import RECIPE_PROMPTS, save_config
from gemma_lora.errors import TrainingError
from gemma_lora.io import prepare_output_dir, read_json, write_text_atomic
from gemma_lora.parallel import hosts
from gemma_lora.run_files import (
    BEFORE_FILE,
    DATA_FILE,
    MODEL_DIR,
    SUMMARY_FILE,
    latest_checkpoint,
    resumable,
)


@dataclass
class RunResult:
    run_dir: Path
    parameters: dict
    data: dict
    before: dict  # split -> token loss before training
    after: dict  # split -> token loss after training
    train: dict  # optimizer steps, batches, seconds, tokens/s
    samples: list = field(default_factory=list)
    adapter: Path | None = None
    # "before"/"after" -> split -> {rows, stop_tokens, model_ended_share, ended_share, looped_share[, exact_match]}
    # of greedy held-out answers
    answers: dict = field(default_factory=dict)
    after_sem: dict = field(default_factory=dict)  # split -> standard error of `after` over rows
    model_dir: Path | None = None  # the saved preset of a full fine-tune


def train(config, echo=print, resume=False, callbacks=()):
    """Fine-tune as `config` says, write the run directory and return a `RunResult` (every step of `Run`).

    Args:
        config: a validated `TrainConfig`.
        echo: where progress lines go (print by default).
        resume: continue the run in `config.output_dir` from its newest
            checkpoint (the config must be that run's own config.json).
        callbacks: extra Keras callbacks for the training loop.

    In a job of several processes (joined first, `hosts.join`) every
    process calls it with the same config; only process 0 echoes and writes.

    Raises:
        GemmaLoraError subclasses for bad input; TrainingError on a NaN loss
        (the last good checkpoint is kept); KeyboardInterrupt after Ctrl-C,
        once a checkpoint is saved; HostsError when the processes of a job
        disagree (config, data) or one of them is lost mid-run.
    """
    run = Run(config, echo=echo, resume=resume, callbacks=callbacks)
    with run.session():
        run.setup()
        run.score_before()
        run.fit()
        run.score_after()
        return run.save()


run_training = train  # the name the package has had since its first release


class Run:
    """One run's state between its steps; each step is a short method that prints what it did."""

    def __init__(self, config, echo=print, resume=False, callbacks=()):
        runtime.configure_runtime(
            memory_fraction=config.memory_fraction, seed=config.seed, compilation_cache_dir=config.compilation_cache,
        )
        self._cache_at_start = runtime.compilation_cache_record()  # counts are per process; this run's are the difference
        hosts.require_joined()
        hosts.check_same("config", config.to_dict(),
                         "Start every process with the same command and config file (only --process-id differs).")
        if not hosts.is_main():
            from gemma_lora.progress import mute

            echo = _silent
            mute()
        from gemma_lora.training.reports import Phases

        self.config, self.echo, self.resume, self.extra_callbacks = config, echo, resume, list(callbacks)
        self.main = hosts.is_main()  # the process that writes (every process, when it runs alone)
        self.phases = Phases()
        self.run_dir = self.checkpoint = None

    @contextlib.contextmanager
    def session(self):
        """A context for the steps: puts back Keras' global distribution, and turns a lost peer into one error."""
        import keras

        # The run sets Keras' global distribution (before the model is built, see
        # prepare); put back whatever the caller had once the run ends.
        previous = keras.distribution.distribution()
        try:
            yield
        except Exception as error:
            lost = hosts.lost_peer(error)
            if lost is None:
                raise
            raise lost from None
        finally:
            keras.distribution.set_distribution(previous)

    def setup(self):
        """Make (or check) the run directory, read the data, load the model, enable LoRA, choose the engine."""
        from gemma_lora.model import loading
        from gemma_lora.training import engines
        from gemma_lora.training.prepare import prepare
        from gemma_lora.training.run_logs import require_tensorboard

        require_tensorboard(self.config)
        self.reward_functions = None
        if self.config.samples_completions:  # a reward that cannot load stops the run before the slow model load
            from gemma_lora.training import rewards

            self.reward_functions = rewards.load_rewards(self.config.rewards, self.config.reward_weights,
                                                         self.config.reward_pattern)
        # Process 0 makes or checks the run directory; the others get its path (or its error).
        if self.resume:
            found = hosts.first("run to resume", lambda: str(resumable(Path(self.config.output_dir))))
            self.run_dir, self.checkpoint = Path(self.config.output_dir), Path(found)
        else:
            self.run_dir = Path(hosts.first("run directory", lambda: str(_new_run_dir(self.config))))
        hosts.note_run_dir(self.run_dir)  # named in the line a job prints if one of its processes vanishes
        try:
            with self.phases("load"):
                (self.config, self.causal_lm, self.parameters, self.splits, self.rows, self.data_stats,
                 self.precision, self.pairs) = prepare(self.config, self.echo)
            self.prompts = None
            if self.config.samples_completions:  # GRPO's rows are prompts, not pairs
                from gemma_lora.training import rewards

                self.prompts, self.pairs = self.pairs, None
                rewards.require_answers(self.reward_functions, self.prompts["train"].has_answers)
            hosts.check_same("training data", self.data_stats["fingerprint"],
                             f"Give every process the same data ({self.config.data}) and tokenizer (the preset).")
            self.engine = engines.choose(self.causal_lm, self.config, loading.platform())  # refused: one line
        except BaseException:
            if self.main and not self.resume and not any(self.run_dir.iterdir()):
                self.run_dir.rmdir()  # Bad input leaves nothing behind.
            raise
        self._plan_training()

    def _plan_training(self):
        from gemma_lora.training.engines import compile_for_training
        from gemma_lora.training.optim import make_optimizer
        from gemma_lora.training.reports import optimizer_line

        from gemma_lora.training.objectives import objective_of

        config = self.config
        self.objective = objective_of(config)
        self.echo(f"run directory: {self.run_dir}")
        # epoch 0 is built here, once
        self.plan = self.engine.plan(self.pairs["train"] if self.pairs else self.prompts["train"] if self.prompts
                                     else self.rows["train"], config)
        self.total_steps = self.plan.total_steps()
        if self.prompts:
            import numpy as np

            # The reference is the model the run starts from: these values, taken before a resume restores others.
            self.plan.reference = [np.array(v.value) for v in self.causal_lm.trainable_variables]
            self.plan.rewards = self.reward_functions
        if self.pairs:
            self._prepare_pairs()
        compile_for_training(self.causal_lm, optimizer=make_optimizer(config, self.total_steps))
        self.data_stats.update(self.engine.data_stats(self.plan))
        self.echo(self.engine.describe(self.plan, config))
        self.echo(optimizer_line(config, self.total_steps))
        self.scored = {name: r for name, r in self.rows.items() if name != "train" and len(r)}
        self.instructions = list(RECIPE_PROMPTS) + list(config.prompts)
        text_data = self.data_stats["source"]["format"] == "text"  # text data has no prompts to answer
        self.answered = {name: getattr(self.splits, name) for name in config.answer_splits
                         if getattr(self.splits, name) and not text_data}

    def _prepare_pairs(self):
        """The pair scorer, and the reference log-probs of every pair the run reads (computed once, or read back)."""
        from gemma_lora.training import preference

        self.pair_scorer = preference.PairScorer(self.causal_lm, self.config, self.precision)
        self.held_out_pairs = {name: p for name, p in self.pairs.items() if name != "train" and len(p)}
        if not self.objective.uses_reference:
            return
        path = self.run_dir / preference.REFERENCE_FILE
        if self.resume:
            reference = hosts.first("reference log-probs", lambda: preference.load_reference(path) if path.exists()
                                    else None)
            if reference is None:
                raise TrainingError(f"{path} is missing: without the reference log-probs the run cannot resume. "
                                    "Start it again in a new directory.")
        else:
            wanted = {"train": self.plan.pairs_used(), **{n: list(range(len(p))) for n, p in self.held_out_pairs.items()}}
            with self.phases("reference"):
                reference = {name: preference.reference_logps(self.pair_scorer, self.pairs[name], indices,
                                                              label=f"reference log-probs: {name} pairs")
                             for name, indices in wanted.items()}
            if self.main:
                preference.save_reference(path, reference)
            self.echo(f"reference: the starting model's log-probs of {sum(map(len, reference.values()))} pairs, "
                      f"computed once ({path.name})")
        for name, values in reference.items():
            preference.with_reference(self.pairs[name], values)
        self.plan.rebuild()  # the batches now carry the reference column

    def pair_scores(self, when):
        """Held-out pair scores (loss, reward accuracy, margin, log-probs) per split, now."""
        from gemma_lora.training import preference

        if when == "before" and self.objective.uses_reference:  # the policy is the reference: no model pass
            return {name: preference.scores_at_start(self.objective, p) for name, p in self.held_out_pairs.items()}
        return {name: preference.PairScores(self.pair_scorer, self.objective, p)()
                for name, p in self.held_out_pairs.items()}

    def score(self, when):
        """Token losses of the held-out splits (with the batch size of the scoring during training, so it is reused)."""
        from gemma_lora.training.scoring import token_loss

        size = max(self.config.batch_size, 8)
        return {name: token_loss(self.causal_lm, r, size, label=f"{when}: scoring {name} rows")
                for name, r in self.scored.items()}

    def answer(self, when):
        """(samples, greedy answers of the held-out splits) now."""
        from gemma_lora.training.reports import answer_and_sample, exact_match

        held_out = self.answered if when == "after" or self.config.answer_before else {}
        samples, answers = answer_and_sample(self.causal_lm, self.instructions, held_out, self.config, when)
        if self.config.metric == "exact_match":
            for name, a in answers.items():
                a["exact_match"] = exact_match(a["samples"], self.answered[name])
        return samples, answers

    def score_before(self):
        """Scores, answers and samples before training (read back from before.json when resuming)."""
        from gemma_lora.sampling import Sample
        from gemma_lora.training.checkpoints import restore_checkpoint
        from gemma_lora.training.loop import Position
        from gemma_lora.training.reports import (
            answers_record,
            echo_samples,
            with_current_keys,
        )

        if self.resume:
            saved = hosts.first("scores before training", lambda: read_json(
                self.run_dir / BEFORE_FILE, TrainingError,
                "Without it the run cannot resume: start it again in a new directory."))
            self.before, self.samples_before = saved["token_loss"], [Sample.from_dict(s) for s in saved["samples"]]
            self.pairs_before = saved.get("pairs", {})
            self.answers_before = {name: dict(with_current_keys(a), samples=[Sample.from_dict(s) for s in a["samples"]])
                                   for name, a in saved["answers"].items()}
            self.start, self.batches_done = restore_checkpoint(self.causal_lm, self.checkpoint)
            self.echo(f"resuming from {self.checkpoint.name}: {self.batches_done // self.config.grad_accumulation} "
                      f"optimizer steps ({self.batches_done} batches) done, epoch {self.start.epoch + 1}")
        else:
            if self.main:
                save_config(self.config, self.run_dir / "config.json")
                write_text_atomic(self.run_dir / DATA_FILE, json.dumps(self.data_stats["source"], indent=2) + "\n")
            with self.phases("before"):
                self.before = {name: s["token_loss"] for name, s in self.score("before").items()}
                self.samples_before, self.answers_before = self.answer("before")
                self.pairs_before = self.pair_scores("before") if self.pairs else {}
            record = {"token_loss": self.before, "samples": [s.to_dict() for s in self.samples_before],
                      "answers": answers_record(self.answers_before, with_samples=True), "pairs": self.pairs_before}
            if self.main:
                write_text_atomic(self.run_dir / BEFORE_FILE, json.dumps(record, indent=2) + "\n")
            self.start, self.batches_done = Position(), 0
        for name, scores in self.pairs_before.items():
            self.echo(f"before: {name} pairs: {pair_line(scores)}")
        echo_samples(self.echo, "before", self.samples_before)

    def fit(self):
        """Train from where the run stands to its end, checkpointing as the config says."""
        from gemma_lora.training import checkpoints
        from gemma_lora.training.engines import fit
        from gemma_lora.training.run_logs import Timer, callbacks_for_run
        from gemma_lora.training.scoring import validation_scores

        config, rows = self.config, self.rows
        logs = callbacks_for_run(self.run_dir, {"validation": rows["validation"]}, config,
                                 start_step=self.batches_done, write=self.main)
        # The checkpointer counts batches; checkpoint_every counts optimizer steps.
        self.checkpointer = checkpoints.Checkpointer(
            self.run_dir, config.checkpoint_every and config.checkpoint_every * config.grad_accumulation,
            self.plan.steps_per_epoch, self.batches_done,
        )
        self.best = checkpoints.BestKeeper(self.run_dir) if config.keep_best else None
        evaluate = (validation_scores(self.causal_lm, rows["validation"], max(config.batch_size, 8))
                    if config.eval_every and len(rows["validation"]) else None)
        if evaluate is not None and self.pairs and "validation" in self.held_out_pairs:
            evaluate = self._with_pair_scores(evaluate)
        callbacks = [self.checkpointer, *logs, *([self.best] if self.best else []), *self.extra_callbacks]
        with self.phases("training"), Timer() as timer:
            fit(self.causal_lm, rows["train"], config, callbacks=callbacks, start=self.start, engine=self.engine,
                precision=self.precision, evaluate=evaluate, plan=self.plan)
        self._stop_if_failed()
        self.train_stats = self._train_stats(timer.seconds)
        if self.best is not None:
            kept = self.best.restore(self.causal_lm)
            if kept:
                self.train_stats["best_step"], self.train_stats["best_validation_token_loss"] = kept
                self.echo(f"keeping the best step's adapter: step {kept[0]} (validation token loss {kept[1]:.4f}) of "
                          f"{self.train_stats['optimizer_steps']}")

    def _with_pair_scores(self, evaluate):
        """The loop's `evaluate` plus the validation pairs' scores (`validation_reward_accuracy`, ...), echoed."""
        from gemma_lora.training.preference import PairScores

        scores = PairScores(self.pair_scorer, self.objective, self.held_out_pairs["validation"])

        def both():
            pairs = scores()
            self.echo(f"evaluation: validation pairs: {pair_line(pairs)}")
            return {**evaluate(), **{f"validation_{'pair_loss' if k == 'loss' else k}": v for k, v in pairs.items()}}

        return both

    def _stop_if_failed(self):
        checkpointer, run_dir = self.checkpointer, self.run_dir
        if checkpointer.bad_step is not None:
            kept = (
                f"The last good checkpoint, {checkpointer.last_saved or latest_checkpoint(run_dir)}, is kept: "
                f"lower learning_rate in {run_dir / 'config.json'} and run `gemma-lora train --resume {run_dir}`."
                if latest_checkpoint(run_dir) else "No checkpoint was saved before it; lower --learning-rate and start again."
            )
            raise TrainingError(f"The training loss became NaN at step {checkpointer.bad_step}; training stopped. {kept}")
        if checkpointer.interrupted:
            self.echo(f"interrupted: checkpoint {checkpointer.last_saved} saved after {checkpointer.batches_done} "
                      f"batches; continue with `gemma-lora train --resume {run_dir}`")
            raise KeyboardInterrupt

    def _train_stats(self, seconds):
        accumulation, done = self.config.grad_accumulation, self.checkpointer.batches_done
        examples, real_tokens = self.plan.examples_trained(self.batches_done + 1, done)
        return {
            "optimizer_steps": done // accumulation,
            "batches_done": done,
            "steps": done // accumulation,  # the name summary.json used for optimizer_steps before
            "steps_this_session": done // accumulation - self.batches_done // accumulation,
            "batches_this_session": done - self.batches_done,
            "examples_this_session": examples,
            # Compilation and the validation scoring during training included.
            "seconds": round(seconds, 2),
            "real_tokens_per_second": round(real_tokens / seconds, 1),
            **self.plan.timing,
        }

    def score_after(self):
        """Scores, answers and samples after training, each against its value before."""
        from gemma_lora.training.reports import answer_lines, echo_samples, standard_error

        config, echo = self.config, self.echo
        self.phases.start("after")
        scores = self.score("after")
        self.after = {name: s["token_loss"] for name, s in scores.items()}
        self.after_sem = {name: standard_error(s["row_losses"]) for name, s in scores.items()}
        for name in self.scored:
            echo(f"{name} token loss (response tokens{'' if config.response_only_loss else ' and prompt'}): "
                 f"{self.before[name]:.4f} before → {self.after[name]:.4f} after ({len(self.rows[name])} rows)")
        stats = self.train_stats
        echo(f"trained {stats['steps_this_session']} steps ({stats['examples_this_session']} "
             f"{'pairs' if self.pairs else 'completions' if self.prompts else 'examples'}) in "
             f"{stats['seconds']:.1f} s, compilation and validation included "
             f"({stats['real_tokens_per_second']:,} real tokens/s)")
        self.pairs_after = self.pair_scores("after") if self.pairs else {}
        for name, scores in self.pairs_after.items():
            before = self.pairs_before.get(name, {})
            echo(f"{name} pairs ({len(self.pairs[name])}): {pair_line(scores, before)}")
        self.samples_after, self.answers_after = self.answer("after")
        for name, after in self.answers_after.items():
            for line in answer_lines(name, self.answers_before.get(name), after, config):
                echo(line)
        echo_samples(echo, "after", self.samples_after)
        self.phases.stop()

    def save(self):
        """Write answers, samples, the adapter (or the whole model) and summary.json; return the `RunResult`."""
        from gemma_lora.adapters.files import ADAPTER_FILE
        from gemma_lora.adapters.merge import save_preset
        from gemma_lora.adapters.store import recorded_chat_format, save_adapter
        from gemma_lora.training.reports import (
            answers_record,
            training_record,
            write_answers,
            write_samples,
        )

        config, run_dir, causal_lm = self.config, self.run_dir, self.causal_lm
        # Every process has finished its part: process 0 writes the results.
        hosts.barrier("end of the run")
        if self.main:
            write_answers(run_dir, self.answered, self.answers_before, self.answers_after)
            write_samples(run_dir, self.samples_before, self.samples_after)
        chat_format = recorded_chat_format(config, causal_lm.preprocessor.tokenizer)
        model_dir = adapter = None
        if config.full_finetune:
            # Every weight changed, so there is no adapter: the run keeps the whole model.
            with hosts.whole(causal_lm.weights):
                model_dir = save_preset(causal_lm, run_dir / MODEL_DIR, chat_format) if self.main else run_dir / MODEL_DIR
            self.echo(f"fine-tuned model (a KerasHub preset, usable as --preset): {model_dir}")
        else:
            source = self.data_stats["source"]
            extra = {
                "data": config.data, "data_fingerprint": self.data_stats["fingerprint"], "data_format": source["format"],
                "data_source": source, "split": {k: len(v) for k, v in self.rows.items()},
                "validation_token_loss": self.after.get("validation"), "test_token_loss": self.after.get("test"),
                "training": training_record(config, self.engine.name, self.train_stats),
            }
            # LoRA factors sharded over several processes are gathered whole for the writing.
            with hosts.whole(causal_lm.trainable_variables):
                adapter = save_adapter(causal_lm, run_dir, config, extra=extra) if self.main else run_dir / ADAPTER_FILE
            self.echo(f"adapter: {adapter}")
        summary = {
            "parameters": self.parameters, "precision": self.precision, "engine": self.engine.name,
            "quantize": config.quantize, "chat_format": chat_format,
            "data": {k: v for k, v in self.data_stats.items() if k != "lines"},
            "token_loss_before": self.before, "token_loss_after": self.after,
            "answers_before": answers_record(self.answers_before), "answers_after": answers_record(self.answers_after),
            "token_loss_after_sem": self.after_sem, "train": self.train_stats, "phases_seconds": self.phases.seconds,
            "compilation_cache": self.compilation_cache(),
        }
        if self.pairs:
            summary.update(objective=config.objective, pairs_before=self.pairs_before, pairs_after=self.pairs_after)
        if self.prompts:
            summary.update(objective=config.objective, rollouts=self.rollout_summary())
        if self.main:
            write_text_atomic(run_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        self.echo("time: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in self.phases.seconds.items()))
        cache = summary["compilation_cache"]
        if cache["dir"]:
            self.echo(f"compilation cache: {cache['loaded']} programs loaded, {cache['compiled']} compiled and stored "
                      f"({cache['dir']}; safe to delete, --compilation-cache off turns it off)")
        return RunResult(
            run_dir, self.parameters, summary["data"], self.before, self.after, self.train_stats,
            samples=list(zip(self.samples_before, self.samples_after)), adapter=adapter,
            answers={"before": summary["answers_before"], "after": summary["answers_after"]},
            after_sem=self.after_sem, model_dir=model_dir,
        )

    def rollout_summary(self):
        """GRPO's batches of completions as rollouts.csv holds them: the first and last sampled, and the plot."""
        import csv

        from gemma_lora.training.run_logs import ROLLOUTS_FILE, plot_reward_curve

        path = self.run_dir / ROLLOUTS_FILE
        rows = []
        if path.exists():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("sampled") == "True"]
        plot = plot_reward_curve(self.run_dir) if self.main else None
        if plot:
            self.echo(f"reward curve: {plot}")

        def numbers(row):
            return {k: float(v) for k, v in row.items() if v not in ("", None) and k != "sampled"}

        return {"batches_sampled": len(rows), "first": numbers(rows[0]) if rows else None,
                "last": numbers(rows[-1]) if rows else None, "reward_curve": plot.name if plot else None}

    def compilation_cache(self):
        """The persistent compilation cache's directory (None: off) and this run's programs loaded from it and compiled."""
        now = runtime.compilation_cache_record()
        return {"dir": now["dir"], **{k: now[k] - self._cache_at_start[k] for k in ("loaded", "compiled")}}


def pair_line(scores, before=None):
    """One line of pair scores, each with its value before where given."""
    def one(name, label, form):
        was = f" (before {format(before[name], form)})" if before and name in before else ""
        return f"{label} {format(scores[name], form)}{was}"

    return ", ".join([one("reward_accuracy", "reward accuracy", ".1%"), one("reward_margin", "margin", ".4f"),
                      one("loss", "loss", ".4f"), one("chosen_logps", "chosen log p", ".3f"),
                      one("rejected_logps", "rejected log p", ".3f")])


def _silent(*args, **kwargs):
    pass


def _new_run_dir(config):
    from gemma_lora.training.prepare import default_run_dir

    # Made first so an unwritable path fails before the slow model load.
    return prepare_output_dir(config.output_dir or default_run_dir(config))
