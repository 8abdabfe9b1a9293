"""Is an edit's loss of fluency global, or confined to the edited subjects?

    .venv/bin/python -m bench.experiments.e2026_11_25_ge_spill.ge_spill --z_dir RUN/z [--lam 1000] [--out runs/ge_spill/ge_spill.json]

Edits SmolLM2-135M with the tuning half of `memit-pl tune`'s seed-0 split of counterfact_known_dev.json
(z from ``--z_dir``, e.g. the 584-edit `edit` run's z store; layers and the rest from the shipped config),
then evaluates the *held-back* half, whose subjects were not edited: their GE and NS against the unedited
model's figures on the same half say how much of the damage reaches unrelated text.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from bench.experiments.common import command, parser, save, setup  # noqa: E402
from memit_pl.experiments.sweep import row  # noqa: E402
from memit_pl.experiments.tune import point  # noqa: E402


def main() -> None:
    ap = parser(__doc__, "ge_spill")
    ap.add_argument("--lam", type=float, default=1000.0)
    args = ap.parse_args()
    memit, ed, tune_part, held = setup(args)
    unedited = row(len(held), ed.evaluate(held))
    store = ed.zs(tune_part, memit)
    edited = row(len(held), ed.edited_evaluation(tune_part, store, point(memit, memit.layers, args.lam), "spill",
                                                 eval_requests=held), lam=args.lam)
    result = {"edited_cases": len(tune_part), "evaluated_cases": len(held), "layers": memit.layers, "lam": args.lam,
              "held_unedited": unedited, "held_with_tuning_part_edited": edited,
              "command": command(__file__)}
    save(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
