"""Edit deltas: per-layer low-rank factors Δ_l = A_l B_lᵀ, saved, applied and reverted."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from memit_pl import io
from memit_pl.modeling.spec import ModelSpec, get_spec

DELTA_FILE = "delta.safetensors"


@dataclass
class EditDelta:
    """Δ_l = A_l B_lᵀ for each edited layer l; A [d_model, r], B [d_key, r] (float32)."""

    factors: dict[int, tuple[Tensor, Tensor]]
    metadata: dict[str, Any] = field(default_factory=dict)

    def dense(self, layer: int) -> Tensor:
        """Δ_l as a [d_model, d_key] matrix."""
        a, b = self.factors[layer]
        return a @ b.T

    @property
    def layers(self) -> list[int]:
        return sorted(self.factors)

    def save(self, path: str | Path) -> Path:
        """Write the factors and metadata to a safetensors file (or ``delta.safetensors`` in a directory)."""
        return save_delta(path, self)

    @classmethod
    def load(cls, path: str | Path) -> EditDelta:
        return load_delta(path)

    def apply(self, model: nn.Module) -> EditDelta:
        """W_l += Δ_l on ``model`` (checks the family and the shapes first)."""
        return apply_delta(model, self, 1.0)

    def revert(self, model: nn.Module) -> EditDelta:
        """W_l −= Δ_l: the weights as they were before :meth:`apply` (up to the weights' rounding)."""
        return apply_delta(model, self, -1.0)


def save_delta(path: str | Path, delta: EditDelta) -> Path:
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / DELTA_FILE
    tensors = {}
    for layer, (a, b) in delta.factors.items():
        tensors[f"layer{layer}.A"] = a.float()
        tensors[f"layer{layer}.B"] = b.float()
    io.save_tensors(path, tensors, {**delta.metadata, "layers": delta.layers})
    return path


def load_delta(path: str | Path) -> EditDelta:
    """Read a delta file (or the ``delta.safetensors`` inside a run directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / DELTA_FILE
    tensors, meta = io.load_tensors(path)
    factors = {int(layer): (tensors[f"layer{layer}.A"], tensors[f"layer{layer}.B"]) for layer in meta["layers"]}
    return EditDelta(factors, meta)


@torch.no_grad()
def add_to_weight(spec: ModelSpec, model: nn.Module, layer: int, delta: Tensor, sign: float = 1.0) -> float:
    """W_l += sign · Δ_l in place, Δ [d_model, d_key]; respects transposed (Conv1D) weights.

    The sum is formed in float32 (at least) and cast once to the weight's dtype. Returns how much of Δ the
    cast lost, ‖cast(W + Δ) − W − Δ‖ / ‖Δ‖ (0 for float32 weights; about 1 where bf16 weights round a
    small Δ away).
    """
    w = spec.out_weight(model, layer)
    upd = sign * (delta.T if spec.transposed else delta).to(device=w.device)
    acc = torch.promote_types(w.dtype, torch.float32)
    before = w.to(acc)
    upd = upd.to(acc)
    new = (before + upd).to(w.dtype)
    w.copy_(new)
    if w.dtype == acc:
        return 0.0
    return float((new.to(acc) - before - upd).norm() / upd.norm().clamp(min=1e-30))


def apply_delta(model: nn.Module, delta: EditDelta | str | Path, sign: float = 1.0) -> EditDelta:
    """Add (``sign=1``) or remove (``sign=-1``) a saved delta; checks the model family and shapes."""
    if not isinstance(delta, EditDelta):
        delta = load_delta(delta)
    spec = get_spec(model)
    fam = delta.metadata.get("family")
    if fam is not None and fam != spec.family:
        raise ValueError(f"the delta was made for a {fam} model, this is a {spec.family} model")
    for layer in delta.layers:
        w = spec.out_weight(model, layer)
        d = delta.dense(layer)
        shape = tuple(d.T.shape) if spec.transposed else tuple(d.shape)
        if tuple(w.shape) != shape:
            raise ValueError(f"layer {layer}: delta shape {shape} does not match the weight {tuple(w.shape)}")
    for layer in delta.layers:
        add_to_weight(spec, model, layer, delta.dense(layer), sign)
    return delta
