"""Does a better estimate of C move the 584-case trade-off? The tuning half of `memit-pl tune`'s seed-0
split, edited with statistics from ``--n_samples`` chunks instead of the config's 1,000.

    .venv/bin/python -m bench.experiments.e2026_11_25_cov_samples.cov_samples --z_dir RUN/z [--n_samples 3000] [--lambdas 1000 3000]
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
    ap = parser(__doc__, "cov_samples")
    ap.add_argument("--n_samples", type=int, default=3000)
    ap.add_argument("--lambdas", type=float, nargs="+", default=[1000.0, 3000.0])
    args = ap.parse_args()
    memit, ed, tune_part, _ = setup(args, n_samples=args.n_samples)
    store = ed.zs(tune_part, memit)
    rows = [row(len(tune_part), ed.edited_evaluation(tune_part, store, point(memit, memit.layers, lam), f"lam{lam:g}"),
                lam=lam, n_samples=args.n_samples) for lam in args.lambdas]
    result = {"layers": memit.layers, "rows": rows, "command": command(__file__)}
    save(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
