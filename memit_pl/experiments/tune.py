"""Choose λ and the edited layers by measurement (the paper's Appendix F trade-off, as a tool).

The edits are split (seeded) into a tuning part and a held-back part. Every (layer window, λ) point
edits the tuning part in one batch and is scored by its Editing Score S, subject to bounds on the
loss of Neighborhood Success (NS, or NSu: only the neighbourhood prompts whose subject is not edited
itself) and of Generation Entropy against the unedited model; the chosen point
is then measured on the held-back part, which took no part in the choice.

Cost: statistics are computed once per layer, z once per target layer L = max(R) (a λ-only sweep
optimises no z at all after the first point), so a λ point costs one keys pass per edited layer, the
solves and one evaluation; a new layer window with a new L adds one z optimisation.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from memit_pl import io
from memit_pl.config import MemitConfig
from memit_pl.data.edits import EditRequest
from memit_pl.editor import MEMIT
from memit_pl.experiments.sweep import COLUMNS, markdown, plot_rows, row, with_layers

log = logging.getLogger(__name__)


def split(requests: Sequence[EditRequest], tune_fraction: float, seed: int) -> tuple[list[EditRequest], list[EditRequest]]:
    """A seeded split into (tuning part, held-back part), each in file order."""
    if not 0 < tune_fraction < 1:
        raise ValueError(f"tune_fraction must be in (0, 1), got {tune_fraction}")
    idx = list(range(len(requests)))
    random.Random(seed).shuffle(idx)
    k = max(1, min(len(requests) - 1, round(tune_fraction * len(requests))))
    chosen = set(idx[:k])
    return [r for i, r in enumerate(requests) if i in chosen], [r for i, r in enumerate(requests) if i not in chosen]


def default_windows(n_layers: int, size: int = 5, starts: Sequence[int] = (1, 3, 5)) -> list[list[int]]:
    """Windows of ``size`` consecutive layers starting at ``starts`` (inside the model)."""
    out = []
    for s in starts:
        window = [layer for layer in range(s, s + size) if layer < n_layers]
        if window and window not in out:
            out.append(window)
    return out


NS_METRICS = ("NS", "NSu")


def _check_ns_metric(ns_metric: str) -> None:
    if ns_metric not in NS_METRICS:
        raise ValueError(f"ns_metric must be one of {NS_METRICS}, got {ns_metric!r}")


def excess(r: dict, base: dict, max_ns_drop: float = 5.0, max_ge_drop: float = 5.0, ns_metric: str = "NS") -> dict[str, float]:
    """How many points ``r`` falls beyond each bound relative to ``base``: {ns_metric: ..., "GE": ...}, 0 within
    a bound and where ``r`` or ``base`` has no value."""
    out = {}
    for k, bound in ((ns_metric, max_ns_drop), ("GE", max_ge_drop)):
        have = r.get(k) is not None and base.get(k) is not None
        out[k] = max(0.0, (base[k] - bound) - r[k]) if have else 0.0
    return out


def select(rows: Sequence[dict], base: dict, max_ns_drop: float = 5.0, max_ge_drop: float = 5.0,
           ns_metric: str = "NS") -> tuple[dict, bool]:
    """The row with the best Editing Score among those within the ``ns_metric`` and GE bounds of
    ``base``; when none is, the row that violates the bounds least. Returns (row, within bounds)."""
    _check_ns_metric(ns_metric)

    def violation(r: dict) -> float:
        return sum(excess(r, base, max_ns_drop, max_ge_drop, ns_metric).values())

    feasible = [r for r in rows if violation(r) == 0.0 and r.get("S") is not None]
    if feasible:
        return max(feasible, key=lambda r: r["S"]), True
    return min(rows, key=violation), False


def tune(
    editor: MEMIT,
    requests: Sequence[EditRequest],
    memit: MemitConfig,
    lambdas: Sequence[float],
    windows: Sequence[Sequence[int]],
    *,
    tune_fraction: float = 0.5,
    seed: int = 0,
    max_ns_drop: float = 5.0,
    max_ge_drop: float = 5.0,
    ns_metric: str = "NS",
) -> dict[str, Any]:
    """Search the grid on the tuning part; measure the chosen point on the held-back part."""
    _check_ns_metric(ns_metric)  # before any expensive work
    if memit.method in ("ft", "rome"):
        raise ValueError(f"tune searches λ and layer windows, which memit.method {memit.method} does not use; "
                         "use `memit-pl sweep` at each of its settings instead")
    tune_part, held = split(requests, tune_fraction, seed)
    base_res = editor.evaluate(tune_part)
    base = row(0, base_res)
    rows = []
    for window in windows:
        cfg = with_layers(memit, window)
        store = editor.zs(tune_part, cfg)
        for lam in lambdas:
            point = with_layers(memit, window, lam)
            tag = f"L{'-'.join(map(str, window))}_lam{lam:g}"
            rows.append(row(len(tune_part), editor.edited_evaluation(tune_part, store, point, tag), base_res,
                            lam=lam, layers=f"{window[0]}-{window[-1]}", window=list(window)))
            log.info("tune %s: %s", tag, rows[-1])
    chosen, within = select(rows, base, max_ns_drop, max_ge_drop, ns_metric)
    best = with_layers(memit, chosen["window"], chosen["lam"])
    held_res = editor.evaluate(held)
    held_base = row(0, held_res)
    store = editor.zs(list(tune_part) + list(held), best)
    held_row = row(len(held), editor.edited_evaluation(held, store, best, "held", eval_requests=held), held_res)
    result = {
        "n_tune": len(tune_part),
        "n_held": len(held),
        "seed": seed,
        "bounds": {"max_ns_drop": max_ns_drop, "max_ge_drop": max_ge_drop, "ns_metric": ns_metric},
        "unedited_tune": base,
        "rows": rows,
        "chosen": {"layers": best.layers, "mom2_update_weight": best.mom2_update_weight, "within_bounds": within},
        "unedited_held": held_base,
        "held": held_row,
        "memit": asdict(best),
    }
    broken = held_breaks(result)
    result["held_within_bounds"] = not broken
    if broken:
        log.warning("the chosen point is outside the bounds on the held-back part: %s", broken)
    return result


def held_breaks(result: dict[str, Any]) -> str:
    """The bounds the chosen point breaks on the held-back part, with its change from the unedited model
    ('GE -6.14 (bound −5)'); empty when it keeps them."""
    b = result["bounds"]
    m = b.get("ns_metric", "NS")
    bounds = {m: b["max_ns_drop"], "GE": b["max_ge_drop"]}
    held, base = result["held"], result["unedited_held"]
    over = excess(held, base, b["max_ns_drop"], b["max_ge_drop"], m)
    return ", ".join(f"{k} {held[k] - base[k]:+.2f} (bound −{bounds[k]:g})" for k, v in over.items() if v > 0)


def _bounds(result: dict[str, Any]) -> str:
    b = result["bounds"]
    return f"{b.get('ns_metric', 'NS')} −{b['max_ns_drop']:g}, GE −{b['max_ge_drop']:g}"


def write_tune(out_dir: str | Path, result: dict[str, Any], model_cfg: dict, stats_cfg: dict, title: str) -> Path:
    """tune.json, tune.md, tune.png and the tuned config ``tuned.yaml``; returns the YAML's path."""
    from memit_pl.config import to_yaml

    out_dir = Path(out_dir)
    io.write_json(out_dir / "tune.json", result)
    keys = ("layers", "lam", *COLUMNS)
    broken = held_breaks(result)
    text = [
        f"tuning part: {result['n_tune']} edits, held-back part: {result['n_held']} edits (seed {result['seed']})",
        "",
        markdown([{**result["unedited_tune"], "layers": "unedited", "lam": None}, *result["rows"]], keys),
        "",
        f"chosen: layers {result['chosen']['layers']}, λ {result['chosen']['mom2_update_weight']:g}"
        f" ({'within' if result['chosen']['within_bounds'] else 'OUTSIDE'} the bounds: {_bounds(result)}),"
        f" for {result['n_tune']} edits in one batch",
        "",
        f"held-back part ({'OUTSIDE the bounds: ' + broken if broken else 'within the bounds'}):",
        "",
        markdown([{**result["unedited_held"], "which": "unedited"}, {**result["held"], "which": "edited"}], ("which", *COLUMNS)),
    ]
    io.write_text(out_dir / "tune.md", "\n".join(text) + "\n")
    plot_rows(result["rows"], "lam", out_dir / "tune.png", f"{title}: {result['n_tune']} edits in one batch vs λ", group="layers",
              baseline=result["unedited_tune"])
    path = out_dir / "tuned.yaml"
    io.write_text(path, f"# chosen by `memit-pl tune` (see {out_dir / 'tune.md'}) for {result['n_tune']} edits in one batch:\n"
                  "# the edits' keys weigh against λC in proportion to their number, so other batch sizes trade\n"
                  "# efficacy and specificity differently (measure them with `memit-pl sweep`)\n"
                  + to_yaml({"model": model_cfg, "memit": result["memit"], "stats": stats_cfg}))
    return path
