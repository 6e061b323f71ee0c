"""Save a trained LoRA adapter with the metadata needed to reuse it.

`adapter.lora.h5` is written by KerasHub's own `save_lora_weights`, so stock
`backbone.load_lora_weights` reads it; `adapter.json` beside it records what
the h5 cannot (alpha, targets, template, base preset, versions, data).
"""

import hashlib
import json
from importlib import metadata
from pathlib import Path

from gemma_lora.io import atomic_path, write_text_atomic
from gemma_lora.model import lora_layers

ADAPTER_FILE = "adapter.lora.h5"
METADATA_FILE = "adapter.json"


def save_adapter(causal_lm, directory, config, extra=None):
    """Write `adapter.lora.h5` and `adapter.json` into `directory`, atomically.

    Args:
        causal_lm: a CausalLM whose backbone has LoRA enabled.
        directory: existing directory.
        config: the run's `TrainConfig`.
        extra: dict merged into the metadata (e.g. final validation figures).

    Returns:
        Path of the h5 file.
    """
    directory = Path(directory)
    h5_path = directory / ADAPTER_FILE
    with atomic_path(h5_path, suffix=".lora.h5") as tmp:
        tmp.unlink()  # h5py refuses to overwrite the placeholder mkstemp made.
        causal_lm.backbone.save_lora_weights(str(tmp))
    layers = lora_layers(causal_lm)
    info = {
        "format": "gemma-lora adapter v1",
        "base_preset": config.preset,
        "base_preset_version": config.preset_version,
        "backbone_class": type(causal_lm.backbone).__name__,
        "rank": config.lora_rank,
        "alpha": config.lora_alpha if config.lora_alpha is not None else config.lora_rank,
        "targets": list(config.lora_targets),
        "lora_layers": len(layers),
        "template": config.template,
        "context_template": config.context_template if config.include_context else None,
        "versions": versions(),
        "sha256": file_sha256(h5_path),
        **(extra or {}),
    }
    write_text_atomic(directory / METADATA_FILE, json.dumps(info, indent=2) + "\n")
    return h5_path


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
