"""GGUF export: tiny Gemma, Gemma 2 and Gemma 3 (adapter merged) written, read back three ways, refusals.

Read back with the gguf package's reader (metadata and tensor types), with
the package's importer (logits, tokenization) and, for Gemma 3, with
transformers' GGUF loader, code nobody here wrote (needs torch: skipped
without it; CI runs this file in its Python 3.11 venv). transformers has no
GGUF loader for llama.cpp's `gemma` (Gemma 1) architecture, and its `gemma2`
loader reads neither soft cap nor the query scale from the file (it takes
Gemma2Config's defaults), so it is not a check of these tiny models;
llama.cpp itself reads all three, through llama-cpp-python where it is
installed (it compiles llama.cpp from source, about 12 minutes here, so CI
skips that test: `pip install llama-cpp-python` to run it).
"""

import gguf
import keras_hub
import numpy as np
import pytest
from gguf.quants import dequantize
from tiny_models import dolly_texts, exportable, logits, token_ids

from gemma_lora.adapters import merge
from gemma_lora.errors import ExportError, OutputError
from gemma_lora.export import Provenance
from gemma_lora.export.gguf import GGUF_TYPES, encode, export_gguf
from gemma_lora.model import loading
from gemma_lora.model.gguf_import import TO_GGUF, TO_KERAS, convert_gguf, tensor_layout

# Largest |Δlogit| / max |logit| against the float32 model, per type: f32 is
# exact up to the +1/−1 on norm weights; the others carry their rounding
# (measured on these tiny random models, Gemma / Gemma 3: f32 0 / 0,
# f16 1.1e-3 / 2.5e-3, bf16 7.6e-3 / 1.5e-2, q8_0 2.7e-2 / 3.9e-2).
TOLERANCE = {"f32": 1e-6, "f16": 5e-3, "bf16": 3e-2, "q8_0": 8e-2}
ARCHITECTURES = ("gemma-1kv", "gemma2", "gemma3")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{architecture: (LoRA model, base preset, merged plain model, token ids)}."""
    tmp = tmp_path_factory.mktemp("gguf-models")
    found = {}
    for shape in ARCHITECTURES:
        lora, preset, plain = exportable(shape, tmp)
        found[shape] = (lora, preset, plain, token_ids(plain))
    return found


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    """{(architecture, type): GGUF path} for every architecture and type."""
    tmp = tmp_path_factory.mktemp("gguf")
    meta = {"rank": 4, "alpha": 8.0, "targets": ["query", "value"], "sha256": "ab" * 32,
            "template": "Instruction:\n{instruction}\n\nResponse:\n{response}"}
    return {
        (shape, kind): export_gguf(models[shape][2], tmp / f"{shape}-{kind}.gguf", kind,
                                   Provenance("tiny-base", "runs/x/adapter.lora.h5", meta))
        for shape in ARCHITECTURES for kind in GGUF_TYPES
    }


def rounded(plain, kind):
    """`plain` with every matrix rounded through `kind` and back, as the file stores it."""
    qtype = getattr(gguf.GGMLQuantizationType, GGUF_TYPES[kind][0])
    for name, variable, layout in tensor_layout(plain.backbone):
        array = TO_GGUF[layout](np.asarray(variable))
        data, raw = encode(np.ascontiguousarray(array), qtype)
        stored = dequantize(data, raw) if raw is not None else np.asarray(data, np.float32)
        stored = stored.reshape(array.shape)
        variable.assign(TO_KERAS[layout](stored, variable.shape) if layout else stored)
    return plain


@pytest.mark.parametrize("kind", list(GGUF_TYPES))
@pytest.mark.parametrize("shape", ARCHITECTURES)
def test_importer_reads_back_the_adapter_models_logits(shape, kind, models, exported, tmp_path):
    lora, preset, _, ids = models[shape]
    back = keras_hub.models.CausalLM.from_preset(str(convert_gguf(exported[shape, kind], tmp_path / "p")))
    got, want = logits(back, ids), logits(lora, ids)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= TOLERANCE[kind] * scale
    # Exact for what the file holds: the float model with its matrices rounded the same way.
    reference = logits(rounded(merge.merged_model(lora, preset), kind), ids)
    np.testing.assert_allclose(got, reference, atol=1e-6 * scale)


@pytest.mark.parametrize("shape", ARCHITECTURES)
def test_gguf_reader_sees_llama_cpp_conventions(shape, exported):
    reader = gguf.GGUFReader(exported[shape, "q8_0"])
    field = lambda key: reader.get_field(key).contents()  # noqa: E731
    arch = field("general.architecture")
    assert arch == {"gemma-1kv": "gemma", "gemma2": "gemma2", "gemma3": "gemma3"}[shape]
    if arch == "gemma2":  # what llama.cpp's gemma2 reads (it would take 50 / 30 / 4096 without them)
        assert (field("gemma2.attn_logit_softcapping"), field("gemma2.final_logit_softcapping")) == (5.0, 3.0)
        assert field("gemma2.attention.sliding_window") == 8 and field("gemma2.attention.head_count_kv") == 2
    assert field("general.base_model.0.name") == "tiny-base"
    assert "adapter.lora.h5 (rank 4, alpha 8, targets query/value) merged in" in field("general.description")
    assert field("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert field("tokenizer.ggml.model") == "llama" and field(f"{arch}.attention.head_count") == 4
    assert reader.get_field("tokenizer.chat_template") is None  # trained on an instruction template, not chat
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert "output.weight" not in types  # tied
    assert ("blk.1.post_ffw_norm.weight" in types) == (arch != "gemma")
    assert types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    tokens = field("tokenizer.ggml.tokens")
    kinds = field("tokenizer.ggml.token_type")
    assert kinds[tokens.index("<end_of_turn>")] == gguf.TokenType.CONTROL
    assert "  " in tokens and "\u2581\u2581" not in tokens  # llama.cpp spells whitespace pieces with spaces


def test_identical_tokenization_on_hundreds_of_strings(models, exported, tmp_path):
    _, _, plain, _ = models["gemma3"]
    back = keras_hub.models.CausalLM.from_preset(str(convert_gguf(exported["gemma3", "f32"], tmp_path / "p")))
    texts = dolly_texts(300) + ["<start_of_turn>user\nTwo  spaces,   three.<end_of_turn>\n", "café 12345 ☃"]
    original, converted = plain.preprocessor.tokenizer, back.preprocessor.tokenizer
    for text in texts:
        assert np.asarray(converted.tokenize(text)).tolist() == np.asarray(original.tokenize(text)).tolist()


def test_chat_template_and_modelfile_follow_the_adapters_format(models, tmp_path):
    plain = models["gemma3"][2]
    meta = {"rank": 4, "alpha": 4, "targets": ["query"], "template": "Q: {instruction}\nA: {response}"}
    path = export_gguf(plain, tmp_path / "plain.gguf", "f16", Provenance("tiny-base", "a.lora.h5", meta))
    assert gguf.GGUFReader(path).get_field("tokenizer.chat_template") is None
    modelfile = (tmp_path / "plain.Modelfile").read_text()
    assert 'FROM ./plain.gguf' in modelfile and 'TEMPLATE """Q: {{ .Prompt }}\nA: """' in modelfile
    chat = export_gguf(plain, tmp_path / "chat.gguf", "f16",
                       Provenance("tiny-base", "a.lora.h5", {**meta, "chat_format": "gemma"}))
    template = gguf.GGUFReader(chat).get_field("tokenizer.chat_template").contents()
    assert "<start_of_turn>" in template and "<end_of_turn>" in template
    assert 'PARAMETER stop "<end_of_turn>"' in (tmp_path / "chat.Modelfile").read_text()
    with pytest.raises(ExportError, match="chat format 'chatml'"):
        export_gguf(plain, tmp_path / "x.gguf", "f16", Provenance("b", "a.lora.h5", {**meta, "chat_format": "chatml"}))
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("system", ["Be brief.", "  ", None])
def test_the_exported_chat_template_writes_turns_as_training_did(system):
    """The Jinja template a serving stack applies gives the turns training wrote (data/chat.py)."""
    jinja2 = pytest.importorskip("jinja2")
    from gemma_lora.data import Example
    from gemma_lora.data.chat import gemma_turns
    from gemma_lora.export import GEMMA_CHAT_TEMPLATE

    turns = [("user", " Hi there "), ("assistant", "Hello."), ("user", "Name a colour."), ("assistant", "Blue.")]
    if system is not None:
        turns.insert(0, ("system", system))
    example = Example("", "", conversation=tuple(turns))
    expected = "<bos>" + "".join(f"<start_of_turn>{role}\n{text}<end_of_turn>\n" for role, text in gemma_turns(example))
    messages = [{"role": role, "content": content} for role, content in turns]
    rendered = jinja2.Environment().from_string(GEMMA_CHAT_TEMPLATE).render(
        messages=messages, bos_token="<bos>", add_generation_prompt=False)
    assert rendered == expected
    prompt = jinja2.Environment().from_string(GEMMA_CHAT_TEMPLATE).render(
        messages=messages[:-1], bos_token="<bos>", add_generation_prompt=True)
    assert prompt == expected[: expected.rindex("Blue.")]


def test_transformers_gguf_loader_gives_the_keras_logits(models, exported):
    """A consumer nobody here wrote: transformers' own GGUF reader, config and tensor mapping."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    lora, _, _, ids = models["gemma3"]
    path = exported["gemma3", "f32"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        got = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    want = logits(lora, ids)
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    original = lora.preprocessor.tokenizer
    for text in dolly_texts(50):
        assert tokenizer(text).input_ids[1:] == np.asarray(original.tokenize(text)).tolist()


@pytest.mark.parametrize("shape", ARCHITECTURES)
def test_llama_cpp_gives_the_keras_logits_and_tokens(shape, models, exported):
    """llama.cpp's own loader, graph and tokenizer (llama-cpp-python), Gemma, Gemma 2 and Gemma 3."""
    llama_cpp = pytest.importorskip("llama_cpp")
    lora, _, _, ids = models[shape]
    # f32 KV cache; ggml still evaluates GELU from a float16 table, about 1e-3 of the logits' scale.
    llm = llama_cpp.Llama(model_path=str(exported[shape, "f32"]), logits_all=True, n_ctx=64, verbose=False,
                          type_k=0, type_v=0)
    llm.eval(ids[0].tolist())
    got, want = np.asarray(llm.scores[: ids.shape[1]]), logits(lora, ids)[0]
    assert np.abs(got - want).max() <= 3e-3 * np.abs(want).max()
    tokenizer = lora.preprocessor.tokenizer
    for text in dolly_texts(50):
        assert llm.tokenize(text.encode(), add_bos=True, special=True)[1:] == np.asarray(tokenizer.tokenize(text)).tolist()


@pytest.mark.slow
def test_refusals_leave_nothing_on_disk(models, tmp_path, tiny_preset):
    plain = models["gemma3"][2]
    with pytest.raises(ExportError, match="Unknown GGUF type 'q4_k'"):
        export_gguf(plain, tmp_path / "a.gguf", "q4_k")
    with pytest.raises(ExportError, match="ending in .gguf"):
        export_gguf(plain, tmp_path / "a.bin")
    with pytest.raises(ExportError, match="still has LoRA enabled"):
        export_gguf(models["gemma3"][0], tmp_path / "a.gguf")
    with pytest.raises(ExportError, match="stored as int8"):
        export_gguf(loading.load_causal_lm(tiny_preset, "float32", quantize="int8"), tmp_path / "a.gguf")
    _, _, partial = exportable("gemma-softcap-only", tmp_path / "m")
    with pytest.raises(ExportError, match="some of Gemma 2's features .* no post-attention norms, post-FFW norms, "
                                          "sliding-window layers; llama.cpp's gemma2 graph always has them"):
        export_gguf(partial, tmp_path / "a.gguf")
    other = keras_hub.models.GPTNeoXCausalLM(
        backbone=keras_hub.models.GPTNeoXBackbone(vocabulary_size=16, num_layers=1, num_heads=2, hidden_dim=8,
                                                  intermediate_dim=16, max_sequence_length=8), preprocessor=None)
    with pytest.raises(ExportError, match="cannot write a GPTNeoXBackbone as GGUF"):
        export_gguf(other, tmp_path / "a.gguf")
    export_gguf(plain, tmp_path / "b.gguf", "f16")
    with pytest.raises(OutputError, match="b.gguf already exists"):
        export_gguf(plain, tmp_path / "b.gguf", "f16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.Modelfile", "b.gguf", "m"]


def test_gemma2_27b_query_scale_is_refused():
    """46 layers: llama.cpp would scale queries by 1/sqrt(hidden/heads), KerasHub scales by 1/sqrt(head_dim)."""
    from gemma_lora.export.gguf import refusal

    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=16, num_layers=46, num_query_heads=2, num_key_value_heads=1, hidden_dim=8, intermediate_dim=8,
        head_dim=8, use_post_ffw_norm=True, use_post_attention_norm=True, attention_logit_soft_cap=50.0,
        final_logit_soft_cap=30.0, use_sliding_window_attention=True, query_head_dim_normalize=False)
    assert refusal(backbone) == ("This gemma2 model scales queries by 1/sqrt(8) in KerasHub; llama.cpp would scale them "
                                 "by 1/sqrt(4) (it takes a 46-layer gemma2 for the 27B model), which gives other logits.")
