"""Where and in which precision the stages run: the one Trainer factory, device placement around
Lightning's predict loops, and the compute dtype.

Every stage (statistics, z, keys and h^L of the update, evaluation) is a predict loop. Lightning moves the
module to its root device and back to the CPU on teardown; a model placed over several devices by
accelerate (``device_map``) must not be moved at all, so it runs the same steps in a plain loop.

Three dtypes are kept apart: the weights' (the user's, ``model.dtype``), the compute dtype of the forward
and backward passes (``model.compute_dtype``: bf16 or fp16 autocast, or fp32), and the dtype of what
accumulates or solves (fp32 for δ, Adam, the losses' reductions and Σ k kᵀ; fp64 for the solve), which
the stages keep whatever the compute dtype (:func:`full_precision`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from memit_pl.config import TrainerConfig
from memit_pl.modeling.loading import input_device, spread_over_devices

log = logging.getLogger(__name__)

__all__ = ["autocast", "full_precision", "make_trainer", "on_model_device", "plain_batches", "predict",
           "resolve_compute_dtype", "spread_over_devices"]

COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
_TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LIGHTNING = {"float32": "32-true", "bfloat16": "bf16-mixed", "float16": "16-mixed"}
FAST_BF16 = 1.3
"""bf16 counts as fast on a CPU when the measured pass (the model's, else a matmul) runs at least this many
times faster than in fp32."""


@functools.cache
def cpu_bf16_speedup(n: int = 768, repeats: int = 5) -> float:
    """How many times faster an n×n×n bf16 matmul runs than fp32 on this CPU (median of ``repeats``;
    measured once per process, about 0.1 s). CPUs with AMX or AVX512-BF16 kernels reach 2–6×; others
    emulate bf16 and run it slower than fp32."""
    gen = torch.Generator().manual_seed(0)
    a32 = torch.randn(n, n, generator=gen)
    b32 = torch.randn(n, n, generator=gen)
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = a32.to(dtype), b32.to(dtype)
        a @ b  # warm-up
        runs = []
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            runs.append(time.perf_counter() - t)
        times[dtype] = sorted(runs)[len(runs) // 2]
    return times[torch.float32] / max(times[torch.bfloat16], 1e-9)


def model_bf16_speedup(model: nn.Module, batch: int = 8, seq: int = 32, repeats: int = 3) -> float:
    """How many times faster a forward and backward pass of ``model`` itself runs under bf16 autocast than in
    fp32 on its (CPU) device, on a random batch (median of ``repeats``; about 1 s for a 135M model). A whole
    pass gains less than a matmul: norms, rotary embeddings, softmax and the casts do not get faster."""
    dev = input_device(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.get_input_embeddings().num_embeddings, (batch, seq), generator=gen).to(dev)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids).float()

    def run(dtype) -> float:
        x = embeds.clone().requires_grad_(True)
        t = time.perf_counter()
        with autocast(dev, dtype):
            logits = model(inputs_embeds=x, use_cache=False).logits
        logits.float().logsumexp(-1).mean().backward()
        return time.perf_counter() - t

    times = {}
    for dtype in ("float32", "bfloat16"):
        run(dtype)  # warm-up
        times[dtype] = sorted(run(dtype) for _ in range(repeats))[repeats // 2]
    return times["float32"] / max(times["bfloat16"], 1e-9)


def resolve_compute_dtype(name: str, device: torch.device | str, model: nn.Module | None = None) -> str:
    """``model.compute_dtype`` for passes on ``device``: ``auto`` becomes bf16 on a CUDA device that supports
    it and on a CPU where bf16 is measured to be fast — a forward and backward pass of ``model`` itself
    (:func:`model_bf16_speedup`) when given, else a matmul (:func:`cpu_bf16_speedup`) — and fp32 otherwise;
    the choice is logged. fp16 is refused on the CPU (no fast fp16 kernels there)."""
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"model.compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {name!r}")
    device = torch.device(device)
    if name == "float16" and device.type == "cpu":
        raise ValueError("model.compute_dtype float16 needs a GPU; on the CPU use bfloat16 or float32")
    if name != "auto":
        return name
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        chosen, why = ("bfloat16", "the GPU supports bf16") if ok else ("float32", "the GPU has no bf16")
    elif device.type == "cpu":
        speedup, what = (model_bf16_speedup(model), "the model's forward and backward passes") if model is not None \
            else (cpu_bf16_speedup(), "bf16 matmuls")
        fast = speedup >= FAST_BF16
        chosen = "bfloat16" if fast else "float32"
        why = f"{what} run {speedup:.2f}x fp32 in bf16 on this CPU ({'fast' if fast else 'not fast'}: threshold {FAST_BF16}x)"
    else:
        chosen, why = "float32", f"no mixed precision on {device.type}"
    log.info("model.compute_dtype auto -> %s (%s)", chosen, why)
    return chosen


def torch_dtype(compute_dtype: str) -> torch.dtype:
    return _TORCH[compute_dtype]


def lightning_precision(compute_dtype: str) -> str:
    """The Trainer ``precision`` that runs a stage's steps in ``compute_dtype`` (autocast)."""
    return _LIGHTNING[compute_dtype]


def autocast(device: torch.device | str, compute_dtype: str | None):
    """Autocast to ``compute_dtype`` for passes outside a Trainer (a plain loop, a quick prediction);
    a no-op for fp32 or None."""
    if compute_dtype in (None, "float32"):
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=_TORCH[compute_dtype])


def full_precision(device: torch.device | str):
    """No autocast inside: for accumulations and solves that must stay in fp32/fp64."""
    return torch.autocast(torch.device(device).type, enabled=False)


def compute_dtype_of(cfg: TrainerConfig | None) -> str | None:
    """The compute dtype a trainer config carries (None: fp32)."""
    if cfg is None or cfg.precision is None:
        return None
    return {v: k for k, v in _LIGHTNING.items()}[cfg.precision]


def on_model_device(cfg: TrainerConfig, model: nn.Module) -> TrainerConfig:
    """``accelerator: auto`` resolved to the device the model is on (a model on ``cuda:1`` stays there)."""
    if cfg.accelerator != "auto":
        return cfg
    dev = input_device(model)
    if dev.type == "cuda":
        return replace(cfg, accelerator="gpu", devices=[dev.index or 0])
    return replace(cfg, accelerator=dev.type, devices=1 if cfg.devices in (1, "1", "auto") else cfg.devices)


def make_trainer(
    cfg: TrainerConfig | None,
    callbacks: Sequence[Callback] = (),
    *,
    inference_mode: bool = True,
    root_dir: str | Path | None = None,
    distributed_sampler: bool = True,
) -> L.Trainer:
    """A Trainer for a stage's predict loop: no logger, checkpoints or summary, nothing written to the working
    directory; ``inference_mode`` off where a step needs autograd (z optimisation)."""
    cfg = cfg or TrainerConfig()
    return L.Trainer(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        strategy=cfg.strategy,
        num_nodes=cfg.num_nodes,
        enable_progress_bar=cfg.enable_progress_bar,
        callbacks=list(callbacks),
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        use_distributed_sampler=distributed_sampler,
        default_root_dir=str(root_dir) if root_dir is not None else None,
        inference_mode=inference_mode,
        **({"precision": cfg.precision} if cfg.precision is not None else {}),
    )


def predict(
    cfg: TrainerConfig | None,
    module: L.LightningModule,
    *,
    callbacks: Sequence[Callback] = (),
    dataloaders: Any = None,
    datamodule: L.LightningDataModule | None = None,
    inference_mode: bool = True,
    return_predictions: bool = False,
    root_dir: str | Path | None = None,
    distributed_sampler: bool = True,
) -> list | None:
    """``Trainer.predict`` that leaves the module's parameters on the device they were on (a model spread over
    devices by accelerate is not moved back: Lightning leaves its placement alone)."""
    params = list(module.parameters())
    spread = any(spread_over_devices(m) for m in module.modules() if getattr(m, "hf_device_map", None))
    device = params[0].device if params and not spread else None
    trainer = make_trainer(cfg, callbacks, inference_mode=inference_mode, root_dir=root_dir,
                           distributed_sampler=distributed_sampler)
    try:
        return trainer.predict(module, dataloaders=dataloaders, datamodule=datamodule,
                               return_predictions=return_predictions)
    finally:
        if device is not None:
            module.to(device)


def _to(batch: Any, device: torch.device) -> Any:
    if hasattr(batch, "to"):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch


def plain_batches(model: nn.Module, loader: Iterable) -> Iterator[tuple[int, Any]]:
    """(index, batch on the model's input device) for the plain loop of a model spread over devices."""
    dev = input_device(model)
    for i, batch in enumerate(loader):
        yield i, _to(batch, dev)


@contextlib.contextmanager
def plain_precision(model: nn.Module, cfg: TrainerConfig | None):
    """The compute dtype of ``cfg`` for a plain loop (what the Trainer's precision plugin does inside one)."""
    with autocast(input_device(model), compute_dtype_of(cfg)):
        yield
