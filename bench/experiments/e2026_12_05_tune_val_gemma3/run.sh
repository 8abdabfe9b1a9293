#!/bin/bash
# λ and window of Gemma-3-270M tuned on counterfact-val (tuning data, Eqn. 5 conflicts dropped: 1,912 cases) at
# the Table 2 batch size, as bench/experiments/e2026_12_05_tune_val/ did for SmolLM2: 1,000 edits in one batch
# (tune_fraction 0.523), the other 912 held back; bounds of #17's goal (NS within 10 of the unedited model, GE
# within 5), GE on a seeded 500. Every pass in bfloat16 (the Figure 5 config, whose agreement with float32 on
# Gemma is bench/results/precision-gemma3.json); z of all 1,912 from a bf16 bank of the val split (resumable,
# 40-minute runs). Windows: the shipped 0–4 and 2–4 (docs/gemma-post-norm.md); λ around the shipped 3000.
# From the repository root: bash bench/experiments/e2026_12_05_tune_val_gemma3/run.sh
set -e
PY=${PY:-.venv/bin/python}
CFG=bench/experiments/e2026_12_05_gemma3_scale/gemma3-270m-bf16.yaml
VAL=../shared/data/counterfact/counterfact-val.json
BANK=bench/zbank/gemma3-270m-bf16-val
OUT=${OUT:-runs/tune-val-gemma}
until "$PY" -c "import json,sys; sys.exit(json.load(open('$BANK/bank.json'))['n_edits'] < 1912)" 2>/dev/null; do
  "$PY" -m bench.zbank --config "$CFG" --edits "$VAL" --bank "$BANK" --minutes 40 --work runs/zbank-val-gemma
done
"$PY" -c "from bench.zbank import seed; print(seed('$OUT/z', '$BANK'), 'chunks seeded')"
.venv/bin/memit-pl tune --config "$CFG" --edits "$VAL" --drop_conflicts true \
  --tune_fraction 0.523 --windows '[[0,1,2,3,4],[2,3,4]]' --values '[1500,3000,6000,12000]' \
  --max_ns_drop 10 --max_ge_drop 5 --eval.generation_cases 500 --z_dir "$OUT/z" --out "$OUT"
