"""Equal results in the compute precision: the same N counterfact-train edits written in one batch with every
pass in float32 and with every pass in the compute dtype, ES/PS/NS side by side.

    .venv/bin/python -m bench.precision [--n 1000] [--compute bfloat16] [--work runs/precision] [--zbank]
                                        [--out bench/results/precision.json]

Two editors over one model, differing only in ``model.compute_dtype`` (statistics, z, keys, the update's
passes and the evaluation all in it; δ, the optimiser state, the losses' log-softmax and the solve stay
float32/float64). Reports ES, PS, NS (percent) of each, their differences, the mean final z loss of each,
the median relative difference of z, the covariance matrices' relative difference (Frobenius, per layer)
and the seconds of each stage. The z stores and statistics are resumed from ``--work`` and the cache.
``--zbank`` seeds the float32 arm's z store from ``bench/zbank/<model>/`` (float32 z of counterfact-train,
bench/zbank.py); its z seconds are then the banked chunks' (timed alone in the session that banked them),
not a measurement of this run. The compute arm always optimises its own z. The z figures compare the N
edits' own rows (a seeded store holds more). ``--rescore`` recomputes the z figures of an existing record
from the two z stores in ``--work`` (no model passes) and keeps its other figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import record  # noqa: E402
from memit_pl.config import Config, TrainerConfig  # noqa: E402
from memit_pl.data.edits import load_edits  # noqa: E402
from memit_pl.editor import MEMIT  # noqa: E402
from memit_pl.modeling.loading import load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--edits", default=str(ROOT.parent / "shared/data/counterfact/counterfact-train.json"))
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--compute", default="bfloat16", help="the compute dtype set against float32")
    ap.add_argument("--config", default=str(ROOT / "configs/smollm2-135m.yaml"))
    ap.add_argument("--work", default="runs/precision")
    ap.add_argument("--fp32-work", default=None,
                    help="work directory of the float32 editor (default <work>/float32), e.g. bench.methods' "
                         "runs/methods/n1000 to reuse its z store")
    ap.add_argument("--zbank", action="store_true",
                    help="seed the float32 arm's z from bench/zbank/<model> (its z seconds are then the bank's)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/precision.json"))
    ap.add_argument("--rescore", action="store_true",
                    help="recompute the z figures of --out from the z stores in the work directories, nothing else")
    args = ap.parse_args()
    record.preflight("bench.precision", args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    base = Config.from_file(args.config)
    base = replace(base, trainer=TrainerConfig(enable_progress_bar=False), eval=replace(base.eval, max_generation_prompts=0))
    model, tok = load_model(base.model.name, device="cpu")
    requests = load_edits(args.edits, tokenizer=tok, limit=args.n, drop_conflicting=True)
    ids = [r.case_id for r in requests]
    if args.rescore:
        return rescore(args, base, model, ids)
    out, covs, zs = {}, {}, {}
    for name, dtype in (("fp32", "float32"), ("compute", args.compute)):
        cfg = replace(base, model=replace(base.model, compute_dtype=dtype))
        work = Path(args.fp32_work) if name == "fp32" and args.fp32_work else Path(args.work) / dtype
        editor = MEMIT(model, tok, cfg, work_dir=work)
        banked_s = None
        if name == "fp32" and args.zbank:
            from bench import zbank

            banked_s = zbank.seed_run(editor.z_store_dir(), cfg.model.name, len(requests))
        t0 = time.perf_counter()
        covs[name] = editor.covariances()
        t1 = time.perf_counter()
        store = editor.zs(requests)
        t2 = time.perf_counter()
        z_s = t2 - t1 + (banked_s or 0.0)
        with editor.edited(requests):
            t3 = time.perf_counter()
            res = editor.evaluate(requests)
        t4 = time.perf_counter()
        m = res["metrics"]
        zs[name] = store
        out[name] = {"compute_dtype": editor.compute_dtype, "ES": round(m["ES"], 2), "PS": round(m["PS"], 2),
                     "NS": round(m["NS"], 2), "S": round(m["S"], 2),
                     "seconds": {"stats": round(t1 - t0, 1), "z": round(z_s, 1), "update": round(t3 - t2, 1),
                                 "evaluate": round(t4 - t3, 1)},
                     "z_from_bank": banked_s is not None}
        logging.info("%s: %s", name, out[name])
    cov_rel = {str(layer): round(float((covs["compute"][layer] - c).norm() / c.norm()), 5) for layer, c in covs["fp32"].items()}
    per_arm, z_figs = z_figures(zs["fp32"], zs["compute"], ids)
    for name in out:
        out[name].update(per_arm[name])
    figures = {**out, "n_edits": len(requests),
               "diff_points": {k: round(out["compute"][k] - out["fp32"][k], 2) for k in ("ES", "PS", "NS", "S")},
               **z_figs, "cov_rel_diff": cov_rel,
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    rec = record.record("precision", figures, args=args, compute_dtype=out["compute"]["compute_dtype"],
                        config={"model": base.model.name, "memit": asdict(base.memit)})
    record.write(args.out, rec)
    print(figures)


def z_figures(store32, storec, ids: list[str]) -> tuple[dict, dict]:
    """Per arm: mean final z loss, NLL and steps over the edits ``ids`` (a seeded store holds more rows);
    together: the losses' relative difference and the relative difference of z, edit by edit."""
    per_arm = {name: {"mean_z_loss": round(float(st.field_for(ids, "loss").float().mean()), 4),
                      "mean_z_nll": round(float(st.field_for(ids, "nll").float().mean()), 4),
                      "mean_z_steps": round(float(st.field_for(ids, "steps").float().mean()), 2)}  # as bench.z
               for name, st in (("fp32", store32), ("compute", storec))}
    z32, zc = store32.z_for(ids), storec.z_for(ids)
    rel = ((zc - z32).norm(dim=-1) / z32.norm(dim=-1)).tolist()
    loss32, lossc = per_arm["fp32"]["mean_z_loss"], per_arm["compute"]["mean_z_loss"]
    return per_arm, {"mean_z_loss_rel_diff": round(abs(lossc - loss32) / loss32, 4),
                     "median_rel_z_diff": round(statistics.median(rel), 6), "max_rel_z_diff": round(max(rel), 6)}


def rescore(args, base: Config, model, ids: list[str]) -> None:
    """The z figures of the record at ``--out`` recomputed from the z stores of its work directories."""
    from memit_pl.editor import z_store_name
    from memit_pl.stages.zstore import load_store

    rec = json.loads(Path(args.out).read_text())
    dirs = {"fp32": Path(args.fp32_work) if args.fp32_work else Path(args.work) / "float32",
            "compute": Path(args.work) / rec["compute"]["compute_dtype"]}
    name = z_store_name(model, base.memit.target_layer)
    per_arm, z_figs = z_figures(load_store(dirs["fp32"] / name), load_store(dirs["compute"] / name), ids)
    figures = {k: rec[k] for k in rec["figures"]}
    for arm in ("fp32", "compute"):
        figures[arm] = {**figures[arm], **per_arm[arm]}
    figures.update(z_figs)
    figures["rescored"] = {"command": record.command("bench.precision"), "git_commit": record.git_commit(),
                           "what": "z figures over the N edits' own rows, from the stores"}
    keep = {k: rec[k] for k in ("command", "git_commit", "packages", "device", "date")}
    new = record.record("precision", figures, config=rec["config"], compute_dtype=rec["compute_dtype"])
    record.write(args.out, {**new, **keep})
    print({k: figures[k] for k in ("fp32", "compute", "mean_z_loss_rel_diff", "median_rel_z_diff")})


if __name__ == "__main__":
    main()
