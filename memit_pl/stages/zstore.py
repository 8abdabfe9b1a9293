"""The z store: target vectors and their diagnostics, one safetensors file per written batch
(``parts/``) merged into ``zs.safetensors``; a restarted run skips the case ids already there."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from memit_pl import io

log = logging.getLogger(__name__)

STORE_FILE = "zs.safetensors"
PARTS = "parts"
FIELDS = ("z", "h_norm", "delta_norm", "loss", "nll", "steps")


def store_key(fingerprint: str, memit_cfg, prefixes: list[str], precision: str | None = None) -> str:
    """What z depends on: the model, the target layer L, the objective's settings, the prefixes and the
    compute dtype (:func:`memit_pl.stages.runtime.compute_dtype_of`; None for float32)."""
    parts = {
        "fingerprint": fingerprint,
        "layer": memit_cfg.target_layer,
        "prefixes": prefixes,
        **{k: getattr(memit_cfg, k) for k in (
            "v_lr", "v_num_grad_steps", "clamp_norm_factor", "kl_factor", "v_weight_decay",
            "v_loss_threshold", "essence_prompt",
        )},
    }
    if precision is not None:
        parts["precision"] = precision
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class ZStore:
    """Everything the apply stage needs, keyed by case id."""

    case_ids: list[str]
    tensors: dict[str, Tensor]
    metadata: dict[str, Any]

    def __len__(self) -> int:
        return len(self.case_ids)

    def z_for(self, case_ids: list[str]) -> Tensor:
        """z rows [n, d_model] in the order of ``case_ids``."""
        return self.field_for(case_ids, "z")

    def field_for(self, case_ids: list[str], field: str) -> Tensor:
        """The rows of one of :data:`FIELDS` (z, loss, steps, ...) in the order of ``case_ids``."""
        index = {c: i for i, c in enumerate(self.case_ids)}
        missing = [c for c in case_ids if c not in index]
        if missing:
            raise KeyError(f"no z for case ids {missing[:5]}{'...' if len(missing) > 5 else ''} in the store")
        return self.tensors[field][torch.tensor([index[c] for c in case_ids])]

    @property
    def layer(self) -> int:
        return int(self.metadata["layer"])


def write_part(store_dir: str | Path, name: str, case_ids: list[str], tensors: dict[str, Tensor], key: str) -> Path:
    path = Path(store_dir) / PARTS / f"{name}.safetensors"
    io.save_tensors(path, tensors, {"case_ids": case_ids, "key": key})
    return path


def _read_parts(store_dir: Path, key: str) -> tuple[list[str], dict[str, list[Tensor]]]:
    ids: list[str] = []
    cols: dict[str, list[Tensor]] = {f: [] for f in FIELDS}
    seen: set[str] = set()
    sources = []
    if (store_dir / STORE_FILE).exists():
        sources.append(store_dir / STORE_FILE)
    sources += sorted((store_dir / PARTS).glob("*.safetensors")) if (store_dir / PARTS).exists() else []
    for path in sources:
        tensors, meta = io.load_tensors(path)
        if meta.get("key") != key:
            raise ValueError(
                f"{path} was computed with another model, layer, objective or context prefixes "
                f"(key {meta.get('key')} != {key}); use a new output directory or delete it"
            )
        for i, c in enumerate(meta["case_ids"]):
            if c in seen:  # a distributed sampler repeats cases to even out ranks
                continue
            seen.add(c)
            ids.append(c)
            for f in FIELDS:
                cols[f].append(tensors[f][i])
    return ids, cols


def done_case_ids(store_dir: str | Path, key: str) -> set[str]:
    """Case ids already optimised under ``key`` (from the merged store and any parts)."""
    store_dir = Path(store_dir)
    if not store_dir.exists():
        return set()
    return set(_read_parts(store_dir, key)[0])


def merge(store_dir: str | Path, key: str, metadata: dict[str, Any]) -> ZStore:
    """Merge parts (and an existing store) into ``zs.safetensors``; then remove the parts."""
    store_dir = Path(store_dir)
    ids, cols = _read_parts(store_dir, key)
    if not ids:
        raise ValueError(f"no z vectors in {store_dir}")
    tensors = {f: torch.stack(cols[f]) for f in FIELDS}
    meta = {**metadata, "key": key, "case_ids": ids}
    io.save_tensors(store_dir / STORE_FILE, tensors, meta)
    if (store_dir / PARTS).exists():
        for p in (store_dir / PARTS).glob("*.safetensors"):
            os.unlink(p)
    return ZStore(ids, tensors, meta)


def load_store(path: str | Path) -> ZStore:
    """Read ``zs.safetensors`` (or the one inside a directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / STORE_FILE
    tensors, meta = io.load_tensors(path)
    return ZStore(list(meta["case_ids"]), tensors, meta)
