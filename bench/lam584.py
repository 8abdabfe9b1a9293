"""All 584 cases of counterfact_known_dev.json edited in one batch at other λ values than the shipped one.

    .venv/bin/python bench/lam584.py --z_dir RUN/z --lams '[2000,3000]' [--config configs/smollm2-135m.yaml]

Layers and everything else from ``--config``; z from ``--z_dir`` (the 584-edit `edit` run's store, so no z
is optimised); evaluation settings as `memit-pl sweep` and `memit-pl tune` (GE on, the reference's top-k 5
sampling, 2 prompts per case, 50 tokens). The unedited model's row is the sweep's n = 0 row
(bench/results/sweep.json), measured on the same 584 cases with the same settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memit_pl.config import EvalConfig, MemitConfig, StatsConfig, TrainerConfig  # noqa: E402
from memit_pl.edits import load_edits  # noqa: E402
from memit_pl.models import load_model  # noqa: E402
from memit_pl.sweep import Editor, row, with_layers  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--z_dir", required=True)
    ap.add_argument("--lams", type=json.loads, default=[2000.0, 3000.0])
    ap.add_argument("--edits", default=str(ROOT.parent / "shared/data/counterfact_known_dev.json"))
    ap.add_argument("--config", default=str(ROOT / "configs/smollm2-135m.yaml"))
    ap.add_argument("--work", default="runs/lam584")
    ap.add_argument("--out", default=str(ROOT / "bench/results/lam584.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    c = yaml.safe_load(Path(args.config).read_text())
    memit = MemitConfig(**c["memit"])
    model, tok = load_model(c["model"]["name"], device="cpu")
    requests = load_edits(args.edits, tokenizer=tok)
    ed = Editor(model, tok, StatsConfig(**c["stats"]), Path(args.work), trainer=TrainerConfig(enable_progress_bar=False),
                eval_cfg=EvalConfig(), z_dir=args.z_dir)
    store = ed.zs(requests, memit)
    rows = []
    for lam in args.lams:
        cfg = with_layers(memit, memit.layers, lam)
        rows.append(row(len(requests), ed.edited_evaluation(requests, store, cfg, f"lam{lam:g}"), lam=lam,
                        layers=f"{memit.layers[0]}-{memit.layers[-1]}"))
        print(json.dumps(rows[-1]), flush=True)
        result = {"rows": rows, "command": "python bench/lam584.py " + " ".join(sys.argv[1:])}
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
