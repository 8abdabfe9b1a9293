"""End-to-end `memit-pl edit` of the first N CounterFact cases: seconds per stage and peak RSS.

    .venv/bin/python -m bench.edit [--n 1000 10000] [--config configs/smollm2-135m.yaml] [--out-dir DIR] [--fresh]
                                   [--zbank]

The first N cases of counterfact-train, Eqn. 5 conflicts dropped (``--drop_conflicts``). With ``--zbank``
the run's z store is seeded from ``bench/zbank/<model>/`` (bench/zbank.py) and only the missing z are
optimised; the row's ``z_s`` and ``total_s`` then add the banked chunks' own seconds (``z_banked_s``), so
that a 10,000-edit run whose z took several sessions still reports what it cost, and ``peak_rss_mb`` is
the peak of this run (the banked chunks ran with at most 320 edits in memory).

Each N runs the real command in its own process (statistics from the cache, warmed first by
`memit-pl stats`; z optimised from scratch; the ascending-layer update; save_pretrained; the top-1
efficacy check) so that its peak RSS is its own. Stage times and each stage's peak RSS
(``stages_peak_rss_mb``: statistics, z, apply, save) come from the run's summary.json.
Writes bench/results/edit.json (the schema of bench/record.py); the run directories (with their z
stores, reusable by `sweep`, `tune --z_dir`, bench/corpus.py and the experiments under
bench/experiments/) stay under --out-dir (default <cache>/runs/bench-edit, i.e.
~/.cache/memit_pl/runs/bench-edit).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import record  # noqa: E402


def cli() -> list[str]:
    exe = Path(sys.executable).with_name("memit-pl")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "memit_pl"]


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB of the child process) of one command."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {code}")
    return wall, usage.ru_maxrss / 1024


def _model_name(config: str) -> str:
    import yaml

    return yaml.safe_load(Path(config).read_text())["model"]["name"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--edits", default=str(ROOT.parent / "shared/data/counterfact/counterfact-train.json"))
    ap.add_argument("--n", type=int, nargs="+", default=[1000, 10000], help="numbers of edits (first N cases)")
    ap.add_argument("--zbank", action="store_true", help="seed z from bench/zbank/<model> (see the docstring)")
    ap.add_argument("--config", default=str(ROOT / "configs/smollm2-135m.yaml"))
    ap.add_argument("--out-dir", default=str(record.cache_dir() / "runs/bench-edit"))
    ap.add_argument("--fresh", action="store_true", help="delete earlier run directories first (z from scratch)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/edit.json"))
    args = ap.parse_args()
    record.preflight("bench.edit", args)

    common = ["--config", args.config, "--trainer.enable_progress_bar", "false"]
    warm_s, warm_rss = run_measured(cli() + ["stats", *common])
    runs = []
    for n in args.n:
        out = Path(args.out_dir) / f"n{n}"
        if out.exists():
            if not args.fresh:
                raise SystemExit(f"{out} exists: its z store would be resumed, not timed; pass --fresh")
            shutil.rmtree(out)
        banked_s = 0.0
        if args.zbank:  # the seconds of the banked chunks among the first n (kept) cases
            from bench import zbank

            banked_s = zbank.seed_run(out / "z", _model_name(args.config), n)
        wall, rss = run_measured(cli() + ["edit", *common, "--edits", args.edits, "--limit", str(n),
                                          "--drop_conflicts", "true", "--out", str(out)])
        summary = json.loads((out / "summary.json").read_text())
        n = summary["n_edits"]
        t = dict(summary["timings"])
        t["z_s"] = t["z_s"] + banked_s
        runs.append({
            "n_edits": n,
            "total_s": round(wall + banked_s, 1),
            "z_banked_s": round(banked_s, 1),
            "wall_s": round(wall, 1),
            "stages_s": {k.removesuffix("_s"): round(v, 1) for k, v in t.items()},
            "z_s_per_edit": round(t["z_s"] / n, 3),
            "other_s": round(wall + banked_s - sum(t.values()), 1),
            "peak_rss_mb": round(rss, 1),
            "stages_peak_rss_mb": summary.get("peak_rss_mb"),
            "top1_new_before": summary["top1_new_before"],
            "top1_new_after": summary["top1_new_after"],
            "z_mean_steps": round(summary["z_mean_steps"], 2),
            "run_dir": str(out),
            "git_commit": record.git_commit(),  # rows of other N kept from earlier runs carry their own
        })
        print(json.dumps(runs[-1]), flush=True)
        rec = _write(args, runs, warm_s, warm_rss)  # after every N: an interrupted run keeps the rows it has
    print(json.dumps(rec, indent=2))


def _write(args, runs: list[dict], warm_s: float, warm_rss: float) -> dict:
    """Write the rows, keeping an earlier record's rows of other N for the same edits file and config."""
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.exists() else {}
    same = (old.get("edits_file"), old.get("model_config")) == (record.scrub(args.edits), record.scrub(args.config))
    mine = {r["n_edits"] for r in runs}
    kept = [r for r in old.get("rows", []) if same and r["n_edits"] not in mine]
    result = {
        "model_config": args.config,
        "edits_file": args.edits,
        "stats_warm_s": round(warm_s, 1),
        "stats_warm_peak_rss_mb": round(warm_rss, 1),
        "rows": sorted(kept + runs, key=lambda r: r["n_edits"]),
        "note": "other_s: model loading, the before/after prediction table, writing the run directory; rows of "
                "other N kept from earlier runs carry their own git_commit",
    }
    rec = record.record("edit", result, args=args, config={"model_config": args.config})
    record.write(out, rec)
    return rec


if __name__ == "__main__":
    main()
