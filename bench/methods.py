"""The paper's Table 2 shape: FT-W, ROME, MEMIT and AlphaEdit beside the unedited model, each writing the
same first N counterfact-train cases in one batch, evaluated the same way.

    .venv/bin/python -m bench.methods [--n 1000] [--methods unedited,ft,rome,memit,alphaedit]
                                      [--ge-cases 500] [--work runs/methods] [--out bench/results/methods/table2.json]

z is optimised once (the shipped config's L) and shared by ROME (layer L alone), MEMIT and AlphaEdit; FT-W
needs none. A method's ``seconds`` is what a user pays for it alone: the z stage (for the three that use
it) plus its own update, with the statistics cached beforehand (``stats_s``, once). Every row is written
as soon as it is done, and a re-run skips the rows already in ``--out`` for the same N and settings; the
z store, the per-layer factors and FT-W's delta are resumed from ``--work``.
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
                    help="start z from bench/zbank/<model> (bench/zbank.py); z_s then adds the banked chunks' seconds")
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

    cfg = Config.from_file(args.config)
    cfg = replace(cfg, trainer=TrainerConfig(enable_progress_bar=False),
                  eval=replace(cfg.eval, generation_cases=args.ge_cases, max_generation_prompts=2))
    editor = MEMIT.from_pretrained(cfg.model.name, config=cfg, work_dir=Path(args.work) / f"n{args.n}")
    requests = load_edits(args.edits, tokenizer=editor.tokenizer, limit=args.n, drop_conflicting=True)
    n = len(requests)
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.exists() else {}
    rows = [r for r in old.get("rows", []) if r.get("n_edits") != n or r["method"] not in methods]
    done = {r["method"]: r for r in old.get("rows", []) if r.get("n_edits") == n and r["method"] in methods
            and r.get("settings") == _settings(cfg, r["method"], overrides)}

    meter = StageMeter()  # the statistics and the shared z stage
    with meter("stats"):
        editor.covariances(cfg.memit.layers)
    stats_s = meter.timings["stats_s"]
    z_s = None
    unedited = None
    for method in methods:
        if method in done:
            logging.info("%s at n=%d: kept from %s", method, n, out)
            rows.append(done[method])
            continue
        if unedited is None:
            unedited = editor.evaluate(requests)
        if method == "unedited":
            rows.append(row(n, unedited, method="unedited", n_edits=n, seconds=0.0, settings=None))
            _write(out, rows, args, cfg, editor, stats_s)
            continue
        memit = replace(cfg.memit, method=method, **overrides.get(method, {}))
        if method != "ft" and z_s is None:  # once, shared: ROME edits layer L, the same L as the window's top
            banked_s = 0.0
            if args.zbank:
                from bench import zbank
                from memit_pl.modeling.loading import fingerprint

                store_dir = editor.work_dir / f"z-L{memit.target_layer}-{fingerprint(editor.model)}"
                banked_s = zbank.seed_run(store_dir, cfg.model.name, n)
            with meter("z"):
                editor.zs(requests, memit)
            z_s = meter.timings["z_s"] + banked_s
        stage = StageMeter()
        with contextlib.ExitStack() as edited:
            with stage("update"):
                delta = edited.enter_context(editor.edited(requests, memit))
            with stage("eval"):
                result = editor.evaluate(requests)
        update_s = stage.timings["update_s"]
        own = update_s + (z_s if method != "ft" else 0.0)
        peaks = {**({} if method == "ft" else {"z": meter.peak_rss_mb.get("z")}), **stage.peak_rss_mb}
        rows.append(row(n, result, unedited, method=method, n_edits=n, seconds=round(own, 1),
                        z_s=None if method == "ft" else round(z_s, 1), update_s=round(update_s, 1),
                        peak_rss_mb=peaks, layers=delta.layers, settings=_settings(cfg, method, overrides),
                        **({k: delta.metadata[k] for k in ("ft_steps", "ft_final_nll")} if method == "ft" else {})))
        logging.info("%s: %s", method, rows[-1])
        _write(out, rows, args, cfg, editor, stats_s)


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
            "alphaedit": ("layers", "nullspace_threshold", "alphaedit_l2")}[method]
    out = {k: m[k] for k in keys}
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
