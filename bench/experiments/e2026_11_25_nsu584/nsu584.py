"""NS and NSu of all 584 cases of counterfact_known_dev.json edited in one batch, at several λ.

    .venv/bin/python -m bench.experiments.e2026_11_25_nsu584.nsu584 --z_dir RUN/z --lams '[2000,3000,5000,10000]'

NSu is Neighborhood Success on the neighbourhood prompts whose subject is not itself one of the 584
edited subjects (the others are meant to change). The unedited model is scored on the same prompts.
Layers and everything else from ``--config``; z from ``--z_dir`` (the 584-edit `edit` run's store, so no z
is optimised). Generation Entropy is not computed here: the edits are those of ``lam584`` (bench/experiments/e2026_11_25_lam584) and
`memit-pl sweep`, whose GE columns stand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from bench.experiments.common import command, load, parser, save, without_generation  # noqa: E402
from memit_pl.experiments.sweep import row  # noqa: E402
from memit_pl.experiments.tune import point  # noqa: E402


def main() -> None:
    ap = parser(__doc__, "nsu584")
    ap.add_argument("--lams", type=json.loads, default=[2000.0, 3000.0, 5000.0, 10000.0])
    args = ap.parse_args()
    memit, ed, requests = load(args)
    without_generation(ed)
    store = ed.zs(requests, memit)
    unedited = ed.evaluate(requests)
    rows = [row(0, unedited)]
    about = sum(bool(p.get("about_edited_subject")) for c in unedited["cases"] for p in c["prompts"]["neighborhood"])
    total = sum(len(c["prompts"]["neighborhood"]) for c in unedited["cases"])
    print(json.dumps(rows[-1]), flush=True)
    for lam in args.lams:
        cfg = point(memit, memit.layers, lam)
        rows.append(row(len(requests), ed.edited_evaluation(requests, store, cfg, f"lam{lam:g}"), lam=lam,
                        layers=f"{memit.layers[0]}-{memit.layers[-1]}"))
        print(json.dumps(rows[-1]), flush=True)
        result = {"neighbourhood_prompts": total, "about_edited_subjects": about, "nsu_cases": unedited["counts"]["NSu"],
                  "rows": rows, "command": command(__file__)}
        save(args.out, result)


if __name__ == "__main__":
    main()
