"""``memit-pl demo``: edit the demo facts on the default model and show the predictions before and after."""

from __future__ import annotations

from pathlib import Path

from memit_pl.cli._common import make_parser, parse
from memit_pl.cli.edit import add_arguments, run
from memit_pl.config import demo_edits_path, packaged_config
from memit_pl.modeling.loading import default_cache_dir

DEMO_LAMBDA = "1000"
"""λ of the demo: 20 edits, shown for their efficacy. The shipped config's λ was tuned for hundreds of
edits under bounds on the loss of Neighborhood Success (10 points) and Generation Entropy (5), which
costs efficacy (docs/tuning.md)."""


def main(argv: list[str]) -> int:
    config = packaged_config("smollm2-135m")  # package data: works from a wheel, from any directory
    if "--config" not in argv and config is not None:
        # the demo's λ right after the default config, so that the user's own arguments still win
        argv = ["--config", str(config), "--memit.mom2_update_weight", DEMO_LAMBDA, *argv]
    parser = make_parser(__doc__)
    add_arguments(parser, out_default=str(default_cache_dir() / "runs" / "demo"))
    cfg, secs = parse(parser, argv)
    if cfg.edits is None:
        cfg.edits = str(demo_edits_path())
        if not Path(cfg.edits).exists():
            raise FileNotFoundError(f"{cfg.edits} not found: pass --edits FILE")
    return run(cfg, secs, "demo")
