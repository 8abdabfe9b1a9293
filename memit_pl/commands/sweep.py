"""``memit-pl sweep``: the scaling experiment (the paper's Figure 5): metrics against the number of edits."""

from __future__ import annotations

import sys
from pathlib import Path

from memit_pl.commands._common import load, make_parser, parse, save_config
from memit_pl.edits import load_edits, validate


def main(argv: list[str]) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--edits", required=True, help="edits file (CounterFact JSON)")
    parser.add_argument("--out", required=True, help="output directory (sweep.json, sweep.md, sweep.png)")
    parser.add_argument("--limit", type=int | None, default=None, help="use only the first N edits")
    parser.add_argument("--z_dir", default=None, help="z store to reuse and extend (e.g. an edit run's z/), for its target layer")
    parser.add_argument("--grid", type=list[int] | None, default=None, help="numbers of edits (default 1, 10, 100, ..., all)")
    cfg, secs = parse(parser, argv)
    from memit_pl.sweep import Editor, log_grid, scaling_sweep, write_sweep

    requests = load_edits(cfg.edits, limit=cfg.limit)
    model, tok = load(secs["model"])
    validate(requests, tok)
    out = Path(cfg.out)
    save_config(out, "sweep", secs, {"edits": str(cfg.edits), "limit": cfg.limit, "grid": cfg.grid})
    editor = Editor(model, tok, secs["stats"], out / "work", trainer=secs["trainer"],
                    cache_dir=secs["model"].cache_dir, eval_cfg=secs["eval"], z_dir=cfg.z_dir)
    grid = cfg.grid or log_grid(len(requests))
    rows = scaling_sweep(editor, requests, secs["memit"], grid)
    meta = {"model": secs["model"].name, "edits_file": str(cfg.edits), "layers": secs["memit"].layers,
            "lambda": secs["memit"].mom2_update_weight, "command": "memit-pl sweep " + " ".join(argv)}
    write_sweep(out, rows, meta)
    sys.stdout.write((out / "sweep.md").read_text())
    return 0
