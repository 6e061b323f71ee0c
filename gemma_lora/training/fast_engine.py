"""The fast engine's batches and step: packed rows through `gemma_lora.fast`'s functional Gemma.

It trains the same LoRA factors of the same Keras model as the Keras engine,
on the same rows in the same epoch order, with the same optimizer, in the
same loop (`loop.run`), so the rest of the run (scoring,
generation, adapters, checkpoints, resume) does not know which engine ran.
What differs is the batches: each epoch's rows (in `loop.epoch_order`) are
packed several per row by `packing.pack` (no cross-attention, response
weights kept), the packed rows shuffled by (seed, epoch) and cut into
batches of `batch_size` rows, all of one shape, so the step compiles once.

Why not KerasHub's model here: its backbones take no per-example attention
masks, so packed rows cannot go through it (see `gemma_lora.fast.extract`).
"""

import numpy as np

from gemma_lora import runtime
from gemma_lora.data import packing
from gemma_lora.fast import extract, forward
from gemma_lora.model.layers import lora_layers
from gemma_lora.parallel import distribute
from gemma_lora.training import loop
from gemma_lora.training.loop import epoch_order

runtime.ensure_runtime()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402


def fast_dtype(precision):
    """The fast engine's dtype for frozen weights and activations."""
    return "float32" if precision == "float32" else "bfloat16"


def examples_of(rows):
    """Each row's (token_ids, loss_weights) without padding, as `packing.pack` takes them.

    A row's weight at position t weighs the prediction of token t + 1, which
    is `pack`'s convention. A row cut at sequence_length loses the label of
    its last position (its next token is not in the row).
    """
    lengths = rows.padding_mask.sum(axis=1)
    return [(rows.token_ids[i, :n], rows.weights[i, :n]) for i, n in enumerate(lengths)]


def epoch_batches(rows, config, epoch):
    """The packed batches of an epoch, in training order: a list of dicts of arrays.

    A pure function of (rows, config, epoch), so a resumed run rebuilds them.
    """
    examples = examples_of(rows)
    order = epoch_order(len(examples), config, epoch)
    packed = packing.pack([examples[i] for i in order], config.sequence_length)
    n = len(packed["token_ids"])
    if config.shuffle:
        packed = {k: v[np.random.default_rng([config.seed, epoch, 1]).permutation(n)] for k, v in packed.items()}
    extra = -n % config.batch_size
    if extra:
        # Empty rows (segment 0, weight 0) keep the last batch the same shape.
        packed = {k: np.concatenate([v, np.zeros((extra, v.shape[1]), v.dtype)]) for k, v in packed.items()}
    size = config.batch_size
    return [{k: v[i : i + size] for k, v in packed.items()} for i in range(0, n + extra, size)]


def batch_contents(rows, batch):
    """(examples, real tokens) in a packed batch: its distinct segments, its non-padding positions."""
    segments = batch["segment_ids"]
    examples = sum(len(np.unique(row[row > 0])) for row in segments)
    return examples, int((segments > 0).sum())


def pairs_per_batch(pairs, config):
    """The most preference pairs a batch of `batch_size` rows can hold (a static size of the step)."""
    return max(1, min(len(pairs), config.batch_size * config.sequence_length // pairs.shortest))


def pair_sequences(pairs, indices):
    """The sequences of `pairs` at `indices`, with the reference's per-token log-probs where they are known."""
    out = []
    for i in indices:
        sides = pairs.sequences(i)
        if pairs.reference is not None:
            # A pair the run never trains on has no reference (zeros, unread).
            known = pairs.reference[i] or [np.zeros(len(side["token_ids"]), np.float32) for side in sides]
            sides = tuple(dict(side, reference_logps=ref) for side, ref in zip(sides, known))
        out.append(sides)
    return out


def pair_batches(pairs, config, epoch=None):
    """The pair batches of an epoch in training order (`packing.pack_pairs`); epoch None: the pairs in order.

    Which pairs share a batch is drawn once per run (the pairs in epoch 0's
    order, packed); each epoch then takes those batches in an order drawn from
    (seed, epoch). Packing each epoch anew could change its number of
    batches, and the loop counts steps per epoch once.
    """
    order = np.arange(len(pairs)) if epoch is None else epoch_order(len(pairs), config, 0)
    batches = packing.pack_pairs(pair_sequences(pairs, order), config.sequence_length, config.batch_size,
                                 pairs_per_batch(pairs, config))
    for batch in batches:  # pack_pairs numbers the pairs in the order given: back to their indices in `pairs`
        batch["pair_index"] = [int(order[i]) for i in batch["pair_index"]]
    if epoch is None or not config.shuffle:
        return batches
    return [batches[i] for i in np.random.default_rng([config.seed, epoch, 1]).permutation(len(batches))]


def pair_contents(pairs, batch):
    """(pairs, real tokens) in a pair batch."""
    return len(batch["pair_index"]), int((batch["segment_ids"] > 0).sum())


def fast_view(causal_lm, precision, seed):
    """(fast config, frozen arrays, where each Keras trainable variable sits in the LoRA pytree) of a LoRA model.

    The frozen arrays are the Keras variables' own (no copy of the base).
    """
    # The layers LoRA is enabled on (the run's lora_targets, as the pipeline enabled them).
    enabled = {layer.name for layer in lora_layers(causal_lm)}
    targets = tuple(name for name in extract.EQUATIONS if name in enabled)
    fast_config, frozen, _ = extract.extract_params(causal_lm, targets, dtype=fast_dtype(precision), seed=seed, cast=False)
    where = {}
    for i, block in enumerate(causal_lm.backbone.transformer_layers):
        for target in fast_config.lora_targets:
            layer = extract.layer_of(block, target)
            if layer is None:  # a Gemma 4 K = V layer's value
                continue
            where[id(layer.lora_kernel_a)] = (i, target, "lora_kernel_a")
            where[id(layer.lora_kernel_b)] = (i, target, "lora_kernel_b")
    return fast_config, frozen, [where[id(v)] for v in causal_lm.trainable_variables]


class FastStepper(loop.StepEngine):
    """`gemma_lora.fast`'s functional Gemma on packed rows, stepped by the loop.

    The frozen base is read once into the fast path's arrays (in the run's
    compute dtype); the trainable state is the Keras model's own LoRA
    variables, in Keras' order, which the step arranges into the fast
    path's per-layer pytree. The update is the run's Keras optimizer
    (`stateless_apply`), as in the Keras engine.
    """

    def __init__(self, causal_lm, plan, precision, objective):
        super().__init__(causal_lm, plan)
        self.objective = objective
        self.fast_config, self.frozen, self.paths = fast_view(causal_lm, precision, plan.config.seed)
        # A pair batch's pairs, a static size of the step (None: single examples).
        pairs = plan.pairs_per_batch if objective.pairs else None
        # The frozen weights keep the Keras variables' layout (extract_params
        # converts them in place), so a distribution's layout map lays out
        # both engines alike; the state keeps its layout across steps.
        state = self.state_shardings()
        out_shardings = None if state is None else (*state, None, None)
        key = (id(self.optimizer), objective, self.fast_config, tuple(self.paths), self.distribution is not None, pairs)
        self._step = loop.compiled_step(
            causal_lm, key,
            lambda: jax.jit(_fast_train_step(self.fast_config, self.paths, self.optimizer, objective, pairs),
                            donate_argnums=(0, 1), out_shardings=out_shardings),
        )

    def batch_weight(self, batch):
        return self.objective.batch_weight(batch)

    def step(self, batch, scale):
        # Every process packs the whole epoch (the same everywhere) and feeds the rows its devices hold.
        shape = batch["token_ids"].shape
        sharding, (start, stop) = distribute.batch_layout(shape, self.distribution)
        names = sorted(k for k, v in batch.items() if isinstance(v, np.ndarray))  # a pair batch's pair_index, pair_places are lists
        batch = dict(zip(names, distribute.to_global([batch[k][start:stop] for k in names], sharding, shape)))
        self.trainable, self.optimizer_values, nll, weight = self._step(
            self.trainable, self.optimizer_values, self.frozen, batch, jnp.float32(scale)
        )
        nll, weight = float(nll), float(weight)
        return nll, weight, nll / max(weight, 1.0)


class FastForward:
    """The functional Gemma on one packed batch, as a function of the LoRA factors (what an objective reads).

    `pairs`: the batch's pair slots (`pack_pairs`), for `sequence_logps`.
    """

    def __init__(self, fast_config, frozen, lora, batch, pairs=None):
        self.fast_config, self.frozen, self.lora, self.batch, self.pairs = fast_config, frozen, lora, batch, pairs

    def token_nll_sums(self):
        return forward.loss_sums(self.fast_config, self.frozen, self.lora, self.batch)

    def sequence_logps(self):
        batch, pairs = self.batch, self.pairs
        logps = forward.token_logps(self.fast_config, self.frozen, self.lora, batch)
        ids = batch["sequence_ids"]
        counts = forward.sequence_sums(batch["loss_weights"] > 0, ids, pairs)
        reference = batch.get("reference_logps")
        reference = jnp.zeros_like(counts) if reference is None else forward.sequence_sums(reference, ids, pairs)
        return forward.sequence_sums(logps, ids, pairs), counts, reference


def lora_tree(fast_config, paths, trainable):
    """The fast path's per-layer LoRA pytree of the Keras model's trainable values (`paths[i]`: the i-th's place)."""
    lora = [{} for _ in range(fast_config.num_layers)]
    for (i, target, name), value in zip(paths, trainable):
        lora[i].setdefault(target, {})[name] = value
    return lora


def _fast_train_step(fast_config, paths, optimizer, objective, pairs=None):
    """The fast engine's step: gradients of the packed batch's loss on the LoRA factors, then the update.

    `paths[i]` is where the Keras model's i-th trainable variable sits in
    the fast path's per-layer LoRA pytree. No reference to the Keras model:
    the compiled step is kept per model and must not keep it alive.
    """

    def train_step(trainable, optimizer_values, frozen, batch, scale):
        def loss(trainable):
            lora = lora_tree(fast_config, paths, trainable)
            nll, weight = objective.loss(FastForward(fast_config, frozen, lora, batch, pairs))
            # `scale` (from the loop) makes it the mean over the optimizer step's loss-carrying tokens.
            return nll * scale, (nll, weight)

        grads, (nll, weight) = jax.grad(loss, has_aux=True)(trainable)
        trainable, optimizer_values = optimizer.stateless_apply(optimizer_values, grads, trainable)
        return trainable, optimizer_values, nll, weight

    return train_step
