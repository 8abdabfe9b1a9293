"""``memit-pl z`` (also ``train_z.py``): optimise the target vectors z for every edit, resumably."""

from __future__ import annotations

import logging
from pathlib import Path

from memit_pl.cli._common import add_selection_arguments, load, make_editor, make_parser, parse, save_config
from memit_pl.data.edits import load_edits

log = logging.getLogger(__name__)


def main(argv: list[str]) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--edits", required=True, help="edits file (CounterFact JSON, zsRE JSON or JSONL)")
    parser.add_argument("--out", required=True, help="z store directory (resumed when it exists)")
    add_selection_arguments(parser)
    cfg, secs = parse(parser, argv)
    requests = load_edits(cfg.edits, limit=cfg.limit, drop_conflicting=cfg.drop_conflicts,
                          drop_empty=cfg.drop_empty)  # bad input fails here, before the model loads
    model, tok = load(secs["model"], memit_cfg=secs["memit"])
    editor = make_editor(secs, model, tok, work_dir=cfg.out)
    editor.check(requests)
    save_config(cfg.out, "z", secs, {"edits": str(cfg.edits), "limit": cfg.limit,
                                     "drop_conflicts": cfg.drop_conflicts, "drop_empty": cfg.drop_empty})
    store = editor.zs(requests, store_dir=Path(cfg.out))
    t = store.tensors
    log.info(
        "z store %s: %d edits, mean loss %.4f, mean steps %.1f, mean ‖δ‖/‖h‖ %.3f",
        cfg.out, len(store), float(t["loss"].mean()), float(t["steps"].float().mean()),
        float((t["delta_norm"] / t["h_norm"]).mean()),
    )
    return 0
