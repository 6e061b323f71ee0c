"""Turn a Gemma 3, Gemma 2 or Gemma (1) GGUF checkpoint (llama.cpp's format) into a KerasHub preset.

    from gemma_lora.model.gguf_import import convert_gguf
    convert_gguf("gemma-3-270m-q4_k_m.gguf", "presets/gemma3-270m")
    keras_hub.models.CausalLM.from_preset("presets/gemma3-270m")  # a Gemma3CausalLM

A `gemma3` file becomes a `Gemma3CausalLM` whose preprocessor is a
`GemmaCausalLMPreprocessor` around a text-only `Gemma3Tokenizer`:
`Gemma3CausalLMPreprocessor` needs TensorFlow at run time, the Gemma one does
not, and `task.json` records the pair so `CausalLM.from_preset` rebuilds it.
A `gemma` file becomes a `GemmaCausalLM`, and so does a `gemma2` file (a
GemmaBackbone with Gemma 2's post norms, soft caps and sliding window).

`tensor_layout` pairs every GGUF tensor name with its KerasHub variable and
the layout change between them; `gemma_lora.export.gguf` writes files with
the same table, so the two directions cannot drift apart.

What llama.cpp's converter (convert_hf_to_gguf.py) changed, and is undone here:
- every RMSNorm weight (q/k norms included) was stored as `1 + w`, because
  llama.cpp computes `x * w` where Gemma computes `x * (1 + w)`;
- matrices are stored (out, in), as in PyTorch; KerasHub's einsum kernels
  keep (in, out), split per head for attention;
- the tokenizer's SentencePiece model is stored as token/score/type lists,
  with three changes made for llama.cpp's own tokenizer (see `_spm_pieces`).
Weights are dequantized to float32 with `gguf.quants.dequantize`, so the
preset is exact for the quantized values but about 4 bytes per parameter.
"""

from pathlib import Path

import numpy as np

from gemma_lora import runtime
from gemma_lora.errors import OutputError, PresetError
from gemma_lora.io import atomic_dir
from gemma_lora.progress import Progress

runtime.ensure_runtime()

import keras_hub  # noqa: E402

ARCHITECTURES = ("gemma", "gemma2", "gemma3")  # llama.cpp's names for Gemma (1), Gemma 2 and Gemma 3 text models
# KerasHub's Gemma3Backbone hard-codes these (keras-hub 0.32): rope base 1e6 on
# global layers, 1e4 on sliding ones, and 5 sliding layers then 1 global.
GLOBAL_ROPE_BASE = 1_000_000.0
LOCAL_ROPE_BASE = 10_000.0
SLIDING_PATTERN = 6
SPIECE_SPACE = "\u2581"  # SentencePiece's visible space, "▁".
# llama.cpp marks these CONTROL, which SentencePiece never matches in text;
# Gemma's chat format needs them matched, as the original tokenizer does.
TURN_TOKENS = ("<start_of_turn>", "<end_of_turn>")
# Gemma (1)'s fixed rope base (KerasHub's GemmaAttention and llama.cpp's default).
GEMMA_ROPE_BASE = 10_000.0
# What llama.cpp's gemma2 takes when a file omits the key (llama-hparams.h, llama-model.cpp).
GEMMA2_DEFAULTS = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "attention.sliding_window": 4096}
GEMMA2_27B_LAYERS = 46  # llama.cpp scales this gemma2's queries by 1/sqrt(hidden/heads)
_MISSING = object()  # `_field`'s default: the key is required.


def convert_gguf(gguf_path, output_dir):
    """Write the Gemma 3, Gemma 2 or Gemma model in a GGUF file as a KerasHub preset directory.

    Args:
        gguf_path: str or Path; a llama.cpp GGUF file of a Gemma 3 text model,
            a Gemma 2 or a Gemma (1) model (any quantization `gguf.quants.dequantize` reads).
        output_dir: str or Path; the preset directory to create. It must not
            exist or be empty; it appears whole or not at all.

    Returns:
        The output directory as a Path.

    Raises:
        PresetError: the file is missing or not GGUF, its architecture is not
            gemma3, gemma2 or gemma, a tensor is missing or misshapen, or a quantization type
            cannot be dequantized.
        OutputError: output_dir already holds files.
    """
    output_dir = Path(output_dir)
    if output_dir.is_file() or (output_dir.is_dir() and any(output_dir.iterdir())):
        raise OutputError(
            f"Output directory {output_dir} already exists and is not empty. "
            "Choose a new directory or delete this one."
        )
    reader = read_gguf(gguf_path)
    causal_lm = build_causal_lm(reader, gguf_path)
    print(f"saving the converted preset to {output_dir}", flush=True)
    with atomic_dir(output_dir) as staging:  # No reader ever sees half a preset.
        causal_lm.save_to_preset(str(staging))
    return output_dir


def read_gguf(gguf_path):
    """Open a GGUF file (memory-mapped) and check it holds a Gemma 3, Gemma 2 or Gemma model."""
    import gguf

    path = Path(gguf_path)
    if not path.is_file():
        raise PresetError(f"GGUF file not found: {path}. Check the path.")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:  # The reader checks the magic and version.
        raise PresetError(f"{path} is not a readable GGUF file ({e}).") from None
    arch = _field(reader, "general.architecture", path)
    if arch not in ARCHITECTURES:
        raise PresetError(
            f"Unsupported GGUF architecture {arch!r} in {path}: only 'gemma3' (Gemma 3 text models), "
            "'gemma2' (Gemma 2) and 'gemma' (Gemma) can be converted."
        )
    return reader


def architecture(reader):
    return reader.get_field("general.architecture").contents()


def build_causal_lm(reader, path):
    """The Gemma3CausalLM or GemmaCausalLM, with GGUF weights and tokenizer, for `reader`."""
    proto = spm_proto(reader, path)
    arch = architecture(reader)
    if arch in ("gemma", "gemma2"):
        tokenizer = keras_hub.models.GemmaTokenizer(proto=proto)
        config = gemma_backbone_config(reader, path) if arch == "gemma" else gemma2_backbone_config(reader, path)
        backbone = keras_hub.models.GemmaBackbone(**config, dtype="float32")
        task = keras_hub.models.GemmaCausalLM
    else:
        tokenizer = keras_hub.models.Gemma3Tokenizer(proto=proto, has_vision_tokens=False)
        backbone = keras_hub.models.Gemma3Backbone(**backbone_config(reader, path), dtype="float32")
        task = keras_hub.models.Gemma3CausalLM
    load_weights(backbone, reader, path)
    preprocessor = keras_hub.models.GemmaCausalLMPreprocessor(tokenizer=tokenizer)
    return task(backbone=backbone, preprocessor=preprocessor)


def gemma_backbone_config(reader, path, arch="gemma"):
    """GemmaBackbone arguments from the metadata of a `gemma` (Gemma 1) file, or the Gemma part of a `gemma2` one.

    llama.cpp's Gemma graph has a fixed shape (no soft caps, post norms or
    sliding window; queries scaled by head_dim), which is GemmaBackbone's
    default; only a rope base other than GemmaAttention's fixed one is refused.
    """
    def get(key, default=_MISSING):
        return _field(reader, f"{arch}.{key}", path, default)

    heads, head_dim = get("attention.head_count"), get("attention.key_length")
    for key, found, wanted in (
        ("rope.freq_base", get("rope.freq_base", GEMMA_ROPE_BASE), GEMMA_ROPE_BASE),
        ("attention.value_length", get("attention.value_length", head_dim), head_dim),
    ):
        if found != wanted:
            raise PresetError(
                f"{path} sets {arch}.{key}={found}; KerasHub's GemmaBackbone only supports {wanted}, "
                "so this model cannot be converted."
            )
    return dict(
        vocabulary_size=len(_field(reader, "tokenizer.ggml.scores", path)),
        num_layers=get("block_count"),
        num_query_heads=heads,
        num_key_value_heads=get("attention.head_count_kv", heads),
        hidden_dim=get("embedding_length"),
        # llama.cpp (like transformers) counts one of the two gated halves;
        # KerasHub's Gemma counts both.
        intermediate_dim=2 * get("feed_forward_length"),
        head_dim=head_dim,
        layer_norm_epsilon=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
    )


def gemma2_backbone_config(reader, path):
    """GemmaBackbone arguments from the metadata of a `gemma2` file: Gemma's, plus Gemma 2's post
    norms, soft caps and sliding window (layers 0, 2, 4, ... slide in both llama.cpp and KerasHub).

    Raises PresetError for Gemma 2 27B, whose queries llama.cpp scales by
    1/sqrt(hidden/heads) where keras-hub 0.32's GemmaDecoderBlock always
    scales by 1/sqrt(head_dim).
    """
    config = gemma_backbone_config(reader, path, "gemma2")
    hidden, heads = config["hidden_dim"], config["num_query_heads"]
    if config["num_layers"] == GEMMA2_27B_LAYERS and hidden // heads != config["head_dim"]:
        raise PresetError(
            f"{path} is a Gemma 2 27B model: llama.cpp scales its queries by 1/sqrt({hidden // heads}), "
            f"KerasHub 0.32's GemmaBackbone by 1/sqrt({config['head_dim']}), so it cannot be converted exactly."
        )

    def get(key):
        return _field(reader, f"gemma2.{key}", path, GEMMA2_DEFAULTS[key])

    return dict(
        config,
        use_post_ffw_norm=True,
        use_post_attention_norm=True,
        attention_logit_soft_cap=float(get("attn_logit_softcapping")),
        final_logit_soft_cap=float(get("final_logit_softcapping")),
        use_sliding_window_attention=True,
        sliding_window_size=int(get("attention.sliding_window")),
    )


def backbone_config(reader, path):
    """Gemma3Backbone arguments from the GGUF metadata of a `gemma3` file.

    Raises PresetError where the file asks for something Gemma3Backbone
    cannot express (another rope base or sliding pattern, or the 27B query
    scaling) rather than converting it into a subtly wrong model.
    """
    def get(key, default=_MISSING):  # Without a default, the key is required.
        return _field(reader, f"gemma3.{key}", path, default)

    heads, hidden, head_dim = get("attention.head_count"), get("embedding_length"), get("attention.key_length")
    sliding_window = get("attention.sliding_window", None)
    expected = {
        "rope.freq_base": (get("rope.freq_base", GLOBAL_ROPE_BASE), GLOBAL_ROPE_BASE),
        "rope.freq_base_swa": (get("rope.freq_base_swa", LOCAL_ROPE_BASE), LOCAL_ROPE_BASE),
        "attention.sliding_window_pattern": (get("attention.sliding_window_pattern", SLIDING_PATTERN), SLIDING_PATTERN),
        "attention.value_length": (get("attention.value_length", head_dim), head_dim),
    }
    for key, (found, wanted) in expected.items():
        if found != wanted:
            raise PresetError(
                f"{path} sets gemma3.{key}={found}; KerasHub's Gemma3Backbone only supports "
                f"{wanted}, so this model cannot be converted."
            )
    # llama.cpp scales queries by hidden/heads for the 62-layer 27B model;
    # keras-hub 0.32's Gemma3DecoderBlock always scales by head_dim.
    if get("block_count") == 62 and hidden // heads != head_dim:
        raise PresetError(f"{path} is a Gemma 3 27B model, whose query scaling KerasHub 0.32 cannot express.")
    scaling_type = get("rope.scaling.type", "none")
    if scaling_type not in ("none", "linear"):
        raise PresetError(f"{path} uses rope scaling {scaling_type!r}; only linear (or none) is supported.")
    scaling = get("rope.scaling.factor", 1.0) if scaling_type == "linear" else 1.0
    return dict(
        vocabulary_size=len(_field(reader, "tokenizer.ggml.scores", path)),
        image_size=None,
        num_layers=get("block_count"),
        num_query_heads=heads,
        num_key_value_heads=get("attention.head_count_kv", heads),
        hidden_dim=hidden,
        intermediate_dim=get("feed_forward_length"),
        head_dim=head_dim,
        query_head_dim_normalize=True,
        use_query_key_norm=True,
        use_post_ffw_norm=True,
        use_post_attention_norm=True,
        attention_logit_soft_cap=get("attn_logit_softcapping", None),
        final_logit_soft_cap=get("final_logit_softcapping", None),
        use_sliding_window_attention=sliding_window is not None,
        sliding_window_size=sliding_window or 4096,
        global_rope_scaling_factor=float(scaling),
        layer_norm_epsilon=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
    )


def tensor_layout(backbone):
    """(GGUF tensor name, KerasHub variable, layout) for every weight of a Gemma (1 or 2) or Gemma 3 backbone.

    llama.cpp's names (gguf-py's tensor map for `gemma`, `gemma2` and
    `gemma3`); the layout names the change between the two conventions
    (`TO_KERAS`, `TO_GGUF`). Gemma ties the output projection to the
    embedding, so there is no `output.weight`. Gemma (1) blocks have neither
    post norms nor query/key norms; Gemma 2 blocks have the post norms;
    Gemma 3 blocks have all four.
    """
    yield "token_embd.weight", backbone.token_embedding.embeddings, None
    yield "output_norm.weight", backbone.layer_norm.scale, "norm"
    gemma3 = isinstance(backbone, keras_hub.models.Gemma3Backbone)
    for i, block in enumerate(backbone.transformer_layers):
        attention = block.attention
        entries = [
            ("attn_norm", block.pre_attention_norm.scale, "norm"),
            ("ffn_norm", block.pre_ffw_norm.scale, "norm"),
            ("attn_q", attention.query_dense.kernel, "heads_in"),
            ("attn_k", attention.key_dense.kernel, "heads_in"),
            ("attn_v", attention.value_dense.kernel, "heads_in"),
            ("attn_output", attention.output_dense.kernel, "heads_out"),
            ("ffn_gate", block.gating_ffw.kernel, "transpose"),
            ("ffn_up", block.gating_ffw_2.kernel, "transpose"),
            ("ffn_down", block.ffw_linear.kernel, "transpose"),
        ]
        if block.use_post_attention_norm:  # Gemma 2 and 3
            entries.append(("post_attention_norm", block.post_attention_norm.scale, "norm"))
        if block.use_post_ffw_norm:
            entries.append(("post_ffw_norm", block.post_ffw_norm.scale, "norm"))
        if gemma3:
            entries += [
                ("attn_q_norm", attention.query_norm.scale, "norm"),
                ("attn_k_norm", attention.key_norm.scale, "norm"),
            ]
        for name, variable, layout in entries:
            yield f"blk.{i}.{name}.weight", variable, layout


def load_weights(backbone, reader, path):
    """Copy every GGUF tensor into its KerasHub variable, undoing llama.cpp's layouts."""
    tensors = {t.name: t for t in reader.tensors}
    if "output.weight" in tensors:
        # Gemma ties the output projection to the embedding; a separate one
        # would be silently dropped by the backbone.
        raise PresetError(f"{path} has an untied output.weight; Gemma ties it to token_embd.weight.")
    layout = list(tensor_layout(backbone))
    # Dequantizing a 270M model's tensors takes most of a minute on 2 cores.
    progress = Progress(len(layout), f"converting {Path(path).name}", unit="tensor")
    for name, variable, kind in layout:
        variable.assign(_tensor(tensors, name, path, variable.shape, TO_KERAS.get(kind)))
        progress.update()
    progress.close()


def _tensor(tensors, name, path, shape, transform):
    """Dequantize tensor `name` to float32, rearranged to KerasHub's `shape`."""
    from gguf.quants import dequantize

    if name not in tensors:
        raise PresetError(f"{path} has no tensor {name!r}; it is not a complete Gemma checkpoint.")
    tensor = tensors[name]
    try:
        array = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise PresetError(
            f"Tensor {name!r} in {path} uses quantization {tensor.tensor_type.name}, which the gguf "
            "package cannot dequantize. Use a file quantized as F32, F16, BF16, Q4_K, Q8_0 or similar."
        ) from None
    # GGUF lists dimensions innermost first; NumPy wants them outermost first.
    stored = tuple(reversed(tensor.shape.tolist()))
    array = np.asarray(array, dtype=np.float32).reshape(stored)
    try:
        array = transform(array, shape) if transform else array
    except ValueError:  # A reshape that cannot fit.
        array = None
    if array is None or array.shape != tuple(shape):
        raise PresetError(
            f"Tensor {name!r} in {path} has shape {stored}, which does not fit the variable of "
            f"shape {tuple(shape)} that the file's metadata implies."
        )
    return array


def _norm(array, shape):
    return array - 1.0  # llama.cpp stored 1 + w; KerasHub computes x * (1 + w).


def _transpose(array, shape):
    return array.T  # (out, in) → (in, out).


def _heads_in(array, shape):
    # (heads * head_dim, hidden) → (heads, hidden, head_dim); Gemma needs no
    # rope permutation, unlike llama.cpp's LLaMA conversion.
    heads, hidden, head_dim = shape
    return array.reshape(heads, head_dim, hidden).transpose(0, 2, 1)


def _heads_out(array, shape):
    # (hidden, heads * head_dim) → (heads, head_dim, hidden).
    heads, head_dim, hidden = shape
    return array.reshape(hidden, heads, head_dim).transpose(1, 2, 0)


TO_KERAS = {"norm": _norm, "transpose": _transpose, "heads_in": _heads_in, "heads_out": _heads_out}
# The inverses, for writing: KerasHub variable value → llama.cpp's array.
TO_GGUF = {
    "norm": lambda w: w + 1.0,
    "transpose": lambda w: w.T,
    "heads_in": lambda w: w.transpose(0, 2, 1).reshape(-1, w.shape[1]),  # (heads, hidden, head_dim) → (heads·head_dim, hidden)
    "heads_out": lambda w: w.transpose(2, 0, 1).reshape(w.shape[2], -1),  # (heads, head_dim, hidden) → (hidden, heads·head_dim)
    None: lambda w: w,
}


def spm_proto(reader, path):
    """A serialized SentencePiece ModelProto rebuilt from the GGUF tokenizer fields."""
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    model = _field(reader, "tokenizer.ggml.model", path)
    if model != "llama":  # llama.cpp's name for a SentencePiece vocabulary.
        raise PresetError(f"{path} has a {model!r} tokenizer; Gemma uses SentencePiece ('llama').")
    proto = spm_pb2.ModelProto()
    ids = {name: _field(reader, f"tokenizer.ggml.{name}_token_id", path) for name in ("bos", "eos", "unknown", "padding")}
    for piece, score, kind in _spm_pieces(reader, path, ids["unknown"]):
        proto.pieces.add(piece=piece, score=score, type=spm_pb2.ModelProto.SentencePiece.Type.Value(kind))
    trainer = proto.trainer_spec
    # Gemma's tokenizer settings; only those that change encoding matter here.
    trainer.model_type = spm_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(proto.pieces)
    trainer.byte_fallback = True
    trainer.split_digits = True
    trainer.allow_whitespace_only_pieces = True
    trainer.bos_id, trainer.eos_id = ids["bos"], ids["eos"]
    trainer.unk_id, trainer.pad_id = ids["unknown"], ids["padding"]
    for field, token_id in (("bos_piece", "bos"), ("eos_piece", "eos"), ("unk_piece", "unknown"), ("pad_piece", "padding")):
        setattr(trainer, field, proto.pieces[ids[token_id]].piece)
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", path, False))
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return proto.SerializeToString()


def _spm_pieces(reader, path, unk_id):
    """(piece, score, SentencePiece type name) per token, undoing llama.cpp's edits.

    llama.cpp's converter (1) types `<unk>` CONTROL, but SentencePiece needs
    exactly one UNKNOWN piece; (2) writes user-defined pieces with spaces where
    SentencePiece has "▁" (Gemma's whitespace-run tokens); (3) types every
    special added token CONTROL, including the turn markers.
    """
    import gguf

    tokens = _field(reader, "tokenizer.ggml.tokens", path)
    scores = _field(reader, "tokenizer.ggml.scores", path)
    types = _field(reader, "tokenizer.ggml.token_type", path)
    if not len(tokens) == len(scores) == len(types):
        raise PresetError(f"{path} has {len(tokens)} tokens but {len(scores)} scores and {len(types)} types.")
    unknown = set(types) - {int(t) for t in gguf.TokenType}
    if unknown:
        raise PresetError(f"{path} has token types {sorted(unknown)} that llama.cpp does not define.")
    for token_id, (piece, score, kind) in enumerate(zip(tokens, scores, types)):
        # llama.cpp's token types carry SentencePiece's names, numbered differently.
        kind = gguf.TokenType(kind).name
        if token_id == unk_id:
            kind = "UNKNOWN"
        elif piece in TURN_TOKENS:
            kind = "USER_DEFINED"
        elif kind == "USER_DEFINED":
            piece = piece.replace(" ", SPIECE_SPACE)
        yield piece, float(score), kind


def _field(reader, key, path, default=_MISSING):
    """A metadata value (str, number, bool or list), or `default` when absent."""
    field = reader.get_field(key)
    if field is None:
        if default is _MISSING:
            raise PresetError(f"{path} lacks the metadata key {key!r}; it is not a complete Gemma GGUF file.")
        return default
    return field.contents()
