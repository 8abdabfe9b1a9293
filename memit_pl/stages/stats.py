"""Key second-moment statistics E[k kᵀ] per layer (the paper's Eqn. 15), one forward pass for all layers.

- :class:`SecondMoment`: a torchmetrics ``Metric`` (Σ k kᵀ and the count, summed across ranks),
  around the pure functions :func:`_second_moment_update` / :func:`_second_moment_compute`.
- :class:`CovarianceModule`: a LightningModule whose ``predict_step`` runs the model once per batch,
  stops after the deepest requested layer, and feeds every layer's metric.
- :class:`StatsCache` / :class:`StatsProgress`: one safetensors file per layer, keyed by model
  fingerprint, tokenizer, corpus, sample count, chunk length, dtype and seed; per-rank progress
  checkpoints so an interrupted run resumes where it stopped.
- :func:`layer_covariances`: the entry point the other stages call.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn
from torchmetrics import Metric

from memit_pl.config import StatsConfig, TrainerConfig
from memit_pl.data.corpus import CorpusDataModule
from memit_pl.functional.solve import output_rms
from memit_pl.modeling import hooks
from memit_pl.modeling.loading import spread_over_devices
from memit_pl.modeling.spec import check_layers, get_spec
from memit_pl.stages import runtime
from memit_pl.stages.stats_cache import (  # noqa: F401  (re-exported)
    ACCUM_DTYPES,
    FORMAT,
    StatsCache,
    StatsKey,
    check_stats_config,
    stats_cache,
    tokenizer_fingerprint,
)

log = logging.getLogger(__name__)

CHECKPOINT_EVERY = 1024
"""Chunks (per rank) between progress checkpoints."""
_QUIET = (".*IterableDataset.*has `__len__` defined.*", ".*predict returned None.*")

# --- the math --------------------------------------------------------------------------------------


def _second_moment_update(
    keys: Tensor, mask: Tensor | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """Σ k kᵀ [d_key, d_key] (in ``dtype``) and the number of keys (int64 scalar).

    Args:
        keys: [batch, pos, d_key] (or [n, d_key]).
        mask: [batch, pos] (or [n]); positions where it is 0 (padding) are left out.
    """
    flat = keys.reshape(-1, keys.shape[-1])
    if mask is not None:
        flat = flat[mask.reshape(-1).to(flat.device).bool()]
    flat = flat.to(dtype)
    return flat.T @ flat, torch.tensor(flat.shape[0], dtype=torch.long, device=flat.device)


def _second_moment_compute(total: Tensor, count: Tensor) -> Tensor:
    """E[k kᵀ] = Σ k kᵀ / n."""
    if int(count) == 0:
        raise ValueError("no keys were seen: the second moment is undefined")
    return total / count.to(total.dtype)


def second_moment(keys: Tensor, mask: Tensor | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """E[k kᵀ] [d_key, d_key] of ``keys`` [batch, pos, d_key] over the positions where ``mask`` is 1."""
    return _second_moment_compute(*_second_moment_update(keys, mask, dtype))


class SecondMoment(Metric):
    """The uncentred second moment E[k kᵀ] of key vectors, summed across ranks.

    Example:
        >>> m = SecondMoment(2)
        >>> m.update(torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]), torch.tensor([[1, 0]]))
        >>> m.compute()
        tensor([[1., 2.],
                [2., 4.]])
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, d_key: int, dtype: str | torch.dtype = "float32", **kwargs: Any):
        super().__init__(**kwargs)
        accum = ACCUM_DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
        if accum not in ACCUM_DTYPES.values():
            raise ValueError(f"stats.dtype must be float32 or float64, got {dtype!r}")
        self.add_state("total", default=torch.zeros(d_key, d_key, dtype=accum), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, keys: Tensor, mask: Tensor | None = None) -> None:
        total, count = _second_moment_update(keys, mask, self.total.dtype)
        self.total += total.to(self.total.device)  # keys may come from another device (a device_map)
        self.count += count.to(self.count.device)

    def compute(self) -> Tensor:
        return _second_moment_compute(self.total, self.count)


# --- the Lightning stage ---------------------------------------------------------------------------


class CovarianceModule(LightningModule):
    """One forward pass per batch, stopped after max(layers), fills every layer's :class:`SecondMoment`
    with the input of ``spec.mlp_out`` at padding-free positions.

    For a model with a norm after the MLP (``spec.mlp_post_norm``, Gemma 2/3) each key is divided by
    rms(W k), the size of its MLP output before the norm: the stream sees a change Δ k there scaled by
    about gain / rms(W k), so E[k kᵀ / rms(W k)²] measures the preservation error in the stream's units
    (the apply stage scales the edits' keys and targets the same way)."""

    def __init__(self, model: nn.Module, layers: Sequence[int], dtype: str = "float32"):
        super().__init__()
        if spread_over_devices(model):
            # placed over several devices by accelerate: not a submodule, so Lightning never moves it
            # (its own hooks move the inputs); only the metrics live on the Trainer's device
            object.__setattr__(self, "model", model)
        else:
            self.model = model
        spec = get_spec(model)
        self.post_norm = spec.mlp_post_norm is not None
        self.layers = sorted(set(int(x) for x in layers))
        self.names = {spec.name("mlp_out", layer): layer for layer in self.layers}
        self.module_names = {layer: name for name, layer in self.names.items()}
        self.moments = nn.ModuleDict(
            {str(layer): SecondMoment(spec.d_key(model, layer), dtype) for layer in self.layers}
        )
        self.chunks = 0
        """Chunks this rank has processed in this run."""
        self.tokens = 0
        """Non-padding tokens this rank has processed in this run."""

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> dict[int, Tensor]:
        """Keys [batch, pos, d_key] per layer, from one pass that stops after the deepest layer."""
        with hooks.trace(self.model, self.names, inputs=True, outputs=self.post_norm, stop=True) as rec:
            hooks.forward(self.model, input_ids, attention_mask)
        if self.post_norm:
            return {layer: rec[name].input / output_rms(rec[name].output).unsqueeze(-1) for name, layer in self.names.items()}
        return {layer: rec[name].input for name, layer in self.names.items()}

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        mask = batch["attention_mask"]
        for layer, keys in self(batch["input_ids"], mask).items():
            with runtime.full_precision(keys.device):  # Σ k kᵀ in the accumulation dtype, not the compute one
                self.moments[str(layer)].update(keys, mask)
        self.chunks += int(mask.shape[0])
        self.tokens += int(mask.sum())

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.predict_step(batch, batch_idx)

    def states(self) -> dict[int, tuple[Tensor, Tensor]]:
        """This rank's (Σ k kᵀ, count) per layer (not synchronised)."""
        return {layer: (m.total, m.count) for layer, m in ((int(k), v) for k, v in self.moments.items())}

    def add_states(self, states: dict[int, tuple[Tensor, Tensor]]) -> None:
        """Add saved partial sums (a resumed run) to this rank's metrics."""
        for layer, (total, count) in states.items():
            m = self.moments[str(layer)]
            m.total += total.to(device=m.total.device, dtype=m.total.dtype)
            m.count += count.to(device=m.count.device, dtype=m.count.dtype)

    def results(self) -> dict[int, tuple[Tensor, int]]:
        """E[k kᵀ] and the global key count per layer, synchronised across ranks (every rank calls it)."""
        out = {}
        for layer, m in ((int(k), v) for k, v in self.moments.items()):
            with m.sync_context():
                out[layer] = (_second_moment_compute(m.total, m.count), int(m.count))
        return out


# --- resumable progress -----------------------------------------------------------------------


class StatsProgress(Callback):
    """Resumes from, and periodically writes, this rank's progress checkpoint; logs tokens/s; at the
    end reduces the metrics across ranks and writes one cache file per layer (rank 0)."""

    def __init__(
        self,
        cache: StatsCache,
        layers: Sequence[int],
        every_n_chunks: int = CHECKPOINT_EVERY,
        log_every_s: float = 30.0,
    ):
        self.cache, self.layers = cache, list(layers)
        self.every_n_chunks, self.log_every_s = max(1, every_n_chunks), log_every_s
        self.resumed = self.saved_at = 0
        self.t0 = self.t_log = 0.0

    def _start(self, trainer: Trainer, pl_module: CovarianceModule) -> None:
        chunks, states = self.cache.load_partial(trainer.global_rank, trainer.world_size, self.layers)
        if chunks:
            pl_module.add_states(states)
            log.info(
                "rank %d resumes after %d chunks (progress checkpoint in %s)",
                trainer.global_rank,
                chunks,
                self.cache.dir,
            )
        self.resumed = self.saved_at = chunks
        self.t0 = self.t_log = time.perf_counter()

    def _done(self, pl_module: CovarianceModule) -> int:
        return self.resumed + pl_module.chunks

    def _checkpoint(self, trainer: Trainer, pl_module: CovarianceModule) -> None:
        done = self._done(pl_module)
        self.cache.save_partial(
            trainer.global_rank, trainer.world_size, self.layers, done, pl_module.states()
        )
        self.saved_at = done

    def _batch_end(self, trainer: Trainer, pl_module: CovarianceModule) -> None:
        if self._done(pl_module) - self.saved_at >= self.every_n_chunks:
            self._checkpoint(trainer, pl_module)
        now = time.perf_counter()
        if trainer.is_global_zero and now - self.t_log >= self.log_every_s:
            self.t_log = now
            rate = pl_module.tokens * trainer.world_size / max(now - self.t0, 1e-9)
            log.info("stats: %d chunks on rank 0, %.0f tokens/s (all ranks)", self._done(pl_module), rate)

    def _end(self, trainer: Trainer, pl_module: CovarianceModule) -> None:
        results = pl_module.results()  # collective: every rank takes part
        elapsed = time.perf_counter() - self.t0
        counts = torch.tensor([self._done(pl_module), pl_module.tokens], device=pl_module.device)
        n_chunks, tokens = (int(x) for x in pl_module.all_gather(counts).reshape(-1, 2).sum(0))
        if trainer.is_global_zero:
            for layer, (mom2, count) in results.items():
                self.cache.save(layer, mom2, count, n_chunks, pl_module.module_names[layer])
            self.cache.clear_partials()
            log.info(
                "stats: layers %s from %d chunks (%d keys) in %.1fs, %.0f tokens/s -> %s",
                self.layers,
                n_chunks,
                next(iter(results.values()))[1],
                elapsed,
                tokens / max(elapsed, 1e-9),
                self.cache.dir,
            )
            if n_chunks < self.cache.key.n_samples:
                log.warning(
                    "the corpus gave only %d of stats.n_samples=%d chunks", n_chunks, self.cache.key.n_samples
                )
        trainer.strategy.barrier("memit_pl.stages.stats.saved")

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch_end(trainer, pl_module)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch_end(trainer, pl_module)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end(trainer, pl_module)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end(trainer, pl_module)


# --- the entry point ---------------------------------------------------------------------------------


def compute_covariances(
    model: nn.Module,
    tokenizer,
    layers: Sequence[int],
    stats: StatsConfig,
    *,
    cache_dir: str | Path | None = None,
    trainer: TrainerConfig | None = None,
    callbacks: Sequence[Callback] = (),
    checkpoint_every: int = CHECKPOINT_EVERY,
) -> dict[int, Tensor]:
    """:func:`layer_covariances` with extra Trainer callbacks and the checkpoint interval (in chunks per rank)."""
    wanted = sorted(set(int(x) for x in layers))
    if not wanted:
        raise ValueError("memit.layers must name at least one layer")
    check_layers(model, wanted)
    cache = stats_cache(model, tokenizer, stats, cache_dir, runtime.compute_dtype_of(trainer))
    out = {layer: cache.load(layer) for layer in wanted}
    missing = [layer for layer, v in out.items() if v is None]
    if missing:
        _run_stage(model, tokenizer, missing, stats, cache, trainer, callbacks, checkpoint_every)
        for layer in missing:
            out[layer] = cache.load(layer)
            if out[layer] is None:
                raise RuntimeError(f"the statistics stage ended without writing {cache.layer_path(layer)}")
    else:
        log.info("statistics of layers %s read from %s", wanted, cache.dir)
    return {layer: v.to(torch.float32) for layer, v in out.items()}


def _run_stage(model, tokenizer, layers, stats, cache, trainer_cfg, callbacks, checkpoint_every) -> None:
    log.info(
        "computing statistics of layers %s on %s (%d chunks of %d tokens) -> %s",
        layers,
        cache.key.corpus,
        stats.n_samples,
        stats.seq_len,
        cache.dir,
    )
    module = CovarianceModule(model, layers, stats.dtype)
    data = CorpusDataModule(
        tokenizer,
        stats.corpus,
        stats.n_samples,
        stats.seq_len,
        stats.batch_size,
        stats.seed,
        skip=partial(cache.resume_chunks, list(layers)),
    )
    progress = StatsProgress(cache, layers, every_n_chunks=checkpoint_every)
    with warnings.catch_warnings():
        for message in _QUIET:
            warnings.filterwarnings("ignore", message=message)
        runtime.predict(trainer_cfg, module, callbacks=[progress, *callbacks], datamodule=data,
                        root_dir=cache.dir, distributed_sampler=False)


def layer_covariances(
    model: nn.Module,
    tokenizer,
    layers: list[int],
    stats: StatsConfig,
    *,
    cache_dir: str | Path | None = None,
    trainer: TrainerConfig | None = None,
) -> dict[int, Tensor]:
    """E[k kᵀ] per layer: float32 [d_key, d_key] on the CPU, the mean over every non-padding token
    of the corpus sample of the input k of ``spec.mlp_out`` at that layer (Eqn. 15 without λ).

    Reads the cache when it matches; otherwise computes the missing layers in one pass (stopping
    after the deepest of them) as a Lightning stage, which works with DDP, resumes an interrupted
    run, and writes the cache. ``cache_dir`` ``None`` -> ``models.default_cache_dir()/"stats"``.
    """
    return compute_covariances(model, tokenizer, layers, stats, cache_dir=cache_dir, trainer=trainer)
