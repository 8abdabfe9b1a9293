"""Benchmark of evaluation: many cases per padded batch (ours) against one case at a time.

"per-record" is the same scoring code with one case per forward pass, as the reference scores a
record (kmeng01/memit ``compute_rewrite_quality_counterfact``: all prompts of one record in one
batch). "reference" re-implements the reference's ``test_batch_prediction`` (one row per prompt and
target, tokenised as ``f"{prompt} {target}"``, right padding, full logits, a Python loop over target
tokens) to check our numbers against its algorithm; it runs once. Batched and per-record runs are
interleaved; medians reported. Generation Entropy is timed apart (it is greedy decoding, which
dominates on a CPU): batched and per-record generations are compared on ``--ge-cases`` cases.

    .venv/bin/python -m bench.eval --n 50 --repeats 3

Writes bench/results/eval.json (the schema of bench/record.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import record  # noqa: E402
from memit_pl.config import EvalConfig, TrainerConfig  # noqa: E402
from memit_pl.data.edits import load_edits  # noqa: E402
from memit_pl.modeling.loading import load_model  # noqa: E402
from memit_pl.stages import runtime  # noqa: E402
from memit_pl.stages.evaluate import METRICS, evaluate_requests  # noqa: E402

DEFAULT_EDITS = ROOT / ".." / "shared" / "data" / "counterfact_known_dev.json"


@torch.no_grad()
def reference_record(model, tok, r) -> list[tuple[float, float]]:
    """The reference's per-record scoring: (mean NLL of target_new, of target_true) per prompt."""
    prefixes = [r.text, *r.paraphrases, *r.neighborhood]
    prefix_lens = [len(n) for n in tok(prefixes)["input_ids"]]
    enc = tok([f"{p} {s}" for p in prefixes for s in (r.target_new, r.target_true)], padding=True, return_tensors="pt")
    a_tok, b_tok = (tok(f" {n}")["input_ids"] for n in (r.target_new, r.target_true))
    logits = model(**enc).logits
    out = []
    for i in range(logits.size(0)):
        cur = a_tok if i % 2 == 0 else b_tok
        nll = sum(-torch.log_softmax(logits[i, prefix_lens[i // 2] + j - 1], 0)[t].item() for j, t in enumerate(cur))
        out.append(nll / len(cur))
    return [(out[i], out[i + 1]) for i in range(0, len(out), 2)]


def max_metric_diff(a: dict, b: dict) -> float:
    diffs = [abs(a["metrics"][m] - b["metrics"][m]) for m in METRICS if a["metrics"][m] is not None]
    if any((a["metrics"][m] is None) != (b["metrics"][m] is None) for m in METRICS):
        return math.inf
    return max(diffs, default=0.0)


def prompt_nlls(result: dict) -> list[tuple[float, float]]:
    return [
        (e["nll_new"], e["nll_true"])
        for c in result["cases"]
        for k in ("rewrite", "paraphrase", "neighborhood")
        for e in c["prompts"][k]
    ]


def max_nll_diff(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) for pa, pb in zip(a, b) for x, y in zip(pa, pb))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--edits", default=str(DEFAULT_EDITS))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=50, help="cases timed")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=EvalConfig.batch_size, help="rows per forward pass")
    ap.add_argument("--ge-cases", type=int, default=8, help="cases for the Generation Entropy check (0: none)")
    ap.add_argument("--compute", default="auto", help="compute dtype of a third, batched run (auto, bfloat16, float32)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "eval.json"))
    args = ap.parse_args()
    record.preflight("bench.eval", args)
    compute = runtime.resolve_compute_dtype(args.compute, "cpu")
    compute_trainer = TrainerConfig(enable_progress_bar=False, precision=runtime.lightning_precision(compute))

    model, tok = load_model(args.model, device="cpu")
    requests = load_edits(args.edits, tokenizer=tok, limit=args.n)
    cfg = EvalConfig(batch_size=args.batch_size, max_generation_prompts=0)
    evaluate_requests(model, tok, requests[:4], cfg)  # warm-up

    evaluate_requests(model, tok, requests[:4], cfg, compute_trainer)  # warm-up of the compute dtype
    times: dict[str, list[float]] = {"batched": [], "per_record": [], "compute": []}
    results = {}
    for rep in range(args.repeats):
        order = ["batched", "compute", "per_record"] if rep % 2 == 0 else ["per_record", "compute", "batched"]
        for mode in order:
            t0 = time.perf_counter()
            res = evaluate_requests(model, tok, requests, cfg, compute_trainer if mode == "compute" else None,
                                    per_record=mode == "per_record")
            times[mode].append(time.perf_counter() - t0)
            results[mode] = res
            print(f"repeat {rep} {mode}: {times[mode][-1]:.1f}s", flush=True)

    t0 = time.perf_counter()
    ref = [p for r in requests for p in reference_record(model, tok, r)]
    ref_s = time.perf_counter() - t0
    print(f"reference re-implementation: {ref_s:.1f}s", flush=True)

    med = {m: statistics.median(v) for m, v in times.items()}
    batched, per_record = results["batched"], results["per_record"]
    report = {
        "model": args.model,
        "edits_file": str(Path(args.edits)),
        "device_note": f"cpu ({torch.get_num_threads()} threads, {platform.machine()})",
        "n_cases": len(requests),
        "repeats": args.repeats,
        "batch_size_rows": args.batch_size,
        "generation_entropy_in_timing": False,
        "batched_runs_s": [round(t, 2) for t in times["batched"]],
        "per_record_runs_s": [round(t, 2) for t in times["per_record"]],
        "batched_s": round(med["batched"], 2),
        "per_record_s": round(med["per_record"], 2),
        "batched_cases_per_s": round(len(requests) / med["batched"], 2),
        "per_record_cases_per_s": round(len(requests) / med["per_record"], 2),
        "speedup": round(med["per_record"] / med["batched"], 2),
        "fp32_s": round(med["batched"], 2),
        "compute_s": round(med["compute"], 2),
        "compute_runs_s": [round(t, 2) for t in times["compute"]],
        "ratio_compute_vs_fp32": round(med["batched"] / med["compute"], 2),
        "max_abs_metric_diff_compute_vs_fp32": max_metric_diff(results["compute"], batched),
        "max_abs_nll_diff_compute_vs_fp32": max_nll_diff(prompt_nlls(results["compute"]), prompt_nlls(batched)),
        "metrics_compute": results["compute"]["metrics"],
        "max_abs_metric_diff_batched_vs_per_record": max_metric_diff(batched, per_record),
        "max_abs_nll_diff_batched_vs_per_record": max_nll_diff(prompt_nlls(batched), prompt_nlls(per_record)),
        "reference_reimplementation_s": round(ref_s, 2),
        "max_abs_nll_diff_vs_reference": max_nll_diff(prompt_nlls(batched), ref),
        "metrics": batched["metrics"],
    }

    if args.ge_cases:
        ge_cfg = EvalConfig(batch_size=args.batch_size)
        ge_req = requests[: args.ge_cases]
        t0 = time.perf_counter()
        ge_b = evaluate_requests(model, tok, ge_req, ge_cfg)
        t1 = time.perf_counter()
        ge_p = evaluate_requests(model, tok, ge_req, ge_cfg, per_record=True)
        t2 = time.perf_counter()
        report["generation_check"] = {
            "n_cases": len(ge_req),
            "generation_length": ge_cfg.generation_length,
            "prompts_per_case": ge_cfg.max_generation_prompts,
            "batched_s": round(t1 - t0, 2),
            "per_record_s": round(t2 - t1, 2),
            "GE_batched": ge_b["metrics"]["GE"],
            "GE_per_record": ge_p["metrics"]["GE"],
            "same_generations": [c["generations"] for c in ge_b["cases"]] == [c["generations"] for c in ge_p["cases"]],
        }
    report["same_metrics"] = report["max_abs_metric_diff_batched_vs_per_record"] < 1e-3 and (
        report["max_abs_nll_diff_vs_reference"] < 1e-3
    )
    rec = record.record("eval", report, args=args, config={"eval": dataclasses.asdict(cfg)}, compute_dtype=compute)
    record.write(args.out, rec)
    print(json.dumps(rec, indent=2))
    return 0 if report["same_metrics"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
