"""Export a merged Gemma, Gemma 2, Gemma 3 or Gemma 4 (text) model as one GGUF file for llama.cpp and Ollama.

    gemma-lora export runs/<run>/adapter.lora.h5 model.gguf --to gguf --gguf-type q8_0
    llama-cli -m model.gguf -p "..."          # or: ollama create mine -f model.Modelfile

The file is written with the gguf package's `GGUFWriter` in llama.cpp's own
conventions, the inverse of `gemma_lora.gguf_import` (both walk its
`tensor_layout`): RMSNorm weights stored as 1 + w, matrices (out, in),
attention split per head flattened head-major, the embedding tied (no
`output.weight`); the SentencePiece vocabulary as token/score/type lists with
the edits llama.cpp makes (see `vocabulary`); the hyper-parameters under
llama.cpp's key names. `general.*` names the base and the adapter. Matrices
take the asked type (`gguf.quants.quantize` for bf16 and q8_0), norms stay
float32 as in llama.cpp's own files. A `<stem>.Modelfile` for Ollama is
written beside the file, with the prompt template the adapter was trained on.

Gemma 4 (`gemma4_gguf.py`) is written as llama.cpp's converter writes a
Gemma4ForCausalLM checkpoint: the transformers tensors the package exports
(checked against transformers' logits), renamed by gguf-py's own tensor map
for `gemma4`, with its hyper-parameters (per-layer KV heads and the sliding
pattern as arrays, the global and sliding head widths and RoPE bases) and
its `rope_freqs` tensor for the partial RoPE of global layers.
"""

from pathlib import Path

import numpy as np

from gemma_lora.errors import ExportError
from gemma_lora.export import (
    CHAT_TEMPLATES,
    GGUF_TYPES,
    OLLAMA_CHAT,
    Provenance,
    check_new,
    check_plain,
    gemma2_features,
    query_scale_width,
)
from gemma_lora.io import atomic_path, write_text_atomic
from gemma_lora.model.gemma4 import TURN_MARKERS as GEMMA4_TURN_TOKENS
from gemma_lora.model.gguf_import import (
    SPIECE_SPACE,
    TO_GGUF,
    TURN_TOKENS,
    tensor_layout,
)

ARCHITECTURES = {"GemmaBackbone": "gemma", "Gemma3Backbone": "gemma3",  # a GemmaBackbone may be gemma2
                 "Gemma4Backbone": "gemma4"}
# Neither backbone records a context length; these are the shortest of each
# family (Gemma and Gemma 2: 8K; Gemma 3 270M and 1B: 32K), so no size is over-promised.
CONTEXT_LENGTH = {"gemma": 8192, "gemma2": 8192, "gemma3": 32768}
# llama.cpp takes a 46-layer gemma2 (Gemma 2 27B) and a 62-layer gemma3
# (Gemma 3 27B) to scale queries by 1/sqrt(hidden/heads), any other by
# 1/sqrt(head_dim) (llama-model.cpp, f_attention_scale).
WIDE_QUERY_SCALE_LAYERS = {"gemma2": 46, "gemma3": 62}
GEMMA3_ROPE_BASE = 1_000_000.0  # global layers; llama.cpp's sliding layers use 10K, as KerasHub does


def export_gguf(causal_lm, output_path, gguf_type="f32", provenance=None):
    """Write `causal_lm` as a llama.cpp GGUF file and an Ollama Modelfile beside it, atomically.

    Args:
        causal_lm: a plain (merged, float) GemmaCausalLM (Gemma 1 or 2) or text-only
            Gemma3CausalLM with its preprocessor (the vocabulary goes into the file).
        output_path: str or Path ending in .gguf; must not exist, nor its
            `<stem>.Modelfile`.
        gguf_type: "f32", "f16", "bf16" or "q8_0": the type of the matrices
            (norms stay f32; a q8_0 matrix whose rows are not a multiple of
            32 is written f16, as llama.cpp does).
        provenance: `Provenance` (base, adapter, metadata) for the file's
            general metadata, the chat template and the Modelfile; None: unnamed.

    Returns:
        The GGUF path.

    Raises:
        ExportError: unknown type, LoRA attached, quantized, or an
            architecture llama.cpp's graph for it would compute differently.
        OutputError: the file or Modelfile exists, or cannot be written.
    """
    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"Unknown GGUF type {gguf_type!r}: use one of {', '.join(GGUF_TYPES)}.")
    output_path = Path(output_path)
    if output_path.suffix != ".gguf":
        raise ExportError(f"A GGUF export is one file ending in .gguf. Received: {output_path}. Give e.g. model.gguf.")
    try:
        import gguf  # noqa: F401  (not a core dependency)
    except ImportError:
        raise ExportError('GGUF export needs the gguf package: pip install "gemma-lora[gguf]" (or pip install gguf).') from None
    check_plain(causal_lm, "GGUF")
    reason = refusal(causal_lm.backbone)
    if reason:
        raise ExportError(reason)
    if causal_lm.preprocessor is None or not hasattr(causal_lm.preprocessor.tokenizer, "proto"):
        raise ExportError("This model has no SentencePiece tokenizer attached; a GGUF file needs its vocabulary.")
    provenance = provenance or Provenance(base="unnamed model")
    modelfile = output_path.with_suffix(".Modelfile")
    check_new(output_path, "GGUF file")
    check_new(modelfile, "Ollama Modelfile")
    with atomic_path(output_path, suffix=".gguf") as tmp:
        write_gguf(causal_lm, tmp, gguf_type, provenance)
    write_text_atomic(modelfile, ollama_modelfile(output_path.name, provenance))
    return output_path


def gguf_architecture(backbone):
    """llama.cpp's name for `backbone`: gemma, gemma2 (a GemmaBackbone with Gemma 2's features) or gemma3."""
    arch = ARCHITECTURES[type(backbone).__name__]
    return "gemma2" if arch == "gemma" and gemma2_features(backbone) else arch


def llama_query_scale_width(arch, backbone):
    """w in the 1/sqrt(w) llama.cpp scales this model's queries by (see WIDE_QUERY_SCALE_LAYERS)."""
    if backbone.num_layers == WIDE_QUERY_SCALE_LAYERS.get(arch):
        return backbone.hidden_dim // backbone.num_query_heads
    return backbone.head_dim


def refusal(backbone):
    """Why llama.cpp would compute something else for `backbone`, or None when the file is right."""
    name = type(backbone).__name__
    if name not in ARCHITECTURES:
        return (f"gemma-lora cannot write a {name} as GGUF; it writes {', '.join(ARCHITECTURES)} "
                "(llama.cpp's gemma, gemma2, gemma3).")
    arch = gguf_architecture(backbone)
    if arch == "gemma4":
        from gemma_lora.export.gemma4_gguf import refusal as gemma4_refusal

        return gemma4_refusal(backbone)
    if arch == "gemma":
        if query_scale_width(backbone) != backbone.head_dim:
            return "This GemmaBackbone scales queries by hidden/heads; llama.cpp's Gemma scales them by head_dim."
        return None
    if arch == "gemma2":
        missing = [what for what, on in (("post-attention norms", backbone.use_post_attention_norm),
                                         ("post-FFW norms", backbone.use_post_ffw_norm),
                                         ("attention-logit soft cap", backbone.attention_logit_soft_cap),
                                         ("final-logit soft cap", backbone.final_logit_soft_cap),
                                         ("sliding-window layers", backbone.use_sliding_window_attention)) if not on]
        if missing:
            return (f"This GemmaBackbone has some of Gemma 2's features ({', '.join(gemma2_features(backbone))}) but "
                    f"no {', '.join(missing)}; llama.cpp's gemma2 graph always has them.")
    else:
        if backbone.vision_encoder is not None or getattr(backbone, "is_embedding_model", False):
            return "Only text-only Gemma 3 causal LMs are written as GGUF (llama.cpp keeps vision in a separate file)."
        missing = [what for what, on in (("query/key norms", backbone.use_query_key_norm),
                                         ("post-attention norms", backbone.use_post_attention_norm),
                                         ("post-FFW norms", backbone.use_post_ffw_norm),
                                         ("sliding-window layers", backbone.use_sliding_window_attention)) if not on]
        if missing:
            return f"This Gemma3Backbone has no {', '.join(missing)}; llama.cpp's gemma3 graph always has them."
        if backbone.attention_logit_soft_cap:
            return "This Gemma3Backbone caps attention logits; llama.cpp's gemma3 graph has no such cap."
        if backbone.local_rope_scaling_factor != 1.0:
            return "This Gemma3Backbone scales the rope of sliding-window layers; llama.cpp's gemma3 cannot express it."
    # What Keras computes (the attention layer's own setting: keras-hub 0.32 ignores the
    # backbone's for Gemma 2 and 3, see export.query_scale_width) against what llama.cpp would.
    keras_scale, llama_scale = query_scale_width(backbone), llama_query_scale_width(arch, backbone)
    if keras_scale != llama_scale:
        rule = (f" (it takes a {backbone.num_layers}-layer {arch} for the 27B model)"
                if backbone.num_layers == WIDE_QUERY_SCALE_LAYERS[arch] else "")
        return (f"This {arch} model scales queries by 1/sqrt({keras_scale}) in KerasHub; llama.cpp would scale "
                f"them by 1/sqrt({llama_scale}){rule}, which gives other logits.")
    return None


def write_gguf(causal_lm, path, gguf_type, provenance):
    """Write the whole GGUF file to `path` (checks done by the caller)."""
    import gguf

    backbone = causal_lm.backbone
    arch = gguf_architecture(backbone)
    tensor_type, file_type = GGUF_TYPES[gguf_type]
    writer = gguf.GGUFWriter(str(path), arch)
    write_general(writer, provenance, getattr(gguf.LlamaFileType, file_type))
    if arch == "gemma4":
        from gemma_lora.export import gemma4_gguf

        gemma4_gguf.write_hyperparameters(writer, backbone)
        layout = gemma4_gguf.tensors(backbone)
    else:
        write_hyperparameters(writer, backbone, arch)
        layout = ((name, TO_GGUF[kind](np.asarray(variable, dtype=np.float32)))
                  for name, variable, kind in tensor_layout(backbone))
    tokens = write_vocabulary(writer, causal_lm.preprocessor.tokenizer.proto, provenance)
    qtype = getattr(gguf.GGMLQuantizationType, tensor_type)
    for name, array in layout:
        if name == "token_embd.weight":
            array = embedding_rows(array, tokens)
        data, raw_dtype = encode(np.ascontiguousarray(array), qtype)
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_general(writer, provenance, file_type):
    import gguf

    writer.add_type("model")
    writer.add_name(f"{provenance.base} + LoRA" if provenance.adapter else provenance.base)
    writer.add_description(provenance.describe())
    writer.add_base_model_count(1)
    writer.add_base_model_name(0, provenance.base)
    if provenance.adapter:
        writer.add_string("gemma_lora.adapter", str(provenance.adapter))
        if provenance.meta.get("sha256"):
            writer.add_string("gemma_lora.adapter_sha256", provenance.meta["sha256"])
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_hyperparameters(writer, backbone, arch):
    """The shape under llama.cpp's names (its converter writes these for gemma / gemma2 / gemma3)."""
    writer.add_context_length(CONTEXT_LENGTH[arch])
    writer.add_embedding_length(backbone.hidden_dim)
    writer.add_block_count(backbone.num_layers)
    # KerasHub's Gemma (1 and 2) counts both gated halves; llama.cpp (like transformers) one.
    writer.add_feed_forward_length(backbone.intermediate_dim if arch == "gemma3" else backbone.intermediate_dim // 2)
    writer.add_head_count(backbone.num_query_heads)
    writer.add_head_count_kv(backbone.num_key_value_heads)
    writer.add_key_length(backbone.head_dim)
    writer.add_value_length(backbone.head_dim)
    writer.add_layer_norm_rms_eps(backbone.layer_norm_epsilon)
    if arch == "gemma2":
        # llama.cpp's gemma2 slides on layers 0, 2, 4, ... as KerasHub does; no rope key (10,000 for both).
        writer.add_attn_logit_softcapping(backbone.attention_logit_soft_cap)
        writer.add_final_logit_softcapping(backbone.final_logit_soft_cap)
        writer.add_sliding_window(backbone.sliding_window_size)
    if arch == "gemma3":
        import gguf

        writer.add_rope_freq_base(GEMMA3_ROPE_BASE)
        writer.add_sliding_window(backbone.sliding_window_size)
        if backbone.global_rope_scaling_factor != 1.0:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(backbone.global_rope_scaling_factor)
        if backbone.final_logit_soft_cap:
            writer.add_final_logit_softcapping(backbone.final_logit_soft_cap)


def write_vocabulary(writer, proto_bytes, provenance):
    """The tokenizer fields; returns the number of tokens."""
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    proto = spm_pb2.ModelProto()
    proto.ParseFromString(proto_bytes)
    tokens, scores, types = vocabulary(proto)
    writer.add_tokenizer_model("llama")  # llama.cpp's name for a SentencePiece vocabulary
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    spec = proto.trainer_spec
    writer.add_bos_token_id(spec.bos_id)
    writer.add_eos_token_id(spec.eos_id)
    writer.add_unk_token_id(spec.unk_id)
    writer.add_pad_token_id(spec.pad_id)
    writer.add_add_bos_token(True)  # KerasHub's Gemma preprocessor starts every prompt with <bos>
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
    chat_format = provenance.chat_format
    if chat_format is not None:
        writer.add_chat_template(CHAT_TEMPLATES[chat_format])
    return len(tokens)


def vocabulary(proto):
    """(tokens, scores, types) as llama.cpp's converter writes a Gemma SentencePiece model.

    Its edits, which `gguf_import._spm_pieces` undoes: `<unk>` and the turn
    markers are typed CONTROL (its special added tokens, which its own
    tokenizer then matches as whole tokens), and user-defined pieces (Gemma's
    whitespace runs) are written with spaces where SentencePiece has "▁".
    """
    import gguf
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    tokens, scores, types = [], [], []
    for piece in proto.pieces:
        kind = spm_pb2.ModelProto.SentencePiece.Type.Name(piece.type)
        text = piece.piece
        if kind == "UNKNOWN" or text in TURN_TOKENS + GEMMA4_TURN_TOKENS:
            kind = "CONTROL"
        elif kind == "USER_DEFINED":
            text = text.replace(SPIECE_SPACE, " ")
        tokens.append(text)
        scores.append(piece.score)
        types.append(gguf.TokenType[kind])
    return tokens, scores, types


def embedding_rows(array, tokens):
    # llama.cpp keeps one embedding row per token: rows past the vocabulary
    # (padding some checkpoints carry) are never produced, so they are dropped.
    if array.shape[0] < tokens:
        raise ExportError(f"The embedding has {array.shape[0]} rows for {tokens} tokens; the tokenizer does not fit the model.")
    return array[:tokens]


def encode(array, qtype):
    """(data, raw_dtype) for GGUFWriter.add_tensor: norms f32, matrices in `qtype`."""
    import gguf
    from gguf.quants import quantize

    if array.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        return array.astype(np.float32), None
    if qtype == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16), None
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if array.shape[-1] % block:
        return array.astype(np.float16), None  # rows that do not split into blocks, as llama.cpp falls back
    return quantize(array, qtype), qtype


def ollama_modelfile(gguf_name, provenance):
    """An Ollama Modelfile for the GGUF file beside it, prompting as the adapter was trained."""
    lines = [
        f"# {provenance.describe()}",
        f"#   ollama create my-gemma -f {Path(gguf_name).with_suffix('.Modelfile')} && ollama run my-gemma",
        f"FROM ./{gguf_name}",
    ]
    chat_format = provenance.chat_format
    if chat_format is not None:
        template, stop = OLLAMA_CHAT[chat_format]
        lines += [f'TEMPLATE """{template}"""', f'PARAMETER stop "{stop}"']
    elif provenance.prompt_template is not None:
        # The training template's prompt part, the user's text in place of {instruction}.
        prompt = provenance.prompt_template.replace("{instruction}", "{{ .Prompt }}")
        lines.append(f'TEMPLATE """{prompt}"""')
    else:
        lines.append('TEMPLATE """{{ .Prompt }}"""')
    lines += ["# Greedy, as `gemma-lora generate` samples by default.", "PARAMETER temperature 0"]
    return "\n".join(lines) + "\n"
