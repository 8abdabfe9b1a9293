"""Is an edit's loss of fluency global, or confined to the edited subjects?

    .venv/bin/python bench/ge_spill.py --z_dir RUN/z [--lam 1000] [--out bench/results/ge_spill.json]

Edits SmolLM2-135M with the tuning half of `memit-pl tune`'s seed-0 split of counterfact_known_dev.json
(z from ``--z_dir``, e.g. the 584-edit `edit` run's z store; layers and the rest from the shipped config),
then evaluates the *held-back* half, whose subjects were not edited: their GE and NS against the unedited
model's figures on the same half say how much of the damage reaches unrelated text.
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
from memit_pl.tune import split  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--z_dir", required=True)
    ap.add_argument("--lam", type=float, default=1000.0)
    ap.add_argument("--edits", default=str(ROOT.parent / "shared/data/counterfact_known_dev.json"))
    ap.add_argument("--config", default=str(ROOT / "configs/smollm2-135m.yaml"))
    ap.add_argument("--work", default="runs/ge_spill")
    ap.add_argument("--out", default=str(ROOT / "bench/results/ge_spill.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    c = yaml.safe_load(Path(args.config).read_text())
    memit = MemitConfig(**c["memit"])
    model, tok = load_model(c["model"]["name"], device="cpu")
    tune_part, held = split(load_edits(args.edits, tokenizer=tok), 0.5, 0)
    ed = Editor(model, tok, StatsConfig(**c["stats"]), Path(args.work), trainer=TrainerConfig(enable_progress_bar=False),
                eval_cfg=EvalConfig(batch_size=256, generation_length=50, max_generation_prompts=2), z_dir=args.z_dir)
    unedited = row(len(held), ed.evaluate(held))
    store = ed.zs(tune_part, memit)
    edited = row(len(held), ed.edited_evaluation(tune_part, store, with_layers(memit, memit.layers, args.lam), "spill",
                                                 eval_requests=held), lam=args.lam)
    result = {"edited_cases": len(tune_part), "evaluated_cases": len(held), "layers": memit.layers, "lam": args.lam,
              "held_unedited": unedited, "held_with_tuning_part_edited": edited,
              "command": "python bench/ge_spill.py " + " ".join(sys.argv[1:])}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
