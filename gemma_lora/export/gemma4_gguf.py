"""Gemma 4 (text) in llama.cpp's `gemma4` conventions: hyper-parameters, tensors, refusals.

llama.cpp's converter (convert_hf_to_gguf.py, `Gemma4Model`) reads a
transformers Gemma 4 checkpoint. The package writes what it would write from
the transformers folder `export.hf` makes of the same model (whose logits
transformers reproduces): the same tensors under gguf-py's own name map for
`gemma4`, RMSNorm weights as they are (Gemma 4 scales by w, not 1 + w), the
router's scale and the experts' output scales under the names llama.cpp
reads, and its hyper-parameters, the per-layer ones as arrays. The vocabulary
is the SentencePiece one, written as for Gemma 3 (gguf.py `write_vocabulary`).
"""

import numpy as np

from gemma_lora.export.hf import gemma4_refusal, hf_weights

# transformers' default context for Gemma 4 (Gemma4TextConfig.max_position_embeddings),
# which llama.cpp's converter writes: KerasHub's backbone records none.
CONTEXT_LENGTH = 131_072


def refusal(backbone):
    """Why llama.cpp's gemma4 graph would compute something else for `backbone`, or None.

    The tensors are the transformers export's, so what that refuses is refused here too.
    """
    reason = gemma4_refusal(backbone)
    if reason:
        return reason.replace("transformers' Gemma4ForCausalLM", "llama.cpp's gemma4 (from the transformers tensors)")
    global_head = backbone.global_head_dim or backbone.head_dim
    if (global_head * backbone.global_rope_partial_rotary_factor) % 2:
        return (f"Its global layers turn {global_head * backbone.global_rope_partial_rotary_factor:g} of "
                f"{global_head} head dimensions with RoPE; llama.cpp's rope_freqs needs a whole number of pairs.")
    return None


def layer_is_sliding(backbone):
    return [block.use_sliding_window_attention for block in backbone.transformer_layers]


def write_hyperparameters(writer, backbone):
    """What llama.cpp's converter writes for a Gemma4ForCausalLM config of this backbone."""
    sliding = layer_is_sliding(backbone)
    global_kv = backbone.num_global_key_value_heads or backbone.num_key_value_heads
    global_head = backbone.global_head_dim or backbone.head_dim
    writer.add_context_length(CONTEXT_LENGTH)
    writer.add_embedding_length(backbone.hidden_dim)
    writer.add_block_count(backbone.num_layers)
    ffw = [int(block.actual_intermediate_dim) for block in backbone.transformer_layers]
    writer.add_feed_forward_length(ffw if len(set(ffw)) > 1 else ffw[0])  # double-wide KV-shared layers
    writer.add_head_count(backbone.num_query_heads)
    writer.add_head_count_kv([backbone.num_key_value_heads if s else global_kv for s in sliding])
    writer.add_layer_norm_rms_eps(backbone.layer_norm_epsilon)
    blocks = backbone.transformer_layers
    writer.add_rope_freq_base(next((b.attention.rope_wavelength for b in blocks if not b.use_sliding_window_attention),
                                   backbone.global_rope_wavelength or 1_000_000.0))
    writer.add_rope_freq_base_swa(next((b.attention.rope_wavelength for b in blocks if b.use_sliding_window_attention),
                                       backbone.local_rope_wavelength or 10_000.0))
    writer.add_key_length(global_head)
    writer.add_value_length(global_head)
    writer.add_key_length_swa(backbone.head_dim)
    writer.add_value_length_swa(backbone.head_dim)
    # "proportional" RoPE: the whole global head's frequencies, the unturned pairs masked by rope_freqs.
    writer.add_rope_dimension_count(global_head)
    writer.add_rope_dimension_count_swa(backbone.head_dim)
    writer.add_sliding_window(backbone.sliding_window_size)
    writer.add_sliding_window_pattern(sliding)
    if backbone.final_logit_soft_cap:
        writer.add_final_logit_softcapping(backbone.final_logit_soft_cap)
    writer.add_shared_kv_layers(backbone.num_kv_shared_layers)
    writer.add_embedding_length_per_layer_input(backbone.hidden_size_per_layer_input or 0)
    if backbone.enable_moe_block:
        writer.add_expert_count(backbone.num_experts)
        writer.add_expert_used_count(backbone.num_experts_per_token)
        writer.add_expert_feed_forward_length(backbone.expert_intermediate_dim)


def tensors(backbone):
    """(GGUF name, float32 array) for every tensor: the transformers export's, as llama.cpp's converter renames them."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA4, backbone.num_layers)
    for name, array in hf_weights(backbone).items():
        array = np.asarray(array, np.float32)
        if name == "lm_head.weight":
            continue  # tied to the embedding
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        if name.endswith("router.scale"):
            yield f"blk.{layer}.ffn_gate_inp.scale", array
            continue
        if name.endswith("router.per_expert_scale"):  # llama.cpp scales each expert's down projection
            yield f"blk.{layer}.ffn_down_exps.scale", array
            continue
        if not name.endswith(".weight"):  # layer_scalar, experts.gate_up_proj, experts.down_proj
            name += ".weight"
        mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            from gemma_lora.errors import ExportError

            raise ExportError(f"gguf-py has no gemma4 name for {name}; update the gguf package (pip install -U gguf).")
        yield mapped, array
    # Proportional RoPE on global layers: llama.cpp turns the first pairs of each head and,
    # with a frequency factor of 1e30, leaves the others (as its converter writes it).
    global_head = backbone.global_head_dim or backbone.head_dim
    turned = int(global_head * backbone.global_rope_partial_rotary_factor / 2)
    yield "rope_freqs.weight", np.array([1.0] * turned + [1e30] * (global_head // 2 - turned), np.float32)
