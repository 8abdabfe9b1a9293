"""The whole edit: statistics (cached) -> z (resumable) -> ascending-layer update -> outputs."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memit_pl import io
from memit_pl.config import MemitConfig, StatsConfig, TrainerConfig
from memit_pl.data.edits import EditRequest, target_ids
from memit_pl.delta import save_delta
from memit_pl.modeling.loading import fingerprint
from memit_pl.stages.apply import apply_memit, residual_norms, saved_keys
from memit_pl.stages.zmodule import compute_zs

log = logging.getLogger(__name__)


def stats_dir(cache_dir: str | Path | None) -> Path | None:
    return None if cache_dir is None else Path(cache_dir) / "stats"


def covariances(model, tokenizer, memit: MemitConfig, stats: StatsConfig, cache_dir=None, trainer=None):
    """(E[k kᵀ] for every edited layer, from the statistics stage (cached); the statistics' cache id)."""
    from memit_pl.stages.stats import layer_covariances, stats_cache

    covs = layer_covariances(model, tokenizer, list(memit.layers), stats, cache_dir=stats_dir(cache_dir), trainer=trainer)
    return covs, stats_cache(model, tokenizer, stats, stats_dir(cache_dir)).key.dirname()


def previous_keys(dirs: Sequence[str | Path], layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Keys of earlier rounds, concatenated per layer (layers an earlier round did not edit are skipped)."""
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
    model: nn.Module,
    tokenizer,
    requests: Sequence[EditRequest],
    store,
    memit: MemitConfig,
    stats: StatsConfig,
    out_dir: str | Path,
    *,
    trainer: TrainerConfig | None = None,
    cache_dir: str | Path | None = None,
    previous: Sequence[str | Path] = (),
    save_model: bool = True,
    config_dump: dict[str, Any] | None = None,
    stats_result: tuple[dict, str] | None = None,
) -> dict[str, Any]:
    """Statistics (cached; or ``stats_result`` from :func:`covariances` when already at hand) and the
    ascending-layer update from a z store; writes the delta, ``summary.json`` and (optionally) the
    edited model; returns the summary."""
    out_dir = Path(out_dir)
    fp_before = fingerprint(model)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    covs, cov_id = stats_result or covariances(model, tokenizer, memit, stats, cache_dir, trainer)
    timings["stats_s"] = time.perf_counter() - t
    prev = previous_keys(previous, memit.layers) if previous else None
    resid_before = residual_norms(model, tokenizer, requests, store, memit)
    t = time.perf_counter()
    delta = apply_memit(
        model, tokenizer, requests, store, covs, memit, out_dir, trainer=trainer, prev_keys=prev,
        cov_ids={layer: cov_id for layer in memit.layers},
        prev_ids=[str(p) for p in previous],
    )
    timings["apply_s"] = time.perf_counter() - t
    resid_after = residual_norms(model, tokenizer, requests, store, memit)
    delta.metadata.update({"fingerprint": fp_before, "memit": vars(memit), "config": config_dump or {}})
    save_delta(out_dir, delta)
    summary = {
        "n_edits": len(requests),
        "layers": list(memit.layers),
        "delta_norm": {str(layer): float(delta.dense(layer).norm()) for layer in delta.layers},
        "resid_norm_before": float(resid_before.mean()),
        "resid_norm_after": float(resid_after.mean()),
        "z_mean_loss": float(store.tensors["loss"].mean()),
        "z_mean_steps": float(store.tensors["steps"].float().mean()),
        "timings": timings,
    }
    if save_model:
        t = time.perf_counter()
        model.save_pretrained(out_dir / "model", safe_serialization=True)
        tokenizer.save_pretrained(out_dir / "model")
        timings["save_s"] = time.perf_counter() - t
    io.write_json(out_dir / "summary.json", summary)
    return summary


def run_edit(
    model: nn.Module,
    tokenizer,
    requests: Sequence[EditRequest],
    memit: MemitConfig,
    stats: StatsConfig,
    out_dir: str | Path,
    *,
    trainer: TrainerConfig | None = None,
    cache_dir: str | Path | None = None,
    z_dir: str | Path | None = None,
    previous: Sequence[str | Path] = (),
    save_model: bool = True,
    config_dump: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Edit ``model`` in place with all ``requests`` in one batch: z (resumable) then ``apply_stage``;
    adds the top-1 efficacy before and after to the summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    before = efficacy_top1(model, tokenizer, requests)
    # statistics first: they are cached and needed by the apply stage anyway
    t = time.perf_counter()
    stats_result = covariances(model, tokenizer, memit, stats, cache_dir, trainer)
    stats_s = time.perf_counter() - t
    t = time.perf_counter()
    store = compute_zs(model, tokenizer, requests, memit, z_dir or out_dir / "z", trainer, config_dump)
    z_s = time.perf_counter() - t
    summary = apply_stage(
        model, tokenizer, requests, store, memit, stats, out_dir, trainer=trainer, cache_dir=cache_dir,
        previous=previous, save_model=save_model, config_dump=config_dump, stats_result=stats_result,
    )
    after = efficacy_top1(model, tokenizer, requests)
    summary["timings"].update({"stats_s": stats_s, "z_s": z_s})
    summary["top1_new_before"] = sum(before) / len(before)
    summary["top1_new_after"] = sum(after) / len(after)
    io.write_json(out_dir / "summary.json", summary)
    log.info(
        "edited %d facts: top-1 new object %.0f%% -> %.0f%%, mean ‖z−h^L‖ %.3f -> %.3f",
        len(requests), 100 * summary["top1_new_before"], 100 * summary["top1_new_after"],
        summary["resid_norm_before"], summary["resid_norm_after"],
    )
    return summary
