"""Batched z optimisation in fp32 vs in the compute dtype vs the serial per-edit reference loop, side by
side in one run.

    .venv/bin/python -m bench.z [--n 200] [--compare N] [--plain 32] [--batch 32] [--compute auto]
                                [--config configs/smollm2-135m.yaml]

The compute dtype (``--compute``: auto, float32, bfloat16; auto as ``model.compute_dtype: auto``) runs the
same batched optimiser under autocast, batch by batch right after its fp32 run on the same edits.

Ours is what `memit-pl z` runs: the edits ordered by their length after the subject (as
``compute_zs`` orders them), in batches of ``--batch``; per batch one no-grad pass over the columns
before the subject's last token (filling the key/value cache), one no-grad pass up to layer L, then
each step only the blocks above L and only the columns from the edit on, logits only where the loss
reads them. Interleaved with it, batch by batch, the reference algorithm on the same edits one at a
time (a full forward and backward pass every step), for the first ``--compare`` edits (default: all).
Once, for the first ``--plain`` edits: the batched optimiser without the prefix cache. Same context
prefixes, hyperparameters and steps. Writes bench/results/z.json (the schema of bench/record.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import record  # noqa: E402
from memit_pl.config import MemitConfig  # noqa: E402
from memit_pl.data.edits import load_edits  # noqa: E402
from memit_pl.modeling.loading import input_device, load_model  # noqa: E402
from memit_pl.modeling.spec import get_spec  # noqa: E402
from memit_pl.stages import runtime  # noqa: E402
from memit_pl.stages.context import context_prefixes  # noqa: E402
from memit_pl.stages.zbatch import build_z_batch, by_live_length  # noqa: E402
from memit_pl.stages.zopt import optimize_z  # noqa: E402
from tests.support.z_reference import reference_z  # noqa: E402


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
    ap.add_argument("--edits", default=str(ROOT.parent / "shared/data/counterfact/counterfact-train.json"))
    ap.add_argument("--n", type=int, default=200, help="edits (the first n cases, conflicts dropped)")
    ap.add_argument("--compute", default="auto", help="compute dtype of the second batched run (auto, bfloat16, ...)")
    ap.add_argument("--batch", type=int, default=32, help="edits per batched optimisation")
    ap.add_argument("--reference-settings", action="store_true",
                    help="also time the fp32 batched optimiser at the reference's z settings (lr 0.5, 25 steps)")
    ap.add_argument("--compile", action="store_true",
                    help="also time the fp32 batched optimiser with memit.z_compile (torch.compile of the re-run blocks)")
    ap.add_argument("--compare", type=int, default=None,
                    help="edits (the first ones in file order) also optimised by the serial reference (default: all)")
    ap.add_argument("--plain", type=int, default=32,
                    help="edits (the first ones in optimisation order) also run without the prefix cache")
    ap.add_argument("--config", default=str(ROOT / "configs/smollm2-135m.yaml"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (bench/gpu_check.sh)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/z.json"))
    args = ap.parse_args()
    record.preflight("bench.z", args)

    torch.manual_seed(0)
    model, tok = load_model(args.model, device=args.device)
    spec = get_spec(model)
    dev = input_device(model)
    cfg = memit_from_yaml(Path(args.config))
    cfg.z_prefix_cache = True
    requests = load_edits(args.edits, tokenizer=tok, limit=args.n, drop_conflicting=True)
    compute = runtime.resolve_compute_dtype(args.compute, args.device)  # auto: bf16 on CUDA, the matmul probe on a CPU
    prefixes = context_prefixes(model, tok, cfg.context_templates, cfg.context_seeds, cfg.seed)
    n_compare = len(requests) if args.compare is None else min(args.compare, len(requests))
    compared_ids = {r.case_id for r in requests[:n_compare]}
    ordered = by_live_length(tok, requests)

    ours_s, ours = [], {}  # per batch seconds; case id -> (z, loss, steps)
    comp_s, comp = [], {}  # the same in the compute dtype
    base_s, base = [], {}  # per edit seconds; case id -> (z, loss, steps)
    compile_s, rel_k = [], []  # per batch seconds with z_compile; relative z differences to fp32 eager
    refset_s, refset_loss, refset_steps = [], [], []  # at the reference's z settings
    before_frac = []
    for i in range(0, len(ordered), args.batch):
        chunk = ordered[i : i + args.batch]
        t = time.perf_counter()
        batch = build_z_batch(tok, chunk, prefixes, cfg.essence_prompt).to(dev)
        res = optimize_z(model, spec, batch, cfg)
        ours_s.append(time.perf_counter() - t)
        for j, r in enumerate(chunk):
            ours[r.case_id] = (res.z[j], float(res.loss[j]), int(res.steps[j]))
        t = time.perf_counter()
        with runtime.autocast(args.device, compute):
            res_c = optimize_z(model, spec, build_z_batch(tok, chunk, prefixes, cfg.essence_prompt).to(dev), cfg)
        comp_s.append(time.perf_counter() - t)
        for j, r in enumerate(chunk):
            comp[r.case_id] = (res_c.z[j], float(res_c.loss[j]), int(res_c.steps[j]))
        if args.reference_settings:
            t = time.perf_counter()
            res_r = optimize_z(model, spec, build_z_batch(tok, chunk, prefixes, cfg.essence_prompt).to(dev),
                               dataclasses.replace(cfg, v_lr=0.5, v_num_grad_steps=25))
            refset_s.append(time.perf_counter() - t)
            refset_loss.extend(res_r.loss.tolist())
            refset_steps.extend(res_r.steps.tolist())
        if args.compile:
            t = time.perf_counter()
            res_k = optimize_z(model, spec, build_z_batch(tok, chunk, prefixes, cfg.essence_prompt).to(dev),
                               dataclasses.replace(cfg, z_compile=True))
            compile_s.append(time.perf_counter() - t)
            rel_k.extend(((res_k.z - res.z).norm(dim=-1) / res.z.norm(dim=-1)).tolist())
        lens = batch.attention_mask.sum(1).float()
        before_frac.append(float((batch.lookup.float() / lens).mean()))
        for r in chunk:
            if r.case_id in compared_ids:
                t = time.perf_counter()
                base[r.case_id] = reference_z(model, tok, spec, r, prefixes, cfg)
                base_s.append(time.perf_counter() - t)
        done = i + len(chunk)
        print(f"edits {done}/{len(ordered)}: ours {sum(ours_s) / done:.3f} s/edit, {compute} "
              f"{sum(comp_s) / done:.3f} s/edit; reference "
              f"{statistics.fmean(base_s) if base_s else float('nan'):.3f} s/edit over {len(base_s)}", flush=True)

    # The prefix cache's own share: the first --plain edits (in optimisation order) with and without it.
    plain_reqs = ordered[: args.plain]
    plain_rows = {}
    if plain_reqs:
        cfg.z_prefix_cache = False
        t = time.perf_counter()
        plain = optimize_z(model, spec, build_z_batch(tok, plain_reqs, prefixes, cfg.essence_prompt).to(dev), cfg)
        plain_total = time.perf_counter() - t
        cfg.z_prefix_cache = True
        t = time.perf_counter()
        cached = optimize_z(model, spec, build_z_batch(tok, plain_reqs, prefixes, cfg.essence_prompt).to(dev), cfg)
        cached_total = time.perf_counter() - t
        plain_rows = {
            "n_plain": len(plain_reqs),
            "ours_no_prefix_cache_s_per_edit": round(plain_total / len(plain_reqs), 4),
            "ours_same_edits_s_per_edit": round(cached_total / len(plain_reqs), 4),
            "ratio_prefix_cache": round(plain_total / cached_total, 2),
            "ours_no_prefix_cache_mean_loss": round(float(plain.loss.mean()), 4),
            "max_rel_z_diff_prefix_cache_vs_not": round(float(((cached.z - plain.z).norm(dim=-1) / plain.z.norm(dim=-1)).max()), 7),
        }

    prof = profile_batch(model, spec, build_z_batch(tok, ordered[: args.batch], prefixes, cfg.essence_prompt).to(dev), cfg)
    ids = sorted(base, key=lambda c: [r.case_id for r in requests].index(c))
    rel = [float((ours[c][0] - base[c][0]).norm() / base[c][0].norm()) for c in ids]
    ours_per_edit = sum(ours_s) / len(ordered)
    comp_per_edit = sum(comp_s) / len(ordered)
    base_per_edit = statistics.fmean(base_s)
    rel_c = [float((comp[c][0] - ours[c][0]).norm() / ours[c][0].norm()) for c in ours]
    result = {
        "fp32_s_per_edit": round(ours_per_edit, 4),
        "compute_s_per_edit": round(comp_per_edit, 4),
        "serial_s_per_edit": round(base_per_edit, 4),
        "cpu_bf16_matmul_speedup": round(runtime.cpu_bf16_speedup(), 2) if args.device == "cpu" else None,
        "ratio_compute_vs_fp32": round(ours_per_edit / comp_per_edit, 2),
        "ratio_compute_vs_serial": round(base_per_edit / comp_per_edit, 2),
        "mean_loss_fp32": round(statistics.fmean(v[1] for v in ours.values()), 4),
        "mean_loss_compute": round(statistics.fmean(v[1] for v in comp.values()), 4),
        "mean_steps_compute": round(statistics.fmean(v[2] for v in comp.values()), 2),
        "median_rel_z_diff_compute_vs_fp32": round(statistics.median(rel_c), 6),
        "compute_batch_s_per_edit_median": round(statistics.median(
            t / len(ordered[i * args.batch : (i + 1) * args.batch]) for i, t in enumerate(comp_s)), 4),
        "model": args.model,
        "n_edits": len(requests),
        "n_compared": len(ids),
        "batch_size": args.batch,
        "ours_s_per_edit": round(ours_per_edit, 4),
        "baseline_s_per_edit": round(base_per_edit, 4),
        "ratio": round(base_per_edit / ours_per_edit, 2),
        "ours_mean_loss": round(statistics.fmean(ours[c][1] for c in ids), 4),
        "baseline_mean_loss": round(statistics.fmean(base[c][1] for c in ids), 4),
        "ours_all_mean_loss": round(statistics.fmean(v[1] for v in ours.values()), 4),
        "ours_batch_s_median": round(statistics.median(ours_s), 2),
        "ours_batch_s_per_edit_median": round(statistics.median(
            t / len(ordered[i * args.batch : (i + 1) * args.batch]) for i, t in enumerate(ours_s)), 4),
        "baseline_s_per_edit_median": round(statistics.median(base_s), 4),
        "ours_mean_steps": round(statistics.fmean(ours[c][2] for c in ids), 2),
        "baseline_mean_steps": round(statistics.fmean(base[c][2] for c in ids), 2),
        "same_steps_fraction": round(sum(ours[c][2] == base[c][2] for c in ids) / len(ids), 3),
        "median_rel_z_diff": round(statistics.median(rel), 7),
        "max_rel_z_diff": round(max(rel), 7),
        **plain_rows,
        **({} if not refset_s else {
            "fp32_reference_settings_s_per_edit": round(sum(refset_s) / len(ordered), 4),
            "ratio_reference_settings_vs_fp32": round(sum(refset_s) / sum(ours_s), 2),
            "ratio_reference_settings_vs_compute": round(sum(refset_s) / sum(comp_s), 2),
            "mean_loss_reference_settings": round(statistics.fmean(refset_loss), 4),
            "mean_steps_reference_settings": round(statistics.fmean(refset_steps), 2),
            "mean_steps_fp32": round(statistics.fmean(v[2] for v in ours.values()), 2)}),
        **({} if not compile_s else {
            "compile_s_per_edit": round(sum(compile_s) / len(ordered), 4),
            "compile_s_per_edit_after_first_batch": round(sum(compile_s[1:]) / max(1, len(ordered) - args.batch), 4),
            "fp32_s_per_edit_after_first_batch": round(sum(ours_s[1:]) / max(1, len(ordered) - args.batch), 4),
            "ratio_fp32_vs_compile_after_first_batch": round(sum(ours_s[1:]) / max(sum(compile_s[1:]), 1e-9), 3),
            "compile_first_batch_s": round(compile_s[0], 1), "fp32_first_batch_s": round(ours_s[0], 1),
            "median_rel_z_diff_compile_vs_fp32": round(statistics.median(rel_k), 7)}),
        "fraction_of_positions_before_edit": round(statistics.fmean(before_frac), 3),
        "profile_top_ops": prof,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "torch_threads": torch.get_num_threads(),
    }
    rec = record.record("z", result, args=args, config={"model": args.model, "memit": dataclasses.asdict(cfg)},
                        compute_dtype=compute)
    record.write(args.out, rec)
    print(json.dumps(rec, indent=2))


if __name__ == "__main__":
    main()
