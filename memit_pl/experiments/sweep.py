"""Experiments that edit the same model many times: the scaling sweep (the paper's Figure 5) and the
layer / setting search of ``tune``. Everything that does not change between points is computed once:
statistics per layer, z per target layer L (z depends on nothing else), the unedited evaluation."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from memit_pl import io
from memit_pl.config import MemitConfig
from memit_pl.data.edits import EditRequest
from memit_pl.editor import MEMIT, restored  # noqa: F401  (restored: re-exported for experiments)

log = logging.getLogger(__name__)

COLUMNS = ("S", "ES", "PS", "NS", "NSu", "GE")
EASYEDIT_COLUMNS = ("reliability", "generalization", "locality")
#: per method, the one setting that trades efficacy against specificity, as (MemitConfig key, row column):
#: what ``tune`` searches and ``sweep --values`` varies; ROME has none besides its layer
SEARCHED: dict[str, tuple[str, str] | None] = {
    "memit": ("mom2_update_weight", "lam"),
    "alphaedit": ("alphaedit_l2", "alpha"),
    "ft": ("ft_weight_decay", "decay"),
    "rome": None,
}
LABELS = {"lam": "λ", "alpha": "α", "decay": "decay"}


def with_value(memit: MemitConfig, value: float) -> MemitConfig:
    """``memit`` with its method's searched setting (``SEARCHED``) at ``value``."""
    from memit_pl.config import ConfigError

    searched = SEARCHED.get(memit.method)
    if searched is None:
        raise ConfigError(f"memit.method {memit.method} has no setting to vary besides its layer")
    return replace(memit, **{searched[0]: float(value)})


def check_values(memit: MemitConfig, values: Sequence[float] | None) -> None:
    """A one-line error for values of a setting the method does not have (ROME: its layer only)."""
    from memit_pl.config import ConfigError

    if values and SEARCHED.get(memit.method) is None:
        raise ConfigError(f"sweep: memit.method {memit.method} has no setting to vary besides its layer; give no values")


def log_grid(n_max: int) -> list[int]:
    """1, 10, 100, ... below ``n_max``, then ``n_max`` itself."""
    grid = [10**k for k in range(int(math.log10(max(n_max, 1))) + 1) if 10**k < n_max]
    return [*grid, n_max]


def row(n: int, result: dict[str, Any], unedited: dict[str, Any] | None = None, **extra) -> dict[str, Any]:
    """A sweep/tune row: the paper's columns, then EasyEdit's (Locality against ``unedited``, the unedited
    model's result on the same cases; 100 for the unedited row itself)."""
    from memit_pl.stages.eval_report import easyedit_metrics

    m = result["metrics"]
    ee = easyedit_metrics(result["cases"], unedited["cases"] if unedited is not None else result["cases"])
    out = {"n": n, **extra, **{k: (round(m[k], 2) if m.get(k) is not None else None) for k in COLUMNS}}
    return {**out, **{k: (round(v, 2) if v is not None else None) for k, v in ee.items()}}


def scaling_sweep(editor: MEMIT, requests: Sequence[EditRequest], memit: MemitConfig, grid: Sequence[int],
                  values: Sequence[float] | None = None) -> list[dict]:
    """Rows {n, S, ES, PS, NS, NSu, GE} for the unedited model (n = 0, on all cases) and for the first n
    cases edited in one batch (evaluated on those n); z is computed once for all cases. Each edited row
    also has ``NSu_unedited``: the unedited model's NSu on the same prompts (those cases, those subjects).
    With ``values``, one row per value of the method's searched setting (``SEARCHED``: MEMIT's λ as ``lam``,
    AlphaEdit's ridge as ``alpha``, FT-W's decay as ``decay``) and n; z depends on none of them."""
    from memit_pl.stages.evaluate import nsu_of_records

    check_values(memit, values)
    column = SEARCHED[memit.method][1] if values else None
    store = None if memit.method == "ft" else editor.zs(requests, memit)
    unedited = editor.evaluate(requests)
    rows = [row(0, unedited)]
    log.info("sweep n=0: %s", rows[-1])
    for value in values or [None]:
        point = memit if value is None else with_value(memit, value)
        for n in grid:
            base = nsu_of_records(unedited["cases"][:n], [r.subject for r in requests[:n]])
            extra = {} if value is None else {column: float(value)}
            tag = f"n{n}" if value is None else f"n{n}_{column}{value:g}"
            rows.append(row(n, editor.edited_evaluation(requests[:n], store, point, tag), unedited,
                            NSu_unedited=None if base is None else round(base, 2), **extra))
            log.info("sweep %s: %s", tag, rows[-1])
    return rows


def plot_rows(rows: Sequence[dict], x: str, path: str | Path, title: str, group: str | None = None,
              log_x: bool = True, baseline: dict | None = None, keep_zero: bool = False) -> Path:
    """ES/PS/NS/NSu/GE (and S) against ``x``; one line style per ``group`` value when given; the unedited
    model (``baseline``, else the row with ``x`` = 0) as dotted horizontal lines, as in the paper's Figure 5.
    Rows with ``x`` = 0 are the unedited model unless ``keep_zero`` (a grid with 0 in it, e.g. no decay):
    then they are points, on a log axis that is linear below the smallest positive ``x``."""
    plt = io.pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    groups = sorted({r.get(group) for r in rows}, key=str) if group else [None]
    styles = ["-", "--", "-.", (0, (3, 1, 1, 1, 1, 1))]  # dotted is the unedited level
    for gi, g in enumerate(groups):
        sel = [r for r in rows if (group is None or r.get(group) == g) and (r[x] > 0 or keep_zero)]
        xs = [r[x] for r in sel]
        value = f"{g:g}" if isinstance(g, (int, float)) else g
        label = f" ({LABELS.get(group, group)} {value})" if group else ""
        for k, colour in zip(("S", "ES", "PS", "NS", "NSu"), ("black", "tab:blue", "tab:orange", "tab:green", "tab:olive")):
            pts = [(xv, r[k]) for xv, r in zip(xs, sel) if r.get(k) is not None]
            if pts:
                axes[0].plot(*zip(*pts), linestyle=styles[gi % 4], color=colour, marker="o", ms=3, label=k + label)
        ge = [(xv, r["GE"]) for xv, r in zip(xs, sel) if r.get("GE") is not None]
        if ge:
            axes[1].plot(*zip(*ge), linestyle=styles[gi % 4], color="tab:red", marker="o", ms=3, label="GE" + label)
    if not any(r.get("GE") is not None for r in rows):
        axes[1].text(0.5, 0.5, "Generation Entropy not measured", ha="center", va="center", transform=axes[1].transAxes)
    base = [baseline] if baseline is not None else [r for r in rows if r[x] == 0 and not keep_zero]
    if base:
        for k, colour in zip(("ES", "PS", "NS", "NSu"), ("tab:blue", "tab:orange", "tab:green", "tab:olive")):
            if base[0].get(k) is not None:
                axes[0].axhline(base[0][k], color=colour, ls=":", lw=1.2, alpha=0.8)
        if base[0].get("GE") is not None:
            axes[1].axhline(base[0]["GE"], color="tab:red", ls=":", lw=1.2, alpha=0.8)
    positive = [r[x] for r in rows if r[x] > 0]
    zero = keep_zero and any(r[x] <= 0 for r in rows)
    for ax, ylabel in zip(axes, ("success rate (%)", "generation entropy (×100)")):
        if log_x and zero:
            ax.set_xscale("symlog", linthresh=min(positive, default=1.0))
        elif log_x:
            ax.set_xscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title + ("  (dotted: unedited model)" if base else ""))
    fig.tight_layout()
    return io.save_figure(fig, path, dpi=120)


def plot_arms(rows: Sequence[dict], x: str, path: str | Path, title: str, group: str = "method",
              metrics: Sequence[str] = ("ES", "PS", "NS", "GE")) -> Path:
    """One panel per metric, one colour per ``group`` value (each arm of a comparison): what several arms of
    the same protocol look like side by side, where :func:`plot_rows` crowds one panel with every metric of
    every arm. A row with ``x`` = 0 is that arm's unedited model: its value starts the arm's line and, for the
    first arm that has one, is drawn dotted across the panel."""
    plt = io.pyplot()

    arms = list(dict.fromkeys(r.get(group) for r in rows))  # in the order the rows give them
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics), 3.6), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, k in zip(axes[0], metrics):
        for ai, arm in enumerate(arms):
            pts = sorted((r[x], r[k]) for r in rows if r.get(group) == arm and r.get(k) is not None)
            if pts:
                ax.plot(*zip(*pts), "-", color=colours[ai % len(colours)], marker="o", ms=3, label=str(arm))
        base = next((r[k] for r in rows if r[x] == 0 and r.get(k) is not None), None)
        if base is not None:
            ax.axhline(base, color="grey", ls=":", lw=1.2)
        ax.set_title(k + (" (×100)" if k == "GE" else " (%)"))
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(title + ("  (dotted: unedited model)" if any(r[x] == 0 for r in rows) else ""))
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return io.save_figure(fig, path, dpi=120)


def markdown(rows: Sequence[dict], keys: Sequence[str]) -> str:
    def fmt(v):
        return "—" if v is None else (f"{v:g}" if isinstance(v, (int, float)) else str(v))

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def write_sweep(out_dir: str | Path, rows: list[dict], meta: dict[str, Any]) -> None:
    out_dir = Path(out_dir)
    io.write_json(out_dir / "sweep.json", {**meta, "rows": rows})
    column = next((c for _, c in filter(None, SEARCHED.values()) if any(c in r for r in rows)), None)
    same = ("NS_unedited",) if any("NS_unedited" in r for r in rows) else ()  # the unedited NS on the row's cases
    io.write_text(out_dir / "sweep.md", markdown(rows, ("n", *((column,) if column else ()), *COLUMNS, *same,
                                                        "NSu_unedited", *EASYEDIT_COLUMNS)) + "\n")
    plot_rows(rows, "n", out_dir / "sweep.png", f"{meta.get('model')}: edits in one batch", group=column,
              baseline=rows[0] if column else None)
