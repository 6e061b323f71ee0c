"""Backend and device-memory settings, applied before Keras is imported.

Keras reads `KERAS_BACKEND` once, at import, and JAX reads
`XLA_PYTHON_CLIENT_MEM_FRACTION` once, when it first touches a device. So both
must be set before either happens; `configure_runtime` does that and refuses
loudly when it is too late rather than silently running on the wrong backend.
"""

import os
import sys
from pathlib import Path

from gemma_lora.errors import RuntimeSetupError

BACKEND = "jax"  # The package's training and scoring code is written for JAX.


# JAX's persistent compilation cache: `compilation_cache="auto"` puts it here.
COMPILATION_CACHE_NAME = "jax"
# What JAX's monitoring records for each compilation that could use the cache.
_CACHE_EVENTS = {"/jax/compilation_cache/cache_hits": "loaded", "/jax/compilation_cache/cache_misses": "compiled"}
_cache_counts = {"loaded": 0, "compiled": 0}
_cache = {"dir": None}


def cache_root():
    """Where the package keeps what it builds: converted presets, compiled programs (GEMMA_LORA_CACHE overrides)."""
    return Path(os.environ.get("GEMMA_LORA_CACHE", Path.home() / ".cache" / "gemma_lora"))


def compilation_cache_path(setting):
    """The directory a `compilation_cache` setting names: "auto" → `cache_root()/jax`; None, "" or "off" → None."""
    if setting in (None, "", "off"):
        return None
    return cache_root() / COMPILATION_CACHE_NAME if setting == "auto" else Path(setting).expanduser()


def compilation_cache_record():
    """This process's use of the persistent compilation cache: its directory (None: off) and the
    programs loaded from it and compiled (then stored) since `configure_runtime` turned it on."""
    import jax

    on = _cache["dir"] is not None and jax.config.jax_enable_compilation_cache  # a job of several turns it off
    return {"dir": _cache["dir"] if on else None, **(_cache_counts if on else {"loaded": 0, "compiled": 0})}


def _count_cache_event(event, *args, **kwargs):
    if event in _CACHE_EVENTS:
        _cache_counts[_CACHE_EVENTS[event]] += 1


def configure_runtime(
    memory_fraction=1.0, seed=None, compilation_cache_dir=None, backend=BACKEND
):
    """Set the Keras backend and JAX memory fraction, then seed and cache.

    Call it before anything imports Keras (in a notebook: in the first cell).
    Calling it again with the same backend is harmless.

    Args:
        memory_fraction: float in (0, 1], default 1.0 (the classic recipe's
            value). Share of GPU memory JAX may take.
        seed: int or None. Seeds Python, NumPy and Keras (`set_random_seed`).
        compilation_cache_dir: a directory, "auto" (`cache_root()/jax`), or
            None / "off" (the default here: off). Enables JAX's persistent
            compilation cache there, so a second run loads its programs
            instead of compiling them again (`compilation_cache_record`
            counts both). Deleting the directory is safe: programs are
            compiled again.
        backend: must be "jax"; kept as an argument so the error below can
            name what was asked for.

    Raises:
        RuntimeSetupError: Keras was already imported with another backend,
            or `backend` is not "jax".
    """
    if backend != BACKEND:
        raise RuntimeSetupError(
            f"gemma-lora runs on the JAX backend only. Received: backend={backend!r}. "
            "Use backend='jax'."
        )
    if not 0.0 < memory_fraction <= 1.0:
        raise RuntimeSetupError(
            f"memory_fraction must be in (0, 1]. Received: memory_fraction={memory_fraction}."
        )
    if "keras" in sys.modules:
        active = sys.modules["keras"].config.backend()
        if active != backend:
            raise RuntimeSetupError(
                f"Keras was already imported with the {active!r} backend, and the "
                "backend cannot change after import. Call "
                "gemma_lora.configure_runtime() before importing keras or keras_hub "
                "(restart the Python process or notebook kernel first)."
            )
    os.environ["KERAS_BACKEND"] = backend
    # Only effective if JAX has not initialised its GPU client yet; a notebook
    # that already ran JAX code keeps whatever fraction it started with.
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{memory_fraction:.2f}"
    cache = compilation_cache_path(compilation_cache_dir)
    if cache is not None:
        import jax

        jax.config.update("jax_compilation_cache_dir", str(cache))
        if _cache["dir"] is None:
            jax.monitoring.register_event_listener(_count_cache_event)
        _cache["dir"] = str(cache)
        # Cache every compiled program, not only the slow ones: the first
        # training step is what users wait for.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if seed is not None:
        import keras

        keras.utils.set_random_seed(seed)


def quiet_startup():
    """Keep TensorFlow, absl, oneDNN and CUDA start-up lines off stderr; call before Keras is imported.

    keras-hub requires tensorflow-text on Linux, so TensorFlow is installed
    beside it, and keras-hub imports it when it can: 2.6 s of a 5.3 s
    `import keras_hub` here, and a dozen log lines (among them "failed call
    to cuInit" on machines without a GPU). Nothing the package runs needs it
    (KerasHub's tokenizers take their pure-Python path without it), so it is
    made unimportable for this process, unless something imported it already.
    SentencePiece's INFO lines go too. Library users who want TensorFlow in
    the same process simply do not call this; the CLI calls it unless
    `--verbose`.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for name in ("tensorflow", "tensorflow_text"):
        if name not in sys.modules:
            sys.modules[name] = None  # `import tensorflow` now raises ImportError, which keras-hub expects
    try:
        import sentencepiece

        sentencepiece.set_min_log_level(1)  # WARNING and up
    except (ImportError, AttributeError):
        pass


def ensure_runtime():
    """Default to the JAX backend if nobody configured the runtime.

    Every module that imports Keras calls this first, so `import gemma_lora`
    followed by any call works without an explicit `configure_runtime()`.

    Raises:
        RuntimeSetupError: Keras is (or is about to be) on another backend.
    """
    if "keras" not in sys.modules:
        os.environ.setdefault("KERAS_BACKEND", BACKEND)
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "1.00")
    import keras

    if keras.config.backend() != BACKEND:
        raise RuntimeSetupError(
            f"Keras is using the {keras.config.backend()!r} backend; gemma-lora "
            "needs 'jax'. Set KERAS_BACKEND=jax (or call "
            "gemma_lora.configure_runtime()) before importing keras."
        )
