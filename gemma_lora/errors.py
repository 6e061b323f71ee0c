"""Exception types for the mistakes a user can make.

Each family has its own type so callers can catch one kind of problem. The CLI
turns any `GemmaLoraError` into one line on stderr and exit code 2; every
message names the bad value and how to fix it.
"""


class GemmaLoraError(Exception):
    """Base class: a problem with the user's input, not a bug in the package."""


class ConfigError(GemmaLoraError):
    """A configuration value is invalid (the message lists every problem)."""


class DataError(GemmaLoraError):
    """The dataset cannot be read or yields nothing to train on."""


class PresetError(GemmaLoraError):
    """The model preset cannot be found, downloaded or loaded."""


class CredentialsError(PresetError):
    """Kaggle credentials are missing, or Kaggle refused access."""


class OutputError(GemmaLoraError):
    """An output file or directory cannot be written."""


class RuntimeSetupError(GemmaLoraError):
    """The runtime (backend, memory fraction) can no longer be configured."""


class TrainingError(GemmaLoraError):
    """Training stopped for a reason the user must act on (e.g. NaN loss)."""


class AdapterError(GemmaLoraError):
    """An adapter file is unreadable or does not fit the model it is loaded into."""


class ExportError(GemmaLoraError):
    """A model cannot be exported as asked (LoRA still attached, quantized, unsupported architecture)."""


class HostsError(GemmaLoraError):
    """A job of several processes cannot start or go on (no coordinator, processes that disagree, a lost peer)."""
