"""How the edit depends on the corpus of the covariance statistics: the same z vectors applied with
statistics from the offline Wikipedia sample and from WikiText-2, then evaluated.

    .venv/bin/python -m bench.corpus --z RUN/z [--edits data/demo_edits.jsonl] [--n-samples 200]

RUN/z is a z store made with ``--config`` for the same edits, e.g. ``memit-pl edit --config
configs/smollm2-135m.yaml --edits data/demo_edits.jsonl --out RUN`` (or the z store of ``memit-pl demo``).
Writes bench/results/corpus.json (the schema of bench/record.py); the statistics of both corpora go
to the memit-pl cache, the edited runs' scratch files under ``--work``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import record  # noqa: E402
from memit_pl.config import Config, EvalConfig, StatsConfig, TrainerConfig  # noqa: E402
from memit_pl.data.edits import load_edits  # noqa: E402
from memit_pl.editor import MEMIT  # noqa: E402
from memit_pl.experiments.sweep import row  # noqa: E402
from memit_pl.modeling.loading import load_model  # noqa: E402
from memit_pl.stages.zstore import load_store  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--z", required=True, help="a z store made with the config below")
    ap.add_argument("--edits", default=str(ROOT / "data/demo_edits.jsonl"))
    ap.add_argument("--config", default=str(ROOT / "configs/smollm2-135m.yaml"))
    ap.add_argument("--wikitext", default=str(ROOT.parent / "shared/data/wikitext-2-raw/wiki.valid.raw"))
    ap.add_argument("--n-samples", type=int, default=200)
    ap.add_argument("--work", default=str(record.cache_dir() / "runs/bench-corpus"))
    ap.add_argument("--out", default=str(ROOT / "bench/results/corpus.json"))
    args = ap.parse_args()
    record.preflight("bench.corpus", args)

    config = Config.from_file(args.config)
    memit = config.memit
    model, tok = load_model(config.model.name, device="cpu")
    requests = load_edits(args.edits, tokenizer=tok)
    store = load_store(args.z)
    eval_cfg = EvalConfig(max_generation_prompts=0)
    tcfg = TrainerConfig(accelerator="cpu", enable_progress_bar=False)
    rows = []
    base = None
    for name, corpus in (("wikipedia-sample", "wikipedia-sample"), ("wikitext-2 valid", args.wikitext)):
        cfg = replace(config, stats=StatsConfig(corpus=corpus, n_samples=args.n_samples), trainer=tcfg, eval=eval_cfg)
        editor = MEMIT(model, tok, cfg, work_dir=Path(args.work) / name.replace(" ", "-"))
        if base is None:
            base = row(0, editor.evaluate(requests), corpus="(unedited)")
            rows.append(base)
        t = time.perf_counter()
        editor.covariances(memit.layers)
        res = editor.edited_evaluation(requests, store, replace(memit), "edit")
        rows.append(row(len(requests), res, corpus=name, seconds=round(time.perf_counter() - t, 1)))
        print(rows[-1], flush=True)
    out = {"model": config.model.name, "edits_file": args.edits, "n_samples": args.n_samples, "layers": memit.layers,
           "lambda": memit.mom2_update_weight, "rows": rows}
    rec = record.record("corpus", out, args=args, config={"memit": dataclasses.asdict(memit),
                                                          "eval": dataclasses.asdict(eval_cfg)})
    record.write(args.out, rec)
    print(json.dumps(rec, indent=2))


if __name__ == "__main__":
    main()
