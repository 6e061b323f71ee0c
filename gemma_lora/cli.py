"""The `gemma-lora` command: train, generate, merge, export, sweep, compare, convert-gguf, info.

    gemma-lora train --preset tiny --sequence-length 128 --max-steps 20
    gemma-lora train --recipe                       # the classic KerasHub recipe
    gemma-lora train --coordinator 10.0.0.1:12355 --num-processes 2 --process-id 0   # one of several hosts
    gemma-lora generate --preset tiny --prompt "Name three colours."
    gemma-lora generate --preset gemma3_instruct_1b --prompt "Hi!"   # chat turns: an instruction-tuned preset
    gemma-lora export runs/tiny-20261122-120000/adapter.lora.h5 hf_model/
    gemma-lora export runs/tiny-20261122-120000/adapter.lora.h5 model.gguf --to gguf
    gemma-lora export runs/tiny-20261122-120000/adapter.lora.h5 peft_adapter/ --to peft
    gemma-lora sweep --ranks 4 8 16 --max-steps 20  # LoRA ranks side by side (demo preset)
    gemma-lora compare --max-steps 20               # full fine-tune vs LoRA (demo preset)
    gemma-lora info runs/tiny-20261122-120000

Every `TrainConfig` field is a flag (`--lora-rank 8`); `--config FILE` reads a
TOML/YAML/JSON file first. User mistakes print one line on stderr and exit 2;
`--debug` shows tracebacks.
"""

import argparse
import dataclasses
import sys
import types
import typing
import warnings
from pathlib import Path

from gemma_lora.config import FIELDS, load_config_file, resolve_config
from gemma_lora.errors import GemmaLoraError

# Fields that make sense for `generate` (the rest only affect training).
GENERATE_FIELDS = (
    "preset", "preset_version", "precision", "quantize", "chat", "template", "max_new_tokens", "sampler",
    "top_k", "stop_strings", "seed", "memory_fraction", "compilation_cache",
)
GENERATE_HELP = {
    "seed": "Seeds top-k sampling (--sampler top_k); greedy answers do not depend on it (default: 0).",
    "preset": "The model, as for train (default: the adapter's base model, else gemma_2b_en).",
    "chat": "Write each prompt as a user turn of Gemma's chat format and stop answers at <end_of_turn> (Gemma 4: "
            "its own format, <|turn>user ... <turn|>, answers stop at <turn|>) (default: as "
            "the adapter was trained, else on for instruction-tuned presets such as gemma3_instruct_1b; --no-chat: "
            "the template).",
    "template": "Prompt template; the prompt is everything before {response} (default: the adapter's, else the recipe's).",
    "stop_strings": "Answers are cut at the first of these (default: the adapter's, else '\\nInstruction:' with the "
                    "template and none with the chat format).",
    "quantize": "int8 | int4 | none: store the base quantized (default: as the adapter was trained, else none).",
}
# The sweep sets rank, alpha and the method per variant; every other field is shared.
SWEEP_FIELDS = tuple(name for name in FIELDS if name not in ("lora_rank", "lora_alpha", "full_finetune"))
COMPARE_FIELDS = tuple(name for name in FIELDS if name != "full_finetune")
# Sweeps and comparisons default to the real small Gemma, which a CPU can run.
SERIES_PRESET = "demo"


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.verbose or args.debug):
        from gemma_lora.runtime import quiet_startup

        quiet_startup()
    _one_line_warnings()
    from gemma_lora.parallel.hosts import (
        leave,  # in a job of several processes, the one line printed ends the process
    )

    try:
        return args.handler(args) or 0
    except GemmaLoraError as e:
        if args.debug:
            raise
        print(f"gemma-lora: error: {e}", file=sys.stderr)
        return leave(2)
    except KeyboardInterrupt:
        print("gemma-lora: interrupted", file=sys.stderr)
        return leave(130)
    except Exception as e:  # A bug, not a user mistake: say so, keep it to one line.
        if args.debug:
            raise
        print(
            f"gemma-lora: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return leave(1)


def _one_line_warnings():
    """The package's own warnings as one line on stderr, like its errors (others print as Python prints them)."""
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if "gemma_lora" in str(filename):
            print(f"gemma-lora: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def build_parser():
    parser = argparse.ArgumentParser(prog="gemma-lora", description="LoRA fine-tuning of Gemma with KerasHub on JAX.")
    parser.add_argument("--debug", action="store_true", help="Show tracebacks (and everything --verbose shows).")
    parser.add_argument("--verbose", action="store_true",
                        help="Show the start-up lines of TensorFlow, absl and XLA that are hidden by default.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="Fine-tune a preset and write a run directory.",
                                description="Fine-tune a Gemma preset with LoRA. Defaults: the package's; --recipe: the classic KerasHub recipe.")
    train.add_argument("--config", help="TOML, YAML or JSON file of config fields (flags override it).")
    train.add_argument("--resume", metavar="RUN_DIR", help="Continue an interrupted run from its newest checkpoint, with its own config.json.")
    add_job_flags(train)
    add_field_flags(train, FIELDS)
    train.set_defaults(handler=run_train)

    generate = commands.add_parser(
        "generate", help="Sample answers from a preset, optionally with an adapter.",
        description="Answer prompts with a preset, or with an adapter on its base: then the base, chat format or "
                    "template, stop strings and quantization come from the adapter's metadata unless a flag says "
                    "otherwise.")
    add_field_flags(generate, GENERATE_FIELDS, helps=GENERATE_HELP)
    generate.add_argument("--prompt", action="append", required=True, help="An instruction (repeatable).")
    generate.add_argument("--adapter", help="A .lora.h5 adapter (e.g. RUN_DIR/adapter.lora.h5) to apply.")
    generate.set_defaults(handler=run_generate)

    merge = commands.add_parser("merge", help="Fold an adapter into its base and save a plain KerasHub preset.")
    merge.add_argument("adapter", help="The .lora.h5 adapter (its adapter.json names the base preset).")
    merge.add_argument("output_dir", help="New directory for the merged preset.")
    add_field_flags(merge, ("preset", "preset_version", "precision"))
    merge.set_defaults(handler=run_merge)

    export = commands.add_parser(
        "export", help="Export an adapter or merged preset: transformers folder, GGUF file or PEFT adapter.",
        description="--to hf (default): a transformers folder (safetensors, config, tokenizer). --to gguf: one GGUF "
                    "file for llama.cpp / Ollama, with an Ollama Modelfile beside it. Both merge an adapter into its "
                    "base first (a quantized base is dequantized to float). --to peft: the adapter itself in PEFT's "
                    "format (adapter_config.json + adapter_model.safetensors), exact for KerasHub's per-head LoRA.")
    export.add_argument("source", help="A .lora.h5 adapter (its adapter.json names the base), or a merged preset directory.")
    export.add_argument("output", help="New output: a directory (hf, peft) or a .gguf file (gguf).")
    export.add_argument("--to", choices=("hf", "gguf", "peft"), default="hf", help="Export format (default: hf).")
    export.add_argument("--gguf-type", metavar="TYPE",
                        help="--to gguf: f32 (default), f16, bf16 or q8_0, the type of the matrices (norms stay f32).")
    export.add_argument("--with-base", action="store_true",
                        help="--to peft: also write the base model as a transformers folder in OUTPUT/base.")
    add_field_flags(export, ("preset", "preset_version", "precision"))
    export.set_defaults(handler=run_export)

    convert = commands.add_parser("convert-gguf", help="Convert a Gemma 3 (text) or Gemma GGUF file into a KerasHub preset directory.")
    convert.add_argument("gguf_file", help="A .gguf file (llama.cpp format), e.g. gemma-3-270m-q4_k_m.gguf.")
    convert.add_argument("output_dir", help="New directory for the preset (usable as --preset DIR).")
    convert.set_defaults(handler=run_convert)

    sweep = commands.add_parser(
        "sweep", help="Train one LoRA adapter per rank on the same data; table, plot and samples side by side.",
        description="LoRA rank sweep: one pipeline run per rank (same data, order and seed) into "
                    "OUTPUT_DIR/rank-N, then results.csv/.json/.md, plot.png and samples.md in OUTPUT_DIR. "
                    "Running it again resumes: finished ranks are skipped. Preset default: demo.")
    sweep.add_argument("--config", help="TOML, YAML or JSON file of config fields (flags override it).")
    sweep.add_argument("--ranks", nargs="+", type=int, default=[4, 8, 16], metavar="RANK",
                       help="LoRA ranks to train, in ascending order (default: 4 8 16).")
    alpha = sweep.add_mutually_exclusive_group()
    alpha.add_argument("--alpha", type=float, help="Hold alpha fixed at this value for every rank.")
    alpha.add_argument("--alpha-per-rank", type=float,
                       help="Hold alpha/rank fixed: alpha = this x rank (default: alpha = rank, i.e. 1).")
    add_field_flags(sweep, SWEEP_FIELDS, defaults={"preset": SERIES_PRESET})
    sweep.set_defaults(handler=run_sweep)

    compare = commands.add_parser(
        "compare", help="Full fine-tune vs LoRA at one rank: same data and steps; table and bar plot.",
        description="Runs LoRA at --lora-rank and a full fine-tune (every weight trainable) through the same "
                    "pipeline into OUTPUT_DIR/lora-rN and OUTPUT_DIR/full. Preset default: demo; on a CPU only "
                    "tiny, demo or a local preset directory. Checkpoints default to off (a full model's are large).")
    compare.add_argument("--config", help="TOML, YAML or JSON file of config fields (flags override it).")
    add_field_flags(compare, COMPARE_FIELDS, defaults={"preset": SERIES_PRESET, "checkpoint_every": None})
    compare.set_defaults(handler=run_compare)

    info = commands.add_parser("info", help="Show what a run directory, adapter or preset holds.",
                               description="A short summary: base model, method, steps, losses before and after, "
                                           "share of answers that end and files of a run; rank, targets and base of an adapter; "
                                           "architecture and size of a preset.")
    info.add_argument("target", help="A run directory, a .lora.h5 adapter, a preset directory, or a preset name.")
    info.add_argument("--json", action="store_true", help="Print the raw JSON records instead of the summary.")
    info.set_defaults(handler=run_info)
    return parser


def add_job_flags(parser):
    """Flags of a job of several processes (docs/multihost.md); not config fields: they differ per process and launch."""
    from gemma_lora.parallel.hosts import (
        COORDINATOR_VARIABLE,
        EXIT_PEER_LOST,
        HEARTBEAT_TIMEOUT,
        JOIN_TIMEOUT,
        NUM_PROCESSES_VARIABLE,
        PROCESS_ID_VARIABLE,
    )

    job = parser.add_argument_group(
        "several processes or hosts",
        "Run the same command in every process; only --process-id differs. Without these flags: Keras' "
        f"{COORDINATOR_VARIABLE}, {NUM_PROCESSES_VARIABLE} and {PROCESS_ID_VARIABLE}, else what a SLURM step, "
        "Open MPI or a TPU pod slice that names its workers tells JAX, else one process.")
    job.add_argument("--coordinator", metavar="HOST:PORT",
                     help="Process 0's host and a free port, the same for every process; 'auto': JAX discovers the "
                          "job (Cloud TPU VMs, SLURM, Open MPI, Kubernetes).")
    job.add_argument("--num-processes", type=int, metavar="N", help="Processes in the job.")
    job.add_argument("--process-id", type=int, metavar="I", help="This process's index, 0 to N-1; 0 prints and writes.")
    job.add_argument("--coordinator-timeout", type=float, default=JOIN_TIMEOUT, metavar="SECONDS",
                     help=f"A process that cannot join the job within this stops with one line (default: {JOIN_TIMEOUT}).")
    job.add_argument("--heartbeat-timeout", type=float, default=HEARTBEAT_TIMEOUT, metavar="SECONDS",
                     help="A process silent this long has vanished (died, killed, its host or network lost): every "
                          "other process stops with one line naming it and the --resume command, exit code "
                          f"{EXIT_PEER_LOST} (default: {HEARTBEAT_TIMEOUT}).")


def add_field_flags(parser, names, defaults=None, helps=None):
    """One flag per config field; only flags the user gives reach the config.

    The help text is the field's, with its default (`defaults` overrides
    the field's own, e.g. the sweep's preset) unless `helps` replaces it.
    """
    for name in names:
        f = FIELDS[name]
        flag = f.metadata.get("flag") or "--" + name.replace("_", "-")
        text = (helps or {}).get(name) or f"{f.metadata['help']} (default: {_default_text(name, defaults)})"
        kwargs = {"dest": name, "default": argparse.SUPPRESS, "help": text.replace("%", "%%")}
        base, optional = _unwrap_optional(f.type)
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(base) is dict:
            parser.add_argument(flag, action=_MappingAction, metavar="NAME=COLUMN", **kwargs)
        elif typing.get_origin(base) is list:
            parser.add_argument(flag, nargs="*", metavar="VALUE", **kwargs)
        else:
            parser.add_argument(flag, type=_parser_for(base, optional), metavar=base.__name__.upper(), **kwargs)


def _default_text(name, defaults=None):
    if defaults and name in defaults:
        value = defaults[name]
    else:
        f = FIELDS[name]
        value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if isinstance(value, list):
        return " ".join(repr(v) for v in value) or "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items()) or "none"
    return "none" if value is None else repr(value) if isinstance(value, str) and ("\n" in value or not value) else str(value)


class _MappingAction(argparse.Action):
    """A repeatable NAME=VALUE option collected into a dict."""

    def __call__(self, parser, namespace, value, option_string=None):
        name, sep, column = value.partition("=")
        if not sep or not name.strip() or not column.strip():
            parser.error(f"{option_string} expects NAME=COLUMN, got {value!r}")
        mapping = dict(getattr(namespace, self.dest, None) or {})
        mapping[name.strip()] = column.strip()
        setattr(namespace, self.dest, mapping)


def _unwrap_optional(annotation):
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def _parser_for(base, optional):
    def parse(text):
        if optional and text.lower() == "none":
            return None
        try:
            return base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {base.__name__}{' or none' if optional else ''}, got {text!r}") from None

    parse.__name__ = base.__name__
    return parse


def config_from_args(args, names, defaults=None):
    """The config from `defaults` < the --config file < flags."""
    overrides = {name: getattr(args, name) for name in names if hasattr(args, name)}
    file_values = load_config_file(args.config) if getattr(args, "config", None) else {}
    return resolve_config({**(defaults or {}), **file_values}, overrides)


def run_train(args):
    from gemma_lora.errors import ConfigError
    from gemma_lora.parallel import hosts

    for name in ("coordinator_timeout", "heartbeat_timeout"):
        if not getattr(args, name) > 0:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} must be a number of seconds > 0. Received: {getattr(args, name)}.")
    job = hosts.job_from(args.coordinator, args.num_processes, args.process_id)
    if args.resume:
        given = [name for name in FIELDS if hasattr(args, name)] + (["config"] if args.config else [])
        if given:
            raise ConfigError(
                f"--resume uses the run's own config.json; drop {', '.join('--' + g.replace('_', '-') for g in given)} "
                f"(to change a value, edit {Path(args.resume) / 'config.json'})."
            )
    else:
        config = config_from_args(args, FIELDS)  # a bad config stops before joining anyone
    if job is not None:
        hosts.join(job, args.coordinator_timeout, args.heartbeat_timeout)
    if args.resume:

        def read_config():
            config_file = Path(args.resume) / "config.json"
            if not config_file.is_file():
                raise ConfigError(
                    f"{args.resume} is not a run directory (no config.json). Give the RUN_DIR of a run to resume."
                )
            return load_config_file(config_file)

        # Process 0's run directory: the other hosts need not have it.
        config = resolve_config(hosts.first("config to resume", read_config), {"output_dir": str(args.resume)})
    from gemma_lora.training.run import run_training

    result = run_training(config, resume=bool(args.resume))
    if hosts.is_main():
        print(f"done: {result.run_dir}")


def run_sweep(args):
    config = config_from_args(args, SWEEP_FIELDS, {"preset": SERIES_PRESET})
    from gemma_lora.sweep import rank_sweep

    rank_sweep(config, args.ranks, alpha=args.alpha, alpha_per_rank=args.alpha_per_rank)


def run_compare(args):
    config = config_from_args(args, COMPARE_FIELDS, {"preset": SERIES_PRESET, "checkpoint_every": None})
    from gemma_lora.sweep import compare_full_vs_lora

    compare_full_vs_lora(config)


def run_generate(args):
    meta = {}
    if args.adapter:
        from gemma_lora.adapters.files import read_adapter

        meta = read_adapter(args.adapter)[2]
        if meta is None and not hasattr(args, "preset"):
            from gemma_lora.errors import ConfigError

            raise ConfigError(f"{args.adapter} has no metadata naming its base model: pass --preset.")
        meta = meta or {}
    # What the adapter was trained with, unless a flag says otherwise.
    recorded = {"base_preset": "preset", "base_preset_version": "preset_version", "quantize": "quantize",
                "template": "template", "stop_strings": "stop_strings"}
    defaults = {field: meta[key] for key, field in recorded.items() if key in meta}
    if "chat_format" in meta:
        defaults["chat"] = meta["chat_format"] is not None
    if meta.get("data_format") in ("completion", "text") and not meta.get("chat_format"):
        # Trained on prompts as written (no instruction template): give the prompt as it is.
        defaults["template"] = "{instruction}{response}"
    config = config_from_args(args, GENERATE_FIELDS, defaults)
    from gemma_lora import runtime

    runtime.configure_runtime(config.memory_fraction, config.seed, config.compilation_cache)
    from gemma_lora.model import loading, presets
    from gemma_lora.sampling import generate

    preset_dir = presets.resolve_preset(config.preset, config.preset_version)
    if config.chat is None:
        config = dataclasses.replace(config, chat=presets.chat_format_of(config.preset, preset_dir) is not None)
    if meta:
        prompts = "Gemma's chat format" if config.chat else "its template and stop strings"
        print(f"adapter {args.adapter}: base {config.preset}, {prompts}")
    elif config.chat:
        from gemma_lora.data import chat

        fmt = presets.chat_format_for(preset_dir)
        end = chat.TURN_MARKERS[fmt][1]
        name = "Gemma 4's" if fmt == chat.GEMMA4 else "Gemma's"
        print(f"{config.preset}: prompts as user turns of {name} chat format, answers stop at {end}")
    causal_lm = loading.load_causal_lm(preset_dir, config.resolved_precision(loading.platform()), quantize=config.quantize,
                                     frozen_base=True)
    if args.adapter:
        from gemma_lora.adapters.store import load_adapter

        load_adapter(causal_lm, args.adapter, preset=config.preset)
    for sample in generate(causal_lm, args.prompt, config, label=f"answering {len(args.prompt)} prompts"):
        print(f"### {sample.instruction}\n{sample.text.strip()}\n")


def _merged(args, adapter):
    """Load the adapter's base (quantized as it was trained), apply the adapter, merge in memory."""
    from gemma_lora.adapters.files import read_adapter
    from gemma_lora.config import config_for_adapter

    _, _, meta = read_adapter(adapter)
    config = config_for_adapter(meta, adapter, preset=getattr(args, "preset", None),
                                preset_version=getattr(args, "preset_version", None),
                                precision=getattr(args, "precision", None))
    from gemma_lora import runtime

    runtime.configure_runtime(config.memory_fraction)
    from gemma_lora.adapters.store import load_adapter
    from gemma_lora.model import loading, presets

    preset_dir = presets.resolve_preset(config.preset, config.preset_version)
    precision = config.resolved_precision(loading.platform()) if config.precision == "auto" else config.precision
    causal_lm = loading.load_causal_lm(preset_dir, precision, quantize=config.quantize)
    load_adapter(causal_lm, adapter, preset=config.preset)
    stored = f"{precision} weights" + (f", dequantized from {config.quantize}" if config.quantize else "")
    return causal_lm, preset_dir, config, precision, f"{stored}, no LoRA"


def run_merge(args):
    causal_lm, preset_dir, config, precision, described = _merged(args, args.adapter)
    from gemma_lora.adapters.files import read_metadata
    from gemma_lora.adapters.merge import merge_adapter

    chat_format = (read_metadata(args.adapter) or {}).get("chat_format")
    out = merge_adapter(causal_lm, preset_dir, args.output_dir, precision, chat_format=chat_format)
    chat = f"; its metadata.json records chat_format {chat_format!r}" if chat_format else ""
    print(f"merged {args.adapter} into {config.preset}: {out} ({described}{chat})")


def run_export(args):
    from gemma_lora.errors import ConfigError

    if args.gguf_type is not None and args.to != "gguf":
        raise ConfigError(f"--gguf-type applies to --to gguf only (got --to {args.to}). Drop it, or add --to gguf.")
    if args.with_base and args.to != "peft":
        raise ConfigError(f"--with-base applies to --to peft only (got --to {args.to}). Drop it, or add --to peft.")
    if args.gguf_type is not None:
        from gemma_lora.errors import ExportError
        from gemma_lora.export import GGUF_TYPES

        if args.gguf_type not in GGUF_TYPES:  # before any model is loaded
            raise ExportError(f"Unknown GGUF type {args.gguf_type!r}: use one of {', '.join(GGUF_TYPES)}.")
    from gemma_lora.export import Provenance, check_new

    check_new(args.output)  # before any model is loaded
    if args.to == "gguf" and not args.output.endswith(".gguf"):
        from gemma_lora.errors import ExportError

        raise ExportError(f"A GGUF export is one file ending in .gguf. Received: {args.output}. Give e.g. model.gguf.")
    if args.to == "peft":
        return _export_peft(args)
    if args.source.endswith(".lora.h5"):
        causal_lm, preset_dir, config, precision, described = _merged(args, args.source)
        from gemma_lora.adapters.files import read_adapter
        from gemma_lora.adapters.merge import merged_model

        plain = merged_model(causal_lm, preset_dir, precision)
        what = f"{args.source} merged into {config.preset} ({described})"
        provenance = Provenance(config.preset, args.source, read_adapter(args.source)[2] or {})
    else:
        if hasattr(args, "preset"):
            raise ConfigError(f"--preset names an adapter's base; {args.source} is exported as it is. Drop --preset.")
        config = config_from_args(args, ("preset_version", "precision"))
        from gemma_lora import runtime

        runtime.configure_runtime(config.memory_fraction)
        from gemma_lora.model import loading, presets

        precision = "float32" if config.precision == "auto" else config.precision
        plain = loading.load_causal_lm(presets.resolve_preset(args.source, config.preset_version), precision)
        what = f"{args.source} ({precision} weights)"
        provenance = Provenance(args.source)
    if args.to == "gguf":
        from gemma_lora.export.gguf import export_gguf

        out = export_gguf(plain, args.output, args.gguf_type or "f32", provenance)
        print(f"exported {what} to {out} ({args.gguf_type or 'f32'}) and {out.with_suffix('.Modelfile')}: "
              f"llama-cli -m {out}, or ollama create NAME -f {out.with_suffix('.Modelfile')}")
        return
    from gemma_lora.export import export_transformers

    out = export_transformers(plain, args.output)
    print(f"exported {what} to {out}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")


def _export_peft(args):
    from gemma_lora.errors import ConfigError

    if not args.source.endswith(".lora.h5"):
        raise ConfigError(f"--to peft exports an adapter; {args.source} is not a .lora.h5 file. Give RUN_DIR/adapter.lora.h5.")
    causal_lm, preset_dir, config, precision, _ = _merged(args, args.source)
    from gemma_lora.adapters.files import read_adapter
    from gemma_lora.export import Provenance
    from gemma_lora.export.peft import export_peft
    from gemma_lora.model import loading

    base = loading.load_causal_lm(preset_dir, precision) if args.with_base else None
    provenance = Provenance(config.preset, args.source, read_adapter(args.source)[2] or {})
    out = export_peft(causal_lm, args.output, provenance, base=base)
    with_base = f" with the base in {out / 'base'}" if base is not None else ""
    print(f"exported {args.source} as a PEFT adapter to {out}{with_base}: see {out / 'README.md'} to load it")


def run_convert(args):
    from gemma_lora import runtime

    runtime.configure_runtime()
    from gemma_lora.model.gguf_import import convert_gguf

    out = convert_gguf(args.gguf_file, args.output_dir)
    print(f"converted {args.gguf_file} into {out}; use it with --preset {out}")


def run_info(args):
    from gemma_lora.info import describe

    for line in describe(args.target, as_json=args.json):
        print(line)


if __name__ == "__main__":
    sys.exit(main())
