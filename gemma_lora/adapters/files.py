"""An adapter's files: `NAME.lora.h5` (KerasHub's LoRA weights) and `NAME.json` (what they need).

Reading them needs h5py and NumPy only, not Keras, so `gemma-lora info` and
the CLI's argument checks answer without importing it.
"""

from pathlib import Path

import numpy as np

from gemma_lora.errors import AdapterError
from gemma_lora.io import read_json

ADAPTER_FILE = "adapter.lora.h5"
METADATA_FILE = "adapter.json"
ADAPTER_SUFFIX = ".lora.h5"


def metadata_path(adapter_path):
    """Where an adapter's metadata lives: `foo.lora.h5` -> `foo.json` (`adapter.lora.h5` -> `adapter.json`).

    Named after the adapter, not the folder, so two adapters side by side
    never read each other's metadata.
    """
    adapter_path = Path(adapter_path)
    return adapter_path.with_name(adapter_path.name.removesuffix(ADAPTER_SUFFIX) + ".json")


def read_metadata(adapter_path):
    """The adapter's metadata dict, or None when it has none (a stock KerasHub adapter).

    Raises:
        AdapterError: the metadata file exists but is unreadable.
    """
    path = metadata_path(adapter_path)
    if not path.is_file():
        return None
    meta = read_json(path, AdapterError, f"Restore it, or delete it to load {Path(adapter_path).name} the stock KerasHub way.")
    missing = [key for key in ("rank", "alpha", "targets") if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise AdapterError(
            f"{path} is not an adapter's metadata (no {', '.join(missing)}). Restore it, or delete it to load "
            f"{Path(adapter_path).name} the stock KerasHub way."
        )
    return meta


def read_adapter(path):
    """Check an adapter file and return (rank, {layer index: (A, B)}, metadata or None).

    Raises:
        AdapterError: wrong extension, missing, or not a readable LoRA h5.
    """
    import h5py

    path = Path(path)
    if not path.name.endswith(ADAPTER_SUFFIX):
        raise AdapterError(
            f"An adapter file must end in .lora.h5 (KerasHub's LoRA format). Received: {path}. "
            "Pass the adapter.lora.h5 of a run directory."
        )
    if not path.is_file():
        raise AdapterError(f"Adapter file not found: {path}.")
    try:
        with h5py.File(path, "r") as f:
            rank = int(f["lora/vars/rank"][()])
            factors = {
                int(index): (np.asarray(group["vars/lora_kernel_a"]), np.asarray(group["vars/lora_kernel_b"]))
                for index, group in f["lora"].items()
                if index != "vars"
            }
    except (OSError, KeyError, ValueError) as e:
        raise AdapterError(
            f"{path} is not a readable LoRA adapter ({type(e).__name__}: the file is corrupt, "
            "truncated or not written by save_lora_weights). Use an intact copy."
        ) from None
    meta = read_metadata(path)
    if meta is not None and meta.get("rank") != rank:
        raise AdapterError(
            f"{metadata_path(path)} says rank {meta.get('rank')} but {path} holds rank {rank}: they do not belong together."
        )
    return rank, factors, meta
