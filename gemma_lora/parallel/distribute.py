"""Train on several devices with Keras' own distribution API (data or model parallel).

    plan = choose_plan(config, preset_dir, precision)   # which layout, from devices and model size
    distribution = make_distribution(plan, backbone_config(preset_dir))
    keras.distribution.set_distribution(distribution)   # before the model is built

Data parallel replicates every weight and splits each batch over the devices
(`keras.distribution.DataParallel`). Model parallel (`ModelParallel`) lays the
devices out as a (batch, model) mesh and shards the big kernels over the model
axis with the `LayoutMap` of `gemma_layout_map`.

Why not KerasHub's `GemmaBackbone.get_layout_map`: it shards key/value kernels
on their KV-heads axis, and gemma_2b_en (and Gemma 3 270M/1B) has one KV head,
which no model axis of 2+ devices divides (keras-hub #1613: "global size of its
dimension 0 should be divisible by 2"). Gemma3Backbone has no layout map at all.
The map here is built from the preset's config and shards a dimension only
where the mesh axis divides it, so it fits every Gemma size and every mesh.

In a job of several processes (`gemma_lora.hosts`) the devices are every
process's, the plan is chosen from their global count, and each process
feeds only the rows of a batch that its own devices hold (`batch_layout`,
`to_global`).
"""

import dataclasses
import json
import math
from pathlib import Path

from gemma_lora import runtime
from gemma_lora.errors import ConfigError

runtime.ensure_runtime()

import keras  # noqa: E402

BATCH, MODEL = "batch", "model"  # mesh axis names
# Auto picks data parallel while the weights take at most this share of one
# device's memory: the rest is for activations, the LoRA optimizer state (well
# under 1% of the weights) and XLA's workspace.
FITS_SHARE = 0.5


@dataclasses.dataclass(frozen=True)
class Plan:
    """How training is laid out: kind is "none", "data" or "model"; mesh is (batch, model)."""

    kind: str
    mesh: tuple = (1, 1)
    reason: str = ""

    processes: int = 1

    def describe(self):
        hosts = f" in {self.processes} processes" if self.processes > 1 else ""
        if self.kind == "none":
            return f"distribution: one device ({self.reason})"
        if self.kind == "data":
            return f"distribution: data parallel over {self.mesh[0]} devices{hosts} ({self.reason})"
        return (f"distribution: model parallel, mesh {self.mesh[0]} batch x {self.mesh[1]} model{hosts} "
                f"({self.reason})")


def choose_plan(config, preset_dir=None, precision="float32", devices=None, device_bytes=None):
    """Pick the layout for `config.distribution` on `devices` (default: the job's, every process's).

    The "auto" rule: one device → none. Several → data parallel when the
    weights (parameters x bytes of the stored dtype) take at most FITS_SHARE of
    one device's memory (unknown on CPU: assumed to fit); otherwise model
    parallel over the smallest model axis (a divisor of the device count) on
    which each device's share fits. The remaining devices form the batch axis;
    if batch_size does not split over it, the batch axis shrinks to the
    largest size that divides both and the model axis takes the rest.

    Args:
        config: a `TrainConfig` (distribution, model_parallel, batch_size).
        preset_dir: local preset directory; its weights file gives the
            parameter count (only needed for "auto").
        precision: the dtype policy name; "bfloat16" stores 2 bytes a weight.
        devices: list of JAX devices; default every process's (`job_devices`).
        device_bytes: memory of one device; default what JAX reports for
            one of this process's own (another host's reports nothing).

    Raises:
        ConfigError: more parallelism than devices, a model axis that does
            not divide the device count, a batch that does not split, or
            distribution "none" in a job of several processes.
    """
    devices = list(devices if devices is not None else job_devices())
    processes = len({getattr(d, "process_index", 0) for d in devices})
    if processes > 1 and config.distribution == "none":
        raise ConfigError(
            f"distribution='none' trains on one device, but this job's {processes} processes have "
            f"{len(devices)}. Use distribution auto, data or model (or run one process)."
        )
    plan = _choose(config, preset_dir, precision, devices, device_bytes)
    return dataclasses.replace(plan, processes=processes)


def _choose(config, preset_dir, precision, devices, device_bytes):
    import jax

    n = len(devices)
    kind, batch = config.distribution, config.batch_size
    if kind == "none" or (kind == "auto" and n == 1):
        return Plan("none", reason=f"distribution={kind!r}, {n} device(s) visible")
    if kind == "data":
        _check_batch(batch, n, f"distribution='data' on {n} devices")
        return Plan("data", (n, 1), reason="distribution='data'")
    if kind == "model":
        m = config.model_parallel or n
        if m > n or n % m:
            raise ConfigError(
                f"model_parallel={m} needs a device count it divides, but {n} device(s) are visible "
                f"({devices[0].platform}). Use a model_parallel that divides {n}"
                + (", or run where more devices are visible." if m > n else ".")
            )
        _check_batch(batch, n // m, f"distribution='model' with model_parallel={m} on {n} devices")
        return Plan("model", (n // m, m), reason=f"distribution='model', model_parallel={m}")
    # auto, several devices
    weights = parameter_count(preset_dir) * (2 if precision == "bfloat16" else 4)
    local = [d for d in devices if getattr(d, "process_index", 0) == jax.process_index()] or devices
    memory = device_bytes if device_bytes is not None else _device_memory(local[0])
    share = None if memory is None else FITS_SHARE * memory
    fitting = [m for m in _divisors(n) if share is None or weights / m <= share]
    m = fitting[0] if fitting else n
    data = math.gcd(batch, n // m)
    size = f"{weights / 2**30:.2f} GiB of weights"
    size += "" if memory is None else f", {memory / 2**30:.1f} GiB per device"
    if data == n:
        return Plan("data", (n, 1), reason=f"auto: {size}, fits one device")
    why = f"needs {m} devices" if m > 1 else f"batch_size={batch} splits over {data}"
    return Plan("model", (data, n // data), reason=f"auto: {size}, {why}")


def make_distribution(plan, backbone_config, devices=None):
    """The `keras.distribution.Distribution` for `plan`, or None for one device."""
    if plan.kind == "none":
        return None
    devices = list(devices if devices is not None else job_devices())
    if plan.kind == "data":
        return keras.distribution.DataParallel(devices=devices)
    mesh = keras.distribution.DeviceMesh(shape=plan.mesh, axis_names=(BATCH, MODEL), devices=devices)
    return keras.distribution.ModelParallel(
        layout_map=gemma_layout_map(mesh, backbone_config), batch_dim_name=BATCH
    )


def gemma_layout_map(mesh, backbone_config):
    """A `LayoutMap` for any Gemma 1, 2, 3 or 4 backbone (and its LoRA factors) on `mesh`.

    Megatron-style, as KerasHub's: query heads, FFW width and vocabulary go on
    the model axis; the hidden dimension on the batch axis (weights sharded
    across replicas as well). Each dimension is sharded only if its mesh axis
    divides it, otherwise replicated along that axis: so gemma_2b_en's single
    KV head stays whole (keras-hub #1613) while its 8 query heads split, and
    Gemma 2's several KV heads (4, 8, 16) split as its query heads do.
    Unmatched variables (norm scales, Gemma 2/3's post norms, the vision
    tower) are replicated.

    Gemma 4: a key/value kernel's head axis splits only where the model axis
    divides both the sliding layers' KV heads and the global layers' own
    (`num_global_key_value_heads`: 4 on gemma4_31b, whose query and output
    kernels are wider there, which the head split leaves alone); the
    mixture-of-experts bank (experts x hidden x width) splits its experts over
    the model axis and hidden over the batch axis; the per-layer embedding
    table (E2B, E4B: vocabulary x layers·256) splits its vocabulary like the
    token embedding. The router and the per-layer gates are small: replicated.

    A LoRA factor follows its kernel: A (kernel shape[:-1] + rank) shards its
    leading dims as the kernel does, B (rank, out) shards its output dim as the
    kernel's last dim, so x·A·B has the same layout as x·W and the optimizer
    state (created with each variable's layout) follows too.

    Args:
        mesh: a `keras.distribution.DeviceMesh` with axes ("batch", "model").
        backbone_config: dict, the backbone's `get_config()` (see `backbone_config`).
    """
    c = backbone_config
    sizes = dict(zip(mesh.axis_names, mesh.shape))

    def axis(name, dim):
        return name if dim % sizes[name] == 0 else None

    heads, kv_heads, hidden = c["num_query_heads"], c["num_key_value_heads"], c["hidden_dim"]
    # Gemma 4's global layers have their own KV head count; one axis must divide both.
    kv_heads = math.gcd(kv_heads, c.get("num_global_key_value_heads") or kv_heads)
    # Gemma 1/2 gate to intermediate_dim // 2, Gemma 3 to intermediate_dim:
    # a mesh axis dividing the half divides both.
    ffw = c["intermediate_dim"] // 2
    kernels = {
        "attention/query": (axis(MODEL, heads), axis(BATCH, hidden), None),
        "attention/(key|value)": (axis(MODEL, kv_heads), axis(BATCH, hidden), None),
        "attention/attention_output": (axis(MODEL, heads), None, axis(BATCH, hidden)),
        "(ffw_gating|ffw_gating_2)": (axis(BATCH, hidden), axis(MODEL, ffw)),
        "ffw_linear": (axis(MODEL, ffw), axis(BATCH, hidden)),
    }
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["token_embedding/embeddings"] = (axis(MODEL, c["vocabulary_size"]), axis(BATCH, hidden))
    for layer, spec in kernels.items():
        prefix = rf"decoder_block_\d+/{layer}"
        layout_map[f"{prefix}/kernel"] = spec
        layout_map[f"{prefix}/lora_kernel_a"] = (*spec[:-1], None)
        layout_map[f"{prefix}/lora_kernel_b"] = (None, spec[-1])
    if c.get("enable_moe_block"):
        experts = axis(MODEL, c["num_experts"])
        layout_map[r"decoder_block_\d+/moe_expert_bank/(gate_proj|up_proj)"] = (experts, axis(BATCH, hidden), None)
        layout_map[r"decoder_block_\d+/moe_expert_bank/down_proj"] = (experts, None, axis(BATCH, hidden))
    if c.get("hidden_size_per_layer_input"):
        per_layer_vocab = c.get("vocab_size_per_layer_input") or c["vocabulary_size"]
        layout_map["per_layer_token_embedding/embeddings"] = (axis(MODEL, per_layer_vocab), None)
        layout_map["per_layer_model_projection/kernel"] = (axis(BATCH, hidden), None)
    return layout_map


def job_devices():
    """Every device of the job (of every process), each process's together.

    In process order, so that each process's devices hold one contiguous
    block of a batch's rows (the share it feeds), and a model axis no
    larger than a process's devices stays within its host.
    """
    import jax

    return sorted(jax.devices(), key=lambda d: (d.process_index, d.id))


def batch_layout(shape, distribution=None):
    """How a global batch of `shape` is laid out: (sharding, (start, stop) of the rows this process feeds).

    Rows go over the data axis of `distribution` (Keras' data layout, as its
    own trainer lays batches out); (None, (0, rows)) without one.
    """
    if distribution is None:
        return None, (0, shape[0])
    sharding = distribution.get_data_layout(shape).backend_layout
    spans = sorted({index[0].indices(shape[0])[:2] for index in sharding.addressable_devices_indices_map(shape).values()})
    start, stop = spans[0][0], spans[-1][1]
    # job_devices keeps a process's rows together; a mesh built otherwise may not.
    if sum(b - a for a, b in spans) != stop - start:
        raise ValueError(f"This process's devices hold rows {spans} of the batch, not one block.")
    return sharding, (start, stop)


def to_global(arrays, sharding, shape):
    """One global array per process-local array (this process's rows of a batch of `shape`), laid out by `sharding`.

    Each process gives only its own rows (`batch_layout`); JAX puts them on
    its devices (`jax.make_array_from_process_local_data`). Without a
    sharding the arrays are returned as they are.
    """
    if sharding is None:
        return list(arrays)
    import jax

    return [jax.make_array_from_process_local_data(sharding, a, (*shape, *a.shape[2:])) for a in arrays]


def apply(config, preset_dir, precision, echo=print):
    """Choose the plan and set it as Keras' global distribution (None for one device).

    Call before the model is built: each variable takes its layout when created.
    Returns the `Plan`.
    """
    plan = choose_plan(config, preset_dir, precision)
    keras.distribution.set_distribution(make_distribution(plan, backbone_config(preset_dir)))
    echo(plan.describe())
    return plan


def backbone_config(preset_dir):
    """The backbone's config dict from a KerasHub preset's config.json."""
    return json.loads((Path(preset_dir) / "config.json").read_text())["config"]


def parameter_count(preset_dir):
    """Parameters in a preset's weight files, read from their shapes (no weights loaded)."""
    import h5py

    total = 0

    def add(_, item):
        nonlocal total
        if isinstance(item, h5py.Dataset):
            total += math.prod(item.shape)

    for path in sorted(Path(preset_dir).glob("model*.weights.h5")):
        with h5py.File(path, "r") as f:
            f.visititems(add)
    return total


def _check_batch(batch_size, replicas, where):
    if batch_size % replicas:
        multiple = replicas * max(1, round(batch_size / replicas))
        raise ConfigError(
            f"batch_size={batch_size} does not split over the {replicas} data-parallel replicas of "
            f"{where}. Use a batch_size that is a multiple of {replicas} (e.g. {multiple}), "
            "or another distribution."
        )


def _divisors(n):
    return [m for m in range(1, n + 1) if n % m == 0]


def _device_memory(device):
    # GPUs and TPUs report the allocator's limit (already reduced by
    # memory_fraction); CPU devices report nothing.
    try:
        stats = device.memory_stats()
    except Exception:  # Some backends raise instead of returning None.
        return None
    return (stats or {}).get("bytes_limit")
