"""Export a merged model to a Hugging Face transformers folder: right, or refused before writing.

    gemma-lora export runs/<run>/adapter.lora.h5 hf_model/   # merge, then export
    gemma-lora export merged/ hf_model/                       # a merged preset directory

    transformers.AutoModelForCausalLM.from_pretrained("hf_model")

KerasHub's exporter (keras-hub 0.32) writes the config, the tokenizer and
most tensors; where it is wrong, this module corrects it or refuses:
- its Gemma weight map keeps only the first key/value head
  (`key_dense.weights[0][0]`), and lays the query projection out right only
  when heads x head_dim equals the hidden size (gemma_2b_en: 8 x 256 = 2048;
  gemma_7b_en: 16 x 256 != 3072, and 16 KV heads): the q/k/v projections are
  written here from the whole kernels;
- its Gemma config leaves out the RMSNorm epsilon and the architecture name,
  its Gemma 3 config the attention and final logit soft caps: added here;
  its Gemma 3 query scale is the backbone's setting, which keras-hub 0.32's
  attention ignores (`export.query_scale_width`): the one used is written;
- it writes Gemma 2 (a GemmaBackbone with post norms, soft caps and a
  sliding window) as Gemma 1 without them, and its norm map puts the pre-FFW
  norm where transformers' Gemma 2 reads the post-attention one: a Gemma 2 is
  written here as `Gemma2ForCausalLM` (model type gemma2: both soft caps,
  the four norms of each layer, every KV head, the query scale the Keras model
  uses, the sliding window and which layers slide);
- its Gemma 4 config leaves out `attention_k_eq_v`, so transformers gives
  the global layers of a K = V model (gemma4_31b, gemma4_26b_a4b) a value
  projection and as many KV heads as the sliding ones, and refuses the
  checkpoint; it names the architecture Gemma4TextForCausalLM, which
  transformers does not have; and its RoPE parameters name no rope_type,
  so transformers rotates the global layers' partial share of each head
  with frequencies of that width instead of the whole head's ("proportional"):
  all three are set here (Gemma4ForCausalLM, model type gemma4_text: text
  only, as the package trains it);
- shapes transformers' Gemma2ForCausalLM, Gemma3ForCausalLM or
  Gemma4ForCausalLM cannot express are refused (for Gemma 4: an attention
  soft cap, which its text attention does not apply; a last layer that
  slides, which it makes global; RoPE scaling factors, which it does not
  read), as is every other architecture (no logit test here covers them).
The weights come from the model's variables as they are, so a model with
LoRA still attached or quantized weights is refused (see export.check_plain).
"""

import json
from pathlib import Path

import numpy as np

from gemma_lora.errors import ExportError
from gemma_lora.export import check_new, check_plain, gemma2_features, query_scale_width
from gemma_lora.io import atomic_dir

# Backbones whose export is checked against transformers' logits (tests/unit/test_export.py).
SUPPORTED = ("Gemma3Backbone", "GemmaBackbone", "Gemma4Backbone")
ARCHITECTURES = {"GemmaBackbone": "GemmaForCausalLM", "Gemma3Backbone": "Gemma3ForCausalLM",
                 "Gemma4Backbone": "Gemma4ForCausalLM"}
GEMMA2_ARCHITECTURE = "Gemma2ForCausalLM"  # a GemmaBackbone with Gemma 2's features
# KerasHub's Gemma (1) map names the pre-FFW norm `post_attention_layernorm`
# (Gemma 1's name for it); transformers' Gemma 2 has four norms per layer.
GEMMA2_NORMS = {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "pre_ffw_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
# KerasHub layer name → the Hugging Face module it becomes (inside model.layers.{i}),
# and how its kernel is laid out (see `hf_weight`).
HF_MODULES = {
    "query": ("self_attn.q_proj", "heads_in"),
    "key": ("self_attn.k_proj", "heads_in"),
    "value": ("self_attn.v_proj", "heads_in"),
    "attention_output": ("self_attn.o_proj", "heads_out"),
    "ffw_gating": ("mlp.gate_proj", "dense"),
    "ffw_gating_2": ("mlp.up_proj", "dense"),
    "ffw_linear": ("mlp.down_proj", "dense"),
}


def supported_backbones():
    """Backbone class names this package exports to transformers (each checked by a logit test)."""
    return list(SUPPORTED)


def refusal(backbone):
    """Why `backbone` cannot be written as a right transformers model, or None when it can."""
    name = type(backbone).__name__
    if name not in SUPPORTED:
        return f"gemma-lora cannot export a {name} to transformers; it can export {', '.join(SUPPORTED)}."
    if name == "GemmaBackbone":
        gemma2 = gemma2_features(backbone)
        if gemma2 and not (backbone.use_post_attention_norm and backbone.use_post_ffw_norm):
            return (
                f"This GemmaBackbone has some of Gemma 2's features ({', '.join(gemma2)}) but not both post norms; "
                "transformers' Gemma2ForCausalLM always applies them, and its Gemma has none of these."
            )
        if not gemma2 and query_scale_width(backbone) != backbone.head_dim:
            return "This GemmaBackbone scales queries by hidden/heads; transformers' Gemma scales them by head_dim."
        return None
    if name == "Gemma4Backbone":
        return gemma4_refusal(backbone)
    missing = [
        what for what, on in (
            ("query/key norms", backbone.use_query_key_norm),
            ("post-attention norms", backbone.use_post_attention_norm),
            ("post-FFW norms", backbone.use_post_ffw_norm),
        ) if not on
    ]
    if missing:
        return f"This Gemma3Backbone has no {', '.join(missing)}; transformers' Gemma3ForCausalLM always applies them."
    if backbone.vision_encoder is not None:
        return (
            "This Gemma 3 has a vision encoder; only text-only Gemma 3 exports are checked here. "
            "Train on the text-only preset (e.g. gemma3_4b_text)."
        )
    if getattr(backbone, "is_embedding_model", False):
        return "This Gemma3Backbone is an embedding model, not a causal LM."
    return None


def gemma4_refusal(backbone):
    """Why a Gemma4Backbone cannot be written as transformers' Gemma4ForCausalLM, or None."""
    problems = []
    if not backbone.text_only_model:
        problems.append("it has a vision or audio encoder (the package exports the text stack it trains)")
    if backbone.attention_logit_soft_cap is not None:
        problems.append(f"it soft-caps attention logits ({backbone.attention_logit_soft_cap:g}), which transformers' "
                        "Gemma 4 text attention does not")
    if backbone.layer_types and backbone.layer_types[-1] != "full_attention":
        problems.append("its last layer slides, and transformers' Gemma 4 makes the last layer global")
    if backbone.local_rope_scaling_factor != 1.0 or backbone.global_rope_scaling_factor != 1.0:
        problems.append("it scales RoPE positions, which KerasHub's exporter does not write")
    if backbone.num_kv_shared_layers and not backbone.hidden_size_per_layer_input:
        # transformers 5.x slices per-layer inputs for KV-shared layers unconditionally (Gemma 4 E2B/E4B have both).
        problems.append("it shares keys and values across layers without per-layer inputs, which transformers' "
                        "Gemma 4 cannot run")
    if backbone.is_embedding_model or backbone.use_bidirectional_attention:
        problems.append("it is an embedding model, not a causal LM")
    if problems:
        return "This Gemma 4 cannot be written as transformers' Gemma4ForCausalLM: " + "; ".join(problems) + "."
    return None


def export_transformers(causal_lm, output_dir):
    """Write `causal_lm` (weights, config, tokenizer) as a transformers folder, atomically.

    Args:
        causal_lm: a KerasHub GemmaCausalLM (Gemma 1 or 2) or text-only
            Gemma3CausalLM without LoRA and without quantized weights.
        output_dir: the new folder (must not exist).

    Returns:
        The output directory.

    Raises:
        ExportError: LoRA is still enabled, the weights are quantized, or the
            architecture cannot be written right (the message says why).
        OutputError: `output_dir` exists or cannot be written.
    """
    check_plain(causal_lm, "transformers")
    reason = refusal(causal_lm.backbone)
    if reason:
        raise ExportError(reason)
    output_dir = check_new(output_dir)
    with atomic_dir(output_dir) as staging:
        write_transformers(causal_lm, staging)
    return output_dir


def write_transformers(causal_lm, directory):
    """Write the transformers files into an existing `directory` (checks done by the caller)."""
    from keras_hub.src.utils.transformers.export import hf_exporter
    from safetensors.numpy import save_file

    directory = Path(directory)
    backbone = causal_lm.backbone
    tokenizer = causal_lm.preprocessor.tokenizer if causal_lm.preprocessor is not None else None
    config = hf_config(backbone, tokenizer)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # safetensors writes an array's buffer as it lies: transposed views must be made C-ordered first.
    weights = {name: np.ascontiguousarray(array) for name, array in hf_weights(backbone).items()}
    save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        hf_exporter.export_tokenizer(tokenizer, str(directory))
        generation = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
        (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def hf_config(backbone, tokenizer=None):
    """KerasHub's transformers config for `backbone`, with the fields it leaves out or gets wrong."""
    from keras_hub.src.utils.transformers.export import hf_exporter

    name = type(backbone).__name__
    config = hf_exporter.MODEL_CONFIGS[name](backbone)
    config["architectures"] = [ARCHITECTURES[name]]
    if name == "Gemma4Backbone":
        # KerasHub's global layers take K = V exactly when num_global_key_value_heads is set.
        config["attention_k_eq_v"] = backbone.num_global_key_value_heads is not None
        # Without a rope_type transformers reads partial_rotary_factor as "rotate that share of the head
        # with frequencies of that width"; KerasHub's (and Google's) is "proportional": the frequencies of
        # the whole head, the rest not rotated.
        rope = config["rope_parameters"]
        rope["full_attention"]["rope_type"] = "proportional"
        rope["sliding_attention"]["rope_type"] = "default"
    config["rms_norm_eps"] = backbone.layer_norm_epsilon
    if name == "Gemma3Backbone":
        config["attn_logit_softcapping"] = backbone.attention_logit_soft_cap
        config["final_logit_softcapping"] = backbone.final_logit_soft_cap
        # KerasHub writes the backbone's setting (hidden/heads for gemma3_27b), not what its attention computes.
        config["query_pre_attn_scalar"] = query_scale_width(backbone)
    elif name == "GemmaBackbone" and gemma2_features(backbone):
        config.update(gemma2_config(backbone))
    if tokenizer is not None:
        # The ids of this vocabulary (KerasHub's Gemma 3 config hard-codes
        # bos 1 / eos 2, which are Gemma's eos / bos).
        config["bos_token_id"] = tokenizer.token_to_id("<bos>")
        config["eos_token_id"] = tokenizer.token_to_id("<eos>")
        config["pad_token_id"] = tokenizer.token_to_id("<pad>")
    return config


def gemma2_config(backbone):
    """transformers' Gemma2Config fields for a GemmaBackbone with Gemma 2's features, as Keras computes them."""
    blocks = backbone.transformer_layers
    rope = blocks[0].attention.rope_layer
    return {
        "architectures": [GEMMA2_ARCHITECTURE],
        "model_type": "gemma2",
        "hidden_activation": "gelu_pytorch_tanh",  # KerasHub: gelu(approximate=True)
        # transformers scales queries by query_pre_attn_scalar ** -0.5.
        "query_pre_attn_scalar": query_scale_width(backbone),
        "attn_logit_softcapping": backbone.attention_logit_soft_cap,
        "final_logit_softcapping": backbone.token_embedding.logit_soft_cap,
        "sliding_window": backbone.sliding_window_size,
        # Which layers slide, as the Keras blocks do (KerasHub: 0, 2, 4, ...; none without a window).
        "layer_types": [
            "sliding_attention" if block.attention.use_sliding_window_attention else "full_attention"
            for block in blocks
        ],
        "rope_parameters": {"rope_type": "default", "rope_theta": float(rope.max_wavelength)},
    }


def hf_weights(backbone):
    """{transformers tensor name: float array} for `backbone`: KerasHub's map, q/k/v projections and
    Gemma 2's norms corrected."""
    from keras_hub.src.utils.transformers.export import hf_exporter

    weights = hf_exporter.MODEL_EXPORTERS[type(backbone).__name__](backbone, include_lm_head=True)
    weights = {name: np.asarray(tensor) for name, tensor in weights.items()}
    if type(backbone).__name__ == "Gemma4Backbone":
        return weights  # KerasHub's Gemma 4 map writes every head (checked by transformers' logits)
    gemma2 = type(backbone).__name__ == "GemmaBackbone" and bool(gemma2_features(backbone))
    for i, block in enumerate(backbone.transformer_layers):
        attention = block.attention
        for layer in (attention.query_dense, attention.key_dense, attention.value_dense):
            module, layout = HF_MODULES[layer.name]
            # Every head, head-major (KerasHub's Gemma map keeps one k/v head, and
            # scrambles q unless heads x head_dim == hidden).
            weights[f"model.layers.{i}.{module}.weight"] = hf_weight(np.asarray(layer.kernel), layout)
        if gemma2:
            for hf_name, keras_name in GEMMA2_NORMS.items():
                weights[f"model.layers.{i}.{hf_name}.weight"] = np.asarray(getattr(block, keras_name).scale)
    return weights


def hf_weight(kernel, layout):
    """A KerasHub kernel as the (out, in) weight of the transformers Linear it becomes.

    heads_in: (heads, hidden, head_dim) → (heads·head_dim, hidden), head-major
    as transformers splits q/k/v; heads_out: (heads, head_dim, hidden) →
    (hidden, heads·head_dim); dense: (in, out) → (out, in).
    """
    if layout == "heads_in":
        return kernel.transpose(0, 2, 1).reshape(-1, kernel.shape[1])
    if layout == "heads_out":
        return kernel.transpose(2, 0, 1).reshape(kernel.shape[2], -1)
    return kernel.T


def hf_module_paths(backbone):
    """{id(KerasHub layer): transformers module path} for every projection of `backbone`."""
    paths = {}
    for i, block in enumerate(backbone.transformer_layers):
        attention = block.attention
        for layer in (attention.query_dense, attention.key_dense, attention.value_dense, attention.output_dense,
                      block.gating_ffw, block.gating_ffw_2, block.ffw_linear):
            if layer is None:  # a Gemma 4 K = V layer has no value projection
                continue
            if layer.name not in HF_MODULES:
                raise ExportError(f"Unexpected layer {layer.path} in {type(backbone).__name__}; cannot map it to transformers.")
            paths[id(layer)] = f"model.layers.{i}.{HF_MODULES[layer.name][0]}"
    return paths
