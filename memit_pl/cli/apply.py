"""``memit-pl apply`` (also ``apply_edits.py``): the ascending-layer update from a z store."""

from __future__ import annotations

import logging
from pathlib import Path

from memit_pl.cli._common import add_selection_arguments, load, make_editor, make_parser, parse, save_config
from memit_pl.data.edits import load_edits

log = logging.getLogger(__name__)


def main(argv: list[str]) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--edits", required=True, help="edits file (the one the z store was made from)")
    parser.add_argument("--z", required=True, help="z store directory (from `memit-pl z`)")
    parser.add_argument("--out", required=True, help="run directory: delta, per-layer factors, summary, model/")
    add_selection_arguments(parser)
    parser.add_argument("--previous", type=list[str], default=[], help="earlier run directories whose edits to keep")
    parser.add_argument("--save_model", type=bool, default=True, help="write the edited model with save_pretrained")
    cfg, secs = parse(parser, argv)
    from memit_pl.stages.pipeline import apply_stage
    from memit_pl.stages.zstore import load_store

    requests = load_edits(cfg.edits, limit=cfg.limit, drop_conflicting=cfg.drop_conflicts,
                          drop_empty=cfg.drop_empty)  # bad input fails here, before the model loads
    model, tok = load(secs["model"], memit_cfg=secs["memit"])
    editor = make_editor(secs, model, tok, work_dir=cfg.out)
    editor.check(requests)
    store = load_store(cfg.z)
    extra = {"edits": str(cfg.edits), "z": str(cfg.z), "previous": cfg.previous}
    path = save_config(cfg.out, "apply", secs, extra)
    summary = apply_stage(editor, requests, store, Path(cfg.out), previous=cfg.previous, save_model=cfg.save_model,
                          config_dump={"path": str(path), **extra})
    log.info("applied %d edits to layers %s; mean ‖z−h^L‖ %.3f -> %.3f", len(requests), secs["memit"].layers,
             summary["resid_norm_before"], summary["resid_norm_after"])
    return 0
