"""A second LoRA trainer on the functional Gemma, with its own AdamW, for scripts/benchmark.py only.

`gemma_lora.fast` trains in the product through the Keras model's own
optimizer (`training/fast_engine.py`). The benchmark runs the functional
forward on the GPU machine, which has JAX but not always Keras, so it keeps
this pure-JAX train step: random frozen weights (`init_params`), an AdamW
written to match keras.optimizers.AdamW (tests/unit/test_fast.py checks it), one
jitted step, and `write_back` to copy trained factors into a Keras model.

    config = FastConfig(...)                      # e.g. the gemma_2b shape
    frozen, lora = init_params(config, jax.random.key(0))
    step = make_train_step(config, AdamW(learning_rate=5e-5, weight_decay=0.01))
    opt_state = step.init(lora)
    lora, opt_state, sums = step(frozen, lora, opt_state, batch)
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from gemma_lora.errors import ConfigError
from gemma_lora.fast.extract import arrange_layers, layer_lora, layer_of, norm_readers
from gemma_lora.fast.forward import loss_sums


def write_back(causal_lm, config, lora):
    """Assign trained LoRA factors to the Keras model's EinsumDense layers.

    Enables LoRA (with the config's rank and alpha) on target layers that do
    not have it yet, so the Keras model then computes what the fast path does.

    Raises:
        ConfigError: a target layer already has LoRA of another rank or alpha.
    """
    blocks = causal_lm.backbone.transformer_layers
    for i, block in enumerate(blocks):
        factors = layer_lora(config, lora, i)
        for target in config.lora_targets:
            layer = layer_of(block, target)
            if layer is None:
                continue
            if not layer.lora_enabled:
                layer.enable_lora(config.lora_rank, lora_alpha=config.lora_alpha)
            if (layer.lora_rank, float(layer.lora_alpha)) != (
                config.lora_rank,
                config.lora_alpha,
            ):
                raise ConfigError(
                    f"Layer {layer.path} has LoRA rank {layer.lora_rank} alpha "
                    f"{layer.lora_alpha}; the trained factors have rank "
                    f"{config.lora_rank} alpha {config.lora_alpha}."
                )
            layer.lora_kernel_a.assign(np.asarray(factors[target]["lora_kernel_a"]))
            layer.lora_kernel_b.assign(np.asarray(factors[target]["lora_kernel_b"]))


def init_params(config, key):
    """Random frozen weights and fresh LoRA factors of `config`'s shape.

    For benchmarks: builds gemma_2b-sized weights directly on the device, in
    `config.dtype`, without a Keras model holding a second copy. Norm scales
    are small and random rather than zero so no multiply sees only zeros.
    """
    dtype = jnp.dtype(config.dtype)
    n, d, f, L = config.num_query_heads, config.hidden_dim, config.ffw_dim, config.num_layers
    keys = iter(jax.random.split(key, 16 * (L + 1)))

    def normal(shape, scale):
        # Drawn in the target dtype: no float32 copy of the weights, ever.
        return jax.random.normal(next(keys), shape, dtype) * jnp.asarray(scale, dtype)

    layers, lora = [], []
    for index in range(L):
        h, k, k_eq_v, _ = config.heads_of(index)
        shapes = {
            "query": (n, d, h),
            "key": (k, d, h),
            "value": (k, d, h),
            "attention_output": (n, h, d),
            "ffw_gating": (d, f),
            "ffw_gating_2": (d, f),
            "ffw_linear": (f, d),
        }
        if k_eq_v:
            del shapes["value"]
        fan_in = {"attention_output": n * h, "ffw_linear": f}
        layer = {
            name: normal(shape, 1.0 / math.sqrt(fan_in.get(name, d)))
            for name, shape in shapes.items()
        }
        for name, _ in norm_readers(config):
            layer[name] = normal((h,) if name in ("query_norm", "key_norm") else (d,), 0.1)
        if config.layer_scalar:
            layer["layer_scalar"] = jnp.ones((), dtype)
        layers.append(layer)
        factors = {}
        for target in config.lora_targets:
            if target not in shapes:
                continue
            shape = shapes[target]
            # he_uniform, as Keras initialises lora_kernel_a; B starts at 0.
            bound = math.sqrt(6.0 / math.prod(shape[:-1]))
            factors[target] = {
                "lora_kernel_a": jax.random.uniform(
                    next(keys), (*shape[:-1], config.lora_rank), jnp.float32, -bound, bound
                ),
                "lora_kernel_b": jnp.zeros((config.lora_rank, shape[-1]), jnp.float32),
            }
        lora.append(factors)
    frozen = {
        "embedding": normal((config.vocabulary_size, d), 1.0 / math.sqrt(d)),
        "final_norm": normal((d,), 0.1),
        "layers": arrange_layers(config, layers),
    }
    return frozen, arrange_layers(config, lora)


@dataclasses.dataclass(frozen=True)
class AdamW:
    """keras.optimizers.AdamW's update, on a pytree of float32 arrays.

    Written here so this module needs nothing but JAX (scripts/benchmark.py
    runs it on the GPU machine without Keras); training goes through
    gemma_lora.optim, Keras' own AdamW. The rule is a dozen lines. As in Keras: decoupled decay
    `p -= p * wd * lr` first, then Adam with bias correction folded into the
    step size and epsilon added to sqrt(v); leaves whose path contains one of
    `exclude` (Keras: `exclude_from_weight_decay(var_names=...)`) get no decay.
    """

    learning_rate: float = 5e-5
    weight_decay: float = 0.01
    beta_1: float = 0.9
    beta_2: float = 0.999
    epsilon: float = 1e-7
    exclude: tuple = ("bias", "scale")

    def init(self, params):
        zeros = lambda p: jnp.zeros_like(p)  # noqa: E731
        return {
            "count": jnp.zeros((), jnp.int32),
            "m": jax.tree.map(zeros, params),
            "v": jax.tree.map(zeros, params),
        }

    def _decays(self, path):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return not any(word in name for word in self.exclude)

    def update(self, params, grads, state):
        count = state["count"] + 1
        t = count.astype(jnp.float32)
        lr = self.learning_rate
        alpha = lr * jnp.sqrt(1.0 - self.beta_2**t) / (1.0 - self.beta_1**t)

        def one(path, p, g, m, v):
            if self.weight_decay and self._decays(path):
                p = p - p * (self.weight_decay * lr)
            m = m + (g - m) * (1.0 - self.beta_1)
            v = v + (jnp.square(g) - v) * (1.0 - self.beta_2)
            return p - m * alpha / (jnp.sqrt(v) + self.epsilon), m, v

        out = jax.tree_util.tree_map_with_path(one, params, grads, state["m"], state["v"])
        is_triple = lambda x: isinstance(x, tuple)  # noqa: E731
        pick = lambda i: jax.tree.map(lambda x: x[i], out, is_leaf=is_triple)  # noqa: E731
        return pick(0), {"count": count, "m": pick(1), "v": pick(2)}


class TrainStep:
    """One jitted LoRA training step: gradients of the mean per-token loss.

    `step(frozen, lora, opt_state, batch) -> (lora, opt_state, sums)`, where
    `sums = {"nll_sum", "weight_sum"}` stay on the device (no host sync per
    step). The LoRA and optimizer buffers are donated: the caller's old arrays
    are invalid after the call. `traces` counts compilations of the step.
    """

    def __init__(self, config, optimizer=None):
        self.config = config.validate()
        self.optimizer = optimizer or AdamW()
        self.traces = 0
        self._step = jax.jit(self._run, donate_argnums=(1, 2))

    def init(self, lora):
        return self.optimizer.init(lora)

    def _run(self, frozen, lora, opt_state, batch):
        self.traces += 1  # Python runs here only while tracing.

        def objective(lora):
            nll, weight = loss_sums(self.config, frozen, lora, batch)
            return nll / jnp.maximum(weight, 1.0), (nll, weight)

        grads, (nll, weight) = jax.grad(objective, has_aux=True)(lora)
        lora, opt_state = self.optimizer.update(lora, grads, opt_state)
        return lora, opt_state, {"nll_sum": nll, "weight_sum": weight}

    def __call__(self, frozen, lora, opt_state, batch):
        return self._step(frozen, lora, opt_state, batch)


def make_train_step(config, optimizer=None):
    """A `TrainStep` for `config` with `optimizer` (default: AdamW())."""
    return TrainStep(config, optimizer)
