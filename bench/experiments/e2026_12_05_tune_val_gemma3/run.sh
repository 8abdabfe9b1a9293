#!/bin/bash
# λ and window of Gemma-3-270M tuned on counterfact-val at 1,000 edits in one batch, the protocol of
# ../e2026_12_05_tune_val/run.sh (SmolLM2's: 912 held back, NS −10 / GE −5 bounds, GE on a seeded 500), run by
# it with Gemma's settings: every pass in bfloat16 (the Figure 5 config, whose agreement with float32 on Gemma
# is bench/results/precision-gemma3.json), z of all 1,912 from a bf16 bank of the val split, windows the
# shipped 0–4 and 2–4 (docs/gemma-post-norm.md; one z store, L = 4), λ from half the shipped 3000 to 8 times it.
# From the repository root: bash bench/experiments/e2026_12_05_tune_val_gemma3/run.sh
CFG=bench/experiments/e2026_12_05_gemma3_scale/gemma3-270m-bf16.yaml BANK=bench/zbank/gemma3-270m-bf16-val \
WORK=runs/zbank-val-gemma OUT=${OUT:-runs/tune-val-gemma} WINDOWS='[[0,1,2,3,4],[2,3,4]]' \
VALUES='[1500,3000,6000,12000,24000]' exec bash bench/experiments/e2026_12_05_tune_val/run.sh
