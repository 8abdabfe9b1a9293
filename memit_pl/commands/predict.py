"""``memit-pl predict``: what a model says next for an edits file's rewrite prompts."""

from __future__ import annotations

import logging

from memit_pl.commands._common import load, make_parser, parse
from memit_pl.edits import load_edits
from memit_pl.predict import top_predictions

log = logging.getLogger(__name__)


def main(argv: list[str]) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--edits", required=True, help="edits file (CounterFact JSON, zsRE JSON or JSONL)")
    parser.add_argument("--k", type=int, default=3, help="predictions per prompt")
    cfg, secs = parse(parser, argv)
    model, tok = load(secs["model"], padding_side="left")
    requests = load_edits(cfg.edits, tokenizer=tok)
    preds = top_predictions(model, tok, [r.text for r in requests], k=cfg.k)
    hits = 0
    lines = [f"{'prompt':<60} {'true':<14} {'new':<14} top-{cfg.k}"]
    for r, p in zip(requests, preds):
        ok = r.target_true is not None and p[0] and r.target_true.startswith(p[0])
        hits += bool(ok)
        lines.append(f"{r.text[:60]:<60} {str(r.target_true)[:14]:<14} {r.target_new[:14]:<14} {', '.join(p)}")
    lines.append(f"top-1 is the first token of target_true for {hits}/{len(requests)} prompts")
    import sys

    sys.stdout.write("\n".join(lines) + "\n")
    return 0
