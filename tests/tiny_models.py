"""Tiny Gemma, Gemma 3 and Gemma 2 models for the export and GGUF tests, each with a trained-looking adapter.

Every norm scale is random (so a missing or doubled +1 shows), every LoRA B
factor non-zero (so a dropped update shows). `exportable` returns the LoRA
model, its base preset directory and the merged plain model, the three
things every exporter test starts from.
"""

import gzip
import json
from importlib import resources

import keras
import keras_hub
import numpy as np
from sentencepiece import sentencepiece_model_pb2 as spm_pb2

from gemma_lora.adapters import merge
from gemma_lora.model import loading

SPACE = "\u2581"
EXTRA_PIECES = ("<start_of_turn>", "<end_of_turn>", SPACE * 2, SPACE * 3)
ALL_PROJECTIONS = ("query", "key", "value", "attention_output", "ffw_gating", "ffw_gating_2", "ffw_linear")
# Six layers, so a Gemma 3 has five sliding-window layers and one global one;
# token sequences in the tests are longer than the window. head_dim 256 is
# Gemma 3's own, which transformers' GGUF loader assumes (it reads no query scale).
GEMMA3 = dict(num_layers=6, num_query_heads=4, num_key_value_heads=2, hidden_dim=64, intermediate_dim=128,
              head_dim=256, sliding_window_size=8)
GEMMA = dict(num_layers=2, num_query_heads=4, num_key_value_heads=1, hidden_dim=64, intermediate_dim=256, head_dim=16)
GEMMA2 = dict(num_key_value_heads=2, use_post_ffw_norm=True, use_post_attention_norm=True, final_logit_soft_cap=3.0,
              attention_logit_soft_cap=5.0, use_sliding_window_attention=True, sliding_window_size=8)
# Architecture name → backbone settings (over GEMMA / GEMMA3).
SHAPES = {
    "gemma-1kv": ("gemma", {}),
    "gemma-4kv": ("gemma", dict(num_query_heads=8, num_key_value_heads=4)),
    "gemma3": ("gemma3", {}),
    "gemma3-softcap": ("gemma3", dict(final_logit_soft_cap=3.0)),
    # Gemma 3 27B's config (queries by hidden/heads = 16 here, head_dim 256), which keras-hub 0.32 ignores.
    "gemma3-query-scale": ("gemma3", dict(query_head_dim_normalize=False)),
    # Gemma 2: layer 0 slides (window 8, shorter than the tests' sequences), layer 1 is global; 2 KV
    # heads; soft caps small enough to bind on these random weights (50 / 30 would change nothing).
    "gemma2": ("gemma", GEMMA2),
    # Gemma 2 27B's config asks for queries scaled by hidden/heads (16 here) with head_dim 32;
    # keras-hub 0.32's attention scales by head_dim anyway (see export.query_scale_width).
    "gemma2-query-scale": ("gemma", dict(GEMMA2, head_dim=32, query_head_dim_normalize=False)),
    # Some of Gemma 2's features without its post norms: transformers has no such model.
    "gemma-softcap-only": ("gemma", dict(final_logit_soft_cap=3.0, attention_logit_soft_cap=5.0)),
}


def gemma3_style_proto():
    """The shipped tiny BPE vocab plus Gemma 3's turn markers and whitespace runs.

    They go right after the four special pieces, ahead of the merged pieces,
    as in Gemma's own vocabulary: transformers' GGUF tokenizer rebuilds BPE
    merges in vocabulary order, so a whitespace run listed last would lose to
    "▁He" in "  He" (SentencePiece matches user-defined pieces first either way).
    """
    proto = spm_pb2.ModelProto()
    proto.ParseFromString((resources.files("gemma_lora") / "resources" / "tiny_vocab.spm").read_bytes())
    pieces = list(proto.pieces)
    present = {piece.piece for piece in pieces}  # the shipped vocabulary has the turn markers already
    del proto.pieces[:]
    proto.pieces.extend(pieces[:4])
    for piece in EXTRA_PIECES:
        if piece not in present:
            proto.pieces.add(piece=piece, score=0.0, type=spm_pb2.ModelProto.SentencePiece.USER_DEFINED)
    proto.pieces.extend(pieces[4:])
    proto.trainer_spec.vocab_size = len(proto.pieces)
    return proto


def tiny_causal_lm(shape, seed=7):
    """A float32 CausalLM of architecture `shape` (a SHAPES key) with random weights and norm scales."""
    family, overrides = SHAPES[shape]
    proto = gemma3_style_proto().SerializeToString()
    keras.utils.set_random_seed(seed)
    if family == "gemma3":
        tokenizer = keras_hub.models.Gemma3Tokenizer(proto=proto, has_vision_tokens=False)
        backbone = keras_hub.models.Gemma3Backbone(
            vocabulary_size=tokenizer.vocabulary_size(), image_size=None, use_post_ffw_norm=True,
            use_post_attention_norm=True, use_sliding_window_attention=True, dtype="float32",
            **{**GEMMA3, **overrides})
        task = keras_hub.models.Gemma3CausalLM
    else:
        tokenizer = keras_hub.models.GemmaTokenizer(proto=proto)
        backbone = keras_hub.models.GemmaBackbone(
            vocabulary_size=tokenizer.vocabulary_size(), dtype="float32", **{**GEMMA, **overrides})
        task = keras_hub.models.GemmaCausalLM
    rng = np.random.default_rng(seed)
    for weight in backbone.weights:
        if weight.path.endswith("scale"):
            weight.assign(rng.normal(0, 0.5, weight.shape).astype("float32"))
    preprocessor = keras_hub.models.GemmaCausalLMPreprocessor(tokenizer, sequence_length=64)
    return task(backbone=backbone, preprocessor=preprocessor)


def with_adapter(causal_lm, rank=4, alpha=8.0, targets=ALL_PROJECTIONS, seed=0):
    """LoRA with non-zero B factors, a stand-in for training."""
    layers = loading.enable_lora(causal_lm, rank, alpha, targets, seed=seed)
    rng = np.random.default_rng(seed)
    for layer in layers:
        layer.lora_kernel_b.assign(rng.normal(0, 0.1, layer.lora_kernel_b.shape).astype("float32"))
    return causal_lm


def exportable(shape, directory, rank=4, alpha=8.0, targets=ALL_PROJECTIONS):
    """(LoRA model, base preset dir, merged plain model) for a tiny `shape` saved under `directory`."""
    preset = directory / f"{shape}-base"
    if not preset.exists():
        tiny_causal_lm(shape).save_to_preset(str(preset))
    lora = with_adapter(loading.load_causal_lm(preset, "float32"), rank, alpha, targets)
    return lora, preset, merge.merged_model(lora, preset)


def dolly_texts(n=20):
    path = resources.files("gemma_lora") / "resources" / "databricks-dolly-sample.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(n), f)]
    return [f"Instruction:\n{r['instruction']}\n\nResponse:\n{r['response']}" for r in rows]


def token_ids(causal_lm, length=24):
    """<bos> and the start of a Dolly row: longer than a Gemma 3 sliding window."""
    ids = np.asarray(causal_lm.preprocessor.tokenizer.tokenize(dolly_texts(1)[0]))[: length - 1]
    bos = causal_lm.preprocessor.tokenizer.token_to_id("<bos>")
    return np.concatenate([[bos], ids])[None].astype("int32")


def logits(causal_lm, ids):
    return np.asarray(causal_lm({"token_ids": ids, "padding_mask": np.ones_like(ids, bool)}), dtype="float32")
