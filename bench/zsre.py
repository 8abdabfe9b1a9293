"""The paper's Table 1 (zsRE) on a packaged model: N zsRE records written in one batch, the unedited and the
edited model evaluated on the same records.

    .venv/bin/python -m bench.zsre [--config configs/smollm2-135m.yaml] [--n 1000]
                                   [--out bench/results/zsre/smollm2.json]

Metrics as the paper's zsRE table: Efficacy, Paraphrase and Specificity are top-1 token accuracies of the
new object on the question, of the new object on its rephrasing, and of the true answer on the unrelated
"nq question:" prompt (``acc_rewrite``, ``acc_paraphrase``, ``acc_neighborhood``), Score their harmonic
mean; EasyEdit's Reliability, Generalization and Locality beside them. The two records of MEND's training
split with an empty new object are dropped (``--drop_empty``). z and the evaluations resume from ``--work``.
"""

from __future__ import annotations

import argparse
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
from memit_pl.stages.eval_report import easyedit_metrics  # noqa: E402


def table_row(result: dict, unedited: dict, n: int) -> dict:
    m = result["metrics"]
    out = {"efficacy": m["acc_rewrite"], "paraphrase": m["acc_paraphrase"], "specificity": m["acc_neighborhood"]}
    vals = [v for v in out.values() if v is not None]
    out["score"] = statistics.harmonic_mean(vals) if len(vals) == 3 and min(vals) > 0 else None
    out = {k: (round(v, 2) if v is not None else None) for k, v in out.items()}
    ee = easyedit_metrics(result["cases"], unedited["cases"])
    return {**out, **{k: (round(v, 2) if v is not None else None) for k, v in ee.items()}, "n_edits": n}


def _records_read(path: str, requests) -> int:
    """How many records of the file the first requests came from (the last one's position + 1)."""
    import json

    records = json.loads(Path(path).read_text())
    last = requests[-1]
    return next(i for i, r in enumerate(records) if r["src"].replace(r["subject"], "{}", 1) == last.prompt
                and r["subject"] == last.subject and r["alt"] == last.target_new) + 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--edits", default=str(ROOT.parent / "shared/data/zsre/zsre_mend_train-1k.json"))
    ap.add_argument("--n", type=int, default=1000, help="the first N records (empty new objects dropped)")
    ap.add_argument("--config", default=str(ROOT / "configs/smollm2-135m.yaml"))
    ap.add_argument("--work", default=None, help="default runs/zsre/<model>")
    ap.add_argument("--out", default=None, help="default bench/results/zsre/<short model name>.json")
    args = ap.parse_args()
    cfg = Config.from_file(args.config)
    short = cfg.model.name.split("-")[0]  # smollm2, gemma3
    args.work = args.work or f"runs/zsre/{short}"
    args.out = args.out or str(ROOT / f"bench/results/zsre/{short}.json")
    record.preflight("bench.zsre", args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    cfg = replace(cfg, trainer=TrainerConfig(enable_progress_bar=False), eval=replace(cfg.eval, max_generation_prompts=0))
    editor = MEMIT.from_pretrained(cfg.model.name, config=cfg, work_dir=args.work)
    requests = load_edits(args.edits, tokenizer=editor.tokenizer, limit=args.n, drop_empty=True)
    n = len(requests)
    t = time.perf_counter()
    editor.covariances(cfg.memit.layers)
    stats_s = time.perf_counter() - t
    unedited = editor.evaluate(requests)
    t = time.perf_counter()
    editor.zs(requests)
    z_s = time.perf_counter() - t
    t = time.perf_counter()
    with editor.edited(requests):
        update_s = time.perf_counter() - t
        edited = editor.evaluate(requests)
    figures = {"unedited": {**table_row(unedited, unedited, 0), "n_edits": 0},
               "edited": table_row(edited, unedited, n),
               "n_edits": n, "n_dropped_empty": _records_read(args.edits, requests) - n,
               "model": cfg.model.name, "layers": cfg.memit.layers, "lambda": cfg.memit.mom2_update_weight,
               "seconds": {"stats": round(stats_s, 1), "z": round(z_s, 1), "update": round(update_s, 1)},
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    rec = record.record("zsre", figures, args=args, compute_dtype=editor.compute_dtype,
                        config={"model": cfg.model.name, "memit": asdict(cfg.memit), "eval": asdict(cfg.eval)})
    record.write(args.out, rec)
    logging.info("%s", figures)


if __name__ == "__main__":
    main()
