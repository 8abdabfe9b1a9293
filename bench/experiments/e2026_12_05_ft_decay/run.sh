#!/bin/bash
# FT-W decay search on counterfact-val (tuning data), layer 0, lr 5e-3; one record per decay.
# From the repository root: N=100 GE=100 bash bench/experiments/e2026_12_05_ft_decay/run.sh
#                           N=1000 GE=500 WDS="0 1e-3 1e-2 1e-1" bash bench/experiments/e2026_12_05_ft_decay/run.sh
N=${N:-100}
GE=${GE:-100}
for WD in ${WDS:-0 1e-3 1e-2 1e-1 1}; do
  .venv/bin/python -m bench.methods --edits ../shared/data/counterfact/counterfact-val.json --n "$N" \
    --methods unedited,ft --set ft.ft_layer=0 --set ft.ft_lr=5e-3 --set ft.ft_weight_decay="$WD" \
    --ge-cases "$GE" --work runs/ftdecay/w --out "runs/ftdecay/n$N-wd$WD.json"
done
