"""Where MEMIT's capacity ends on SmolLM2-135M: the same banked z of the first n counterfact-train cases written
with narrower windows (layers [6] and [4, 5, 6], the shipped [0..6]) and smaller λ, each in one batch.

    python -m bench.experiments.e2026_12_04_capacity.run --arms 0-6:2000,0-6:200,4-6:2000,6:2000 \
        --n 1000 --eval-cases 500 [--work runs/capacity] [--out runs/capacity/capacity.json]

The z of a window are at its top layer L: for L = 6 (the shipped config's) they are seeded from
``bench/zbank/smollm2-135m`` (float32, the shipped objective); a window reaching higher (``0-8:2000``) gets
its own z at its L, seeded from ``bench/zbank/smollm2-135m-L<L>`` where that bank exists and optimised here
for the cases it lacks, once for all its arms (``z_s`` per L: this run's own seconds; 0 for the bank's).
Each arm edits the first n cases in one batch and is evaluated on the first ``--eval-cases`` of them (a fixed sample of the batch, the same for
every arm; GE on ``--ge-cases`` of those), next to the unedited model on the same cases. Besides the paper's
and EasyEdit's metrics a row has ``reached``: the mean over the batch of 1 − ‖z − h^L‖ after the edit over
‖z − h^L‖ before it (no context prefix), the share of the way to z that the linear update travels in the
model's own terms. Rows are written as they finish and a re-run keeps the done ones (same arm and n).
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from bench import record, zbank  # noqa: E402
from memit_pl.config import Config, TrainerConfig  # noqa: E402
from memit_pl.data.edits import load_edits  # noqa: E402
from memit_pl.editor import MEMIT, restored  # noqa: E402
from memit_pl.experiments.sweep import row  # noqa: E402
from memit_pl.modeling.spec import get_spec  # noqa: E402
from memit_pl.stages.apply import residual_norms  # noqa: E402

MODULE = "bench.experiments.e2026_12_04_capacity.run"


def parse_arm(text: str) -> tuple[list[int], float]:
    """``"0-6:2000"`` -> ([0, ..., 6], 2000.0); ``"6:2000"`` -> ([6], 2000.0)."""
    window, _, lam = text.partition(":")
    lo, _, hi = window.partition("-")
    try:
        layers = list(range(int(lo), int(hi or lo) + 1))
        return layers, float(lam)
    except ValueError:
        raise SystemExit(f"--arms {text!r}: expected FIRST-LAST:LAMBDA, e.g. 0-6:2000") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--edits", default=str(ROOT.parent / "shared/data/counterfact/counterfact-train.json"))
    ap.add_argument("--config", default=str(ROOT / "configs/smollm2-135m.yaml"))
    ap.add_argument("--arms", default="0-6:2000,0-6:200,4-6:2000,6:2000")
    ap.add_argument("--n", type=int, nargs="+", default=[1000], help="batch sizes (the first n cases)")
    ap.add_argument("--eval-cases", type=int, default=500, help="the first K cases of each batch are evaluated")
    ap.add_argument("--ge-cases", type=int, default=100, help="cases (seeded sample of the K) whose generations give GE")
    ap.add_argument("--work", default="runs/capacity")
    ap.add_argument("--out", default="runs/capacity/capacity.json")
    args = ap.parse_args()
    record.preflight(MODULE, args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    arms = [parse_arm(a) for a in args.arms.split(",") if a]
    cfg = Config.from_file(args.config)
    cfg = replace(cfg, trainer=TrainerConfig(enable_progress_bar=False),
                  eval=replace(cfg.eval, generation_cases=args.ge_cases, max_generation_prompts=2))
    editor = MEMIT.from_pretrained(cfg.model.name, config=cfg, work_dir=args.work)
    requests = load_edits(args.edits, tokenizer=editor.tokenizer, limit=max(args.n), drop_conflicting=True)
    k = min(args.eval_cases, min(args.n))
    ids = [r.case_id for r in requests]
    spec = get_spec(editor.model)
    editor.covariances(range(min(a[0][0] for a in arms), max(a[0][-1] for a in arms) + 1))
    stores, before, z_s = {}, {}, {}  # per target layer L of the arms: z of every request
    for layers, _ in arms:
        top, top_layer = replace(cfg.memit, layers=layers), layers[-1]
        if top_layer in stores:
            continue
        if top_layer == cfg.memit.target_layer:
            zbank.seed_run(editor.z_store_dir(top), cfg.model.name, len(requests))
        elif ((bank := zbank.bank_dir(cfg.model.name, top_layer)) / zbank.INDEX).exists():
            logging.info("z at L=%d: %d chunk files seeded from %s", top_layer,
                         zbank.seed(editor.z_store_dir(top), bank), bank.relative_to(ROOT))
        t = time.perf_counter()
        stores[top_layer] = editor.zs(requests, top)  # optimises only the cases the bank lacks
        z_s[top_layer] = time.perf_counter() - t
        before[top_layer] = residual_norms(editor.model, editor.tokenizer, requests, stores[top_layer], top)

    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    done = {(tuple(r["layers"]), r["lam"], r["n_edits"]) for r in rows}
    t0 = time.perf_counter()
    unedited = editor.evaluate(requests[:k])
    unedited_s = time.perf_counter() - t0
    if not any(r["method"] == "unedited" for r in rows):
        rows.append(row(0, unedited, method="unedited", n_edits=0, layers=[], lam=None, eval_cases=k,
                        eval_s=round(unedited_s, 1)))
    for n in args.n:
        for layers, lam in arms:
            if (tuple(layers), lam, n) in done:
                continue
            memit = replace(cfg.memit, layers=layers, mom2_update_weight=lam)
            store = stores[layers[-1]]
            with restored(editor.model, layers):
                t1 = time.perf_counter()
                editor.apply(requests[:n], store, memit)
                t2 = time.perf_counter()
                after = residual_norms(editor.model, editor.tokenizer, requests[:n], store, memit)
                result = editor.evaluate(requests[:k])
                t3 = time.perf_counter()
            reached = float((1 - after / before[layers[-1]][:n]).mean())
            rows.append(row(n, result, unedited, method="memit", n_edits=n, layers=layers, lam=lam, eval_cases=k,
                            key_dims=sum(spec.d_key(editor.model, layer) for layer in layers),
                            reached=round(100 * reached, 2),
                            z_mean_loss=round(float(store.field_for(ids[:n], "loss").mean()), 4),
                            update_s=round(t2 - t1, 1), eval_s=round(t3 - t2, 1)))
            logging.info("n=%d layers=%s λ=%g: %s", n, layers, lam, rows[-1])
            figures = {"rows": rows, "z_s": {str(k): round(v, 1) for k, v in z_s.items()},
                       "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
            record.write(out, record.record("capacity", figures, args=args, module=MODULE,
                                            config={"model": cfg.model.name, "memit": asdict(cfg.memit),
                                                    "eval": asdict(cfg.eval)}))


if __name__ == "__main__":
    main()
