"""The whole edit as the CLI runs it: statistics (cached) -> z (resumable) -> ascending-layer update ->
a run directory (delta, per-layer factors, ``summary.json``, optionally the edited model)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memit_pl import io
from memit_pl.config import MemitConfig, StatsConfig
from memit_pl.data.edits import EditRequest, target_ids
from memit_pl.modeling.loading import fingerprint
from memit_pl.stages.meter import StageMeter

log = logging.getLogger(__name__)


def stats_dir(cache_dir: str | Path | None) -> Path | None:
    return None if cache_dir is None else Path(cache_dir) / "stats"


def covariances(model, tokenizer, memit: MemitConfig, stats: StatsConfig, cache_dir=None, trainer=None):
    """(E[k kᵀ] for every edited layer, from the statistics stage (cached); the statistics' cache id)."""
    from memit_pl.stages.stats import layer_covariances, stats_cache

    covs = layer_covariances(model, tokenizer, list(memit.layers), stats, cache_dir=stats_dir(cache_dir), trainer=trainer)
    from memit_pl.stages.runtime import compute_dtype_of

    return covs, stats_cache(model, tokenizer, stats, stats_dir(cache_dir), compute_dtype_of(trainer)).key.dirname()


def previous_keys(dirs: Sequence[str | Path], layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Keys of earlier rounds, concatenated per layer (layers an earlier round did not edit are skipped)."""
    from memit_pl.stages.apply import saved_keys

    out: dict[int, list[torch.Tensor]] = {}
    for d in dirs:
        for layer, k in saved_keys(d).items():
            if layer in layers:
                out.setdefault(layer, []).append(k)
    return {layer: torch.cat(ks) for layer, ks in out.items()}


def efficacy_top1(model: nn.Module, tokenizer, requests: Sequence[EditRequest], batch_size: int = 32) -> list[bool]:
    """Per request: is the first token of the new object the top-1 prediction after the rewrite prompt?"""
    from memit_pl.modeling.predict import top_ids

    top = top_ids(model, tokenizer, [r.text for r in requests], k=1, batch_size=batch_size)[:, 0].tolist()
    return [t == target_ids(tokenizer, r.target_new)[0] for t, r in zip(top, requests)]


def apply_stage(
    editor,
    requests: Sequence[EditRequest],
    store,
    out_dir: str | Path,
    *,
    previous: Sequence[str | Path] = (),
    save_model: bool = True,
    config_dump: dict[str, Any] | None = None,
    meter: StageMeter | None = None,
) -> dict[str, Any]:
    """Statistics (cached) and the ascending-layer update of a :class:`memit_pl.MEMIT` from a z store; writes
    the delta, ``summary.json`` and (optionally) the edited model into ``out_dir``; returns the summary.
    ``meter``: the run's stage meter, when the caller measured earlier stages (statistics, z)."""
    from memit_pl.stages.apply import residual_norms

    model, tokenizer, memit = editor.model, editor.tokenizer, editor.memit
    out_dir = Path(out_dir)
    fp_before = fingerprint(model)
    meter = meter or StageMeter()
    with meter("stats"):  # in memory if the caller's run already read them: a stage's seconds add up
        editor.covariances(memit.layers)
    prev = previous_keys(previous, memit.layers) if previous else None
    with editor.autocast():
        resid_before = residual_norms(model, tokenizer, requests, store, memit)
    with meter("apply"):
        delta = editor.apply(requests, store, out_dir=out_dir, prev_keys=prev, prev_ids=[str(p) for p in previous])
    with editor.autocast():
        resid_after = residual_norms(model, tokenizer, requests, store, memit)
    delta.metadata.update({"fingerprint": fp_before, "memit": vars(memit), "config": config_dump or {}})
    delta.save(out_dir)
    summary = {
        "n_edits": len(requests),
        "method": memit.method,
        "layers": delta.layers,
        "compute_dtype": editor.compute_dtype,
        "weights_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "cast_error": delta.metadata.get("cast_error", {}),
        "delta_norm": {str(layer): float(delta.dense(layer).norm()) for layer in delta.layers},
        "resid_norm_before": float(resid_before.mean()),
        "resid_norm_after": float(resid_after.mean()),
        "z_mean_loss": float(store.tensors["loss"].mean()),
        "z_mean_steps": float(store.tensors["steps"].float().mean()),
    }
    if memit.method == "alphaedit":  # what the projection keeps, per layer (the solver's own decomposition)
        solver = editor.method_solver(memit)
        summary["null_space"] = {str(layer): solver.report(cov) for layer, cov in editor.covariances(memit.layers).items()}
    return _save(editor, out_dir, summary, save_model, meter)


def _save(editor, out_dir: Path, summary: dict[str, Any], save_model: bool, meter: StageMeter) -> dict[str, Any]:
    """The edited model (``save_pretrained``, measured) if asked for, then ``summary.json`` with the stages'
    seconds (``timings``) and peak memory."""
    if save_model:
        with meter("save"):
            editor.save_pretrained(out_dir / "model")
    summary.update(timings=dict(meter.timings), **meter.memory())
    io.write_json(out_dir / "summary.json", summary)
    return summary


def _finetune_stage(editor, requests: Sequence[EditRequest], out_dir: Path, save_model: bool,
                    config_dump: dict[str, Any] | None) -> dict[str, Any]:
    """FT-W (``memit.method: ft``): no statistics and no z; the delta, ``summary.json``, the edited model."""
    fp_before = fingerprint(editor.model)
    meter = StageMeter()
    with meter("ft"):
        delta = editor.edit(requests)
    delta.metadata.update({"fingerprint": fp_before, "config": config_dump or {}})
    delta.save(out_dir)
    summary = {"n_edits": len(requests), "method": "ft", "layers": delta.layers, "compute_dtype": editor.compute_dtype,
               "delta_norm": {str(layer): float(delta.dense(layer).norm()) for layer in delta.layers},
               "ft_steps": delta.metadata["ft_steps"], "ft_final_nll": delta.metadata["ft_final_nll"]}
    return _save(editor, out_dir, summary, save_model, meter)


def run_edit(
    editor,
    requests: Sequence[EditRequest],
    out_dir: str | Path,
    *,
    z_dir: str | Path | None = None,
    previous: Sequence[str | Path] = (),
    save_model: bool = True,
    config_dump: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Edit the editor's model in place with all ``requests`` in one batch: z (resumable, in
    ``<out_dir>/z``) then :func:`apply_stage`; adds the top-1 efficacy before and after to the summary."""
    model, tokenizer = editor.model, editor.tokenizer
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    editor.check(requests)
    with editor.autocast():
        before = efficacy_top1(model, tokenizer, requests)
    if editor.memit.method == "ft":
        summary = _finetune_stage(editor, requests, out_dir, save_model, config_dump)
    else:
        meter = StageMeter()
        with meter("stats"):  # statistics first: they are cached and needed by the apply stage anyway
            editor.covariances()
        with meter("z"):
            store = editor.zs(requests, store_dir=z_dir or out_dir / "z", config_dump=config_dump)
        summary = apply_stage(editor, requests, store, out_dir, previous=previous, save_model=save_model,
                              config_dump=config_dump, meter=meter)
    with editor.autocast():
        after = efficacy_top1(model, tokenizer, requests)
    summary["top1_new_before"] = sum(before) / len(before)
    summary["top1_new_after"] = sum(after) / len(after)
    io.write_json(out_dir / "summary.json", summary)
    resid = ("" if "resid_norm_before" not in summary else
             f", mean ‖z−h^L‖ {summary['resid_norm_before']:.3f} -> {summary['resid_norm_after']:.3f}")
    log.info("edited %d facts (%s): top-1 new object %.0f%% -> %.0f%%%s", len(requests), editor.memit.method,
             100 * summary["top1_new_before"], 100 * summary["top1_new_after"], resid)
    return summary
