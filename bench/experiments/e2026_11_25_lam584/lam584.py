"""All 584 cases of counterfact_known_dev.json edited in one batch at other λ values than the shipped one.

    .venv/bin/python -m bench.experiments.e2026_11_25_lam584.lam584 --z_dir RUN/z --lams '[2000,3000]' [--config configs/smollm2-135m.yaml]

Layers and everything else from ``--config``; z from ``--z_dir`` (the 584-edit `edit` run's store, so no z
is optimised); evaluation settings as `memit-pl sweep` and `memit-pl tune` (GE on, the reference's top-k 5
sampling, 2 prompts per case, 50 tokens). The unedited model's row is the sweep's n = 0 row
(bench/experiments/e2026_11_25_sweep_smollm2_lam5000/sweep.json), measured on the same 584 cases with the same settings.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from bench.experiments.common import command, load, parser, save  # noqa: E402
from memit_pl.experiments.sweep import row  # noqa: E402
from memit_pl.experiments.tune import point  # noqa: E402


def main() -> None:
    ap = parser(__doc__, "lam584")
    ap.add_argument("--lams", type=json.loads, default=[2000.0, 3000.0])
    args = ap.parse_args()
    memit, ed, requests = load(args)
    store = ed.zs(requests, memit)
    rows = []
    for lam in args.lams:
        cfg = point(memit, memit.layers, lam)
        rows.append(row(len(requests), ed.edited_evaluation(requests, store, cfg, f"lam{lam:g}"), lam=lam,
                        layers=f"{memit.layers[0]}-{memit.layers[-1]}"))
        print(json.dumps(rows[-1]), flush=True)
        result = {"rows": rows, "command": command(__file__)}
        save(args.out, result)


if __name__ == "__main__":
    main()
