"""Where the stages run: the one Trainer factory, and device placement around Lightning's predict loops.

Every stage (statistics, z, keys and h^L of the update, evaluation) is a predict loop. Lightning moves the
module to its root device and back to the CPU on teardown; a model placed over several devices by
accelerate (``device_map``) must not be moved at all, so it runs the same steps in a plain loop.
"""

from __future__ import annotations

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

__all__ = ["make_trainer", "on_model_device", "plain_batches", "predict", "spread_over_devices"]


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
