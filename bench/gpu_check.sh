#!/usr/bin/env bash
# The GPU check of the compute dtype, for a machine with one CUDA device (under 8 minutes on an H100/H200
# class GPU): the CUDA tests (fp32, bf16 and auto on the GPU against the CPU's fp32 edit), then bench/z.py
# with batches of 256 on the first 1,000 counterfact-train cases (fp32 vs the compute dtype; the serial
# reference on 16 of them). Results go to $OUT (or bench/results/gpu/ without it).
#   bash bench/gpu_check.sh            # from the repository root, with the project's venv or python
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
"$PY" -m pytest -q -p no:cacheprovider tests/test_precision.py -k cuda 2>&1 | tee "$OUT/cuda-tests.txt"
PYTHONUNBUFFERED=1 timeout 360 "$PY" -m bench.z --n 1000 --batch 256 --compare 16 --plain 0 --compute auto \
    --device cuda --out "$OUT/z-gpu.json" 2>&1 | tail -n 40 | tee "$OUT/z-gpu.txt"
