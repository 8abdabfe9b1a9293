"""``memit-pl predict``: what a model says next for an edits file's rewrite prompts."""

from __future__ import annotations

import logging
import sys

from memit_pl.cli._common import load, make_parser, parse
from memit_pl.data.edits import load_edits, target_ids
from memit_pl.modeling.predict import top_ids

log = logging.getLogger(__name__)


def main(argv: list[str]) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--edits", required=True, help="edits file (CounterFact JSON, zsRE JSON or JSONL)")
    parser.add_argument("--k", type=int, default=3, help="predictions per prompt")
    cfg, secs = parse(parser, argv)
    load_edits(cfg.edits)  # a bad file fails here, before the model is loaded
    model, tok = load(secs["model"], padding_side="left")
    requests = load_edits(cfg.edits, tokenizer=tok)
    ids = top_ids(model, tok, [r.text for r in requests], k=cfg.k)
    hits = 0
    lines = [f"{'prompt':<60} {'true':<14} {'new':<14}   top-{cfg.k}"]
    for r, row in zip(requests, ids.tolist()):
        # right = the top-1 token is the first token of target_true (as it follows the prompt)
        ok = r.target_true is not None and target_ids(tok, r.target_true)[:1] == row[:1]
        hits += bool(ok)
        preds = ", ".join(tok.decode([t]).strip() for t in row)
        mark = "*" if ok else " "
        lines.append(f"{r.text[:60]:<60} {str(r.target_true)[:14]:<14} {r.target_new[:14]:<14} {mark} {preds}")
    lines.append(f"top-1 is the first token of target_true for {hits}/{len(requests)} prompts")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
