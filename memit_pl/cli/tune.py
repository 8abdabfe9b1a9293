"""``memit-pl tune``: choose the edited layers and λ (AlphaEdit: α, FT-W: the decay) by measurement; writes a
tuned config."""

from __future__ import annotations

import sys
from dataclasses import asdict
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
from memit_pl.data.edits import load_edits, validate


def main(argv: list[str]) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--edits", required=True, help="edits file (CounterFact JSON)")
    parser.add_argument("--out", required=True, help="output directory (tune.json, tune.md, tune.png, tuned.yaml)")
    add_selection_arguments(parser)
    parser.add_argument("--z_dir", default=None, help="z store to reuse and extend (e.g. an edit run's z/), for its target layer")
    parser.add_argument("--lambdas", type=list[float] | None, default=None,
                        help="MEMIT's λ grid (default [1e3, 3e3, 1e4, 3e4, 1e5]); the same as --values for MEMIT")
    parser.add_argument("--values", type=list[float] | None, default=None,
                        help="the grid of the method's searched setting: MEMIT λ, AlphaEdit alphaedit_l2 (default "
                             "[1, 10, 100]), FT-W ft_weight_decay (default [0, 1e-3, 1e-2, 1e-1]); ROME: none")
    parser.add_argument("--windows", type=list[list[int]] | None, default=None,
                        help="layer windows to try (default: 5-layer windows starting at 1, 3, 5; for FT-W and "
                             "ROME, which write one layer, the first and the last layer of memit.layers, or FT-W's "
                             "memit.ft_layer when set)")
    parser.add_argument("--tune_fraction", type=float, default=0.5, help="share of the edits used for the search")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tuning/held-back split")
    parser.add_argument("--max_ns_drop", type=float, default=5.0, help="allowed loss of Neighborhood Success (points)")
    parser.add_argument("--max_ge_drop", type=float, default=5.0, help="allowed loss of Generation Entropy (points)")
    parser.add_argument("--ns_metric", choices=["NS", "NSu"], default="NS",
                        help="which Neighborhood Success the bound applies to: all neighbourhood prompts (NS), or "
                             "only those whose subject is not itself edited in the batch (NSu)")
    cfg, secs = parse(parser, argv)
    from memit_pl.experiments.tune import (
        DEFAULT_VALUES,
        ONE_LAYER,
        check_grid,
        default_windows,
        tune,
        write_tune,
    )
    from memit_pl.modeling.spec import get_spec

    memit = secs["memit"]
    values = given_values(cfg, memit)
    values = DEFAULT_VALUES.get(memit.method, []) if values is None else values
    one_layer = [[memit.ft_layer]] if memit.method == "ft" and memit.ft_layer is not None else \
        [[memit.layers[0]], [memit.layers[-1]]]
    windows = cfg.windows or (one_layer if memit.method in ONE_LAYER else None)
    check_grid(memit, values, windows)  # before the model loads

    requests = load_edits(cfg.edits, limit=cfg.limit, drop_conflicting=cfg.drop_conflicts,
                          drop_empty=cfg.drop_empty)
    model, tok = load(secs["model"], memit_cfg=secs["memit"])
    validate(requests, tok)
    out = Path(cfg.out)
    windows = windows or default_windows(get_spec(model).n_layers(model))
    save_config(out, "tune", secs, {"edits": str(cfg.edits), "values": values, "windows": windows})
    editor = make_editor(secs, model, tok, out / "work", cfg.z_dir)
    result = tune(editor, requests, memit, values, windows, tune_fraction=cfg.tune_fraction,
                  seed=cfg.seed, max_ns_drop=cfg.max_ns_drop, max_ge_drop=cfg.max_ge_drop, ns_metric=cfg.ns_metric)
    result["command"] = "memit-pl tune " + " ".join(argv)
    path = write_tune(out, result, asdict(secs["model"]), asdict(secs["stats"]), secs["model"].name)
    sys.stdout.write((out / "tune.md").read_text() + f"\ntuned config: {path}\n")
    return 0
