"""``memit-pl sweep``: the scaling experiment (the paper's Figure 5): metrics against the number of edits."""

from __future__ import annotations

import sys
from pathlib import Path

from memit_pl.cli._common import (
    add_selection_arguments,
    given_values,
    load,
    make_editor,
    make_parser,
    parse,
    save_config,
)
from memit_pl.data.edits import load_edits


def main(argv: list[str]) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--edits", required=True, help="edits file (CounterFact JSON)")
    parser.add_argument("--out", required=True, help="output directory (sweep.json, sweep.md, sweep.png)")
    add_selection_arguments(parser)
    parser.add_argument("--z_dir", default=None, help="z store to reuse and extend (e.g. an edit run's z/), for its target layer")
    parser.add_argument("--grid", type=list[int] | None, default=None, help="numbers of edits (default 1, 10, 100, ..., all)")
    parser.add_argument("--lambdas", type=list[float] | None, default=None,
                        help="MEMIT's λ values to sweep (one row per λ and n; default: memit.mom2_update_weight); "
                             "the same as --values for MEMIT")
    parser.add_argument("--values", type=list[float] | None, default=None,
                        help="values of the method's own setting, one row per value and n: MEMIT λ, AlphaEdit "
                             "alphaedit_l2, FT-W ft_weight_decay (ROME has none); default: the config's")
    cfg, secs = parse(parser, argv)
    from memit_pl.experiments.sweep import SEARCHED, check_values, log_grid, scaling_sweep, write_sweep

    memit = secs["memit"]
    values = given_values(cfg, memit)
    check_values(memit, values)  # before the model loads

    requests = load_edits(cfg.edits, limit=cfg.limit, drop_conflicting=cfg.drop_conflicts,
                          drop_empty=cfg.drop_empty)
    model, tok = load(secs["model"], memit_cfg=secs["memit"])
    out = Path(cfg.out)
    save_config(out, "sweep", secs, {"edits": str(cfg.edits), "limit": cfg.limit, "grid": cfg.grid,
                                     "values": values})
    editor = make_editor(secs, model, tok, out / "work", cfg.z_dir)
    editor.check(requests)
    grid = cfg.grid or log_grid(len(requests))
    rows = scaling_sweep(editor, requests, memit, grid, values=values)
    searched = SEARCHED.get(memit.method)
    key = "lambda" if memit.method == "memit" else None if searched is None else searched[0]
    setting = {} if key is None else {key: values or getattr(memit, searched[0])}
    meta = {"model": secs["model"].name, "edits_file": str(cfg.edits), "layers": memit.layers,
            "method": memit.method, **setting,
            "compute_dtype": editor.compute_dtype, "n_requests": len(requests),
            "command": "memit-pl sweep " + " ".join(argv)}
    write_sweep(out, rows, meta)
    sys.stdout.write((out / "sweep.md").read_text())
    return 0
