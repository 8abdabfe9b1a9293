"""Does a better estimate of C move the 584-case trade-off? The tuning half of `memit-pl tune`'s seed-0
split, edited with statistics from ``--n_samples`` chunks instead of the config's 1,000.

    .venv/bin/python bench/cov_samples.py --z_dir RUN/z [--n_samples 3000] [--lambdas 1000 3000]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memit_pl.config import EvalConfig, MemitConfig, StatsConfig, TrainerConfig  # noqa: E402
from memit_pl.edits import load_edits  # noqa: E402
from memit_pl.models import load_model  # noqa: E402
from memit_pl.sweep import Editor, row, with_layers  # noqa: E402
from memit_pl.tune import split  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--z_dir", required=True)
    ap.add_argument("--n_samples", type=int, default=3000)
    ap.add_argument("--lambdas", type=float, nargs="+", default=[1000.0, 3000.0])
    ap.add_argument("--edits", default=str(ROOT.parent / "shared/data/counterfact_known_dev.json"))
    ap.add_argument("--config", default=str(ROOT / "configs/smollm2-135m.yaml"))
    ap.add_argument("--work", default="runs/cov_samples")
    ap.add_argument("--out", default=str(ROOT / "bench/results/cov_samples.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    c = yaml.safe_load(Path(args.config).read_text())
    memit = MemitConfig(**c["memit"])
    model, tok = load_model(c["model"]["name"], device="cpu")
    tune_part, _ = split(load_edits(args.edits, tokenizer=tok), 0.5, 0)
    ed = Editor(model, tok, replace(StatsConfig(**c["stats"]), n_samples=args.n_samples), Path(args.work),
                trainer=TrainerConfig(enable_progress_bar=False),
                eval_cfg=EvalConfig(batch_size=256, generation_length=50, max_generation_prompts=2), z_dir=args.z_dir)
    store = ed.zs(tune_part, memit)
    rows = [row(len(tune_part), ed.edited_evaluation(tune_part, store, with_layers(memit, memit.layers, lam), f"lam{lam:g}"),
                lam=lam, n_samples=args.n_samples) for lam in args.lambdas]
    result = {"layers": memit.layers, "rows": rows, "command": "python bench/cov_samples.py " + " ".join(sys.argv[1:])}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
