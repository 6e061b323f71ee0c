"""Compile and fit a LoRA model on tokenized arrays; score true per-token losses.

Keras' printed `loss` divides the summed loss by every position of the batch,
padding and masked prompt tokens included (0.86 printed where the real mean
was 3.15 in ../shared/quality-notes.md). So this module also tracks
`token_loss`, a weighted metric whose mean is over the tokens that carry loss,
and scores validation/test splits the same way after each epoch.
"""

import dataclasses
import math
import time
import weakref

import numpy as np

from gemma_lora import distribute, loop, runtime
from gemma_lora.errors import ConfigError
from gemma_lora.layers import model_inputs
from gemma_lora.loop import (  # noqa: F401  (re-exported: they were train's before loop.py)
    History,
    Position,
    StopAfterSteps,
    epoch_order,
    epochs_from,
    with_step_limit,
)
from gemma_lora.progress import Progress

runtime.ensure_runtime()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402


def make_optimizer(config, total_steps=None):
    """AdamW as in the classic recipe (no weight decay on bias and norm scales), with the run's controls."""
    from gemma_lora.optim import make_optimizer as make

    return make(config, total_steps)


def compile_for_training(causal_lm, config, total_steps=None):
    """Compile with the recipe's loss and metrics, plus the true per-token loss.

    `total_steps` (optimizer steps of the run, see `total_steps`) is where a
    learning-rate schedule ends; a constant rate does not need it.
    """
    causal_lm.compile(
        optimizer=make_optimizer(config, total_steps),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[
            keras.metrics.SparseCategoricalAccuracy(),
            # Weighted by the loss weights: the mean over loss-carrying tokens.
            keras.metrics.SparseCategoricalCrossentropy(from_logits=True, name="token_loss"),
        ],
    )


def fit(causal_lm, rows, config, callbacks=(), verbose="auto", start=None, engine="keras", precision="float32",
        evaluate=None):
    """Train on `rows` (a `data.TokenizedRows`) from `start` and return a History.

    Both engines run `loop.run`: the Keras engine (`KerasEngine`, KerasHub's
    model through a jitted stateless step on length-bucketed batches) and
    the fast engine (`fast_train.FastEngine`, packed rows). `--recipe` runs
    `keras.Model.fit` itself, once per epoch, as the classic recipe does
    (`keras_fit`). Callbacks that set `model.stop_training` end the run.

    Args:
        verbose: truthy shows one progress bar over the optimizer steps the
            run will take (`TrainingProgress`); 0 shows nothing.
        start: a `Position` to resume from (default: the beginning).
        engine: "keras", or "fast" to train with `gemma_lora.fast_train` on
            packed rows (see `fast_train.resolve_engine`).
        precision: the run's dtype policy; the fast engine's dtype follows it.
        evaluate: optional f() -> logs, every `eval_every` optimizer steps.
    """
    start = start or Position()
    callbacks = list(callbacks)
    progress = None
    if verbose:
        per_epoch = steps_per_epoch(rows, config, engine)
        done = (start.epoch * per_epoch + start.step) // config.grad_accumulation
        progress = TrainingProgress(total_steps(rows, config, engine) - done)
        callbacks.append(progress)
    try:
        if config.recipe:
            return keras_fit(causal_lm, rows, config, callbacks, start)
        if engine == "fast":
            from gemma_lora.fast_train import FastEngine

            stepper = FastEngine(causal_lm, rows, config, precision)
        else:
            stepper = KerasEngine(causal_lm, rows, config)
        from gemma_lora.optim import schedule_fn

        fn = schedule_fn(config, total_steps(rows, config, engine))
        learning_rate = (lambda step: float(fn(step))) if fn is not None else (lambda step: config.learning_rate)
        return loop.run(stepper, config, callbacks, start, learning_rate=learning_rate, evaluate=evaluate)
    finally:
        if progress is not None:
            progress.close()


class KerasEngine(loop.StepEngine):
    """KerasHub's model as it is (any architecture, quantized bases, several devices), stepped by the loop.

    Batches are the length-bucketed rows of `epoch_batches`, each trimmed to
    its longest row; the step is `stateless_call` of the Keras model, the
    loss the weighted token cross-entropy, and the update Keras' optimizer's
    `stateless_apply`, all in one jitted function (compiled once per batch
    length). Under a Keras distribution each batch is laid out as Keras'
    own trainer lays it out, and the state keeps its variables' layout.
    """

    def __init__(self, causal_lm, rows, config):
        super().__init__(causal_lm)
        self.rows, self.config = rows, config
        self.non_trainable = [v.value for v in causal_lm.non_trainable_variables]
        state = self.state_shardings()
        out_shardings = None if state is None else (*state, None, None)
        key = (id(self.optimizer), self.distribution is not None)
        self._step = loop.compiled_step(
            causal_lm, key,
            lambda: jax.jit(_keras_train_step(causal_lm, self.optimizer), donate_argnums=(0, 1), out_shardings=out_shardings),
        )

    def steps_per_epoch(self):
        return steps_per_epoch(self.rows, self.config)

    def epoch_batches(self, epoch):
        return epoch_batches(self.rows, self.config, epoch)

    def batch_weight(self, index):
        return float(self.rows.weights[index].sum())

    def step(self, index, scale):
        size, trim = self.config.batch_size, self.config.bucket_by_length
        shape = (size, batch_length(self.rows, index, trim))
        # Under a distribution each process builds only the rows its own devices hold.
        sharding, share = distribute.batch_layout(shape, self.distribution)
        x, labels, weights = batch_arrays(self.rows, index, size, trim, share)
        inputs = distribute.to_global((x["token_ids"], x["padding_mask"], labels, weights), sharding, shape)
        self.trainable, self.optimizer_values, nll, weight = self._step(
            self.trainable, self.optimizer_values, self.non_trainable, *inputs, jnp.float32(scale)
        )
        nll, weight = float(nll), float(weight)
        return nll, weight, nll / max(weight, 1.0)


def _keras_train_step(causal_lm, optimizer):
    """The Keras engine's step function for `causal_lm` (compiled once per batch length)."""
    # A weak reference: the compiled step is kept per model (loop.compiled_step),
    # and a strong one would keep every model ever trained alive.
    model = weakref.ref(causal_lm)

    def train_step(trainable, optimizer_values, non_trainable, token_ids, padding_mask, labels, weights, scale):
        # The name is what tests count traces of.
        def objective(trainable):
            logits, _ = model().stateless_call(
                trainable, non_trainable, model_inputs(model(), token_ids, padding_mask), training=True
            )
            nll, weight = weighted_nll(logits, labels, weights)
            # The mean over the optimizer step's loss-carrying tokens (`scale`, from the
            # loop), as in the fast engine: not Keras' sample-weighted loss, which
            # divides by every position of the batch, padding included, so its
            # scale moves with each length bucket.
            return nll * scale, (nll, weight)

        grads, (nll, weight) = jax.grad(objective, has_aux=True)(trainable)
        trainable, optimizer_values = optimizer.stateless_apply(optimizer_values, grads, trainable)
        return trainable, optimizer_values, nll, weight

    return train_step


def weighted_nll(logits, labels, weights):
    """(sum of weight x -log p(label), sum of weights) over the whole batch, in float32.

    -log softmax(logits)[label] = logsumexp(logits) - logits[label]: no second
    vocabulary-sized array of log-probabilities (262k wide on Gemma 3).
    """
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - picked
    weights = weights.astype(jnp.float32)
    return jnp.sum(nll * weights), jnp.sum(weights)


def keras_fit(causal_lm, rows, config, callbacks, start):
    """The classic recipe's training: `keras.Model.fit` once per epoch on the epoch's batches.

    Batches go straight to `keras.Model.fit` as a `PyDataset`: KerasHub's own
    `fit` (its PipelineModel) would wrap arrays in a grain/tf.data dataset
    and drop `shuffle`.
    """
    callbacks = with_step_limit(callbacks, config, start, steps_per_epoch(rows, config))
    history = History()
    for epoch, skip in epochs_from(start, config, callbacks):
        # The epoch's batches are a pure function of (seed, epoch), so a
        # resumed run rebuilds them and drops the ones already taken.
        batches = epoch_batches(rows, config, epoch)[skip:]
        history.extend(
            keras.Model.fit(
                causal_lm,
                Batches(rows, batches, config, causal_lm),
                initial_epoch=epoch,
                epochs=epoch + 1,
                shuffle=False,
                callbacks=callbacks,
                verbose=0,  # TrainingProgress shows progress over the whole run instead.
            )
        )
        if causal_lm.stop_training:
            break
    return history


def steps_per_epoch(rows, config, engine="keras"):
    if engine == "fast":
        from gemma_lora import fast_train

        return fast_train.steps_per_epoch(rows, config)
    return math.ceil(len(rows) / config.batch_size)


# Batch lengths are rounded up to a multiple of this: a handful of shapes
# (each compiles the train step once) instead of one per batch.
LENGTH_MULTIPLE = 64
# Rows are sorted by length within windows of this many batches: batches of
# rows of like length waste little on padding, and the epoch stays shuffled.
SORT_WINDOW_BATCHES = 32


def epoch_batches(rows, config, epoch):
    """The row indices of each batch of an epoch, in training order.

    With `bucket_by_length` (the default) rows are drawn in the epoch's order,
    sorted by length within windows of `SORT_WINDOW_BATCHES` batches, cut into
    batches, and the batches put in an order drawn from (seed, epoch). Each
    batch is then only as long as its longest row (rounded up to
    `LENGTH_MULTIPLE`): on Dolly at sequence_length 512 about 42% of the
    positions of a fixed-length batch are real tokens, against 80-90% here.
    Without it (the recipe), batches are consecutive rows of the epoch order.
    """
    order = epoch_order(len(rows), config, epoch)
    size = config.batch_size
    if not config.bucket_by_length:
        return [order[i : i + size] for i in range(0, len(order), size)]
    lengths = rows.padding_mask.sum(axis=1)
    window = size * SORT_WINDOW_BATCHES
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i : i + size] for i in range(0, len(chunk), size)]
    shuffled = np.random.default_rng([config.seed, epoch, 1]).permutation(len(batches))
    return [batches[i] for i in shuffled] if config.shuffle else batches


def batch_arrays(rows, index, batch_size, trim=True, share=None):
    """`(x, labels, weights)` of the rows at `index`, padded to `batch_size` rows.

    With `trim`, positions past the batch's longest row (rounded up to
    `LENGTH_MULTIPLE`) are dropped: they are padding in every row. With
    `share` = (start, stop), only those rows of the padded batch are built
    (one process's share of a global batch), as long as the whole batch's.
    """
    length = batch_length(rows, index, trim)
    start, stop = share or (0, batch_size)
    part = pad_rows(take(rows, index[start:stop]), stop - start)
    if length < part.token_ids.shape[1]:
        part = dataclasses.replace(
            part,
            token_ids=part.token_ids[:, :length],
            padding_mask=part.padding_mask[:, :length],
            labels=part.labels[:, :length],
            weights=part.weights[:, :length],
        )
    return part.x, part.labels, part.weights


def batch_length(rows, index, trim=True):
    """Positions of the batch of the rows at `index`: its longest row rounded up to `LENGTH_MULTIPLE`, or all."""
    full = rows.token_ids.shape[1]
    if not trim:
        return full
    # A padding row shows one position (pad_rows), so a batch is at least that long.
    longest = max(int(rows.padding_mask[index].sum(axis=1).max(initial=0)), 1)
    return min(-(-longest // LENGTH_MULTIPLE) * LENGTH_MULTIPLE, full)


def positions_per_epoch(rows, config):
    """Token positions (real and padding) the first epoch's batches hold."""
    return sum(
        config.batch_size * batch_arrays(rows, index, config.batch_size, config.bucket_by_length)[1].shape[1]
        for index in epoch_batches(rows, config, 0)
    )


class Batches(keras.utils.PyDataset):
    """An epoch's batches for `keras.Model.fit`, each trimmed to its own length."""

    def __init__(self, rows, batches, config, model=None):
        super().__init__()
        self.rows, self.batches, self.config, self.model = rows, batches, config, model

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        x, labels, weights = batch_arrays(self.rows, self.batches[i], self.config.batch_size, self.config.bucket_by_length)
        return {**x, **self.extra_inputs(x)}, labels, weights

    def extra_inputs(self, x):
        # Gemma 4's position ids; Keras' fit keeps no model here, so it is given at construction.
        return {} if self.model is None else model_inputs(self.model, x["token_ids"], x["padding_mask"])


def take(rows, index):
    """The rows at `index` (a NumPy index array), as new `TokenizedRows`."""
    return dataclasses.replace(
        rows,
        token_ids=rows.token_ids[index],
        padding_mask=rows.padding_mask[index],
        labels=rows.labels[index],
        weights=rows.weights[index],
    )


def pad_rows(rows, batch_size):
    """Add all-padding rows (weight 0) up to a multiple of `batch_size` rows.

    A short last batch has a new shape, which would compile the train step a
    second time; a padding row adds nothing to the loss.
    """
    extra = -len(rows) % batch_size if len(rows) else batch_size  # a process's share may hold no row at all
    if not extra:
        return rows

    def grow(array):
        return np.concatenate([array, np.zeros((extra, *array.shape[1:]), array.dtype)])

    # One visible position per padding row: attention over a fully masked row
    # could give NaN, and NaN times a zero weight is still NaN.
    padding_mask = grow(rows.padding_mask)
    padding_mask[len(rows) :, 0] = True
    return dataclasses.replace(
        rows,
        token_ids=grow(rows.token_ids),
        padding_mask=padding_mask,
        labels=grow(rows.labels),
        weights=grow(rows.weights),
    )


class SplitScorer(keras.callbacks.Callback):
    """After each epoch, add the true per-token loss of each split to the logs."""

    def __init__(self, splits, batch_size, show_progress=True):
        super().__init__()
        self.splits = {name: rows for name, rows in splits.items() if rows is not None and len(rows)}
        self.batch_size = batch_size
        self.show_progress = show_progress

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        for name, rows in self.splits.items():
            label = f"scoring {name} rows" if self.show_progress else None
            result = token_loss(self.model, rows, self.batch_size, label=label)
            logs[f"{name}_token_loss"] = result["token_loss"]
            logs[f"{name}_perplexity"] = result["perplexity"]


class TrainingProgress(keras.callbacks.Callback):
    """One progress bar over the whole run, for either engine.

    Its total is the number of steps the run will really take (`total_steps`
    minus those done before a resume), whatever the epochs and `max_steps`;
    it shows `token_loss`, the per-token mean the summary reports (Keras'
    own `loss` divides by padding too). Pass `verbose=0` to `fit` so Keras'
    per-epoch bar stays off.
    """

    def __init__(self, steps, label="training"):
        super().__init__()
        self.steps, self.label = steps, label
        self.progress = None

    def on_train_begin(self, logs=None):
        if self.progress is None:  # Keras' engine calls fit once per epoch.
            self.progress = Progress(self.steps, self.label, unit="step")

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        if not logs.get("update", True):
            return  # a batch whose gradient waits for the rest of its accumulation
        shown = {"token_loss": float(logs["token_loss"])} if "token_loss" in logs else {}
        if "learning_rate" in logs:
            shown["lr"] = f"{logs['learning_rate']:.2e}"
        self.progress.update(**shown)

    def close(self):
        if self.progress is not None:
            self.progress.close()


def examples_trained(rows, config, engine, first_step, last_step):
    """(examples, real tokens) in global steps first_step..last_step (1-based, inclusive).

    Exact for either engine: a Keras step holds `batch_size` rows (fewer at
    an epoch's end), a fast-engine step several packed examples per row.
    """
    per_epoch = steps_per_epoch(rows, config, engine)
    examples = tokens = 0
    plans = {}
    for step in range(first_step, last_step + 1):
        epoch, index = divmod(step - 1, per_epoch)
        if epoch not in plans:
            if engine == "fast":
                from gemma_lora import fast_train

                plans[epoch] = [fast_train.batch_contents(b) for b in fast_train.epoch_batches(rows, config, epoch)]
            else:
                lengths = rows.padding_mask.sum(axis=1)
                plans[epoch] = [(len(b), int(lengths[b].sum())) for b in epoch_batches(rows, config, epoch)]
        n, t = plans[epoch][index]
        examples, tokens = examples + n, tokens + t
    return examples, tokens


def total_steps(rows, config, engine="keras"):
    """Optimizer steps a whole run takes: every epoch's, or max_steps if fewer.

    Raises:
        ConfigError: grad_accumulation is more than the run's batches.
    """
    batches = loop.total_batches(steps_per_epoch(rows, config, engine), config)
    if not batches:
        raise ConfigError(
            f"grad_accumulation={config.grad_accumulation} needs that many batches for one optimizer step, but "
            f"the run has {config.epochs * steps_per_epoch(rows, config, engine)}. Lower grad_accumulation or "
            "batch_size, or train on more rows or epochs."
        )
    return batches // config.grad_accumulation


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
        callbacks.append(EvaluationLog(run_dir / EVALUATIONS_FILE))
    if config.tensorboard:
        callbacks.append(TensorBoardLog(run_dir / "tensorboard", start_step, config.grad_accumulation))
    return callbacks


EVALUATIONS_FILE = "evaluations.csv"


class EvaluationLog(keras.callbacks.Callback):
    """One row of evaluations.csv per evaluation: the step, its learning rate, training and validation loss."""

    COLUMNS = ("step", "learning_rate", "train_token_loss", "validation_token_loss", "validation_perplexity")

    def __init__(self, path):
        super().__init__()
        self.path = path

    def on_evaluation(self, step, logs):
        import csv

        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:  # appended row by row, like metrics.csv
            writer = csv.DictWriter(f, fieldnames=self.COLUMNS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({name: logs.get(name, "") for name in self.COLUMNS})


def validation_scores(causal_lm, rows, batch_size=8):
    """The loop's `evaluate`: the validation split's per-token loss and perplexity, now."""

    def evaluate():
        result = token_loss(causal_lm, rows, batch_size, label="scoring validation rows")
        return {"validation_token_loss": result["token_loss"], "validation_perplexity": result["perplexity"]}

    return evaluate


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


def token_loss(causal_lm, rows, batch_size=8, label=None):
    """Mean cross-entropy over the tokens that carry loss, and per-row means.

    Rows are scored in length order, each batch trimmed to its longest row
    (as in training), which skips most padding. With a `label`, progress
    (rows scored / total) is shown.

    Returns:
        dict with `token_loss` (sum of -log p over weighted tokens / their
        count), `perplexity` = exp(token_loss), `row_losses` (each row's mean,
        in the rows' own order; NaN for rows with no weighted token) and
        `tokens`.
    """
    trainable = [v.value for v in causal_lm.trainable_variables]
    non_trainable = [v.value for v in causal_lm.non_trainable_variables]
    remembered = _remembered_score(causal_lm, rows, batch_size, trainable + non_trainable)
    if remembered is not None:
        return remembered
    score = _scorer(causal_lm)
    order = np.argsort(rows.padding_mask.sum(axis=1), kind="stable")
    sums, counts = np.zeros(len(rows)), np.zeros(len(rows))
    progress = Progress(len(rows), label, unit="row", enabled=bool(label))
    for start in range(0, len(rows), batch_size):
        index = order[start : start + batch_size]
        x, labels, weights = batch_arrays(rows, index, batch_size)
        s, c = score(trainable, non_trainable, x["token_ids"], x["padding_mask"], labels, weights)
        sums[index] = np.asarray(s)[: len(index)]
        counts[index] = np.asarray(c)[: len(index)]
        progress.update(len(index))
    progress.close()
    total = float(counts.sum())
    mean = float(sums.sum() / total) if total else float("nan")
    with np.errstate(invalid="ignore", divide="ignore"):
        row_losses = sums / counts
    result = {
        "token_loss": mean,
        "perplexity": math.exp(mean) if math.isfinite(mean) and mean < 700 else float("inf"),
        "row_losses": row_losses,
        "tokens": int(total),
    }
    _remember_score(causal_lm, rows, batch_size, trainable + non_trainable, result)
    return dict(result, row_losses=row_losses.copy())


# The last split scored per model, with weak references to the rows and to the
# weight arrays it was scored with. A run scores validation at the end of
# training (an epoch's end or the last evaluation) and the pipeline's "after"
# scores the same rows with the same weights right after: the second is
# answered from here (100 rows of the 270M model: about a minute of CPU).
# Keyed by identity, since arrays cannot be dict keys; any assignment to a
# variable makes a new array, so a changed model is always scored again.
_LAST_SCORE = weakref.WeakKeyDictionary()


def _remember_score(causal_lm, rows, batch_size, values, result):
    _LAST_SCORE[causal_lm] = (weakref.ref(rows), batch_size, [weakref.ref(v) for v in values], result)


def _remembered_score(causal_lm, rows, batch_size, values):
    entry = _LAST_SCORE.get(causal_lm)
    if entry is None:
        return None
    rows_ref, size, refs, result = entry
    same = rows_ref() is rows and size == batch_size and len(refs) == len(values)
    if not same or any(ref() is not value for ref, value in zip(refs, values)):
        return None
    return dict(result, row_losses=result["row_losses"].copy())


_SCORERS = weakref.WeakKeyDictionary()


def _scorer(causal_lm):
    # One jitted scorer per model, so scoring every epoch reuses the compiled function.
    if causal_lm in _SCORERS:
        return _SCORERS[causal_lm]

    # A weak reference: a value of a WeakKeyDictionary that refers to its key
    # keeps the key alive, and with it every model ever scored (a rank sweep's
    # memory would grow with each rank).
    model = weakref.ref(causal_lm)

    @jax.jit
    def score(trainable, non_trainable, token_ids, padding_mask, labels, weights):
        logits, _ = model().stateless_call(trainable, non_trainable, model_inputs(model(), token_ids, padding_mask))
        # -log softmax(logits)[label] = logsumexp(logits) - logits[label]: no
        # second vocabulary-sized array of log-probabilities (262k wide on Gemma 3).
        logits = logits.astype(jnp.float32)
        picked = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
        nll = jax.nn.logsumexp(logits, axis=-1) - picked
        return (nll * weights).sum(axis=-1), weights.sum(axis=-1)

    _SCORERS[causal_lm] = score
    return score


class Timer:
    """Wall-clock seconds of a block."""

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
