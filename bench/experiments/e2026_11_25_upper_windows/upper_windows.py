"""Layer windows whose target layer lies above the shipped one, on `memit-pl tune`'s seed-0 tuning half.

    .venv/bin/python -m bench.experiments.e2026_11_25_upper_windows.upper_windows --z_dir RUN/z --windows '[[2,3,4,5,6,7,8]]' --lams '[3000]'

z for a new target layer L = max(window) is optimised once for the tuning half (stored under
``--work``/z-L<L>, resumed if interrupted) and shared by every window with that L; each (window, λ) point
is one apply and one evaluation of the 292 tuning cases, with the tune runs' evaluation settings, so the
rows compare directly with `memit-pl tune`'s rows on the same half.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from bench.experiments.common import command, parser, save, setup  # noqa: E402
from memit_pl.experiments.sweep import row  # noqa: E402
from memit_pl.experiments.tune import point  # noqa: E402


def main() -> None:
    ap = parser(__doc__, "upper_windows")
    ap.add_argument("--windows", type=json.loads, required=True, help="JSON list of layer lists")
    ap.add_argument("--lams", type=json.loads, default=[3000.0], help="JSON list of λ values")
    args = ap.parse_args()
    memit, ed, tune_part, _ = setup(args)
    rows = []
    for window in args.windows:
        cfg = point(memit, window)
        t0 = time.perf_counter()
        store = ed.zs(tune_part, cfg)
        z_s = time.perf_counter() - t0
        for lam in args.lams:
            tag = f"L{'-'.join(map(str, window))}_lam{lam:g}"
            rows.append(row(len(tune_part), ed.edited_evaluation(tune_part, store, point(memit, window, lam), tag),
                            lam=lam, layers=f"{window[0]}-{window[-1]}", z_seconds=round(z_s, 1)))
            print(json.dumps(rows[-1]), flush=True)
    result = {"cases": len(tune_part), "rows": rows, "command": command(__file__)}
    save(args.out, result)


if __name__ == "__main__":
    main()
