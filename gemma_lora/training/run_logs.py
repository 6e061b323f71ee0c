"""What a run shows and logs while it trains: the progress bar, metrics.csv, evaluations.csv, TensorBoard.

`callbacks_for_run` is the set a run directory gets; each is a Keras
callback, fed by the loop (`loop.run`) or by `keras.Model.fit` (the recipe).
"""

import time

import numpy as np

from gemma_lora import runtime
from gemma_lora.errors import ConfigError
from gemma_lora.io import write_text_atomic
from gemma_lora.progress import Progress
from gemma_lora.training.scoring import SplitScorer

runtime.ensure_runtime()

import keras  # noqa: E402


class TrainingProgress(keras.callbacks.Callback):
    """One progress bar over the whole run, for either engine.

    Its total is the number of steps the run will really take (`total_steps`
    minus those done before a resume), whatever the epochs and `max_steps`;
    it shows `token_loss`, the per-token mean the summary reports (Keras'
    own `loss` divides by padding too). Pass `verbose=0` to `fit` so Keras'
    per-epoch bar stays off.
    """

    def __init__(self, steps, label="training", shown_as="token_loss"):
        super().__init__()
        # shown_as: the name the bar gives the logs' token_loss (a preference run's is its mean loss per pair).
        self.steps, self.label, self.shown_as = steps, label, shown_as
        self.progress = None

    def on_train_begin(self, logs=None):
        if self.progress is None:  # Keras' engine calls fit once per epoch.
            self.progress = Progress(self.steps, self.label, unit="step")

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        if not logs.get("update", True):
            return  # a batch whose gradient waits for the rest of its accumulation
        shown = {self.shown_as: float(logs["token_loss"])} if "token_loss" in logs else {}
        if "reward" in logs:  # GRPO: the batch's mean reward, and where the step's time went
            shown.update(reward=f"{logs['reward']:.3f}", sampling=f"{logs['sampling_seconds']:.1f}s",
                         update=f"{logs['update_seconds']:.1f}s")
        if "learning_rate" in logs:
            shown["lr"] = f"{logs['learning_rate']:.2e}"
        self.progress.update(**shown)

    def close(self):
        if self.progress is not None:
            self.progress.close()


def callbacks_for_run(run_dir, splits, config, start_step=0, write=True):
    """The callbacks a CLI/pipeline run uses: split scores, CSV logs, TensorBoard.

    Validation is scored at each epoch's end (`SplitScorer`, into
    metrics.csv) unless `eval_every` scores it every N steps instead (the
    loop's evaluations, into evaluations.csv). `write=False` (a job's
    processes other than process 0) leaves out those that write files; the
    scoring stays, since every process computes it together.
    """
    callbacks = [] if config.eval_every else [SplitScorer(splits, max(config.batch_size, 8))]
    if not write:
        return callbacks
    # append: one fit call per epoch, and resumed runs, add to the same file.
    callbacks.append(keras.callbacks.CSVLogger(str(run_dir / "metrics.csv"), append=True))
    if config.eval_every:
        callbacks.append(EvaluationLog(run_dir / EVALUATIONS_FILE, pairs=config.prefers))
    if config.samples_completions:
        callbacks.append(RolloutLog(run_dir / ROLLOUTS_FILE, resumed_at=start_step // config.grad_accumulation))
    if config.tensorboard:
        callbacks.append(TensorBoardLog(run_dir / "tensorboard", start_step, config.grad_accumulation))
    return callbacks


EVALUATIONS_FILE = "evaluations.csv"


class EvaluationLog(keras.callbacks.Callback):
    """One row of evaluations.csv per evaluation: the step, its learning rate, training and validation loss."""

    COLUMNS = ("step", "learning_rate", "train_token_loss", "validation_token_loss", "validation_perplexity")
    # A preference run's validation pairs (`train_token_loss` is then its objective's mean loss per pair).
    PAIR_COLUMNS = ("validation_pair_loss", "validation_reward_accuracy", "validation_reward_margin",
                    "validation_chosen_logps", "validation_rejected_logps")

    def __init__(self, path, pairs=False):
        super().__init__()
        self.path = path
        self.columns = self.COLUMNS + (self.PAIR_COLUMNS if pairs else ())

    def on_evaluation(self, step, logs):
        import csv

        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:  # appended row by row, like metrics.csv
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({name: logs.get(name, "") for name in self.columns})


ROLLOUTS_FILE = "rollouts.csv"
REWARD_CURVE_FILE = "reward_curve.png"


class RolloutLog(keras.callbacks.Callback):
    """One row of rollouts.csv per GRPO batch: its rewards (per function), groups, lengths, KL, clipping and times.

    Appended row by row; the columns are the first row's, which every batch
    of a run shares. A resumed run (`resumed_at`: the optimizer step of its
    checkpoint) first drops the rows of the steps after it, which it samples
    and logs again, so the file holds each step once.
    """

    def __init__(self, path, resumed_at=0):
        super().__init__()
        self.path = path
        self.columns = None  # the file's header, read (a resumed run's) or written once
        if resumed_at and path.exists():
            _keep_rows_through(path, resumed_at)

    def on_train_batch_end(self, batch, logs=None):
        import csv

        logs = logs or {}
        if "reward" not in logs:
            return
        row = {"optimizer_step": logs.get("optimizer_step"), "loss": logs.get("loss")}
        row.update({k: v for k, v in logs.items() if k.startswith("reward") or k in ROLLOUT_COLUMNS})
        new = not self.path.exists()
        if self.columns is None and not new:
            with open(self.path, newline="") as f:
                self.columns = next(csv.reader(f), list(row))
        self.columns = self.columns or list(row)
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)


def _keep_rows_through(path, step):
    import csv
    import io

    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns, rows = reader.fieldnames, [r for r in reader if int(r["optimizer_step"]) <= step]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, text.getvalue())


ROLLOUT_COLUMNS = ("equal_reward_groups", "completion_length", "ended_share", "kl", "clip_fraction", "logp_gap",
                   "sampled", "sampling_seconds", "update_seconds", "learning_rate")


def plot_reward_curve(run_dir):
    """reward_curve.png from rollouts.csv: each reward function's mean per batch and the weighted total.

    Returns the path, or None when there is nothing to plot or matplotlib is
    missing (`pip install matplotlib`; the CSV has the same numbers).
    """
    import csv

    from gemma_lora.io import write_bytes_atomic

    path = run_dir / ROLLOUTS_FILE
    if not path.exists():
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("sampled") in ("True", "1", "true")]
    if not rows:
        return None
    steps = [int(r["optimizer_step"]) for r in rows]
    figure, axis = plt.subplots(figsize=(7, 4))
    names = [k for k in rows[0] if k.startswith("reward") and not k.endswith("_std")]
    for name in names:
        label = "total (weighted)" if name == "reward" else name[len("reward_"):]
        axis.plot(steps, [float(r[name]) for r in rows], label=label, linewidth=2 if name == "reward" else 1)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("mean reward of the batch's completions")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    target = run_dir / REWARD_CURVE_FILE
    write_bytes_atomic(target, buffer.getvalue())
    return target


def require_tensorboard(config):
    """Raise ConfigError before anything is written if TensorBoard logs are asked for and cannot be written."""
    if not config.tensorboard:
        return
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        raise ConfigError(
            'tensorboard=true needs the tensorboardX package: pip install "gemma-lora[tensorboard]", '
            "or drop --tensorboard."
        ) from None


class TensorBoardLog(keras.callbacks.Callback):
    """Training curves for TensorBoard: token_loss every step, the epoch logs every epoch.

    Written with tensorboardX, which needs no TensorFlow (Keras' own
    TensorBoard callback does, and the CLI keeps TensorFlow out of the
    process). Steps are the run's global steps, so a resumed run continues
    the same curves.
    """

    def __init__(self, log_dir, start_step=0, accumulation=1):
        super().__init__()
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))
        self.step = start_step // accumulation  # optimizer steps; start_step counts batches

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        if not logs.get("update", True):
            return
        self.step += 1
        for name in ("token_loss", "learning_rate"):
            if name in logs:
                self.writer.add_scalar(f"train/{name}", float(logs[name]), self.step)

    def on_evaluation(self, step, logs):
        for name, value in logs.items():
            if name != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(f"eval/{name}", float(value), step)
        self.writer.flush()

    def on_epoch_end(self, epoch, logs=None):
        for name, value in (logs or {}).items():
            if isinstance(value, (int, float, np.floating)) and not isinstance(value, bool):
                self.writer.add_scalar(f"epoch/{name}", float(value), self.step)
        self.writer.flush()

    def on_train_end(self, logs=None):
        self.writer.flush()


class Timer:
    """Wall-clock seconds of a block."""

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
