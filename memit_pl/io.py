"""Atomic file writes: a crash never leaves a half-written artifact behind."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""

    def w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic(Path(path), w)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> None:
    """Save tensors as safetensors atomically; metadata values are JSON-encoded strings."""
    meta = {k: json.dumps(v, default=str) for k, v in (metadata or {}).items()}
    plain = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic(Path(path), lambda tmp: save_file(plain, tmp, metadata=meta))


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and decoded metadata of a file written by :func:`save_tensors`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    meta = {k: json.loads(v) for k, v in raw.items()}
    return load_file(str(path), device=str(device)), meta


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend; matplotlib is the optional ``plots`` extra."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("PNG plots need matplotlib: pip install 'memit-pl[plots]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, **savefig_kwargs: Any) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    plt = pyplot()
    path = Path(path)
    _atomic(path, lambda tmp: fig.savefig(tmp, format="png", **savefig_kwargs))
    plt.close(fig)
    return path
