"""gemma-lora: LoRA fine-tuning of Gemma with Keras 3 + KerasHub on JAX.

    import gemma_lora
    gemma_lora.configure_runtime(memory_fraction=1.0)   # before anything imports Keras
    config = gemma_lora.TrainConfig(preset="tiny", sequence_length=128)
    result = gemma_lora.train(config)          # or gemma_lora.Run(config) step by step

Names that need Keras load on first use, so importing this package does not
import Keras before `configure_runtime` has set the backend.
"""

from gemma_lora.config import TrainConfig, resolve_config
from gemma_lora.errors import (
    AdapterError,
    ConfigError,
    CredentialsError,
    DataError,
    ExportError,
    GemmaLoraError,
    OutputError,
    PresetError,
    RuntimeSetupError,
    TrainingError,
)
from gemma_lora.runtime import configure_runtime

__version__ = "0.1.0"

_LAZY = {
    "train": "gemma_lora.training.run",
    "Run": "gemma_lora.training.run",
    "RunResult": "gemma_lora.training.run",
    "run_training": "gemma_lora.training.run",
    "resolve_chat": "gemma_lora.training.prepare",
    "resolve_preset": "gemma_lora.model.presets",
    "chat_format_of": "gemma_lora.model.presets",
    "use_notebook_credentials": "gemma_lora.model.presets",
    "load_causal_lm": "gemma_lora.model.loading",
    "enable_lora": "gemma_lora.model.loading",
    "parameter_summary": "gemma_lora.model.loading",
    "load_examples": "gemma_lora.data",
    "read_dataset": "gemma_lora.data",
    "split": "gemma_lora.data",
    "tokenize_rows": "gemma_lora.data",
    "compile_for_training": "gemma_lora.training.engines",
    "fit": "gemma_lora.training.engines",
    "token_loss": "gemma_lora.training.scoring",
    "generate": "gemma_lora.sampling",
    "save_adapter": "gemma_lora.adapters.store",
    "load_adapter": "gemma_lora.adapters.store",
    "merge_adapter": "gemma_lora.adapters.merge",
    "merged_model": "gemma_lora.adapters.merge",
    "quantize_base": "gemma_lora.model.quantize",
    "export_transformers": "gemma_lora.export",
    "export_gguf": "gemma_lora.export.gguf",
    "export_peft": "gemma_lora.export.peft",
}

__all__ = [
    "AdapterError",
    "ConfigError",
    "CredentialsError",
    "DataError",
    "ExportError",
    "GemmaLoraError",
    "OutputError",
    "PresetError",
    "RuntimeSetupError",
    "TrainConfig",
    "TrainingError",
    "configure_runtime",
    "resolve_config",
    *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gemma_lora' has no attribute {name!r}")
