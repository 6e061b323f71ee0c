"""What a run directory, an adapter or a preset holds, in a few lines (`gemma-lora info`).

    gemma-lora info runs/demo-20261130-101500      # base, method, steps, losses, share of answers that end, files
    gemma-lora info runs/.../adapter.lora.h5       # rank, alpha, targets, base, parameters
    gemma-lora info demo                           # a preset: architecture and size
    gemma-lora info runs/... --json                # the raw records instead

Run directories and adapters are read without importing Keras, so this
answers in about a second.
"""

import json
from pathlib import Path

from gemma_lora.errors import GemmaLoraError
from gemma_lora.io import read_json

RUN_FILES = ("config.json", "summary.json", "adapter.json")
KINDS = (
    "a run directory (with config.json), an adapter (.lora.h5), a preset directory (with config.json and "
    "metadata.json), or a preset name (demo, tiny, gemma_2b_en, ...)"
)


def describe(target, as_json=False):
    """The lines `gemma-lora info TARGET` prints.

    Raises:
        GemmaLoraError: `target` is none of the kinds in `KINDS`, or a file in it is unreadable.
    """
    path = Path(target)
    if path.name.endswith(".lora.h5"):
        return adapter_lines(path, as_json)
    if path.is_dir() and (path / "config.json").is_file() and not (path / "metadata.json").is_file():
        return run_lines(path, as_json)
    if path.is_dir() or path.exists() or "/" in str(target):
        if path.is_dir() and (path / "metadata.json").is_file():
            return preset_lines(path, as_json)
        raise GemmaLoraError(f"{target} is not {KINDS}.")
    return preset_lines(_resolve_name(target), as_json, name=target)


def run_lines(run_dir, as_json=False):
    from gemma_lora.run_files import check_intact

    check_intact(run_dir)  # a damaged adapter or newest checkpoint: one line, as `generate --adapter` says it
    records = {name: read_json(run_dir / name, GemmaLoraError) for name in RUN_FILES if (run_dir / name).is_file()}
    if as_json:
        return [json.dumps(records, indent=2)]
    config, summary, meta = records.get("config.json", {}), records.get("summary.json"), records.get("adapter.json")
    lines = [f"run: {run_dir}"]
    lines.append(f"  base model: {config.get('preset')}" + _version(config.get("preset_version")))
    lines.append("  method: " + _method(config) + ("; Gemma's chat format" if config.get("chat") else ""))
    if summary is None:
        from_checkpoints = sorted((run_dir / "checkpoints").glob("step-*.npz"))
        state = f"last checkpoint {from_checkpoints[-1].name}" if from_checkpoints else "no checkpoint yet"
        lines.append(f"  unfinished ({state}): `gemma-lora train --resume {run_dir}` continues it")
    else:
        train = summary.get("train", {})
        lines.append(
            f"  trained: {train.get('steps')} steps ({summary.get('engine')} engine, {summary.get('precision')}), "
            f"{train.get('seconds')} s, {train.get('real_tokens_per_second')} real tokens/s"
        )
        rows = summary.get("data", {}).get("rows", {})
        lines.append(f"  data: {config.get('data')}: " + ", ".join(f"{k} {v} rows" for k, v in rows.items()))
        before, after = summary.get("token_loss_before", {}), summary.get("token_loss_after", {})
        for split in after:
            lines.append(f"  {split} token loss: {_change(before.get(split), after[split])}")
        answers_before, answers_after = summary.get("answers_before", {}), summary.get("answers_after", {})
        for split, a in answers_after.items():
            was = f"{a_share(answers_before[split])} → " if split in answers_before else ""
            lines.append(f"  {split} answers ending with {a.get('stop_tokens', ['<eos>'])[0]}: {was}{a_share(a)}")
    if meta:
        lines.append(f"  adapter: {run_dir / 'adapter.lora.h5'} (rank {meta.get('rank')}, alpha {meta.get('alpha')})")
    lines.append("  files: " + ", ".join(_file_list(run_dir)))
    return lines


def adapter_lines(path, as_json=False):
    from gemma_lora.adapters.files import metadata_path, read_adapter

    rank, factors, meta = read_adapter(path)
    size = sum(a.size + b.size for a, b in factors.values())
    if as_json:
        return [json.dumps(meta, indent=2) if meta else "null"]
    lines = [f"adapter: {path}: rank {rank}, {len(factors)} LoRA layers, {size:,} parameters, {_bytes(path)}"]
    if not meta:
        lines.append(f"  no {metadata_path(path).name}: a stock KerasHub adapter (query/value, alpha = rank assumed)")
        return lines
    lines.append(
        f"  base model: {meta.get('base_preset')}{_version(meta.get('base_preset_version'))} "
        f"({meta.get('backbone_class')}{', base ' + meta['quantize'] if meta.get('quantize') else ''})"
    )
    lines.append(f"  alpha {meta.get('alpha')} on {', '.join(meta.get('targets', []))}")
    formats = {"gemma": "Gemma's chat format", "gemma4": "Gemma 4's chat format"}
    fmt = meta.get("chat_format")
    lines.append("  prompts: " + (formats.get(fmt, f"chat format {fmt!r}") if fmt else "the template"))
    if meta.get("data"):
        lines.append(f"  trained on {meta['data']} (fingerprint {meta.get('data_fingerprint')}), split {meta.get('split')}")
    for split in ("validation", "test"):
        if meta.get(f"{split}_token_loss") is not None:
            lines.append(f"  {split} token loss after training: {meta[f'{split}_token_loss']:.4f}")
    lines.append(f"  metadata: {metadata_path(path)}")
    return lines


def preset_lines(preset_dir, as_json=False, name=None):
    preset_dir = Path(preset_dir)
    config = read_json(preset_dir / "config.json", GemmaLoraError)
    if as_json:
        return [json.dumps({"config.json": config, "metadata.json": read_json(preset_dir / "metadata.json", GemmaLoraError)}, indent=2)]
    fields = config.get("config", {})
    shape = ", ".join(
        f"{key} {fields[key]:,}" if isinstance(fields[key], int) else f"{key} {fields[key]}"
        for key in ("num_layers", "hidden_dim", "num_query_heads", "num_key_value_heads", "head_dim", "vocabulary_size")
        if key in fields
    )
    lines = [f"preset: {name or preset_dir}" + (f" ({preset_dir})" if name else "")]
    lines.append(f"  {config.get('class_name', '?')}: {shape}")
    weights = sorted(preset_dir.glob("model*.weights.h5"))
    lines.append(f"  weights: {', '.join(p.name for p in weights) or 'none'} ({sum(p.stat().st_size for p in weights) / 2**20:,.0f} MiB)")
    return lines


def _resolve_name(name):
    from gemma_lora.model import presets

    try:
        return presets.resolve_preset(name)
    except GemmaLoraError as e:
        raise GemmaLoraError(f"{name} is not {KINDS} ({e})") from None


def a_share(answers):
    n = answers.get("rows", 0)
    # Runs written before the chat format recorded the share as eos_share.
    share = answers.get("model_ended_share", answers.get("eos_share")) or 0.0
    return f"{round(share * n)}/{n} ({share:.0%})"


def _change(before, after):
    if before is None:
        return f"{after:.4f}"
    return f"{before:.4f} → {after:.4f} ({(after - before) / before:+.1%})"


def _method(config):
    if config.get("full_finetune"):
        return "full fine-tune (every weight)"
    alpha = config.get("lora_alpha") or config.get("lora_rank")
    method = f"LoRA rank {config.get('lora_rank')}, alpha {alpha}, on {', '.join(config.get('lora_targets', []))}"
    return method + (f" over a {config['quantize']} base" if config.get("quantize") else "")


def _version(version):
    return f" (version {version})" if version is not None else ""


def _file_list(run_dir):
    return [
        f"{p.name}/" if p.is_dir() else f"{p.name} ({_bytes(p)})"
        for p in sorted(run_dir.iterdir())
        if not p.name.startswith(".")
    ]


def _bytes(path):
    size = Path(path).stat().st_size
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
