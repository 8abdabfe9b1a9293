"""``memit-pl apply-delta``: add a saved edit delta to a model and save the result."""

from __future__ import annotations

import logging
from pathlib import Path

from memit_pl.cli._common import load, make_parser, parse

log = logging.getLogger(__name__)


def change(argv: list[str], sign: float, doc: str) -> int:
    parser = make_parser(doc)
    parser.add_argument("--delta", required=True, help="a run directory or its delta.safetensors")
    parser.add_argument("--out", required=True, help="where to save_pretrained the resulting model")
    cfg, secs = parse(parser, argv)
    from memit_pl.delta import apply_delta, load_delta
    from memit_pl.modeling.loading import fingerprint

    model, tok = load(secs["model"])
    delta = load_delta(cfg.delta)
    expected = delta.metadata.get("fingerprint")
    if sign > 0 and expected and fingerprint(model) != expected:
        log.warning("the model's fingerprint differs from the one the delta was computed on (%s)", expected)
    apply_delta(model, delta, sign=sign)
    if sign < 0 and expected and fingerprint(model) != expected:
        log.warning("after reverting, the fingerprint does not match the unedited model's (%s)", expected)
    out = Path(cfg.out)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    log.info("%s %d layers (%s) -> %s", "applied" if sign > 0 else "reverted", len(delta.layers), delta.layers, out)
    return 0


def main(argv: list[str]) -> int:
    return change(argv, +1.0, __doc__)
