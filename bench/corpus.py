"""How the edit depends on the corpus of the covariance statistics: the same z vectors applied with
statistics from the offline Wikipedia sample and from WikiText-2, then evaluated.

    .venv/bin/python bench/corpus.py --z RUN/z [--edits data/demo_edits.jsonl] [--n-samples 200]

Writes bench/results/corpus.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.z import memit_from_yaml  # noqa: E402
from memit_pl.config import EvalConfig, StatsConfig, TrainerConfig  # noqa: E402
from memit_pl.edits import load_edits  # noqa: E402
from memit_pl.models import load_model  # noqa: E402
from memit_pl.sweep import Editor, row  # noqa: E402
from memit_pl.zstore import load_store  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--z", required=True, help="a z store made with the config below")
    ap.add_argument("--edits", default=str(ROOT / "data/demo_edits.jsonl"))
    ap.add_argument("--config", default=str(ROOT / "configs/smollm2-135m.yaml"))
    ap.add_argument("--wikitext", default=str(ROOT.parent / "shared/data/wikitext-2-raw/wiki.valid.raw"))
    ap.add_argument("--n-samples", type=int, default=200)
    ap.add_argument("--work", default="/tmp/memit-pl-bench-corpus")
    ap.add_argument("--out", default=str(ROOT / "bench/results/corpus.json"))
    args = ap.parse_args()

    model, tok = load_model("smollm2-135m", device="cpu")
    memit = memit_from_yaml(Path(args.config))
    requests = load_edits(args.edits, tokenizer=tok)
    store = load_store(args.z)
    eval_cfg = EvalConfig(max_generation_prompts=0)
    tcfg = TrainerConfig(accelerator="cpu", enable_progress_bar=False)
    rows = []
    base = None
    for name, corpus in (("wikipedia-sample", "wikipedia-sample"), ("wikitext-2 valid", args.wikitext)):
        stats = StatsConfig(corpus=corpus, n_samples=args.n_samples)
        editor = Editor(model, tok, stats, Path(args.work) / name.replace(" ", "-"), trainer=tcfg, eval_cfg=eval_cfg)
        if base is None:
            base = row(0, editor.evaluate(requests), corpus="(unedited)")
            rows.append(base)
        t = time.perf_counter()
        editor.covariances(memit.layers)
        res = editor.edited_evaluation(requests, store, replace(memit), "edit")
        rows.append(row(len(requests), res, corpus=name, seconds=round(time.perf_counter() - t, 1)))
        print(rows[-1], flush=True)
    out = {"model": "smollm2-135m", "edits_file": args.edits, "n_samples": args.n_samples, "layers": memit.layers,
           "lambda": memit.mom2_update_weight, "rows": rows, "command": "python bench/corpus.py " + " ".join(sys.argv[1:])}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
