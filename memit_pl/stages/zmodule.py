"""Lightning orchestration of the z stage: ``ZModule`` optimises each batch of edits in its
predict step (δ is local to the step, so ranks never synchronise gradients), ``ZStoreWriter``
writes every finished batch at once, and ``compute_zs`` resumes from what is already on disk."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import DataLoader

from memit_pl import io
from memit_pl.config import MemitConfig, TrainerConfig
from memit_pl.data.edits import EditRequest
from memit_pl.modeling.loading import fingerprint, spread_over_devices
from memit_pl.modeling.spec import get_spec
from memit_pl.stages import runtime
from memit_pl.stages.context import context_prefixes, corpus_prefixes
from memit_pl.stages.zbatch import ZBatch, ZCollate, by_live_length
from memit_pl.stages.zopt import ZResult, optimize_z
from memit_pl.stages.zstore import ZStore, done_case_ids, load_store, merge, store_key, write_part

log = logging.getLogger(__name__)

CONTEXT_FILE = "context_prefixes.json"


class ZModule(L.LightningModule):
    """Optimises δ for a whole batch of edits at once (the frozen model is a plain submodule)."""

    def __init__(self, model: nn.Module, memit: MemitConfig):
        super().__init__()
        self.model = model
        self.memit = memit
        self.spec = get_spec(model)

    def transfer_batch_to_device(self, batch: ZBatch, device: torch.device, dataloader_idx: int) -> ZBatch:
        return batch.to(device)

    def predict_step(self, batch: ZBatch, batch_idx: int) -> ZResult:
        start = time.perf_counter()
        with torch.enable_grad():
            result = optimize_z(self.model, self.spec, batch, self.memit, on_step=self._show)
        rank_zero_info(
            f"z batch {batch_idx}: {batch.n_edits} edits, mean loss {result.loss.mean():.4f}, "
            f"mean steps {result.steps.float().mean():.1f}, {(time.perf_counter() - start) / batch.n_edits:.3f} s/edit"
        )
        return result

    def _show(self, step: int, n_active: int, mean_loss: float) -> None:
        bar = getattr(self.trainer, "progress_bar_callback", None) if self._trainer is not None else None
        pbar = getattr(bar, "predict_progress_bar", None) if bar is not None else None
        if pbar is not None:
            pbar.set_postfix(step=step, active=n_active, loss=f"{mean_loss:.3f}", refresh=False)


class ZStoreWriter(BasePredictionWriter):
    """Writes each batch's z vectors as a part file the moment it is done; merges at the end."""

    def __init__(self, store_dir: str | Path, key: str, metadata: dict):
        super().__init__(write_interval="batch")
        self.store_dir, self.key, self.metadata = Path(store_dir), key, metadata

    def write_on_batch_end(self, trainer, pl_module, prediction: ZResult, batch_indices, batch, batch_idx, dataloader_idx):
        name = f"rank{trainer.global_rank}-{time.time_ns()}-{batch_idx}"
        write_part(self.store_dir, name, prediction.case_ids, prediction.to_tensors(), self.key)

    def on_predict_end(self, trainer, pl_module) -> None:
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            merge(self.store_dir, self.key, self.metadata)
        trainer.strategy.barrier()


def load_or_sample_prefixes(model: nn.Module, tokenizer, memit: MemitConfig, store_dir: Path) -> list[str]:
    """The run's context prefixes: read from the store directory, or sampled (seeded) and saved there."""
    path = store_dir / CONTEXT_FILE
    if path.exists():
        import json

        saved = json.loads(path.read_text())
        if (saved["spec"] == memit.context_templates and saved["seed"] == memit.seed
                and saved.get("source", "model") == memit.context_source):
            return saved["prefixes"]
        raise ValueError(f"{path} holds prefixes for other context settings; use a new output directory")
    if memit.context_source == "corpus":
        prefixes = corpus_prefixes(tokenizer, memit.context_templates, memit.seed)
    else:
        prefixes = context_prefixes(model, tokenizer, memit.context_templates, memit.context_seeds, memit.seed)
    io.write_json(path, prefixes_record(memit.context_templates, memit.seed, memit.context_source, prefixes))
    return prefixes


def prefixes_record(spec, seed: int, source: str, prefixes: list[str]) -> dict:
    """The contents of ``context_prefixes.json``: what :func:`load_or_sample_prefixes` checks on a resume."""
    saved = {"spec": spec, "seed": seed, "prefixes": prefixes}
    if source != "model":  # the files of model-sampled prefixes stay as they were
        saved["source"] = source
    return saved


def compute_zs(
    model: nn.Module,
    tokenizer,
    requests: Sequence[EditRequest],
    memit: MemitConfig,
    store_dir: str | Path,
    trainer: TrainerConfig | None = None,
    config_dump: dict | None = None,
) -> ZStore:
    """z for every request, resuming from ``store_dir``; returns the merged store."""
    store_dir = Path(store_dir)
    store_dir.mkdir(parents=True, exist_ok=True)
    prefixes = load_or_sample_prefixes(model, tokenizer, memit, store_dir)
    fp = fingerprint(model)
    key = store_key(fp, memit, prefixes, runtime.compute_dtype_of(trainer))
    done = done_case_ids(store_dir, key)
    todo = [r for r in requests if r.case_id not in done]
    if memit.z_prefix_cache:  # batches of edits with similar lengths after the subject pad little
        todo = by_live_length(tokenizer, todo)
    metadata = {
        "layer": memit.target_layer,
        "fingerprint": fp,
        "prefixes": prefixes,
        "memit": vars(memit),
        "config": config_dump or {},
    }
    rank_zero_info(f"z: {len(requests)} edits, {len(done)} already in {store_dir}, {len(todo)} to optimise")
    if todo:
        loader = DataLoader(
            list(todo), batch_size=memit.z_batch_size, shuffle=False,
            collate_fn=ZCollate(tokenizer, prefixes, memit.essence_prompt),
        )
        if spread_over_devices(model):  # placed by accelerate over several devices: no Trainer
            module = ZModule(model, memit)
            for i, batch in runtime.plain_batches(model, loader):
                with runtime.plain_precision(model, trainer):
                    res = module.predict_step(batch, i)
                write_part(store_dir, f"plain-{time.time_ns()}-{i}", res.case_ids, res.to_tensors(), key)
            merge(store_dir, key, metadata)
        else:
            runtime.predict(trainer, ZModule(model, memit), callbacks=[ZStoreWriter(store_dir, key, metadata)],
                            dataloaders=loader, inference_mode=False)
    elif not (store_dir / "zs.safetensors").exists() or (store_dir / "parts").exists():
        merge(store_dir, key, metadata)
    store = load_store(store_dir)
    missing = [r.case_id for r in requests if r.case_id not in set(store.case_ids)]
    if missing:
        raise RuntimeError(f"z store {store_dir} lacks {len(missing)} requested cases (e.g. {missing[:3]})")
    return store
