#!/usr/bin/env bash
# The z bank on a lent GPU (bench/zbank.py): counterfact-train's z in file order, in float32 like the CPU
# chunks (the same store key, so both kinds of chunk serve one run), batches of 256, SmolLM2-135M first,
# then Gemma-3-270M with what is left of the budget. Each chunk is committed to the bank as soon as it is
# done; the bank folders are copied to $OUT at the end (and after every model) to come back.
#   MINUTES=4 bash bench/gpu_bank.sh        # minutes per model after which no new chunk starts
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${OUT:-bench/results/gpu}
MINUTES=${MINUTES:-4}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
for cfg in configs/smollm2-135m.yaml configs/gemma3-270m.yaml; do
  PYTHONUNBUFFERED=1 "$PY" -m bench.zbank --config "$cfg" --minutes "$MINUTES" --chunk 1280 --batch 256 \
      2>&1 | grep -E "banked|budget|Error|error" | tee -a "$OUT/zbank.txt" || true
  mkdir -p "$OUT/zbank" && cp -r bench/zbank/* "$OUT/zbank/"
done
