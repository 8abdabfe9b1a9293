"""Experiments that edit the same model many times: the scaling sweep (the paper's Figure 5) and the
λ / layer search of ``tune``. Everything that does not change between points is computed once:
statistics per layer, z per target layer L (z depends on nothing else), the unedited evaluation."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memit_pl import io
from memit_pl.apply import apply_memit
from memit_pl.config import EvalConfig, MemitConfig, StatsConfig, TrainerConfig
from memit_pl.edits import EditRequest
from memit_pl.spec import get_spec
from memit_pl.zmodule import compute_zs

log = logging.getLogger(__name__)

COLUMNS = ("S", "ES", "PS", "NS", "NSu", "GE")


def log_grid(n_max: int) -> list[int]:
    """1, 10, 100, ... below ``n_max``, then ``n_max`` itself."""
    grid = [10**k for k in range(int(math.log10(max(n_max, 1))) + 1) if 10**k < n_max]
    return [*grid, n_max]


@contextmanager
def restored(model: nn.Module, layers: Sequence[int]):
    """Put the edited layers' weights back exactly as they were when the block ends."""
    spec = get_spec(model)
    saved = {layer: spec.out_weight(model, layer).detach().clone() for layer in layers}
    try:
        yield
    finally:
        with torch.no_grad():
            for layer, w in saved.items():
                spec.out_weight(model, layer).copy_(w)


def row(n: int, result: dict[str, Any], **extra) -> dict[str, Any]:
    m = result["metrics"]
    return {"n": n, **extra, **{k: (round(m[k], 2) if m.get(k) is not None else None) for k in COLUMNS}}


class Editor:
    """A model plus everything reusable across edits of it (statistics, z stores per target layer)."""

    def __init__(self, model, tokenizer, stats: StatsConfig, work_dir: str | Path, *, trainer: TrainerConfig | None = None,
                 cache_dir: str | Path | None = None, eval_cfg: EvalConfig | None = None,
                 z_dir: str | Path | None = None):
        self.model, self.tok, self.stats = model, tokenizer, stats
        self.z_dir = None if z_dir is None else Path(z_dir)
        self.work_dir, self.trainer, self.cache_dir = Path(work_dir), trainer, cache_dir
        self.eval_cfg = eval_cfg or EvalConfig()
        self.z_runs = 0  # z optimisations started (the tests check that a λ sweep starts none twice)
        self._covs: dict[int, torch.Tensor] = {}
        self._cov_id = ""

    def covariances(self, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        from memit_pl.pipeline import covariances

        missing = [layer for layer in layers if layer not in self._covs]
        if missing:
            covs, self._cov_id = covariances(self.model, self.tok, MemitConfig(layers=sorted(missing)), self.stats,
                                             self.cache_dir, self.trainer)
            self._covs.update(covs)
        return {layer: self._covs[layer] for layer in layers}

    def zs(self, requests: Sequence[EditRequest], memit: MemitConfig):
        """The z store for target layer max(R) (computed once per layer; resumed from disk). A given
        ``z_dir`` (e.g. an earlier run's ``z/``) serves its own target layer."""
        self.z_runs += 1
        store_dir = self.work_dir / f"z-L{memit.target_layer}"
        if self.z_dir is not None and _store_layer(self.z_dir) in (None, memit.target_layer):
            store_dir = self.z_dir
        return compute_zs(self.model, self.tok, requests, memit, store_dir, self.trainer)

    def evaluate(self, requests: Sequence[EditRequest]) -> dict[str, Any]:
        from memit_pl.evaluate import evaluate_requests

        return evaluate_requests(self.model, self.tok, requests, self.eval_cfg)

    def edited_evaluation(self, requests: Sequence[EditRequest], store, memit: MemitConfig, tag: str,
                          eval_requests: Sequence[EditRequest] | None = None) -> dict[str, Any]:
        """Edit with ``requests``, evaluate (on ``eval_requests``, default the edited ones), restore."""
        with restored(self.model, memit.layers):
            apply_memit(self.model, self.tok, requests, store, self.covariances(memit.layers), memit,
                        self.work_dir / tag, trainer=self.trainer,
                        cov_ids={layer: self._cov_id for layer in memit.layers})
            return self.evaluate(eval_requests if eval_requests is not None else requests)


def _store_layer(store_dir: Path) -> int | None:
    """The target layer of the z store in ``store_dir`` (None when it holds none yet)."""
    from memit_pl.zstore import STORE_FILE, load_store

    return load_store(store_dir).layer if (store_dir / STORE_FILE).exists() else None


def scaling_sweep(editor: Editor, requests: Sequence[EditRequest], memit: MemitConfig, grid: Sequence[int]) -> list[dict]:
    """Rows {n, S, ES, PS, NS, NSu, GE} for the unedited model (n = 0, on all cases) and for the first n
    cases edited in one batch (evaluated on those n); z is computed once for all cases. Each edited row
    also has ``NSu_unedited``: the unedited model's NSu on the same prompts (those cases, those subjects)."""
    from memit_pl.evaluate import nsu_of_records

    store = editor.zs(requests, memit)
    unedited = editor.evaluate(requests)
    rows = [row(0, unedited)]
    log.info("sweep n=0: %s", rows[-1])
    for n in grid:
        base = nsu_of_records(unedited["cases"][:n], [r.subject for r in requests[:n]])
        rows.append(row(n, editor.edited_evaluation(requests[:n], store, memit, f"n{n}"),
                        NSu_unedited=None if base is None else round(base, 2)))
        log.info("sweep n=%d: %s", n, rows[-1])
    return rows


def plot_rows(rows: Sequence[dict], x: str, path: str | Path, title: str, group: str | None = None,
              log_x: bool = True, baseline: dict | None = None) -> Path:
    """ES/PS/NS/NSu/GE (and S) against ``x``; one line style per ``group`` value when given; the unedited
    model (``baseline``, else the row with ``x`` = 0) as thin horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    groups = sorted({r.get(group) for r in rows}, key=str) if group else [None]
    styles = ["-", "--", ":", "-."]
    for gi, g in enumerate(groups):
        sel = [r for r in rows if (group is None or r.get(group) == g) and r[x] > 0]
        xs = [r[x] for r in sel]
        label = f" ({group} {g})" if group else ""
        for k, colour in zip(("S", "ES", "PS", "NS", "NSu"), ("black", "tab:blue", "tab:orange", "tab:green", "tab:olive")):
            pts = [(xv, r[k]) for xv, r in zip(xs, sel) if r.get(k) is not None]
            if pts:
                axes[0].plot(*zip(*pts), styles[gi % 4], color=colour, marker="o", ms=3, label=k + label)
        ge = [(xv, r["GE"]) for xv, r in zip(xs, sel) if r.get("GE") is not None]
        if ge:
            axes[1].plot(*zip(*ge), styles[gi % 4], color="tab:red", marker="o", ms=3, label="GE" + label)
    if not any(r.get("GE") is not None for r in rows):
        axes[1].text(0.5, 0.5, "Generation Entropy not measured", ha="center", va="center", transform=axes[1].transAxes)
    base = [baseline] if baseline is not None else [r for r in rows if r[x] == 0]
    if base:
        for k, colour in zip(("ES", "PS", "NS", "NSu"), ("tab:blue", "tab:orange", "tab:green", "tab:olive")):
            if base[0].get(k) is not None:
                axes[0].axhline(base[0][k], color=colour, lw=0.6, alpha=0.5)
        if base[0].get("GE") is not None:
            axes[1].axhline(base[0]["GE"], color="tab:red", lw=0.6, alpha=0.5)
    for ax, ylabel in zip(axes, ("success rate (%)", "generation entropy (×100)")):
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title + ("  (thin lines: unedited model)" if base else ""))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown(rows: Sequence[dict], keys: Sequence[str]) -> str:
    def fmt(v):
        return "—" if v is None else (f"{v:g}" if isinstance(v, (int, float)) else str(v))

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def write_sweep(out_dir: str | Path, rows: list[dict], meta: dict[str, Any]) -> None:
    out_dir = Path(out_dir)
    io.write_json(out_dir / "sweep.json", {**meta, "rows": rows})
    io.write_text(out_dir / "sweep.md", markdown(rows, ("n", *COLUMNS, "NSu_unedited")) + "\n")
    plot_rows(rows, "n", out_dir / "sweep.png", f"{meta.get('model')}: edits in one batch")


def with_layers(memit: MemitConfig, layers: Sequence[int], lam: float | None = None) -> MemitConfig:
    return replace(memit, layers=list(layers), mom2_update_weight=memit.mom2_update_weight if lam is None else lam)
