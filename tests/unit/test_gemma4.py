"""Gemma 4 (text): the LoRA checklist (STYLE.md) on tiny_gemma4, presets, refusals, and KerasHub's quirks.

tiny_gemma4 is gemma4_31b's text architecture in miniature (gemma4.TINY):
layer 0 slides (window 16), layer 1 is global with twice the head width,
one KV head whose key projection doubles as the value's (K = V) and RoPE on
a quarter of the head; Gemma 4's norms (x * scale, query/key/value norms,
four per block), attention scale 1 and a layer scalar. Chat format, fast
engine, decoder, layouts and exports of Gemma 4 are tested further down.
"""

import json
import math
import os
import shutil

import jax
import keras
import keras_hub
import numpy as np
import pytest
from numerics import assert_close_at_scale
from test_model import fill_kagglehub_cache, hand_count_lora

from gemma_lora import data
from gemma_lora.adapters import files, merge, store
from gemma_lora.errors import ConfigError, PresetError
from gemma_lora.model import gemma4, layers, loading, presets
from gemma_lora.model.layers import model_inputs
from gemma_lora.training import engines, scoring

ALL = ("query", "key", "value", "attention_output", "ffw_gating", "ffw_gating_2", "ffw_linear")
IDS = np.array([[2, 300, 301, 302, 4, 5, 6, 7, 8, 9] * 3], "int32")  # 30 tokens: past the window of 16


def fresh(preset, **kwargs):
    return loading.load_causal_lm(preset, "float32", **kwargs)


def logits(causal_lm, ids=IDS):
    return np.asarray(causal_lm(model_inputs(causal_lm, ids, np.ones_like(ids, bool))))


def rows_of(causal_lm, config, n=8):
    examples = data.split(data.load_examples(config), config).train[:n]
    return data.tokenize_rows(examples, causal_lm.preprocessor.tokenizer, config)


def trained_like(causal_lm, targets=ALL, alpha=8.0, seed=0):
    layers = loading.enable_lora(causal_lm, 4, alpha, targets, seed=seed)
    rng = np.random.default_rng(seed)
    for layer in layers:
        layer.lora_kernel_b.assign(rng.normal(0, 0.2, layer.lora_kernel_b.shape).astype("float32"))
    return causal_lm


def test_tiny_gemma4_is_a_gemma4_text_model(tiny_gemma4_preset):
    causal_lm = fresh(tiny_gemma4_preset)
    backbone = causal_lm.backbone
    assert type(causal_lm).__name__ == "Gemma4CausalLM" and backbone.text_only_model
    local, world = (block.attention for block in backbone.transformer_layers)
    assert local.use_sliding_window_attention and not world.use_sliding_window_attention
    assert (local.head_dim, world.head_dim) == (16, 32)
    assert world.attention_k_eq_v and world.value_dense is None and world.effective_num_kv_heads == 1
    assert world.rotary_dim == 8 and local.rotary_dim == 16  # RoPE on a quarter of the global head
    assert backbone.final_logit_soft_cap == 30.0
    # The turn markers are single tokens of its vocabulary.
    tokenizer = causal_lm.preprocessor.tokenizer
    assert [tokenizer.id_to_token(tokenizer.token_to_id(m)) for m in gemma4.TURN_MARKERS] == list(gemma4.TURN_MARKERS)


def test_the_package_loads_a_gemma4_preset_as_gemma4causallm_where_kerashub_may_not(tiny_gemma4_preset):
    """Why model.load_causal_lm reads the class off the preset: KerasHub 0.32's CausalLM.from_preset
    picks one of the CausalLM subclasses whose backbone is a Gemma4Backbone, from a set (so either,
    by the process's hashing), and builds a Gemma4AssistantCausalLM when it draws that one."""
    from keras_hub.src.utils.preset_utils import list_subclasses

    candidates = {c.__name__ for c in list_subclasses(keras_hub.models.CausalLM)
                  if c.backbone_cls is keras_hub.models.Gemma4Backbone}
    assert candidates == {"Gemma4CausalLM", "Gemma4AssistantCausalLM"}
    assert type(fresh(tiny_gemma4_preset)).__name__ == "Gemma4CausalLM"


def test_trainable_parameters_match_the_hand_count_and_k_eq_v_layers_have_no_value(tiny_gemma4_preset):
    """Checklist 1 and 6: the seven projections take LoRA, except the value of a K = V (global) layer,
    which has no value projection (its values are its keys' projection, which LoRA on key reaches)."""
    causal_lm = fresh(tiny_gemma4_preset)
    expected = hand_count_lora(causal_lm.backbone, 8, ALL)
    layers = loading.enable_lora(causal_lm, 8, targets=ALL)
    assert loading.parameter_summary(causal_lm)["trainable_parameters"] == expected
    assert len(layers) == 2 * len(ALL) - 1
    assert not any(layer.path.startswith("decoder_block_1/attention/value") for layer in layers)
    with pytest.raises(ConfigError, match=r"\['value_norm'\] match no LoRA-able layer of this Gemma4Backbone. "
                                          r"LoRA-able layers here: attention_output, ffw_gating"):
        loading.enable_lora(fresh(tiny_gemma4_preset), 4, targets=("query", "value_norm"))


def test_keras_engine_keeps_the_base_changes_every_factor_lowers_the_loss_and_compiles_once(
        tiny_gemma4_preset, make_config):
    """Checklist 2, 5 and 7 on the Keras engine (LoRA on the feed-forward block included: KerasHub's
    Gemma 4 block multiplies by `layer.kernel`, which holds the LoRA update)."""
    traces = []

    def count(event, duration, fun_name="", **kwargs):
        if event == "/jax/core/compile/jaxpr_trace_duration" and fun_name == "train_step":
            traces.append(fun_name)

    jax.monitoring.register_event_duration_secs_listener(count)
    causal_lm = fresh(tiny_gemma4_preset, sequence_length=64)
    config = make_config(preset="tiny_gemma4", learning_rate=1e-2, epochs=6, batch_size=4, bucket_by_length=False)
    layers = loading.enable_lora(causal_lm, 8, targets=("query", "key", "ffw_linear"), seed=0)
    lora_ids = {id(v) for layer in layers for v in (layer.lora_kernel_a, layer.lora_kernel_b)}
    frozen = {v.path: np.array(v) for v in causal_lm.weights if id(v) not in lora_ids}
    factors = {v.path: np.array(v) for v in causal_lm.weights if id(v) in lora_ids}
    rows = rows_of(causal_lm, config)
    engines.compile_for_training(causal_lm, config)
    before = scoring.token_loss(causal_lm, rows)["token_loss"]
    engines.fit(causal_lm, rows, config, verbose=0)
    after = scoring.token_loss(causal_lm, rows)["token_loss"]
    assert after < before - 0.3, (before, after)
    weights = {v.path: np.array(v) for v in causal_lm.weights}
    for path, value in frozen.items():
        np.testing.assert_array_equal(weights[path], value, err_msg=path)
    assert all(not np.array_equal(weights[p], v) for p, v in factors.items())
    assert len(traces) == 1  # six epochs of one batch shape: one trace


@pytest.mark.slow
def test_adapter_reloads_onto_a_fresh_base_and_merges(tmp_path, tiny_gemma4_preset, make_config):
    """Checklist 3 and 4; the merged preset loads with KerasHub's own Gemma4CausalLM."""
    source = trained_like(fresh(tiny_gemma4_preset))
    store.save_adapter(source, tmp_path, make_config(preset="tiny_gemma4", lora_alpha=8.0, lora_targets=list(ALL)))
    target = fresh(tiny_gemma4_preset)
    assert np.abs(logits(target) - logits(source)).max() > 1e-2
    meta = store.load_adapter(target, tmp_path / files.ADAPTER_FILE)
    np.testing.assert_array_equal(logits(target), logits(source))
    assert meta["base_preset"] == "tiny_gemma4" and meta["backbone_class"] == "Gemma4Backbone"
    merged_dir = merge.merge_adapter(source, tiny_gemma4_preset, tmp_path / "m")
    merged = keras_hub.models.Gemma4CausalLM.from_preset(str(merged_dir))
    assert not layers.lora_layers(merged)
    np.testing.assert_allclose(logits(merged), logits(source), rtol=1e-5, atol=1e-5)


def test_assistant_presets_are_refused_with_kerashubs_reason(tmp_path, tiny_gemma4_preset):
    names = [n for n in keras_hub.models.CausalLM.presets if n.startswith("gemma4") and n.endswith("_assistant")]
    assert len(names) == 4
    for name in names:  # refused by name, before any download (no credentials here)
        with pytest.raises(PresetError, match=rf"{name} is a speculative-decoding assistant.*must NOT be used "
                                              rf"standalone.*--preset {name.removesuffix('_assistant')}"):
            presets.resolve_preset(name)
    # A directory holding one (its task.json names the class) is refused when loaded.
    fake = tmp_path / "assistant"
    shutil.copytree(tiny_gemma4_preset, fake)
    task = json.loads((fake / "task.json").read_text())
    (fake / "task.json").write_text(json.dumps({**task, "class_name": "Gemma4AssistantCausalLM"}))
    with pytest.raises(PresetError, match="is a Gemma4AssistantCausalLM.*must NOT be used standalone"):
        fresh(fake)


GEMMA4_PRESETS = ("gemma4_2b", "gemma4_instruct_2b", "gemma4_4b", "gemma4_instruct_4b", "gemma4_26b_a4b",
                  "gemma4_instruct_26b_a4b", "gemma4_31b", "gemma4_instruct_31b")


@pytest.mark.slow
def test_gemma4_presets_resolve_from_the_kagglehub_cache_offline_and_know_their_chat_format(tiny_gemma4_preset):
    for name in GEMMA4_PRESETS:
        handle = keras_hub.models.CausalLM.presets[name]["kaggle_handle"]  # kaggle://keras/gemma4/keras/<name>/<v>
        _, model_name, _, variation, version = handle.removeprefix("kaggle://").split("/")
        cached = fill_kagglehub_cache(tiny_gemma4_preset, version, model_name, variation)
        assert os.path.samefile(presets.resolve_preset(name), cached), name
        # The instruction-tuned ones default to Gemma 4's chat format, by name and by cache directory.
        expected = "gemma4" if "_instruct_" in name else None
        assert presets.chat_format_of(name) == expected and presets.chat_format_of(handle) == expected
        assert presets.chat_format_of(cached, cached) == expected
    causal_lm = fresh(presets.resolve_preset("gemma4_31b"))
    assert type(causal_lm.backbone).__name__ == "Gemma4Backbone"


def tiny_multimodal(tmp_path):
    """A tiny Gemma 4 with a vision and an audio encoder, saved as a preset (as KerasHub's gemma4_2b is laid out)."""
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    proto = spm_pb2.ModelProto()
    proto.ParseFromString(gemma4.tiny_proto())
    pieces = list(proto.pieces)
    del proto.pieces[:]
    proto.pieces.extend(pieces[:9])
    for piece in ("<|image>", "<|image|>", "<image|>", "<|video|>", "<|audio>", "<|audio|>", "<audio|>"):
        proto.pieces.add(piece=piece, score=0.0, type=spm_pb2.ModelProto.SentencePiece.USER_DEFINED)
    proto.pieces.extend(pieces[9:])
    proto.trainer_spec.vocab_size = len(proto.pieces)
    tokenizer = keras_hub.models.Gemma4Tokenizer(proto=proto.SerializeToString(), has_audio_tokens=True)
    keras.utils.set_random_seed(3)
    vision = keras_hub.models.Gemma4VisionEncoder(
        image_size=32, patch_size=8, num_heads=2, hidden_dim=16, num_layers=1, intermediate_dim=32, head_dim=8,
        output_dim=64, pool_size=2, position_embedding_size=16)
    audio = keras_hub.models.Gemma4AudioEncoder(
        input_feat_size=16, hidden_size=16, num_heads=2, num_layers=1, chunk_size=4, context_left=5,
        sscp_conv_channels=(8, 4), output_proj_dims=16, output_dim=64)
    backbone = keras_hub.models.Gemma4Backbone(
        vocabulary_size=tokenizer.vocabulary_size(), image_size=32, vision_encoder=vision, audio_encoder=audio,
        num_audio_tokens_per_clip=4, dtype="float32", **gemma4.TINY)
    preprocessor = keras_hub.models.Gemma4CausalLMPreprocessor(
        tokenizer, image_converter=keras_hub.layers.Gemma4ImageConverter(image_size=(32, 32), patch_size=8),
        sequence_length=64, num_vision_tokens_per_image=4, max_images_per_prompt=1)
    keras_hub.models.Gemma4CausalLM(backbone=backbone, preprocessor=preprocessor).save_to_preset(str(tmp_path / "mm"))
    return tmp_path / "mm", backbone


@pytest.mark.slow
def test_a_multimodal_preset_loads_as_its_text_stack(tmp_path):
    """The encoders are left out: never built, so never trained, adapted, merged or exported."""
    preset, full = tiny_multimodal(tmp_path)
    causal_lm = fresh(preset)
    backbone = causal_lm.backbone
    assert backbone.vision_encoder is None and backbone.audio_encoder is None and backbone.text_only_model
    assert causal_lm.preprocessor.image_converter is None and causal_lm.preprocessor.sequence_length == 64
    weights = {v.path: np.asarray(v) for v in full.weights}
    assert len(backbone.weights) < len(full.weights)
    for variable in backbone.weights:  # every text weight is the preset's own
        np.testing.assert_array_equal(np.asarray(variable), weights[variable.path], err_msg=variable.path)
    layers = loading.enable_lora(causal_lm, 4, targets=ALL)
    assert all(layer.path.startswith("decoder_block_") for layer in layers)


# --- chat format ----------------------------------------------------------------------------------

from test_chat import (  # noqa: E402
    CONVERSATION,
    EXCHANGES,
    SYSTEM,
    conversation_example,
    weighted_runs,
)

# Gemma 4's prompt formatting (ai.google.dev "Gemma 4 prompt formatting"): a system turn of its own.
RENDERED = f"<|turn>system\n{SYSTEM}<turn|>\n" + "\n".join(
    f"<|turn>user\n{q}<turn|>\n<|turn>model\n{a}<turn|>" for q, a in EXCHANGES)


@pytest.fixture(scope="module")
def tokenizer4(tiny_gemma4_preset):
    return keras_hub.models.Gemma4Tokenizer.from_preset(str(tiny_gemma4_preset))


def test_gemma4_markers_are_single_tokens_and_end_generation(tokenizer4):
    from gemma_lora.data import chat

    marks = chat.markers(tokenizer4)
    assert marks.format == chat.GEMMA4 and marks.system_role and marks.end_of_turn_token == "<turn|>"
    for name, token_id in zip(chat.TURN_MARKERS[chat.GEMMA4], (marks.start_of_turn, marks.end_of_turn)):
        assert tokenizer4.id_to_token(token_id) == name
        assert list(map(int, tokenizer4([name])[0])) == [token_id]
    assert marks.stop_ids == [marks.end_of_turn, tokenizer4.end_token_id]


def test_a_gemma4_vocabulary_without_its_markers_is_refused():
    from importlib import resources

    from gemma_lora.data import chat

    proto = (resources.files("gemma_lora") / "resources" / "tiny_vocab.spm").read_bytes()  # Gemma 1-3 markers only
    plain = keras_hub.models.Gemma4Tokenizer(proto=proto, has_vision_tokens=False, has_video_tokens=False)
    with pytest.raises(ConfigError, match=r"no single token for <\|turn> \(written as text it splits into \d+ pieces\), "
                                          r"so it cannot hold Gemma 4's chat format"):
        chat.markers(plain)


def test_gemma4_rows_have_a_system_turn_and_weigh_exactly_the_model_turns(tokenizer4, make_config):
    rows = data.tokenize_rows([conversation_example()], tokenizer4, make_config(sequence_length=128))
    assert weighted_runs(tokenizer4, rows, 0) == [f"{a}<turn|>" for _, a in EXCHANGES]
    ids = rows.token_ids[0][rows.padding_mask[0]].tolist()
    assert ids[0] == tokenizer4.start_token_id and ids.count(tokenizer4.start_token_id) == 1
    assert tokenizer4.detokenize([ids])[0] == RENDERED
    assert ids[1:] == list(map(int, tokenizer4([RENDERED])[0]))  # what the vocabulary makes of the rendered text
    # No system message (or an empty one): no system turn.
    no_system = conversation_example(CONVERSATION[1:])
    empty = conversation_example((("system", "  "), *CONVERSATION[1:]))
    for example in (no_system, empty):
        row = data.tokenize_rows([example], tokenizer4, make_config(sequence_length=128))
        text = tokenizer4.detokenize([row.token_ids[0][row.padding_mask[0]].tolist()])[0]
        assert text == RENDERED[RENDERED.index("<|turn>user"):]


def test_gemma4_prompts_ask_for_the_last_answer(tokenizer4):
    from gemma_lora.data import chat

    marks = chat.markers(tokenizer4)
    conversation, plain = chat.prompt_ids([conversation_example(), "Hi there"], tokenizer4, marks)
    assert tokenizer4.detokenize([conversation])[0] == RENDERED[: RENDERED.rindex("model\n") + len("model\n")]
    assert tokenizer4.detokenize([plain])[0] == "<|turn>user\nHi there<turn|>\n<|turn>model\n"
    row = chat.encode([conversation_example()], tokenizer4, marks)[0]
    assert row.ids[: len(conversation)] == conversation
    assert tokenizer4.detokenize([row.ids[len(conversation):]])[0] == EXCHANGES[-1][1] + "<turn|>"


# --- fast engine and decoder ------------------------------------------------------------------------


def randomize(causal_lm, seed=0):
    """Random norm scales and layer scalars (so a wrong norm formula or a dropped scalar shows), and
    random experts (KerasHub initialises them to zero)."""
    rng = np.random.default_rng(seed)
    for weight in causal_lm.backbone.weights:
        if weight.path.endswith("scale"):
            weight.assign(rng.normal(1.0, 0.4, weight.shape).astype("float32"))
        elif weight.path.endswith("layer_scalar"):
            weight.assign(np.float32(rng.uniform(0.5, 1.5)))
        elif "moe_expert_bank" in weight.path and weight.path.endswith("proj"):
            weight.assign(rng.normal(0, 0.1, weight.shape).astype("float32"))
    return causal_lm


def randomized(causal_lm, seed=0):
    """`randomize`, then LoRA on every projection with non-zero B factors."""
    return trained_like(randomize(causal_lm, seed), seed=seed)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [{}, dict(attention_logit_soft_cap=5.0, num_layers=4, sliding_window_size=4)])
def test_fast_logits_match_kerashub_float32(overrides):
    """The fast path reads Gemma 4 off the backbone: x * scale norms, value norm, K = V, partial RoPE,
    the global layer's own head width, layer scalars, attention scale 1, final soft cap (and an
    attention soft cap, which KerasHub's Gemma 4 takes too)."""
    from gemma_lora.fast import extract, forward

    causal_lm = randomized(gemma4.build_tiny_causal_lm(seed=1, **overrides))
    ids = np.random.default_rng(1).integers(10, 1000, (2, 24)).astype("int32")
    reference = logits(causal_lm, ids)
    config, frozen, lora = extract.extract_params(causal_lm, ALL, dtype="float32")
    assert config.layer_heads[:2] == ((16, 2, False, 16), (32, 1, True, 8))
    run = jax.jit(forward.logits, static_argnums=0)  # eager dispatch of every op would take most of the test
    got = np.asarray(run(config, frozen, lora, ids, np.ones_like(ids), np.tile(np.arange(24), (2, 1))))
    assert np.abs(got - reference).max() < 1e-5 * np.abs(reference).max()


@pytest.mark.slow
def test_both_engines_give_the_same_loss_and_gradient(tiny_gemma4_preset, make_config):
    from test_loop import first_moments

    config = make_config(preset="tiny_gemma4", batch_size=4, sequence_length=64, shuffle=False, bucket_by_length=False)
    results = []
    for engine in ("keras", "fast"):
        causal_lm = fresh(tiny_gemma4_preset, sequence_length=64)
        loading.enable_lora(causal_lm, 4, targets=ALL, seed=0)
        rows = rows_of(causal_lm, config, 4)
        engines.compile_for_training(causal_lm, config)
        if engine == "keras":
            stepper, batch = engines.KerasEngine().stepper(causal_lm, engines.KerasEngine().plan(rows, config)), np.arange(4)
        else:
            stepper = engines.FastEngine().stepper(causal_lm, engines.FastEngine().plan(rows, config))
            lengths = rows.padding_mask.sum(1)
            batch = {"token_ids": rows.token_ids, "labels": rows.labels, "loss_weights": rows.weights,
                     "segment_ids": (np.arange(64)[None, :] < lengths[:, None]).astype(np.int32),
                     "positions": np.tile(np.arange(64), (4, 1))}
        _, weight, loss = stepper.step(batch, 1.0 / stepper.batch_weight(batch))
        stepper.sync()
        results.append((loss, weight, first_moments(causal_lm)))
    (keras_loss, keras_weight, keras_m), (fast_loss, fast_weight, fast_m) = results
    assert keras_weight == fast_weight
    assert fast_loss == pytest.approx(keras_loss, rel=1e-5)
    for a, b in zip(keras_m, fast_m):
        assert_close_at_scale(b, a, rtol=1e-3)


def test_the_decoder_answers_as_kerashubs_generate(tiny_gemma4_preset):
    from gemma_lora.fast import decode
    from gemma_lora.sampling import keras_hub_batch

    causal_lm = randomized(fresh(tiny_gemma4_preset))
    prompts = [IDS[0, :20].tolist(), IDS[0, :7].tolist()]  # the first longer than the sliding window
    assert decode.unsupported_reason(causal_lm) is None
    ours = decode.decode_tokens(causal_lm, prompts, 8, stop_token_ids=[1])
    assert ours == keras_hub_batch(causal_lm, prompts, 8, stop_ids=[1])


def test_what_the_fast_path_cannot_run_is_refused_naming_the_field():
    from gemma_lora.fast import decode, extract

    causal_lm = gemma4.build_tiny_causal_lm(
        num_layers=4, enable_moe_block=True, num_experts=4, expert_intermediate_dim=16, num_experts_per_token=2,
        hidden_size_per_layer_input=8, num_kv_shared_layers=2)
    message = ("The fast path implements Gemma 4's dense text stack only; this Gemma4Backbone sets enable_moe_block "
               "(the mixture-of-experts feed-forward block), hidden_size_per_layer_input (per-layer token "
               "embeddings), num_kv_shared_layers (layers that reuse an earlier layer's keys and values). "
               "Train it with --engine keras.")
    with pytest.raises(ConfigError) as error:
        extract.check_model(causal_lm)
    assert str(error.value) == message and "\n" not in message
    assert decode.unsupported_reason(causal_lm) == message  # generation falls back to KerasHub's generate


# --- layouts --------------------------------------------------------------------------------------

# The text stacks of KerasHub's Gemma 4 presets as their published configs give them (vocabulary
# 262,144; head_dim 256 sliding, 512 global): 31B dense with K = V on 4 global KV heads, the 26B
# mixture of experts (128 experts), and E2B with per-layer embeddings (256 per layer).
GEMMA4_SHAPES = {
    "gemma4_31b": dict(vocabulary_size=262144, num_layers=60, num_query_heads=32, num_key_value_heads=16,
                       hidden_dim=5376, intermediate_dim=21504, head_dim=256, global_head_dim=512,
                       num_global_key_value_heads=4),
    "gemma4_26b_a4b": dict(vocabulary_size=262144, num_layers=30, num_query_heads=16, num_key_value_heads=8,
                           hidden_dim=2816, intermediate_dim=2112, head_dim=256, global_head_dim=512,
                           num_global_key_value_heads=2, enable_moe_block=True, num_experts=128,
                           expert_intermediate_dim=704),
    "gemma4_2b": dict(vocabulary_size=262144, num_layers=35, num_query_heads=8, num_key_value_heads=1,
                      hidden_dim=1536, intermediate_dim=6144, head_dim=256, global_head_dim=512,
                      hidden_size_per_layer_input=256),
}


def gemma4_shapes(c):
    """Every sharded variable's shape in a sliding (block 0) and a global (block 5) layer of config `c`."""
    n, k, d, f = c["num_query_heads"], c["num_key_value_heads"], c["hidden_dim"], c["intermediate_dim"]
    shapes = {"token_embedding/embeddings": (c["vocabulary_size"], d)}
    for block, h, kv in ((0, c["head_dim"], k), (5, c["global_head_dim"], c.get("num_global_key_value_heads") or k)):
        p = f"decoder_block_{block}"
        shapes.update({f"{p}/attention/query/kernel": (n, d, h), f"{p}/attention/key/kernel": (kv, d, h),
                       f"{p}/attention/attention_output/kernel": (n, h, d), f"{p}/ffw_gating/kernel": (d, f),
                       f"{p}/ffw_gating_2/kernel": (d, f), f"{p}/ffw_linear/kernel": (f, d)})
    shapes["decoder_block_0/attention/value/kernel"] = (k, d, c["head_dim"])
    if c.get("enable_moe_block"):
        e, i = c["num_experts"], c["expert_intermediate_dim"]
        shapes.update({"decoder_block_3/moe_expert_bank/gate_proj": (e, d, i),
                       "decoder_block_3/moe_expert_bank/up_proj": (e, d, i),
                       "decoder_block_3/moe_expert_bank/down_proj": (e, i, d)})
    if c.get("hidden_size_per_layer_input"):
        width = c["num_layers"] * c["hidden_size_per_layer_input"]
        shapes.update({"per_layer_token_embedding/embeddings": (c["vocabulary_size"], width),
                       "per_layer_model_projection/kernel": (d, width)})
    return shapes


@pytest.mark.parametrize("preset", sorted(GEMMA4_SHAPES))
@pytest.mark.parametrize("shape", [(1, 4), (2, 2), (2, 4), (1, 8)])
def test_the_layout_map_divides_every_gemma4_dimension_it_shards(preset, shape):
    from test_distribute import mesh

    from gemma_lora.parallel import distribute

    c = GEMMA4_SHAPES[preset]
    layout_map = distribute.gemma_layout_map(mesh(*shape), c)
    sizes = dict(zip(("batch", "model"), shape))
    for path, dims in gemma4_shapes(c).items():
        layout = layout_map[path]
        assert layout is not None and len(layout.axes) == len(dims), path
        for axis, dim in zip(layout.axes, dims):
            assert axis is None or dim % sizes[axis] == 0, (path, layout.axes, dims)
        if path.endswith(("query/kernel", "moe_expert_bank/gate_proj", "token_embedding/embeddings")):
            assert layout.axes[0] == "model", path  # heads, experts and vocabulary do split
    key = layout_map["decoder_block_5/attention/key/kernel"].axes[0]
    kv = math.gcd(c["num_key_value_heads"], c.get("num_global_key_value_heads") or c["num_key_value_heads"])
    assert key == ("model" if kv % shape[1] == 0 else None)  # 31B: 4 global KV heads split over 4, not over 8


# --- exports ----------------------------------------------------------------------------------------

# Gemma 4 text stacks the transformers export is checked on: tiny_gemma4 (31B's features), the
# mixture of experts (26B's), and per-layer embeddings with KV-shared, double-wide layers (E2B's).
MOE = dict(enable_moe_block=True, num_experts=4, expert_intermediate_dim=16, num_experts_per_token=2)
EXPORT_SHAPES = {
    "dense": {},
    "moe": MOE,
    "e2b-like": dict(num_layers=4, hidden_size_per_layer_input=8, num_kv_shared_layers=2, use_double_wide_mlp=True),
}


def hf_logits(folder, ids):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.no_grad():
        return type(hf).__name__, hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("shape", sorted(EXPORT_SHAPES))
def test_transformers_gives_the_merged_models_logits(tmp_path, shape):
    """KerasHub's Gemma 4 exporter with the package's corrections (attention_k_eq_v, proportional RoPE,
    the architecture name): transformers' Gemma4ForCausalLM computes the merged LoRA model's logits."""
    pytest.importorskip("transformers")
    from gemma_lora.export import export_transformers

    preset = tmp_path / "base"
    randomize(gemma4.build_tiny_causal_lm(seed=1, **EXPORT_SHAPES[shape])).save_to_preset(str(preset))
    lora = trained_like(fresh(preset))  # LoRA on every projection
    want = logits(lora)
    out = export_transformers(merge.merged_model(lora, preset), tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["attention_k_eq_v"] and config["rope_parameters"]["full_attention"]["rope_type"] == "proportional"
    name, got = hf_logits(out, IDS)
    assert name == "Gemma4ForCausalLM"
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "<|turn>user\nHello<turn|>\n"  # the turn markers stay single tokens
    assert tokenizer(text).input_ids == [2, *map(int, lora.preprocessor.tokenizer(text))]


def test_kerashubs_own_gemma4_export_is_refused_by_transformers(tmp_path, tiny_gemma4_preset):
    """Why the package corrects KerasHub's config: without attention_k_eq_v transformers expects a value
    projection and two KV heads in the global layer, and refuses the checkpoint."""
    pytest.importorskip("transformers")
    causal_lm = fresh(tiny_gemma4_preset)
    causal_lm.export_to_transformers(str(tmp_path / "stock"))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        hf_logits(tmp_path / "stock", IDS)


@pytest.mark.parametrize("overrides, reason", [
    (dict(attention_logit_soft_cap=5.0), "soft-caps attention logits"),
    (dict(num_layers=3), "its last layer slides"),
    (dict(num_layers=4, num_kv_shared_layers=2), "shares keys and values across layers without per-layer inputs"),
])
def test_what_transformers_would_compute_otherwise_is_refused(tmp_path, overrides, reason):
    from gemma_lora.errors import ExportError
    from gemma_lora.export import export_transformers

    with pytest.raises(ExportError, match=f"cannot be written as transformers' Gemma4ForCausalLM: .*{reason}"):
        export_transformers(gemma4.build_tiny_causal_lm(**overrides), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("shape", sorted(EXPORT_SHAPES))
def test_peft_gives_the_keras_adapter_models_logits(tmp_path, shape):
    """The adapter in PEFT's format (per-head attention LoRA as rank heads x r, per layer where the global
    layers have their own KV heads), on the exported base."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from gemma_lora.export import Provenance
    from gemma_lora.export.peft import export_peft

    preset = tmp_path / "base"
    randomize(gemma4.build_tiny_causal_lm(seed=1, **EXPORT_SHAPES[shape])).save_to_preset(str(preset))
    lora = trained_like(fresh(preset))
    want = logits(lora)
    out = export_peft(lora, tmp_path / "peft", Provenance("tiny_gemma4", "a.lora.h5"), base=fresh(preset))
    base = transformers.AutoModelForCausalLM.from_pretrained(str(out / "base"), dtype=torch.float32)
    tuned = peft.PeftModel.from_pretrained(base, str(out))
    tuned.eval()
    with torch.no_grad():
        got = tuned(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
    config = json.loads((out / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


# --- mixture of experts -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["moe", "e2b-like"])
def test_moe_and_e2b_shapes_train_on_the_keras_engine(tmp_path, make_config, shape):
    """In a mixture-of-experts block LoRA takes the attention projections and the block's dense MLP
    (ffw_gating, ffw_gating_2, ffw_linear, run beside the experts); the experts are one Gemma4MoEBlock
    holding (experts, in, out) weight tensors, not Dense/EinsumDense layers, so Keras' LoRA cannot attach
    to them: they stay frozen. E2B's shape (per-layer embeddings, KV-shared layers, which have no key or
    value projection of their own) trains the same way. Checklist 1, 2, 3, 4 and 5 on each."""
    preset = tmp_path / shape
    randomize(gemma4.build_tiny_causal_lm(seed=1, **EXPORT_SHAPES[shape])).save_to_preset(str(preset))
    causal_lm = fresh(preset, sequence_length=64)
    expected = hand_count_lora(causal_lm.backbone, 4, ALL)
    layers = loading.enable_lora(causal_lm, 4, targets=ALL, seed=0)
    assert loading.parameter_summary(causal_lm)["trainable_parameters"] == expected
    assert {layer.name for layer in layers} == set(ALL)
    assert all("lora_kernel" in v.path for v in causal_lm.trainable_variables)  # experts, router, tables frozen
    frozen = {v.path: np.array(v) for v in causal_lm.weights if "lora" not in v.path}
    config = make_config(preset=str(preset), learning_rate=1e-2, epochs=4, batch_size=4, bucket_by_length=False)
    rows = rows_of(causal_lm, config)
    engines.compile_for_training(causal_lm, config)
    before = scoring.token_loss(causal_lm, rows)["token_loss"]
    engines.fit(causal_lm, rows, config, verbose=0)
    assert scoring.token_loss(causal_lm, rows)["token_loss"] < before - 0.3
    for v in causal_lm.weights:
        if v.path in frozen:
            np.testing.assert_array_equal(np.array(v), frozen[v.path], err_msg=v.path)
    store.save_adapter(causal_lm, tmp_path, make_config(preset=str(preset), lora_targets=list(ALL)))
    reloaded = fresh(preset)
    store.load_adapter(reloaded, tmp_path / files.ADAPTER_FILE)
    np.testing.assert_array_equal(logits(reloaded), logits(causal_lm))
    merged = keras_hub.models.Gemma4CausalLM.from_preset(str(merge.merge_adapter(causal_lm, preset, tmp_path / "m")))
    np.testing.assert_allclose(logits(merged), logits(causal_lm), rtol=1e-5, atol=1e-5)


# --- GGUF -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_exports(tmp_path_factory):
    """{shape: (LoRA model, GGUF path)}: each merged model written as f32 GGUF, chat format gemma4."""
    pytest.importorskip("gguf")
    from gemma_lora.export import Provenance
    from gemma_lora.export.gguf import export_gguf

    tmp = tmp_path_factory.mktemp("gguf")
    out = {}
    for shape, overrides in EXPORT_SHAPES.items():
        preset = tmp / f"{shape}-base"
        randomize(gemma4.build_tiny_causal_lm(seed=1, **overrides)).save_to_preset(str(preset))
        lora = trained_like(fresh(preset))
        meta = {"rank": 4, "alpha": 8.0, "targets": list(ALL), "chat_format": "gemma4"}
        out[shape] = lora, export_gguf(merge.merged_model(lora, preset), tmp / f"{shape}.gguf", "f32",
                                       Provenance("tiny_gemma4", "a.lora.h5", meta))
    return out


def test_gguf_has_llama_cpps_gemma4_fields(gguf_exports):
    import gguf

    _, path = gguf_exports["dense"]
    reader = gguf.GGUFReader(path)
    field = lambda key: reader.get_field(key).contents()  # noqa: E731
    assert field("general.architecture") == "gemma4"
    assert field("gemma4.attention.head_count_kv") == [2, 1]  # sliding layer 2 KV heads, global (K = V) 1
    assert field("gemma4.attention.sliding_window_pattern") == [True, False]
    assert (field("gemma4.attention.key_length"), field("gemma4.attention.key_length_swa")) == (32, 16)
    names = {t.name for t in reader.tensors}
    assert "blk.1.attn_v.weight" not in names and "blk.0.attn_v.weight" in names  # K = V: no value tensor
    assert {"rope_freqs.weight", "blk.0.layer_output_scale.weight"} <= names
    assert "<|turn>" in field("tokenizer.chat_template")
    assert 'PARAMETER stop "<turn|>"' in path.with_suffix(".Modelfile").read_text()


@pytest.mark.parametrize("shape", sorted(EXPORT_SHAPES))
def test_llama_cpp_gives_the_keras_logits_and_tokens(gguf_exports, shape):
    """llama.cpp's own gemma4 loader, graph and tokenizer (llama-cpp-python): dense, MoE, E2B-like."""
    llama_cpp = pytest.importorskip("llama_cpp")
    lora, path = gguf_exports[shape]
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, verbose=False, type_k=0, type_v=0)
    llm.eval(IDS[0].tolist())
    got, want = np.asarray(llm.scores[: IDS.shape[1]]), logits(lora)[0]
    # f32 KV cache; ggml evaluates GELU from a float16 table, about 1e-3 of the logits' scale.
    assert np.abs(got - want).max() <= 3e-3 * np.abs(want).max()
    text = f"<|turn>user\n{EXCHANGES[0][0]}<turn|>\n<|turn>model\n"
    assert llm.tokenize(text.encode(), add_bos=True, special=True)[1:] == list(map(int, lora.preprocessor.tokenizer(text)))


@pytest.mark.parametrize("system", ["Be brief.", "  ", None])
def test_the_exported_gemma4_chat_template_writes_turns_as_training_did(system, tokenizer4):
    jinja2 = pytest.importorskip("jinja2")
    from gemma_lora.data import Example, chat
    from gemma_lora.export import GEMMA4_CHAT_TEMPLATE

    turns = [("user", " Hi there "), ("assistant", "Hello."), ("user", "Name a colour."), ("assistant", "Blue.")]
    if system is not None:
        turns.insert(0, ("system", system))
    example = Example("", "", conversation=tuple(turns))
    row = chat.encode([example], tokenizer4, chat.markers(tokenizer4))[0]
    expected = tokenizer4.detokenize([row.ids])[0] + "\n"
    messages = [{"role": role, "content": content} for role, content in turns]
    template = jinja2.Environment().from_string(GEMMA4_CHAT_TEMPLATE)
    assert template.render(messages=messages, bos_token="", add_generation_prompt=False) == expected
    prompt = template.render(messages=messages[:-1], bos_token="", add_generation_prompt=True)
    assert prompt == expected[: expected.rindex("Blue.")]
