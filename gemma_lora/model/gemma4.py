"""Gemma 4 (text) as KerasHub 0.32 builds it: its presets, loading the text stack, the tiny test model.

    causal_lm = load_text_model(preset_dir, dtype)   # the text stack of any Gemma4CausalLM preset
    build_tiny_causal_lm()                           # the offline `tiny_gemma4` preset

What differs from Gemma 1-3, and what the package does about it:
- KerasHub's presets are multimodal (a vision encoder on every size, an audio
  encoder on 2b/4b). The package trains text only: a preset with encoders is
  loaded as a text-only `Gemma4Backbone` (the same config with both encoders
  set to None), whose weights KerasHub's weights file holds under the same
  names, so the encoders are never built, trained, adapted or exported.
- `keras_hub.models.CausalLM.from_preset` on a Gemma 4 preset may build a
  `Gemma4AssistantCausalLM` and fail: KerasHub picks a CausalLM subclass
  whose backbone is a Gemma4Backbone out of a set (either one, by the
  process's hashing), then ignores task.json when its class is not a
  subclass of the pick. `task_class` reads the class off the preset instead.
- The `_assistant` presets are speculative-decoding drafts that KerasHub
  documents as "must NOT be used standalone": refused (`assistant_problem`).
- The backbone takes `position_ids` besides token ids and padding mask
  (`layers.model_inputs` adds them).
- Quantizing is refused (`quantize_problem`): the decoder block multiplies
  by `ffw_gating.kernel` itself (`ops.matmul`), which for a quantized layer
  is the raw int8 array without its scale.
- `Gemma4CausalLMPreprocessor.__init__` asserts that TensorFlow is importable,
  which the CLI makes it not (runtime.quiet_startup). The package only reads
  the preprocessor's tokenizer and sequence length (it tokenizes and decodes
  token ids itself), so `preprocessor_without_tensorflow` lets it be built;
  saved presets keep KerasHub's class, for stock KerasHub to load.
"""

import contextlib
import json
from importlib import resources
from pathlib import Path

from gemma_lora import runtime
from gemma_lora.errors import PresetError

runtime.ensure_runtime()

import keras  # noqa: E402
import keras_hub  # noqa: E402

BACKBONE = "Gemma4Backbone"
TASK = "Gemma4CausalLM"
ASSISTANT_TASK = "Gemma4AssistantCausalLM"
# Gemma 4's turn markers (gemma4_causal_lm.py stops at "<turn|>").
TURN_MARKERS = ("<|turn>", "<turn|>")
# KerasHub's instruction-tuned Gemma 4 presets (gemma4_presets.py), tuned on Gemma 4's chat format.
INSTRUCT_PRESETS = ("gemma4_instruct_2b", "gemma4_instruct_4b", "gemma4_instruct_26b_a4b", "gemma4_instruct_31b")


def is_gemma4(backbone):
    return type(backbone).__name__ == BACKBONE


def assistant_problem(preset):
    """Why a KerasHub preset name cannot be trained (a speculative-decoding assistant), or None."""
    presets = keras_hub.models.CausalLM.presets
    if not preset.endswith("_assistant") or preset not in presets:
        return None
    description = presets[preset]["metadata"].get("description", "")
    # KerasHub's own words: "This model must NOT be used standalone. It is designed exclusively ..."
    sentences = [s.strip() for s in description.split(". ") if "standalone" in s or "exclusively" in s]
    reason = ". ".join(sentences).rstrip(".") or "it is a speculative-decoding draft model"
    target = preset.removesuffix("_assistant")
    return (f"{preset} is a speculative-decoding assistant, not a model to train or generate with (KerasHub: "
            f"{reason}). Use its target model instead, e.g. --preset {target}.")


def task_class(preset_dir):
    """The CausalLM class to load `preset_dir` with, or None to let KerasHub choose (Gemma 1-3).

    Raises:
        PresetError: the preset is a Gemma 4 assistant (its task.json says so).
    """
    preset_dir = Path(preset_dir)
    task = _read(preset_dir / "task.json")
    name = (task or {}).get("class_name")
    if name == ASSISTANT_TASK:
        raise PresetError(
            f"The preset in {preset_dir} is a {ASSISTANT_TASK}, a speculative-decoding assistant that KerasHub "
            "documents as 'must NOT be used standalone': it drafts tokens for a Gemma 4 target model's generate. "
            "Train and generate with the target model's preset instead."
        )
    backbone = (_read(preset_dir / "config.json") or {}).get("class_name")
    if name == TASK or backbone == BACKBONE:
        return keras_hub.models.Gemma4CausalLM
    return None


@contextlib.contextmanager
def preprocessor_without_tensorflow():
    """Build Gemma4CausalLMPreprocessors (tokenizer + sequence length) where TensorFlow is blocked.

    Its __init__ calls keras-hub's `assert_tf_installed` only because its
    string preprocessing (`call`, `generate_preprocess`) uses tf.strings;
    the package never calls those. With TensorFlow importable nothing changes.
    """
    from keras_hub.src.models.gemma4 import gemma4_causal_lm_preprocessor as module

    if module.tf is not None:
        yield
        return
    check = module.assert_tf_installed
    module.assert_tf_installed = lambda name: None
    try:
        yield
    finally:
        module.assert_tf_installed = check


def from_preset(preset_dir, dtype):
    """`Gemma4CausalLM.from_preset` for a text-only Gemma 4 preset (see `preprocessor_without_tensorflow`)."""
    with preprocessor_without_tensorflow():
        return keras_hub.models.Gemma4CausalLM.from_preset(str(preset_dir), dtype=dtype)


def has_encoders(preset_dir):
    config = (_read(Path(preset_dir) / "config.json") or {}).get("config", {})
    return bool(config.get("vision_encoder") or config.get("audio_encoder"))


def load_text_model(preset_dir, dtype):
    """A text-only `Gemma4CausalLM` from a Gemma 4 preset that has vision/audio encoders.

    The backbone is rebuilt from config.json with both encoders None; Keras
    loads its weights from the preset's weights file by name and leaves the
    encoders' groups unread, so no encoder weight is ever in memory. The
    preprocessor is KerasHub's, without image/audio/video converters.
    """
    preset_dir = Path(preset_dir)
    serialized = _read(preset_dir / "config.json")
    config = dict(serialized["config"], vision_encoder=None, audio_encoder=None, num_audio_tokens_per_clip=None,
                  dtype=dtype)
    # `text_only_model`-dependent inputs (vision_mask, ...) go with the encoders; the rest is unchanged.
    backbone = keras_hub.models.Gemma4Backbone.from_config(config)
    weights = preset_dir / "model.weights.h5"
    backbone.load_weights(str(weights if weights.is_file() else preset_dir / "model.weights.json"))
    settings = (_read(preset_dir / "preprocessor.json") or {}).get("config", {})
    with preprocessor_without_tensorflow():
        preprocessor = keras_hub.models.Gemma4CausalLMPreprocessor(
            keras_hub.models.Gemma4Tokenizer.from_preset(str(preset_dir)),
            **{k: settings[k] for k in ("sequence_length", "add_start_token", "add_end_token") if k in settings})
    task = (_read(preset_dir / "task.json") or {}).get("config", {})
    return keras_hub.models.Gemma4CausalLM(
        backbone=backbone, preprocessor=preprocessor, final_logit_cap=task.get("final_logit_cap"))


def quantize_problem(backbone):
    """Why `backbone` cannot be quantized (one line with the reason), or None."""
    if not is_gemma4(backbone):
        return None
    return ("Gemma 4 cannot be quantized in KerasHub 0.32: Gemma4TextDecoderBlock computes its feed-forward "
            "block as ops.matmul(x, ffw_gating.kernel) (a 'HOTFIX' in gemma4_decoder_block.py), which for a "
            "quantized layer is the raw int8 array without its scale, so the logits would be wrong. "
            "Train it without --quantize (bfloat16 halves the memory: --precision bfloat16).")


def _read(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- tiny model


def tiny_proto():
    """The shipped tiny vocabulary with Gemma 4's turn markers as single user-defined pieces (ids 7 and 8).

    Built from tiny_vocab.spm at run time (placed right after its own
    markers, as Gemma's vocabulary lists its control tokens before the
    merged pieces), so `tiny` keeps its ids and nothing else is checked in.
    """
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    proto = spm_pb2.ModelProto()
    proto.ParseFromString((resources.files("gemma_lora") / "resources" / "tiny_vocab.spm").read_bytes())
    pieces = list(proto.pieces)
    controls = next(i for i, p in enumerate(pieces) if p.type == spm_pb2.ModelProto.SentencePiece.BYTE)
    del proto.pieces[:]
    proto.pieces.extend(pieces[:controls])
    for marker in TURN_MARKERS:
        proto.pieces.add(piece=marker, score=0.0, type=spm_pb2.ModelProto.SentencePiece.USER_DEFINED)
    proto.pieces.extend(pieces[controls:])
    proto.trainer_spec.vocab_size = len(proto.pieces)
    return proto.SerializeToString()


# gemma4_31b's architecture in miniature: layer 0 slides (window 16, shorter
# than most Dolly rows), layer 1 is global with its own head width (32, twice
# the sliding layers'), one KV head whose key projection is also the value's
# (K = V), and RoPE on a quarter of its head; a final soft cap of 30.
TINY = dict(num_layers=2, num_query_heads=4, num_key_value_heads=2, hidden_dim=64, intermediate_dim=128,
            head_dim=16, global_head_dim=32, num_global_key_value_heads=1, global_rope_partial_rotary_factor=0.25,
            sliding_window_size=16, sliding_window_pattern=2, final_logit_soft_cap=30.0)


def build_tiny_causal_lm(seed=1234, sequence_length=128, **architecture):
    """A tiny text-only `Gemma4CausalLM` (random weights, fixed seed); `architecture` overrides `TINY`."""
    tokenizer = keras_hub.models.Gemma4Tokenizer(proto=tiny_proto(), has_vision_tokens=False,
                                                 has_video_tokens=False)
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.Gemma4Backbone(
        vocabulary_size=tokenizer.vocabulary_size(), image_size=None, dtype="float32", **{**TINY, **architecture})
    with preprocessor_without_tensorflow():
        preprocessor = keras_hub.models.Gemma4CausalLMPreprocessor(tokenizer, sequence_length=sequence_length)
    return keras_hub.models.Gemma4CausalLM(backbone=backbone, preprocessor=preprocessor)
