"""AlphaEdit's lifelong-editing protocol: the first N counterfact-train cases in rounds of R on the same
model, MEMIT-in-rounds against AlphaEdit, all edits so far evaluated every K rounds.

    .venv/bin/python -m bench.rounds [--n 2000] [--round-size 100] [--every 5] [--methods memit,alphaedit]
                                     [--ge-cases 500] [--work runs/rounds] [--out bench/results/methods/rounds.json]
                                     [--label NAME --set memit.KEY=VALUE ...] [--replot]

Each method is one `memit-pl edit --round_size R --evaluate_every K` run in its own process, resumable
between rounds from its run directory under ``--work`` (re-run the same command after an interruption).
A method already in ``--out`` under the same protocol (N, round size, K) is kept when another is run
(``--methods alphaedit`` after ``--methods memit``), so the two can be measured in separate sessions.
``--label`` and ``--set`` add a variant of one method as its own arm (its own run directory and rows), e.g.
``--methods alphaedit --label alphaedit-e0.05 --set memit.nullspace_energy=0.05``, or MEMIT in sequence without
the earlier rounds' keys in its preserved term, as AlphaEdit's paper runs its MEMIT baseline:
``--methods memit --label memit-sequence --set keep_previous_keys=false``.
Writes the rows of both (``method``, ``edits_so_far``, ES, PS, NS, GE and EasyEdit's metrics) to ``--out``
(the schema of bench/record.py) and plots them against the number of edits so far, one panel per metric and one
colour per arm (``rounds.png`` beside it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import record  # noqa: E402
from bench.edit import cli, run_measured  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--edits", default=str(ROOT.parent / "shared/data/counterfact/counterfact-train.json"))
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--round-size", type=int, default=100)
    ap.add_argument("--every", type=int, default=5, help="evaluate all edits so far every K rounds")
    ap.add_argument("--methods", default="memit,alphaedit")
    ap.add_argument("--config", default=str(ROOT / "configs/smollm2-135m.yaml"))
    ap.add_argument("--ge-cases", type=int, default=500)
    ap.add_argument("--work", default="runs/rounds")
    ap.add_argument("--out", default=str(ROOT / "bench/results/methods/rounds.json"))
    ap.add_argument("--label", help="the arm's name in the record and its run directory (default: the method); "
                                    "one method only")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for the arm, e.g. memit.nullspace_energy=0.05 (repeatable)")
    ap.add_argument("--replot", action="store_true", help="redraw the plot of --out from its rows and stop")
    args = ap.parse_args()
    if args.replot:
        rec = json.loads(Path(args.out).read_text())
        _plot(args.out, rec["rows"], rec["n_edits"], rec["round_size"])
        return
    record.preflight("bench.rounds", args)
    out_path = Path(args.out)
    old = json.loads(out_path.read_text()) if out_path.exists() else {}
    same = (old.get("n_edits"), old.get("round_size"), old.get("evaluate_every")) == (args.n, args.round_size, args.every)
    methods = [m for m in args.methods.split(",") if m]
    if (args.label or args.set) and len(methods) != 1:
        ap.error("--label and --set name one arm: give one method")
    labels = {m: args.label or m for m in methods}
    overrides = []
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            ap.error(f"--set {item!r}: expected KEY=VALUE")
        overrides += [f"--{key}", value]
    # an arm measured earlier under the same protocol is kept: each arm can run in its own session
    rows = [r for r in old.get("rows", []) if same and r["method"] not in labels.values()]
    runs = {m: r for m, r in old.get("runs", {}).items() if same and m not in labels.values()}
    for method in methods:
        label = labels[method]
        out = Path(args.work) / label
        wall, rss = run_measured(cli() + [
            "edit", "--config", args.config, "--edits", args.edits, "--limit", str(args.n), "--drop_conflicts", "true",
            "--round_size", str(args.round_size), "--evaluate_every", str(args.every), "--memit.method", method,
            "--eval.generation_cases", str(args.ge_cases), "--save_model", "false",
            "--trainer.enable_progress_bar", "false", "--out", str(out)] + overrides)
        got = json.loads((out / "rounds.json").read_text())
        rows += [{**r, "method": label} for r in got["rows"]]
        runs[label] = {"method": method, "overrides": args.set, "wall_s": round(wall, 1),
                       "peak_rss_mb": round(rss, 1), "layers": got["layers"],
                       "compute_dtype": got["compute_dtype"], **record.measured()}
        _write(args, rows, runs)


def _write(args, rows: list[dict], runs: dict) -> None:
    """The record of every method measured so far (each method's own commit, device and date in ``runs``)."""
    figures = {"rows": rows, "n_edits": args.n, "round_size": args.round_size, "evaluate_every": args.every,
               "runs": runs}
    rec = record.record("rounds", figures, args=args, config={"config_file": args.config},
                        compute_dtype=next(iter(runs.values()))["compute_dtype"])
    record.write(args.out, rec)
    _plot(args.out, rows, args.n, args.round_size)


def _plot(out: str, rows: list[dict], n: int, round_size: int) -> None:
    from memit_pl.experiments.sweep import plot_arms

    plot_arms(rows, "edits_so_far", Path(out).with_suffix(".png"), f"{n:,} counterfact-train edits in rounds of {round_size}")


if __name__ == "__main__":
    main()
