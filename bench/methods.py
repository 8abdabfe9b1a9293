"""The paper's Table 2 shape: FT-W, ROME, MEMIT and AlphaEdit beside the unedited model, each writing the
same first N counterfact-train cases in one batch, evaluated the same way.

    .venv/bin/python -m bench.methods [--n 1000] [--methods unedited,ft,rome,memit,alphaedit]
                                      [--ge-cases 500] [--work runs/methods] [--out bench/results/methods/table2.json]

z is optimised once (the shipped config's L) and shared by ROME (layer L alone), MEMIT and AlphaEdit; FT-W
needs none. ``--grid 1,10,100,3162`` also edits the first n of the N cases for each n of the grid (the z of
the N cases serves every n), one row per method and n; ``--sweep-out DIR`` then writes the paper's Figure 5
from MEMIT's rows (``sweep.json``, ``.md``, ``.png`` as ``memit-pl sweep`` writes them; the unedited row,
n = 0, is the unedited model on the N cases), so a 10,000-edit MEMIT row is computed once for both.

A method's ``seconds`` is what a user pays for it alone: the z stage (for the three that use it) plus its
own update, with the statistics cached beforehand (``stats_s``, once). Every row is written
as soon as it is done, and a re-run skips the rows already in ``--out`` for the same N and settings; the
z store, the per-layer factors and FT-W's delta are resumed from ``--work``. Each row carries ``measured``
(device, commit, date of the run that measured it): the file's own fields name the last run only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import resource
import sys
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import record  # noqa: E402
from memit_pl.config import Config, TrainerConfig  # noqa: E402
from memit_pl.data.edits import load_edits  # noqa: E402
from memit_pl.editor import MEMIT  # noqa: E402
from memit_pl.experiments.sweep import row  # noqa: E402
from memit_pl.stages.meter import StageMeter  # noqa: E402

METHODS = ("unedited", "ft", "rome", "memit", "alphaedit")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--edits", default=str(ROOT.parent / "shared/data/counterfact/counterfact-train.json"))
    ap.add_argument("--n", type=int, default=1000, help="edits: the first N cases, Eqn. 5 conflicts dropped")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--config", default=str(ROOT / "configs/smollm2-135m.yaml"))
    ap.add_argument("--ge-cases", type=int, default=500, help="cases (seeded sample) whose generations give GE")
    ap.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE",
                    help="a memit setting for one method, e.g. ft.ft_weight_decay=1e-3 (repeatable)")
    ap.add_argument("--zbank", action="store_true",
                    help="start z from bench/zbank/<model> (bench/zbank.py; <model>-bf16 under a bfloat16 compute dtype); z_s "
                         "then adds the banked chunks' seconds")
    ap.add_argument("--grid", default="", help="also the first n cases for each n of this comma list (< N)")
    ap.add_argument("--sweep-out", default=None, help="write Figure 5 (sweep.json/.md/.png) from MEMIT's rows here")
    ap.add_argument("--work", default="runs/methods")
    ap.add_argument("--out", default=str(ROOT / "bench/results/methods/table2.json"))
    args = ap.parse_args()
    record.preflight("bench.methods", args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    overrides = _overrides(args.set)
    grid = _grid(args.grid, args.n)
    if args.sweep_out is not None and "memit" not in methods:
        raise SystemExit("--sweep-out draws MEMIT's rows: add memit to --methods")

    cfg = Config.from_file(args.config)
    cfg = replace(cfg, trainer=TrainerConfig(enable_progress_bar=False),
                  eval=replace(cfg.eval, generation_cases=args.ge_cases, max_generation_prompts=2))
    editor = MEMIT.from_pretrained(cfg.model.name, config=cfg, work_dir=Path(args.work) / f"n{args.n}")
    requests = load_edits(args.edits, tokenizer=editor.tokenizer, limit=args.n, drop_conflicting=True)
    n = len(requests)
    sizes = [m for m in grid if m < n] + [n]
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.exists() else {}
    mine = {(m, s) for m in methods for s in ([n] if m == "unedited" else sizes)}
    rows = [r for r in old.get("rows", []) if (r["method"], r.get("n_edits")) not in mine]
    done = {(r["method"], r["n_edits"]): r for r in old.get("rows", []) if (r["method"], r.get("n_edits")) in mine
            and r.get("settings") == _settings(cfg, r["method"], overrides)}
    if args.sweep_out is not None and "unedited" not in methods and not any(
            r["method"] == "unedited" and r["n_edits"] == n for r in rows):
        raise SystemExit(f"--sweep-out needs the unedited row at n={n}: add unedited to --methods")

    meter = StageMeter()  # the statistics and the shared z stage
    with meter("stats"):
        editor.covariances(cfg.memit.layers)
    stats_s = meter.timings["stats_s"]
    z_s = None
    unedited = None
    for method in methods:
        if all((method, m) in done for m in ([n] if method == "unedited" else sizes)):
            logging.info("%s at n=%s: kept from %s", method, ",".join(map(str, sizes)), out)
            rows += [done[(method, m)] for m in ([n] if method == "unedited" else sizes)]
            continue
        if unedited is None:
            unedited = editor.evaluate(requests)
        if method == "unedited":
            rows.append(row(n, unedited, method="unedited", n_edits=n, seconds=0.0, settings=None,
                            measured=record.measured()))
            _write(out, rows, args, cfg, editor, stats_s)
            continue
        memit = replace(cfg.memit, method=method, **overrides.get(method, {}))
        if method != "ft" and z_s is None:  # once, shared: ROME edits layer L, the same L as the window's top
            banked_s = 0.0
            if args.zbank:
                from bench import zbank

                banked_s = zbank.seed_run(editor.z_store_dir(memit), cfg.model.name, n, editor.compute_dtype)
            with meter("z"):
                editor.zs(requests, memit)
            z_s = meter.timings["z_s"] + banked_s
        for m in sizes:
            if (method, m) in done:  # kept; the unedited model's NS on its cases added where it lacks it
                rows.append({**_unedited_on(unedited, requests, m), **done[(method, m)]})
                continue
            stage = StageMeter()
            with contextlib.ExitStack() as edited:
                with stage("update"):
                    delta = edited.enter_context(editor.edited(requests[:m], memit))
                with stage("eval"):
                    result = editor.evaluate(requests[:m])
            # a resumed update re-applies the layers an interrupted run saved: their seconds count, as recorded then
            reused = [delta.metadata.get("layer_seconds", {}).get(str(layer)) for layer in
                      delta.metadata.get("reused_layers", [])]
            update_s = stage.timings["update_s"] + sum(s for s in reused if s)
            if method == "ft":  # FT-W resumed from its checkpoint or delta: the whole run's seconds
                update_s = max(update_s, delta.metadata.get("ft_seconds") or 0.0)
            eval_s = result.get("seconds", stage.timings["eval_s"])  # the passes' own, also when read back
            # z: the stage's seconds for the N cases; a smaller n of the grid leaves it out (it was not timed alone)
            zs = None if method == "ft" or m < n else z_s
            own = None if method != "ft" and zs is None else update_s + (zs or 0.0)
            peaks = {**({} if zs is None else {"z": meter.peak_rss_mb.get("z")}), **stage.peak_rss_mb}
            base = unedited if m == n else {"cases": unedited["cases"][:m]}
            rows.append(row(m, result, base, **_unedited_on(unedited, requests, m), method=method, n_edits=m,
                            seconds=None if own is None else round(own, 1),
                            z_s=None if zs is None else round(zs, 1), update_s=round(update_s, 1),
                            eval_s=round(eval_s, 1), **({"resumed_layers": len(reused)} if reused else {}),
                            peak_rss_mb=peaks, layers=delta.layers, settings=_settings(cfg, method, overrides),
                            measured=record.measured(),
                            **({k: delta.metadata[k] for k in ("ft_steps", "ft_final_nll")} if method == "ft" else {})))
            logging.info("%s at n=%d: %s", method, m, rows[-1])
            _write(out, rows, args, cfg, editor, stats_s)
    if args.sweep_out is not None:
        _write_sweep(Path(args.sweep_out), rows, n, sizes, args, cfg, editor)


def _unedited_on(unedited: dict, requests, m: int) -> dict:
    """The unedited model's NS and NSu on the first m cases (the level an edited row's NS compares with;
    NSu with the first m subjects as the edited ones)."""
    from memit_pl.stages.eval_report import aggregate
    from memit_pl.stages.evaluate import nsu_of_records

    ns = aggregate(unedited["cases"][:m])["NS"]
    nsu = nsu_of_records(unedited["cases"][:m], [r.subject for r in requests[:m]])
    return {"NS_unedited": None if ns is None else round(ns, 2), "NSu_unedited": None if nsu is None else round(nsu, 2)}


def _grid(text: str, n: int) -> list[int]:
    try:
        grid = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise SystemExit(f"--grid {text!r}: expected a comma list of integers, e.g. 1,10,100") from None
    bad = [v for v in grid if not 0 < v <= n]
    if bad:
        raise SystemExit(f"--grid: {bad} outside 1..--n ({n})")
    return grid


def _write_sweep(out_dir: Path, rows: list[dict], n: int, sizes: list[int], args, cfg: Config, editor: MEMIT) -> None:
    """Figure 5 from the unedited row of the N cases (as n = 0) and MEMIT's rows at every n."""
    from memit_pl.experiments.sweep import write_sweep

    base = [r for r in rows if r["method"] == "unedited" and r["n_edits"] == n]
    if not base:
        raise SystemExit(f"--sweep-out: no unedited row at n={n} (add unedited to --methods)")
    edited = sorted((r for r in rows if r["method"] == "memit" and r["n_edits"] in sizes), key=lambda r: r["n_edits"])
    sweep = [{**r, "n": 0} for r in base] + edited
    rec = record.record("methods", {"rows": sweep}, args=args, compute_dtype=editor.compute_dtype,
                        config={"model": cfg.model.name, "memit": asdict(cfg.memit), "eval": asdict(cfg.eval)})
    meta = {k: v for k, v in rec.items() if k not in ("rows", "figures")}
    settings = edited[-1]["settings"]  # the MEMIT rows' own (``--set memit.…`` included)
    write_sweep(out_dir, sweep, {**meta, "model": cfg.model.name, "edits_file": rec["config"]["args"]["edits"],
                                 "layers": settings["layers"], "lambda": settings["mom2_update_weight"],
                                 "method": "memit", "n_requests": n})


def _overrides(items: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for item in items:
        key, _, value = item.partition("=")
        method, _, field = key.partition(".")
        if method not in METHODS or not field or not value:
            raise SystemExit(f"--set {item!r}: expected METHOD.KEY=VALUE with METHOD one of {', '.join(METHODS)}")
        out.setdefault(method, {})[field] = json.loads(value)
    return out


def _settings(cfg: Config, method: str, overrides: dict) -> dict | None:
    if method == "unedited":
        return None
    m = asdict(replace(cfg.memit, method=method, **overrides.get(method, {})))
    keys = {"ft": ("ft_layer", "ft_lr", "ft_steps", "ft_weight_decay", "ft_loss_threshold"),
            "rome": ("layers",), "memit": ("layers", "mom2_update_weight"),
            "alphaedit": ("layers", "nullspace_threshold", "alphaedit_l2", "nullspace_energy")}[method]
    out = {k: m[k] for k in keys if not (k == "nullspace_energy" and m[k] is None)}  # absent from old rows
    if method != "ft" and m["context_source"] != "model":  # z's prefixes (the default is left out of old rows)
        out["context_source"] = m["context_source"]
    return out


def _write(out: Path, rows: list[dict], args, cfg: Config, editor: MEMIT, stats_s: float) -> None:
    order = {m: i for i, m in enumerate(METHODS)}
    rows = sorted(rows, key=lambda r: (r["n_edits"], order[r["method"]]))
    figures = {"rows": rows, "stats_s": round(stats_s, 1), "ge_cases": args.ge_cases,
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    rec = record.record("methods", figures, args=args, compute_dtype=editor.compute_dtype,
                        config={"model": cfg.model.name, "memit": asdict(cfg.memit), "eval": asdict(cfg.eval)})
    record.write(out, rec)
    from memit_pl import io
    from memit_pl.experiments.sweep import markdown

    keys = ("method", "n_edits", "S", "ES", "PS", "NS", "GE", "reliability", "generalization", "locality", "seconds")
    io.write_text(out.with_suffix(".md"), markdown(rows, keys) + "\n")


if __name__ == "__main__":
    main()
