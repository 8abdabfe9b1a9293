"""``memit-pl sweep``: the scaling experiment (the paper's Figure 5): metrics against the number of edits."""

from __future__ import annotations

import sys
from pathlib import Path

from memit_pl.cli._common import add_selection_arguments, load, make_editor, make_parser, parse, save_config
from memit_pl.data.edits import load_edits


def main(argv: list[str]) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--edits", required=True, help="edits file (CounterFact JSON)")
    parser.add_argument("--out", required=True, help="output directory (sweep.json, sweep.md, sweep.png)")
    add_selection_arguments(parser)
    parser.add_argument("--z_dir", default=None, help="z store to reuse and extend (e.g. an edit run's z/), for its target layer")
    parser.add_argument("--grid", type=list[int] | None, default=None, help="numbers of edits (default 1, 10, 100, ..., all)")
    parser.add_argument("--lambdas", type=list[float] | None, default=None,
                        help="λ values to sweep (one row per λ and n; default: memit.mom2_update_weight)")
    cfg, secs = parse(parser, argv)
    from memit_pl.experiments.sweep import log_grid, scaling_sweep, write_sweep

    requests = load_edits(cfg.edits, limit=cfg.limit, drop_conflicting=cfg.drop_conflicts,
                          drop_empty=cfg.drop_empty)
    model, tok = load(secs["model"], memit_cfg=secs["memit"])
    out = Path(cfg.out)
    save_config(out, "sweep", secs, {"edits": str(cfg.edits), "limit": cfg.limit, "grid": cfg.grid,
                                     "lambdas": cfg.lambdas})
    editor = make_editor(secs, model, tok, out / "work", cfg.z_dir)
    editor.check(requests)
    grid = cfg.grid or log_grid(len(requests))
    rows = scaling_sweep(editor, requests, secs["memit"], grid, lambdas=cfg.lambdas)
    meta = {"model": secs["model"].name, "edits_file": str(cfg.edits), "layers": secs["memit"].layers,
            "lambda": cfg.lambdas or secs["memit"].mom2_update_weight, "method": secs["memit"].method,
            "compute_dtype": editor.compute_dtype, "n_requests": len(requests),
            "command": "memit-pl sweep " + " ".join(argv)}
    write_sweep(out, rows, meta)
    sys.stdout.write((out / "sweep.md").read_text())
    return 0
