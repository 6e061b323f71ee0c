#!/usr/bin/env bash
# One GPU check, for a session that is lent a device (about 8 minutes on one H100/H200):
#
#   bash scripts/accelerator_check.sh [OUT_DIR]      # OUT_DIR defaults to $OUT, else ./accelerator-check
#   SMOKE=1 bash scripts/accelerator_check.sh /tmp/x   # the same steps on tiny shapes, on a CPU (a minute)
#
# On the gemma_2b shape (random weights) it measures:
#   1. scripts/benchmark.py's fast and Keras (bfloat16) engines: batch 8 x 512, LoRA rank 4 on
#      query/value, tokens/s and peak memory, each in its own process;
#   2. the fast engine inside the package's training path (`engines.fit`, what `gemma-lora train`
#      runs) for 30 steps on the same shape, with its peak memory;
#   3. the package's decoder's new tokens/s on that model (64 prompts, 128 new tokens each).
# It writes OUT_DIR/accelerator_check.json (everything) and OUT_DIR/accelerator_check.md (one
# table, with the GPU goals of docs/perf.md: >= 65k tokens/s at batch 8 and <= 10 GiB).
#
# The GPU machine has no keras / keras-hub: carry them as wheels in .whl/ (docs/perf.md,
# "Commands", says how to download them); they are installed under /tmp/site here.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-accelerator-check}}"
mkdir -p "$out"
if ! python3 -c "import keras_hub" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "keras-hub is not installed and .whl/ holds no wheels: see docs/perf.md, Commands" >&2
    exit 2
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>/dev/null || true

shape=(--shape gemma_2b) small=() steps=30 rows=64
if [ "${SMOKE:-}" = 1 ]; then shape=(--shape tiny --steps 2 --warmup 1) small=(--small) steps=4 rows=4; fi
python3 scripts/benchmark.py "${shape[@]}" --timeout 150 --variants fast,keras_bf16 \
  --json-out "$out/benchmark.json" 2>&1 | tee "$out/benchmark.log" | grep -v -i warning || true
timeout 300 python3 scripts/check_gemma_2b_shape.py --profile default "${small[@]}" --engine fast --batch-size 8 \
  --sequence-length 512 --steps "$steps" --decode-rows "$rows" --json-out "$out/train.json" 2>&1 \
  | tee "$out/train.log" | grep -v -i warning || true

python3 - "$out" <<'PY'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
gpu = (out / "gpu.txt").read_text().strip() if (out / "gpu.txt").exists() else "unknown"
bench = json.loads((out / "benchmark.json").read_text())["results"] if (out / "benchmark.json").exists() else []
train = json.loads((out / "train.json").read_text()) if (out / "train.json").exists() else {}
record = {"gpu": gpu, "benchmark": bench, "train": train}
tmp = out / "accelerator_check.json.tmp"
tmp.write_text(json.dumps(record, indent=1))
tmp.replace(out / "accelerator_check.json")

def gib(x):
    return f"{x:.1f}" if isinstance(x, (int, float)) else "—"

lines = [f"GPU: {gpu}", "", "| measurement | batch x seq | tokens/s | peak GiB | goal |", "|---|---|---:|---:|---|"]
for r in bench:
    name = r.get("variant", "?")
    tps = r.get("tokens_per_s")
    peak = r.get("peak_gib")
    error = r.get("error")
    lines.append(f"| benchmark.py {name} | {r['batch']} x 512 | "
                 f"{f'{tps:,.0f}' if tps else error or '—'} | {gib(peak)} | "
                 f"{'>= 65,000 tok/s, <= 10 GiB' if name == 'fast' else ''} |")
if train:
    lines.append(f"| fast engine in training, {train['steps']} steps | {train['batch']} x {train['sequence_length']} | "
                 f"{train['tokens_per_s']:,.0f} | {gib(train['peak_gib_training'])} | >= 65,000 tok/s, <= 10 GiB |")
    if "decode_tokens_per_s" in train:
        lines.append(f"| decoder, {train['decode_rows']} rows x 128 new tokens | — | "
                     f"{train['decode_tokens_per_s']:,.0f} new | {gib(train['peak_gib_after_decoding'])} | |")
else:
    lines.append("| fast engine in training | — | failed: see train.log | — | |")
table = "\n".join(lines) + "\n"
(out / "accelerator_check.md").write_text(table)
print(table)
PY
