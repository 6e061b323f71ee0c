"""Save an adapter with its metadata and load it onto a Keras model, with checks.

`adapter.lora.h5` is written by KerasHub's own `save_lora_weights`, so stock
`backbone.load_lora_weights` reads it; `adapter.json` beside it records what
the h5 cannot: alpha, targets, template, base model, versions, data. With the
default targets and alpha = rank the stock loader gives the same model; with
other targets or alpha it would load silently wrong (it enables LoRA on the
default layers with alpha = rank), which is why `load_adapter` reads the
metadata first. Reading the files without Keras is `files.py`; merging, `merge.py`.
"""

import hashlib
import json
import warnings
from importlib import metadata
from pathlib import Path

from gemma_lora.adapters.files import ADAPTER_FILE, metadata_path, read_adapter
from gemma_lora.errors import AdapterError
from gemma_lora.io import atomic_path, write_text_atomic
from gemma_lora.model.layers import layers_with_weights, lora_layers
from gemma_lora.model.loading import enable_lora
from gemma_lora.model.quantize import quantization_mode

DEFAULT_TARGETS = ("query", "value")
# Backbone config entries that must match for an adapter to fit a model.
SHAPE_KEYS = (
    "vocabulary_size", "num_layers", "num_query_heads", "num_key_value_heads",
    "hidden_dim", "intermediate_dim", "head_dim",
)


def save_adapter(causal_lm, directory, config, extra=None):
    """Write `adapter.lora.h5` and `adapter.json` into `directory`, atomically.

    Args:
        causal_lm: a CausalLM whose backbone has LoRA enabled.
        directory: existing directory.
        config: the run's `TrainConfig`.
        extra: dict merged into the metadata (e.g. final validation figures).

    Returns:
        Path of the h5 file.

    Raises:
        OutputError: the files cannot be written (nothing partial is left).
    """
    directory = Path(directory)
    h5_path = directory / ADAPTER_FILE
    with atomic_path(h5_path, suffix=".lora.h5") as tmp:
        tmp.unlink()  # h5py refuses to overwrite the placeholder mkstemp made.
        causal_lm.backbone.save_lora_weights(str(tmp))
    alpha = config.lora_alpha if config.lora_alpha is not None else config.lora_rank
    info = {
        "format": "gemma-lora adapter v1",
        "base_preset": config.preset,
        "base_preset_version": config.preset_version,
        "backbone_class": type(causal_lm.backbone).__name__,
        "backbone_shape": backbone_shape(causal_lm.backbone),
        # The stored form of the frozen base it was trained on: an adapter fits
        # the base it saw, so loading quantizes the same way (or refuses).
        "quantize": quantization_mode(causal_lm),
        "rank": config.lora_rank,
        "alpha": alpha,
        "targets": list(config.lora_targets),
        "lora_layers": len(lora_layers(causal_lm)),
        "stock_loader_compatible": alpha == config.lora_rank and sorted(config.lora_targets) == sorted(DEFAULT_TARGETS),
        "template": config.template,
        "context_template": config.context_template if config.include_context else None,
        # How prompts are written for this adapter: "gemma" (Gemma's chat turns,
        # answers ending at <end_of_turn>), "gemma4" (Gemma 4's, ending at <turn|>)
        # or None (the template). generate,
        # merge and the exporters read it.
        "chat_format": recorded_chat_format(config, causal_lm.preprocessor.tokenizer),
        "stop_strings": config.resolved_stop_strings(),
        "versions": versions(),
        "sha256": file_sha256(h5_path),
        **(extra or {}),
    }
    write_text_atomic(metadata_path(h5_path), json.dumps(info, indent=2) + "\n")
    return h5_path


def recorded_chat_format(config, tokenizer=None):
    """The `chat_format` a run with `config` records: the chat format of `tokenizer`'s model ("gemma", or
    "gemma4" for Gemma 4; "gemma" without a tokenizer) when it trains in one, else None."""
    from gemma_lora.data.chat import GEMMA, format_of

    if not config.chat:
        return None
    return format_of(tokenizer) if tokenizer is not None else GEMMA


def load_adapter(causal_lm, path, preset=None):
    """Apply a saved adapter to a model (without LoRA, or with the same LoRA layout).

    `preset`, the name the model was loaded by, is compared with the base the
    adapter was trained on: a different name with the same shape (e.g. an
    instruction-tuned sibling) loads with a warning; a different shape is an error.

    Reads `adapter.json` to enable LoRA with the adapter's targets and alpha
    and to check the base model; without it, falls back to KerasHub's stock
    behaviour (default targets, alpha = rank) with a warning.

    Returns:
        The adapter's metadata dict (None without adapter.json).

    Raises:
        AdapterError: unreadable file, another base model, or a rank or
            target mismatch with LoRA already enabled on `causal_lm`.
    """
    rank, factors, meta = read_adapter(path)
    if meta is None:
        warnings.warn(
            f"No {metadata_path(path).name} beside {path}: loading it as a stock KerasHub adapter "
            "(default targets query/value, alpha = rank), unchecked.",
            stacklevel=2,
        )
        targets, alpha = DEFAULT_TARGETS, None
    else:
        targets, alpha = tuple(meta["targets"]), float(meta["alpha"])
        _check_base(causal_lm, meta, path)
        want, have = meta.get("quantize"), quantization_mode(causal_lm)
        if want != have:
            raise AdapterError(
                f"{path} was trained on a base stored as {want or 'float (not quantized)'}, but this model's base is "
                f"{have or 'float (not quantized)'}: the logits would differ. Load the base with "
                f"quantize={want!r} (CLI: --quantize {want or 'none'})."
            )
        if preset is not None and meta.get("base_preset") not in (None, preset):
            warnings.warn(
                f"{path} was trained on {meta['base_preset']!r}; loading it onto {preset!r}, which has "
                "the same shape but may have other weights.",
                stacklevel=2,
            )
    existing = lora_layers(causal_lm)
    if existing:
        have_rank = existing[0].lora_rank
        have_targets = sorted({layer.name for layer in existing})
        if have_rank != rank or have_targets != sorted(set(targets)):
            raise AdapterError(
                f"{path} is a rank-{rank} adapter for {sorted(set(targets))}, but this model already has "
                f"rank-{have_rank} LoRA on {have_targets}. Load it into a model without LoRA."
            )
        if alpha is not None:
            for layer in existing:
                layer.lora_alpha = alpha
    else:
        enable_lora(causal_lm, rank, alpha, targets)
    layers = layers_with_weights(causal_lm.backbone)
    expected = {i for i, layer in enumerate(layers) if getattr(layer, "lora_enabled", False)}
    if set(factors) != expected:
        raise AdapterError(
            f"{path} holds LoRA factors for other layers than this model has (layer indices "
            f"{sorted(factors)[:6]} vs {sorted(expected)[:6]}): it was trained on another model."
        )
    for index, (a, b) in factors.items():
        layer = layers[index]
        if a.shape != tuple(layer.lora_kernel_a.shape) or b.shape != tuple(layer.lora_kernel_b.shape):
            raise AdapterError(
                f"{path} does not fit this model: layer {layer.path} needs LoRA factors "
                f"{tuple(layer.lora_kernel_a.shape)} and {tuple(layer.lora_kernel_b.shape)}, the file has "
                f"{a.shape} and {b.shape}. The adapter was trained on another base model."
            )
        layer.lora_kernel_a.assign(a)
        layer.lora_kernel_b.assign(b)
    return meta


def _check_base(causal_lm, meta, path):
    backbone = causal_lm.backbone
    name = type(backbone).__name__
    if meta.get("backbone_class") not in (None, name):
        raise AdapterError(
            f"{path} was trained on a {meta['backbone_class']} ({meta.get('base_preset')}), not a {name}. "
            "Load it onto the base model it was trained on."
        )
    want, have = meta.get("backbone_shape") or {}, backbone_shape(backbone)
    different = {k: (want[k], have.get(k)) for k in want if want[k] != have.get(k)}
    if different:
        details = ", ".join(f"{k} {a} vs {b}" for k, (a, b) in different.items())
        raise AdapterError(
            f"{path} was trained on another base model ({meta.get('base_preset')}: {details}). "
            "Load it onto the base model it was trained on."
        )


def backbone_shape(backbone):
    config = backbone.get_config()
    return {k: config[k] for k in SHAPE_KEYS if k in config}


def versions():
    names = ("gemma-lora", "keras", "keras-hub", "jax")
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
