"""Exports other tools load: a transformers folder, a GGUF file, a PEFT adapter.

    gemma-lora export runs/<run>/adapter.lora.h5 hf_model/                   # --to hf (default): merged
    gemma-lora export runs/<run>/adapter.lora.h5 model.gguf --to gguf        # merged, for llama.cpp / Ollama
    gemma-lora export runs/<run>/adapter.lora.h5 peft_adapter/ --to peft     # unmerged, for PEFT / vLLM

One module per format (`hf`, `gguf`, `peft`); this file holds what they share:
the checks that a model is plain (no LoRA, not quantized), the output checks,
and `Provenance`, what an export records about where its weights came from
(the base, the adapter and its metadata). Each exporter either writes a
model that gives the Keras model's logits, or refuses before writing
anything, with the reason.
"""

import importlib
from dataclasses import dataclass, field
from pathlib import Path

from gemma_lora.errors import ExportError, OutputError

FORMATS = ("hf", "gguf", "peft")
# --gguf-type → (ggml tensor type name, llama.cpp's file type name); only
# types the gguf package quantizes itself.
GGUF_TYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
}

# Chat formats an adapter can be trained on (adapter.json's `chat_format`).
# An export of such an adapter
# carries the template so a chat front end formats turns as in training.
# Gemma's turns: no system role, so a system message leads the first user turn.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    # As training writes it (data/chat.py): the system text as given, a blank line, then the
    # first user turn; an empty system message adds nothing.
    "{% if message['content'] | trim %}{% set ns.system = message['content'] ~ '\n\n' %}{% endif %}"
    "{% else %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ ns.system if role == 'user' else '' }}{{ message['content'] | trim }}<end_of_turn>\n"
    "{% if role == 'user' %}{% set ns.system = '' %}{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# Gemma 4's turns, with its own system turn (data/chat.py): an empty system message writes none.
GEMMA4_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{% if role != 'system' or message['content'] | trim %}"
    "<|turn>{{ role }}\n{{ message['content'] | trim }}<turn|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)
CHAT_TEMPLATES = {"gemma": GEMMA_CHAT_TEMPLATE, "gemma4": GEMMA4_CHAT_TEMPLATE}
# The same turns in Ollama's Go template language, and the marker that ends a turn.
OLLAMA_CHAT = {
    "gemma": (
        # Gemma has no system role: a system message is written as a user turn.
        "{{- range .Messages }}<start_of_turn>{{ if eq .Role \"assistant\" }}model{{ else }}user{{ end }}\n"
        "{{ .Content }}<end_of_turn>\n{{ end }}<start_of_turn>model\n",
        "<end_of_turn>",
    ),
    "gemma4": (
        # Gemma 4 has a system role: each message is a turn of its own role.
        "{{- range .Messages }}<|turn>{{ if eq .Role \"assistant\" }}model{{ else }}{{ .Role }}{{ end }}\n"
        "{{ .Content }}<turn|>\n{{ end }}<|turn>model\n",
        "<turn|>",
    ),
}


@dataclass
class Provenance:
    """Where an export's weights came from, for the file's metadata and notes.

    base: the base preset as the user named it (e.g. "demo", "gemma_2b_en", a directory).
    adapter: path of the .lora.h5 merged in or converted, or None for a plain preset.
    meta: the adapter's adapter.json (rank, alpha, targets, template, ...), or {}.
    """

    base: str
    adapter: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def chat_format(self):
        """The chat format the adapter was trained on, or None (instruction template)."""
        fmt = self.meta.get("chat_format")
        if fmt is not None and fmt not in CHAT_TEMPLATES:
            raise ExportError(
                f"{self.adapter} was trained on chat format {fmt!r}, which this exporter has no template for "
                f"(known: {', '.join(CHAT_TEMPLATES)}). Update gemma-lora."
            )
        return fmt

    @property
    def prompt_template(self):
        """The training template's prompt part (before `{response}`), or None."""
        template = self.meta.get("template")
        if not template or "{response}" not in template:
            return None
        return template.split("{response}")[0]

    def describe(self):
        """One line naming the base and the adapter."""
        if self.adapter is None:
            return f"{self.base} exported by gemma-lora"
        m = self.meta
        details = f"rank {m['rank']}, alpha {m['alpha']:g}, targets {'/'.join(m['targets'])}" if "rank" in m else "no adapter.json"
        return f"{self.base} with the LoRA adapter {Path(self.adapter).name} ({details}) merged in by gemma-lora"


def check_plain(causal_lm, what):
    """Raise ExportError unless `causal_lm` is a plain float model (no LoRA, not quantized).

    An exporter reads each layer's kernel variable: a LoRA update still
    attached would be silently dropped, a quantized kernel written as its
    integers.
    """
    from gemma_lora.model.layers import lora_layers
    from gemma_lora.model.quantize import quantization_mode

    attached = lora_layers(causal_lm)
    if attached:
        raise ExportError(
            f"This model still has LoRA enabled on {len(attached)} layers; the {what} exporter would "
            "drop the update. Merge first: `gemma-lora export ADAPTER OUT` merges for you, or pass "
            "adapters.merged_model(...)."
        )
    mode = quantization_mode(causal_lm)
    if mode is not None:
        raise ExportError(
            f"This model's weights are stored as {mode}; the {what} exporter would write the raw integers. "
            "Export the merged (dequantized, float) model from adapters.merged_model instead."
        )


def gemma2_features(backbone):
    """The Gemma 2 features a GemmaBackbone uses ([] = a Gemma 1): post norms, soft caps, sliding window."""
    return [
        feature for feature, on in (
            ("post-attention/post-FFW norms", backbone.use_post_attention_norm or backbone.use_post_ffw_norm),
            ("logit soft caps", backbone.attention_logit_soft_cap or backbone.final_logit_soft_cap),
            ("sliding-window attention", backbone.use_sliding_window_attention),
        ) if on
    ]


def query_scale_width(backbone):
    """w in the 1/sqrt(w) that scales queries, as the Keras model computes it: head_dim, or hidden/heads.

    Read off the attention layer, not the backbone's config: keras-hub 0.32's
    `GemmaDecoderBlock` and `Gemma3DecoderBlock` build their attention with
    `query_head_dim_normalize=True` whatever the backbone says, so
    gemma2_27b_en (config False, head_dim 128, hidden/heads 144) scales by
    1/sqrt(128) in KerasHub, where Google's reference scales by 1/sqrt(144).
    An export gives the Keras model's logits, so it writes 128.
    """
    attention = backbone.transformer_layers[0].attention
    if attention.query_head_dim_normalize:
        return backbone.head_dim
    return backbone.hidden_dim // backbone.num_query_heads


def check_new(path, what="exported model"):
    """Raise OutputError if `path` exists (exports never overwrite)."""
    path = Path(path)
    if path.exists():
        raise OutputError(f"{path} already exists. Give a new path for the {what}.")
    return path


_LAZY = {
    "export_transformers": "gemma_lora.export.hf",
    "supported_backbones": "gemma_lora.export.hf",
    "export_gguf": "gemma_lora.export.gguf",
    "export_peft": "gemma_lora.export.peft",
}


def __getattr__(name):
    # The exporters import this module's helpers; loading them on first use
    # keeps that one-way (and Keras unloaded until an exporter is asked for).
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gemma_lora.export' has no attribute {name!r}")
