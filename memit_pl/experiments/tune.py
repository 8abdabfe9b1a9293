"""Choose a method's settings by measurement (the paper's Appendix F trade-off, as a tool): the edited
layers and the one setting that trades efficacy against specificity for the method (``SEARCHED``):
λ for MEMIT, AlphaEdit's ridge α, FT-W's decay; ROME has none, so only its layer is searched.

The edits are split (seeded) into a tuning part and a held-back part. Every (layer window, value) point
edits the tuning part in one batch and is scored by its Editing Score S, subject to bounds on the
loss of Neighborhood Success (NS, or NSu: only the neighbourhood prompts whose subject is not edited
itself) and of Generation Entropy against the unedited model; the chosen point
is then measured on the held-back part, which took no part in the choice. FT-W and ROME write one layer,
so their windows are single layers (``[[0], [6]]``).

Cost: statistics are computed once per layer, z once per target layer L = max(R) (a λ-only sweep
optimises no z at all after the first point), so a λ point costs one keys pass per edited layer, the
solves and one evaluation; a new layer window with a new L adds one z optimisation. FT-W needs no z: each
of its points is a fine-tuning run.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from memit_pl import io
from memit_pl.config import ConfigError, MemitConfig
from memit_pl.data.edits import EditRequest
from memit_pl.editor import MEMIT
from memit_pl.experiments.sweep import COLUMNS, LABELS, SEARCHED, markdown, plot_rows, row, with_value

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

#: a grid to search when none is given
DEFAULT_VALUES: dict[str, list[float]] = {"memit": [1e3, 3e3, 1e4, 3e4, 1e5], "alphaedit": [1.0, 10.0, 100.0],
                                          "ft": [0.0, 1e-3, 1e-2, 1e-1], "rome": []}
ONE_LAYER = ("ft", "rome")  # methods that write one layer: each window is one layer


def point(memit: MemitConfig, window: Sequence[int], value: float | None = None) -> MemitConfig:
    """``memit`` at one grid point: the window's layers (FT-W: its layer as ``ft_layer``) and the method's
    searched setting at ``value`` (unchanged when None)."""
    changes: dict[str, Any] = {"layers": list(window)}
    if memit.method == "ft":
        changes["ft_layer"] = window[-1]
    memit = replace(memit, **changes)
    return memit if value is None or SEARCHED[memit.method] is None else with_value(memit, value)


def check_grid(memit: MemitConfig, values: Sequence[float], windows: Sequence[Sequence[int]] | None) -> None:
    """A one-line error, before any model work, for a grid the method cannot use (``windows`` None: the
    default windows, not known before the model is loaded, are not checked)."""
    if memit.method not in SEARCHED:
        raise ConfigError(f"tune: unknown memit.method {memit.method!r}; choose from {', '.join(SEARCHED)}")
    if windows is not None and (not windows or any(not w for w in windows)):
        raise ConfigError("tune: give at least one non-empty layer window")
    if windows is not None and memit.method in ONE_LAYER and any(len(w) != 1 for w in windows):
        bad = next(w for w in windows if len(w) != 1)
        raise ConfigError(f"tune: memit.method {memit.method} writes one layer, so each window is one layer "
                          f"(e.g. [[0], [6]]); got {list(bad)}")
    if SEARCHED[memit.method] is None and values:
        raise ConfigError(f"tune: memit.method {memit.method} has no setting to search besides its layer; "
                          "give no values (layers only)")
    if SEARCHED[memit.method] is not None and not values:
        raise ConfigError(f"tune: give at least one value of {SEARCHED[memit.method][0]} to search")


def _check_ns_metric(ns_metric: str) -> None:
    if ns_metric not in NS_METRICS:
        raise ConfigError(f"ns_metric must be one of {NS_METRICS}, got {ns_metric!r}")


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
    values: Sequence[float],
    windows: Sequence[Sequence[int]],
    *,
    tune_fraction: float = 0.5,
    seed: int = 0,
    max_ns_drop: float = 5.0,
    max_ge_drop: float = 5.0,
    ns_metric: str = "NS",
) -> dict[str, Any]:
    """Search the grid (``windows`` × ``values`` of the method's searched setting, ``SEARCHED``) on the tuning
    part; measure the chosen point on the held-back part."""
    _check_ns_metric(ns_metric)  # before any expensive work
    values = list(values or [])
    check_grid(memit, values, windows)
    searched = SEARCHED[memit.method]
    column = None if searched is None else searched[1]
    tune_part, held = split(requests, tune_fraction, seed)
    base_res = editor.evaluate(tune_part)
    base = row(0, base_res)
    rows = []
    for window in windows:
        store = None if memit.method == "ft" else editor.zs(tune_part, point(memit, window))
        for value in values if column else [None]:
            cfg = point(memit, window, value)
            tag = f"L{'-'.join(map(str, window))}" + ("" if column is None else f"_{column}{value:g}")
            extra = {} if column is None else {column: float(value)}
            rows.append(row(len(tune_part), editor.edited_evaluation(tune_part, store, cfg, tag), base_res,
                            **extra, layers=f"{window[0]}-{window[-1]}", window=list(window)))
            log.info("tune %s: %s", tag, rows[-1])
    chosen, within = select(rows, base, max_ns_drop, max_ge_drop, ns_metric)
    best = point(memit, chosen["window"], None if column is None else chosen[column])
    held_res = editor.evaluate(held)
    held_base = row(0, held_res)
    store = None if memit.method == "ft" else editor.zs(list(tune_part) + list(held), best)
    held_row = row(len(held), editor.edited_evaluation(held, store, best, "held", eval_requests=held), held_res)
    result = {
        "n_tune": len(tune_part),
        "n_held": len(held),
        "seed": seed,
        "bounds": {"max_ns_drop": max_ns_drop, "max_ge_drop": max_ge_drop, "ns_metric": ns_metric},
        "unedited_tune": base,
        "rows": rows,
        "method": memit.method,
        "searched": None if searched is None else {"key": searched[0], "column": column},
        "chosen": {"layers": best.layers, **({} if searched is None else {searched[0]: getattr(best, searched[0])}),
                   "within_bounds": within},
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
    # results written before other methods could be tuned searched λ
    searched = result["searched"] if "searched" in result else {"key": "mom2_update_weight", "column": "lam"}
    column = None if searched is None else searched["column"]
    keys = ("layers", *((column,) if column else ()), *COLUMNS)
    broken = held_breaks(result)
    chosen = result["chosen"]
    value = "" if column is None else f", {LABELS.get(column, column)} {chosen[searched['key']]:g}"
    method = result.get("method", "memit")
    text = [
        f"tuning part: {result['n_tune']} edits, held-back part: {result['n_held']} edits (seed {result['seed']})"
        + ("" if method == "memit" else f"; method {method}"),
        "",
        markdown([{**result["unedited_tune"], "layers": "unedited"}, *result["rows"]], keys),
        "",
        f"chosen: layers {chosen['layers']}{value}"
        f" ({'within' if chosen['within_bounds'] else 'OUTSIDE'} the bounds: {_bounds(result)}),"
        f" for {result['n_tune']} edits in one batch",
        "",
        f"held-back part ({'OUTSIDE the bounds: ' + broken if broken else 'within the bounds'}):",
        "",
        markdown([{**result["unedited_held"], "which": "unedited"}, {**result["held"], "which": "edited"}], ("which", *COLUMNS)),
    ]
    io.write_text(out_dir / "tune.md", "\n".join(text) + "\n")
    heading = f"{title}: {result['n_tune']} edits in one batch vs "
    if column is None:  # layers only (ROME): one point per layer
        rows = [{**r, "layer": r["window"][-1]} for r in result["rows"]]
        plot_rows(rows, "layer", out_dir / "tune.png", heading + "layer", log_x=False, keep_zero=True,
                  baseline=result["unedited_tune"])
    else:
        plot_rows(result["rows"], column, out_dir / "tune.png", heading + LABELS.get(column, column), group="layers",
                  keep_zero=True, baseline=result["unedited_tune"])
    why = ("# the edits' keys weigh against λC in proportion to their number, so other batch sizes trade\n"
           "# efficacy and specificity differently (measure them with `memit-pl sweep`)\n") if method == "memit" else (
           "# a setting chosen at one batch size can trade efficacy and specificity differently at another\n"
           "# (measure them with `memit-pl sweep`)\n")
    path = out_dir / "tuned.yaml"
    io.write_text(path, f"# chosen by `memit-pl tune` (see {out_dir / 'tune.md'}) for {result['n_tune']} edits in one batch:\n"
                  + why + to_yaml({"model": model_cfg, "memit": result["memit"], "stats": stats_cfg}))
    return path
