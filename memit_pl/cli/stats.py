"""``memit-pl stats``: compute (or reuse) the key second-moment statistics E[k kᵀ] of the edited layers."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from memit_pl.cli._common import load, make_editor, make_parser, parse, save_config
from memit_pl.modeling.loading import default_cache_dir
from memit_pl.stages.runtime import compute_dtype_of
from memit_pl.stages.stats import check_stats_config, layer_covariances, stats_cache

log = logging.getLogger(__name__)


def main(argv: list[str]) -> int:
    parser = make_parser(__doc__)
    cfg, secs = parse(parser, argv)
    check_stats_config(secs["stats"])
    model, tok = load(secs["model"], memit_cfg=secs["memit"])
    trainer = make_editor(secs, model, tok).config.trainer  # its precision: the resolved model.compute_dtype
    layers = secs["memit"].layers
    root = Path(secs["model"].cache_dir) if secs["model"].cache_dir else default_cache_dir()
    cache_dir = root / "stats"
    covs = layer_covariances(model, tok, layers, secs["stats"], cache_dir=cache_dir, trainer=trainer)

    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank != 0:
        return 0
    cache = stats_cache(model, tok, secs["stats"], cache_dir, compute_dtype_of(trainer))
    save_config(cache.dir, "stats", secs)
    lines = [
        f"statistics of {secs['model'].name} on {cache.key.corpus} "
        f"({cache.key.n_samples} chunks x {cache.key.seq_len} tokens, {cache.key.dtype})",
        f"{'layer':>5}  {'d_key':>6}  {'mean E[k^2]':>12}  file",
    ]
    for layer, c in covs.items():
        lines.append(
            f"{layer:>5}  {c.shape[0]:>6}  {float(c.diagonal().mean()):>12.5g}  {cache.layer_path(layer)}"
        )
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
