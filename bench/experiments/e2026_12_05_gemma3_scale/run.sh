#!/bin/bash
# Gemma-3-270M at the paper's scale (#17): Figure 5 on counterfact-train up to 10,000 edits in one batch.
#  1. bf16 against fp32 on the same 200 edits (bench/results/precision-gemma3.json), which decides whether the
#     bank and the sweep run in bf16 (this folder's config) or float32 (CFG=configs/gemma3-270m.yaml).
#  2. z of counterfact-train's 9,926 cases (Eqn. 5 conflicts dropped) into the bank of the config's dtype
#     (bench/zbank/gemma3-270m-bf16 or bench/zbank/gemma3-270m), 40-minute runs, resumable.
#  3. bench.methods: the unedited model and MEMIT at n = 1, 10, 100, 1,000, 3,162 and 9,926, Figure 5 in
#     bench/results/counterfact/gemma3 and its Table 2 rows in table2.json there (own work directory; SmolLM2's records are not touched).
# From the repository root: bash bench/experiments/e2026_12_05_gemma3_scale/run.sh   (STEP=1 stops after step 1)
set -e
PY=${PY:-.venv/bin/python}
CFG=${CFG:-bench/experiments/e2026_12_05_gemma3_scale/gemma3-270m-bf16.yaml}
[ -f bench/results/precision-gemma3.json ] || "$PY" -m bench.precision --config configs/gemma3-270m.yaml --n 200 \
  --work runs/precision-gemma --out bench/results/precision-gemma3.json
[ "${STEP:-3}" = 1 ] && exit 0
BANK=$("$PY" -c "
import sys; sys.path.insert(0, '.')
from bench.zbank import bank_dir; from memit_pl.config import Config
c = Config.from_file('$CFG'); print(bank_dir(c.model.name, compute_dtype=c.model.compute_dtype))")
until "$PY" -c "import json,sys; sys.exit(json.load(open('$BANK/bank.json'))['n_edits'] < 9926)" 2>/dev/null; do
  "$PY" -m bench.zbank --config "$CFG" --minutes 40 --work runs/zbank-gemma
done
"$PY" -m bench.methods --config "$CFG" --n 10000 --methods unedited,memit --zbank --grid 1,10,100,1000,3162 \
  --work runs/methods-gemma --out bench/results/counterfact/gemma3/table2.json --sweep-out bench/results/counterfact/gemma3
