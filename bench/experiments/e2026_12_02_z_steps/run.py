"""How many z steps are needed: the loss trajectory of the batched optimiser at several learning rates, and
ES/PS/NS after the edit with the z that each cut-off (after k steps) would have given.

    python -m bench.experiments.e2026_12_02_z_steps.run [--n 64] [--lrs 0.5,1,2] [--cuts 4,6,8,10,12,16,25]

One 25-step run per learning rate records every step's per-edit loss and δ (``optimize_z(trace=...)``); the
state after k steps is what a run with ``v_num_grad_steps = k`` ends in (the same early stops). Each
(lr, cut) pair of ``--evaluate`` is then applied as one MEMIT batch and evaluated on the same cases (no GE).
Cases: the first ``--n`` of counterfact-val (tuning data), conflicts dropped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from bench.experiments.common import command  # noqa: E402
from memit_pl.config import Config, EvalConfig, TrainerConfig  # noqa: E402
from memit_pl.data.edits import load_edits  # noqa: E402
from memit_pl.editor import MEMIT  # noqa: E402
from memit_pl.experiments.sweep import row  # noqa: E402
from memit_pl.modeling.loading import input_device, load_model  # noqa: E402
from memit_pl.modeling.spec import get_spec  # noqa: E402
from memit_pl.stages.context import context_prefixes  # noqa: E402
from memit_pl.stages.zbatch import build_z_batch, by_live_length  # noqa: E402
from memit_pl.stages.zopt import optimize_z  # noqa: E402
from memit_pl.stages.zstore import ZStore  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--edits", default=str(ROOT.parent / "shared/data/counterfact/counterfact-val.json"))
    ap.add_argument("--config", default=str(ROOT / "configs/smollm2-135m.yaml"))
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--lrs", default="0.5,1,2")
    ap.add_argument("--cuts", default="4,6,8,10,12,16,25")
    ap.add_argument("--evaluate", default="0.5:25,0.5:12,0.5:8,1:8,1:12,2:6,2:8",
                    help="lr:cut pairs to apply and evaluate")
    ap.add_argument("--out", default="runs/z_steps/z_steps.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = Config.from_file(args.config)
    cfg = replace(cfg, trainer=TrainerConfig(enable_progress_bar=False),
                  eval=EvalConfig(batch_size=256, max_generation_prompts=0))
    model, tok = load_model(cfg.model.name, device="cpu")
    spec = get_spec(model)
    requests = load_edits(args.edits, tokenizer=tok, limit=args.n, drop_conflicting=True)
    prefixes = context_prefixes(model, tok, cfg.memit.context_templates, cfg.memit.context_seeds, cfg.memit.seed)
    ordered = by_live_length(tok, requests)
    ids = [r.case_id for r in ordered]
    cuts = [int(c) for c in args.cuts.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    trajectories, snaps, seconds = {}, {}, {}
    for lr in lrs:
        memit = replace(cfg.memit, v_lr=lr, v_num_grad_steps=max(cuts))
        losses = [[] for _ in range(max(cuts))]  # per step: per-edit losses over all batches
        states = {c: [] for c in cuts}
        t0 = time.perf_counter()
        for i in range(0, len(ordered), memit.z_batch_size):
            chunk = ordered[i : i + memit.z_batch_size]
            batch = build_z_batch(tok, chunk, prefixes, memit.essence_prompt).to(input_device(model))
            per_step = {}
            optimize_z(model, spec, batch, memit, trace=lambda it, loss, delta, d=per_step: d.__setitem__(it, (loss, delta)))
            # after k steps: the trace at step k - 1 (δ before that step's update); past the last traced step
            # every edit had stopped, and that step's δ is final
            last = max(per_step)
            for k in range(max(cuts)):
                losses[k].extend(per_step[min(k, last)][0].tolist())
            for c in cuts:
                loss, delta = per_step[min(c - 1, last)]
                states[c].append((delta, loss))
        seconds[lr] = round(time.perf_counter() - t0, 1)
        trajectories[str(lr)] = [round(sum(v) / len(v), 4) for v in losses]
        snaps[lr] = states
        print(f"lr {lr}: {seconds[lr]} s, mean loss per step {trajectories[str(lr)]}", flush=True)
    result = {"command": command(__file__), "n_edits": len(ordered), "mean_loss_by_step": trajectories,
              "z_seconds_25_steps": {str(k): v for k, v in seconds.items()}, "evaluated": []}

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    if not args.evaluate:
        return
    editor = MEMIT(model, tok, cfg, work_dir=Path(args.out).parent / "work")
    h_init = _h_init(model, spec, tok, ordered, prefixes, cfg.memit)
    unedited = editor.evaluate(ordered)
    result["unedited"] = row(0, unedited)
    for pair in filter(None, args.evaluate.split(",")):
        lr_s, cut_s = pair.split(":")
        lr, cut = float(lr_s), int(cut_s)
        deltas = torch.cat([d for d, _ in snaps[lr][cut]])
        loss = torch.cat([x for _, x in snaps[lr][cut]])
        store = ZStore(ids, {"z": h_init + deltas, "loss": loss},
                       {"layer": cfg.memit.target_layer, "memit": asdict(cfg.memit), "prefixes": prefixes,
                        "key": f"z-steps-lr{lr}-k{cut}"})
        t = time.perf_counter()
        ev = editor.edited_evaluation(ordered, store, cfg.memit, tag=f"lr{lr}-k{cut}")
        r = row(len(ordered), ev, unedited, lr=lr, steps=cut, mean_z_loss=round(float(loss.mean()), 4),
                seconds=round(time.perf_counter() - t, 1))
        result["evaluated"].append(r)
        print(r, flush=True)
        Path(args.out).write_text(json.dumps(result, indent=2))


def _h_init(model, spec, tok, ordered, prefixes, memit):
    """h^L at each edit's subject token: the z of a one-step run (it stops before any update)."""
    out = []
    for i in range(0, len(ordered), memit.z_batch_size):
        batch = build_z_batch(tok, ordered[i : i + memit.z_batch_size], prefixes, memit.essence_prompt)
        out.append(optimize_z(model, spec, batch.to(input_device(model)), replace(memit, v_num_grad_steps=1)).z)
    return torch.cat(out)


if __name__ == "__main__":
    main()
