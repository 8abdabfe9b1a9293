"""Batched z optimisation vs the serial per-edit reference loop, side by side in one run.

    .venv/bin/python bench/z.py [--n 100] [--compare 32] [--batch 32] [--config configs/smollm2-135m.yaml]

For each batch of edits: the batched optimiser (one no-grad pass over the columns before the
subject's last token, filling the key/value cache; one no-grad pass up to layer L; then only the
blocks above L and only the columns from the edit on, each step; logits only where the loss reads
them). For the first ``--compare`` edits also, side by side: the same optimiser without the
prefix cache, and the edits one at a time with the reference algorithm (a full forward and backward
pass every step). Same context prefixes, hyperparameters and steps. Writes bench/results/z.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memit_pl.config import MemitConfig  # noqa: E402
from memit_pl.context import context_prefixes  # noqa: E402
from memit_pl.edits import load_edits  # noqa: E402
from memit_pl.models import load_model  # noqa: E402
from memit_pl.spec import get_spec  # noqa: E402
from memit_pl.z_reference import reference_z  # noqa: E402
from memit_pl.zbatch import build_z_batch  # noqa: E402
from memit_pl.zopt import optimize_z  # noqa: E402


def memit_from_yaml(path: Path) -> MemitConfig:
    import yaml

    return MemitConfig(**(yaml.safe_load(path.read_text()).get("memit") or {}))


def profile_batch(model, spec, batch, cfg) -> list[dict]:
    """Top operators by self CPU time for one batched optimisation."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        optimize_z(model, spec, batch, cfg)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    return [{"op": e.key, "share": round(e.self_cpu_time_total / total, 3)} for e in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--edits", default=str(ROOT.parent / "shared/data/counterfact_known_dev.json"))
    ap.add_argument("--n", type=int, default=100, help="edits (the first n cases)")
    ap.add_argument("--batch", type=int, default=32, help="edits per batched optimisation")
    ap.add_argument("--compare", type=int, default=32,
                    help="edits (the first ones) also run without the prefix cache and by the serial reference")
    ap.add_argument("--config", default=str(ROOT / "configs/smollm2-135m.yaml"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default=str(ROOT / "bench/results/z.json"))
    args = ap.parse_args()

    torch.manual_seed(0)
    model, tok = load_model(args.model, device="cpu")
    spec = get_spec(model)
    cfg = memit_from_yaml(Path(args.config))
    requests = load_edits(args.edits, tokenizer=tok, limit=args.n)
    prefixes = context_prefixes(model, tok, cfg.context_templates, cfg.context_seeds, cfg.seed)

    ours_total, cmp_ours, cmp_plain, base_s, ours_loss, base_loss, ours_steps, base_steps, rel = 0.0, 0.0, 0.0, [], [], [], [], [], []
    cmp_loss, plain_loss, plain_rel = [], [], []
    before_frac = []
    for i in range(0, len(requests), args.batch):
        chunk = requests[i : i + args.batch]
        t = time.perf_counter()
        batch = build_z_batch(tok, chunk, prefixes, cfg.essence_prompt)
        cfg.z_prefix_cache = True
        res = optimize_z(model, spec, batch, cfg)
        dt = time.perf_counter() - t
        ours_total += dt
        ours_loss += res.loss.tolist()
        ours_steps += res.steps.tolist()
        lens = batch.attention_mask.sum(1).float()
        before_frac.append(float((batch.lookup.float() / lens).mean()))
        compared = max(0, min(len(chunk), args.compare - i))
        if compared == 0:
            print(f"edits {i + len(chunk)}/{len(requests)}: ours {ours_total / (i + len(chunk)):.3f} s/edit", flush=True)
            continue
        sub = chunk[:compared]
        if compared < len(chunk):  # time ours on exactly the compared edits
            t = time.perf_counter()
            res = optimize_z(model, spec, build_z_batch(tok, sub, prefixes, cfg.essence_prompt), cfg)
            dt = time.perf_counter() - t
        cmp_ours += dt
        cmp_loss += res.loss.tolist()[:compared]
        cfg.z_prefix_cache = False
        t = time.perf_counter()
        plain = optimize_z(model, spec, build_z_batch(tok, sub, prefixes, cfg.essence_prompt), cfg)
        cmp_plain += time.perf_counter() - t
        cfg.z_prefix_cache = True
        plain_loss += plain.loss.tolist()
        plain_rel += ((res.z[:compared] - plain.z).norm(dim=-1) / plain.z.norm(dim=-1)).tolist()
        for j, r in enumerate(sub):
            t = time.perf_counter()
            z, loss, steps = reference_z(model, tok, spec, r, prefixes, cfg)
            base_s.append(time.perf_counter() - t)
            base_loss.append(loss)
            base_steps.append(steps)
            rel.append(float((res.z[j] - z).norm() / z.norm()))
        print(f"edits {i + len(chunk)}/{len(requests)}: ours {ours_total / (i + len(chunk)):.3f} s/edit; compared "
              f"{len(base_s)}: ours {cmp_ours / len(base_s):.3f}, no prefix cache {cmp_plain / len(base_s):.3f}, "
              f"reference {statistics.fmean(base_s):.3f} s/edit", flush=True)

    prof = profile_batch(model, spec, build_z_batch(tok, requests[: args.batch], prefixes, cfg.essence_prompt), cfg)
    n_cmp = len(base_s)
    ours, plain_s, base = cmp_ours / n_cmp, cmp_plain / n_cmp, statistics.fmean(base_s)
    result = {
        "model": args.model,
        "n_edits": len(requests),
        "n_compared": n_cmp,
        "batch_size": args.batch,
        "ours_s_per_edit": round(ours, 4),
        "baseline_s_per_edit": round(base, 4),
        "ratio": round(base / ours, 2),
        "ours_mean_loss": round(statistics.fmean(cmp_loss), 4),
        "baseline_mean_loss": round(statistics.fmean(base_loss), 4),
        "ours_no_prefix_cache_s_per_edit": round(plain_s, 4),
        "ours_no_prefix_cache_mean_loss": round(statistics.fmean(plain_loss), 4),
        "ratio_prefix_cache": round(plain_s / ours, 2),
        "max_rel_z_diff_prefix_cache_vs_not": round(max(plain_rel), 7),
        "ours_all_s_per_edit": round(ours_total / len(requests), 4),
        "ours_all_mean_loss": round(statistics.fmean(ours_loss), 4),
        "ours_mean_steps": round(statistics.fmean(ours_steps[:n_cmp]), 2),
        "baseline_mean_steps": round(statistics.fmean(base_steps), 2),
        "same_steps_fraction": round(sum(a == b for a, b in zip(ours_steps[:n_cmp], base_steps)) / n_cmp, 3),
        "median_rel_z_diff": round(statistics.median(rel), 6),
        "max_rel_z_diff": round(max(rel), 6),
        "fraction_of_positions_before_edit": round(statistics.fmean(before_frac), 3),
        "profile_top_ops": prof,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "torch_threads": torch.get_num_threads(),
        "command": "python bench/z.py " + " ".join(sys.argv[1:]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
