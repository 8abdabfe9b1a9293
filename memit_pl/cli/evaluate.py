"""``memit-pl evaluate``: CounterFact / zsRE metrics of a model, before and (with ``--delta``) after an edit."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from memit_pl.cli._common import add_selection_arguments, load, make_editor, make_parser, parse, save_config

log = logging.getLogger(__name__)


def check_delta(model, delta) -> None:
    """Fail before any evaluation when a delta does not fit the model (family, layers, shapes)."""
    from memit_pl.modeling.spec import get_spec

    spec = get_spec(model)
    fam = delta.metadata.get("family")
    if fam is not None and fam != spec.family:
        raise ValueError(f"the delta was made for a {fam} model, this is a {spec.family} model")
    n_layers = spec.n_layers(model)
    for layer in delta.layers:
        if not 0 <= layer < n_layers:
            raise ValueError(f"the delta edits layer {layer}; the model has layers 0..{n_layers - 1}")
        a, b = delta.factors[layer]
        shape = (b.shape[0], a.shape[0]) if spec.transposed else (a.shape[0], b.shape[0])
        w = tuple(spec.out_weight(model, layer).shape)
        if w != shape:
            raise ValueError(f"layer {layer}: delta shape {shape} does not match the weight {w}")


def main(argv: list[str]) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--edits", required=True, help="edits file (CounterFact JSON, zsRE JSON or JSONL)")
    parser.add_argument("--delta", default=None, help="run directory (or file) of a saved edit delta to evaluate")
    parser.add_argument("--out", default=None, help="output directory (default: RUN_DIR/eval with --delta)")
    add_selection_arguments(parser)
    parser.add_argument(
        "--reference_dir", default=None,
        help="directory with attribute_snippets.json, idf.npy, tfidf_vocab.json (enables the Reference Score)",
    )
    cfg, secs = parse(parser, argv)
    if cfg.out is None and cfg.delta is None:
        parser.error("--out is required without --delta")
    out = Path(cfg.out) if cfg.out is not None else Path(cfg.delta) / "eval"
    if cfg.limit is not None and cfg.limit < 1:
        parser.error("--limit must be >= 1")

    from memit_pl.data.edits import load_edits, validate
    from memit_pl.delta import apply_delta, load_delta
    from memit_pl.metrics import ReferenceData
    from memit_pl.stages.eval_report import headline_table, write_reports

    requests = load_edits(cfg.edits, limit=cfg.limit, drop_conflicting=cfg.drop_conflicts,
                          drop_empty=cfg.drop_empty)  # bad input fails here, before the model loads
    reference = ReferenceData.load(cfg.reference_dir) if cfg.reference_dir else None
    delta = load_delta(cfg.delta) if cfg.delta else None
    model, tok = load(secs["model"])
    validate(requests, tok)
    if delta is not None:
        check_delta(model, delta)
    editor = make_editor(secs, model, tok)
    trainer = editor.config.trainer  # the user's trainer settings, in the compute dtype

    runs = {}
    log.info("evaluating the unedited model on %d cases", len(requests))
    runs["unedited"] = editor.evaluate(requests, trainer_cfg=trainer, reference=reference)
    if delta is not None:
        apply_delta(model, delta)
        log.info("evaluating with the delta of %s (layers %s)", cfg.delta, delta.layers)
        runs["edited"] = editor.evaluate(requests, trainer_cfg=trainer, reference=reference)

    meta = {
        "model": secs["model"].name,
        "edits_file": str(cfg.edits),
        "delta": str(cfg.delta) if cfg.delta else None,
        "command": "memit-pl evaluate " + " ".join(argv),
        "compute_dtype": editor.compute_dtype,
    }
    paths = write_reports(out, runs, meta)
    args = {"edits": str(cfg.edits), "delta": meta["delta"], "out": str(out), "limit": cfg.limit,
            "reference_dir": cfg.reference_dir}
    save_config(out, "evaluate", secs, {"args": args})
    sys.stdout.write(headline_table(runs) + "\n\n" + "wrote " + ", ".join(str(p) for p in paths) + "\n")
    return 0
