"""Export a LoRA adapter in PEFT's format, exact for KerasHub's per-head factors.

    gemma-lora export runs/<run>/adapter.lora.h5 peft_adapter/ --to peft [--with-base]

    base = transformers.AutoModelForCausalLM.from_pretrained("peft_adapter/base")
    model = peft.PeftModel.from_pretrained(base, "peft_adapter")

KerasHub's LoRA is not PEFT's on attention. A query/key/value kernel has
shape (heads, hidden, head_dim); KerasHub gives it `lora_kernel_a` of shape
(heads, hidden, r) and `lora_kernel_b` of shape (r, head_dim): every head has
its own A and all share B. As one (heads·head_dim, hidden) matrix, that
update has rank up to heads·r, so the PEFT module gets rank heads·r: its A
is the heads' A factors stacked, its B holds the shared B once per head on
the block diagonal. The product is the same matrix, not an approximation.
The attention output (A per head, (heads, head_dim, r)) and the FFW layers
are plain rank-r products and keep rank r.

Scaling: KerasHub scales by alpha/r. The adapter config keeps `r` and
`lora_alpha` as trained, and records the larger modules' rank heads·r in
`rank_pattern` with `alpha_pattern` alpha·heads, so PEFT's alpha/rank is
alpha/r for every module (a reader that ignores the patterns and takes the
rank from the tensors still scales by lora_alpha/r, also right).
"""

import json

import numpy as np

from gemma_lora.errors import ExportError
from gemma_lora.export import check_new, check_plain
from gemma_lora.export.hf import (
    HF_MODULES,
    hf_module_paths,
    refusal,
    write_transformers,
)
from gemma_lora.io import atomic_dir

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
BASE_DIR = "base"
# Google's presets whose transformers checkpoint on the Hugging Face Hub is a
# text-only causal LM (module paths model.layers.N...., as the adapter names
# them). Gemma 3 4B and larger are published as image-text models, whose
# language layers sit under another path: use --with-base for those.
HUB_CHECKPOINTS = {
    "gemma_2b_en": "google/gemma-2b",
    "gemma_instruct_2b_en": "google/gemma-2b-it",
    "gemma_1.1_instruct_2b_en": "google/gemma-1.1-2b-it",
    "gemma_7b_en": "google/gemma-7b",
    "gemma_instruct_7b_en": "google/gemma-7b-it",
    "gemma_1.1_instruct_7b_en": "google/gemma-1.1-7b-it",
    "gemma2_2b_en": "google/gemma-2-2b",
    "gemma2_instruct_2b_en": "google/gemma-2-2b-it",
    "gemma2_9b_en": "google/gemma-2-9b",
    "gemma2_instruct_9b_en": "google/gemma-2-9b-it",
    # Not gemma2_27b_en: keras-hub 0.32 scales its queries by 1/sqrt(128)
    # (see export.query_scale_width), Google's google/gemma-2-27b by 1/sqrt(144);
    # an adapter trained on the one is not for the other (use --with-base).
    "gemma3_270m": "google/gemma-3-270m",
    "gemma3_instruct_270m": "google/gemma-3-270m-it",
    "gemma3_1b": "google/gemma-3-1b-pt",
    "gemma3_instruct_1b": "google/gemma-3-1b-it",
}
DEMO_NAMES = ("demo", "gemma3_270m_gguf")
# The --max-lora-rank values vLLM accepts (its LoRA kernels are built for these).
VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def export_peft(causal_lm, output_dir, provenance, base=None):
    """Write the LoRA adapter on `causal_lm` as a PEFT adapter folder, atomically.

    Args:
        causal_lm: a CausalLM with the adapter applied (LoRA enabled), float base.
        output_dir: the new folder (must not exist).
        provenance: `Provenance` naming the base preset and the adapter.
        base: None, or a plain CausalLM of the same base (no LoRA), written
            as a transformers folder in `output_dir/base` (--with-base).

    Returns:
        The output directory.

    Raises:
        ExportError: no LoRA, a quantized base (the adapter fits that base,
            not the float one PEFT applies it to), a LoRA layer PEFT has no
            module for, or a base transformers cannot load right.
        OutputError: `output_dir` exists or cannot be written.
    """
    from safetensors.numpy import save_file

    from gemma_lora.model.layers import lora_layers
    from gemma_lora.model.quantize import quantization_mode

    layers = lora_layers(causal_lm)
    if not layers:
        raise ExportError("This model has no LoRA layers: there is no adapter to export. Pass a .lora.h5 adapter.")
    mode = quantization_mode(causal_lm)
    if mode is not None:
        raise ExportError(
            f"This adapter was trained on a base stored as {mode}; PEFT would apply it to the float base, which "
            "gives other logits. Export the merged model instead (--to hf or --to gguf)."
        )
    reason = refusal(causal_lm.backbone)
    if reason:
        raise ExportError(reason)
    if base is not None:
        check_plain(base, "transformers")
    output_dir = check_new(output_dir)
    tensors, config = adapter_tensors(causal_lm, layers)
    config["base_model_name_or_path"] = (
        str(output_dir.resolve() / BASE_DIR) if base is not None else hub_checkpoint(provenance.base) or provenance.base
    )
    with atomic_dir(output_dir) as staging:
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        (staging / "README.md").write_text(readme(provenance, config, base is not None))
        if base is not None:
            (staging / BASE_DIR).mkdir()
            write_transformers(base, staging / BASE_DIR)
    return output_dir


def adapter_tensors(causal_lm, layers):
    """({PEFT tensor name: array}, adapter config without the base) for the LoRA `layers`."""
    paths = hf_module_paths(causal_lm.backbone)
    rank, alpha = layers[0].lora_rank, float(layers[0].lora_alpha)
    tensors, rank_pattern, alpha_pattern, targets = {}, {}, {}, set()
    ranks = {}  # module -> {layer path: rank}: Gemma 4's global layers have their own KV heads
    for layer in layers:
        if id(layer) not in paths:
            raise ExportError(
                f"LoRA on {layer.path} has no PEFT counterpart here (only the projections "
                f"{', '.join(HF_MODULES)}). Export the merged model instead (--to hf)."
            )
        if layer.lora_rank != rank or float(layer.lora_alpha) != alpha:
            raise ExportError(f"LoRA on {layer.path} has rank {layer.lora_rank}, alpha {layer.lora_alpha}; "
                              f"the others rank {rank}, alpha {alpha}.")
        module, layout = HF_MODULES[layer.name]
        lora_a, lora_b = peft_factors(np.asarray(layer.lora_kernel_a), np.asarray(layer.lora_kernel_b), layout)
        prefix = f"base_model.model.{paths[id(layer)]}"
        # C-ordered: safetensors writes an array's buffer as it lies.
        tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(lora_a)
        tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(lora_b)
        targets.add(module.split(".")[-1])
        ranks.setdefault(module, {})[paths[id(layer)]] = lora_a.shape[0]
    for module, by_layer in ranks.items():
        # One key per module where every layer has one rank; else one per layer (PEFT matches a key
        # against the end of each module's path).
        keys = {module: next(iter(by_layer.values()))} if len(set(by_layer.values())) == 1 else by_layer
        for key, module_rank in keys.items():
            if module_rank != rank:
                rank_pattern[key] = module_rank
                alpha_pattern[key] = alpha * module_rank / rank  # so alpha/rank stays the package's alpha/r
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(targets),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    return tensors, config


def peft_factors(a, b, layout):
    """KerasHub's (lora_kernel_a, lora_kernel_b) as PEFT's (lora_A (R, in), lora_B (out, R)) with B·A = ΔW.

    ΔW is the update of the transformers weight (out, in) that `hf.hf_weight`
    makes of the kernel, so merging either side gives the same matrix.
    """
    if layout == "heads_in":
        heads, hidden, rank = a.shape
        head_dim = b.shape[1]
        stacked_a = a.transpose(0, 2, 1).reshape(heads * rank, hidden)  # row head·r + k = head's A[:, k]
        block_b = np.zeros((heads * head_dim, heads * rank), a.dtype)
        for head in range(heads):  # each head's output rows see only its own A rows
            block_b[head * head_dim:(head + 1) * head_dim, head * rank:(head + 1) * rank] = b.T
        return stacked_a, block_b
    if layout == "heads_out":
        heads, head_dim, rank = a.shape
        return a.reshape(heads * head_dim, rank).T, b.T
    return a.T, b.T


def vllm_max_rank(config):
    largest = max([config["r"], *config["rank_pattern"].values()])
    return next((size for size in VLLM_RANKS if size >= largest), largest)


def hub_checkpoint(base):
    return HUB_CHECKPOINTS.get(base)


def readme(provenance, config, with_base):
    """A note on how to load the adapter and which base it needs."""
    base = provenance.base
    lines = [
        f"# PEFT LoRA adapter: {provenance.describe().replace(' merged in by', ' converted by')}",
        "",
        f"Rank {config['r']}, alpha {config['lora_alpha']:g} on {', '.join(config['target_modules'])}; "
        f"attention projections with one LoRA factor per head have rank heads x {config['r']} "
        f"(`rank_pattern`: {json.dumps(config['rank_pattern'])}), the exact equivalent of KerasHub's per-head LoRA.",
        "",
        "## The base model",
    ]
    if with_base:
        lines += [f"`{BASE_DIR}/` holds the base as a transformers folder (the weights the adapter was trained on)."]
    elif base in DEMO_NAMES:
        lines += [
            "The `demo` base is Gemma 3 270M dequantized from a Q4_K_M GGUF file, not Google's google/gemma-3-270m "
            "checkpoint bit for bit. Export it with `--with-base` to serve the weights the adapter was trained on.",
        ]
    elif hub_checkpoint(base):
        lines += [
            f"KerasHub's `{base}` is Google's model published on the Hugging Face Hub as `{hub_checkpoint(base)}` "
            "(not compared here: nothing is downloaded in this package's checks). Or export the base with `--with-base`.",
        ]
    else:
        lines += [f"`{base}` has no Hub checkpoint this package knows; export it with `--with-base`."]
    base_path = config["base_model_name_or_path"]
    lines += [
        "",
        "## Load",
        "",
        "```python",
        "import peft, transformers",
        f"base = transformers.AutoModelForCausalLM.from_pretrained({base_path!r})",
        "model = peft.PeftModel.from_pretrained(base, 'THIS_FOLDER')",
        "```",
        "",
        "vLLM: `vllm serve BASE --enable-lora --lora-modules mine=THIS_FOLDER "
        f"--max-lora-rank {vllm_max_rank(config)}` (the largest module rank, rounded up to a size vLLM accepts)",
        "",
    ]
    return "\n".join(lines)

