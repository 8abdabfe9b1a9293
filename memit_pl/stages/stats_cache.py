"""The statistics cache: one safetensors file per layer, keyed by the model's fingerprint, the tokenizer,
the corpus, the sample count, the chunk length, the accumulation dtype and the seed; plus the per-rank
progress files an interrupted run resumes from."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from memit_pl import io
from memit_pl.config import StatsConfig
from memit_pl.data.corpus import corpus_id, resolve_corpus
from memit_pl.modeling.loading import default_cache_dir, fingerprint
from memit_pl.modeling.spec import get_spec

log = logging.getLogger(__name__)

ACCUM_DTYPES = {"float32": torch.float32, "float64": torch.float64}
FORMAT = 1



def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of a tokenizer's class, vocabulary and default special-token behaviour."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(tokenizer("a b")["input_ids"]).encode())
    return h.hexdigest()[:12]


@dataclass(frozen=True)
class StatsKey:
    """Everything the statistics depend on besides the layer."""

    fingerprint: str
    tokenizer: str
    corpus: str
    n_samples: int
    seq_len: int
    dtype: str
    seed: int
    weighting: str = ""
    """"" for E[k kᵀ]; "post_norm_rms" for E[k kᵀ / rms(W k)²] (a norm after the MLP, see CovarianceModule)."""
    precision: str = ""
    """"" for float32 passes; else the compute dtype of the model's passes (e.g. "bfloat16")."""

    def as_dict(self) -> dict[str, Any]:
        """The fields, without an empty ``weighting`` or ``precision`` (so plain float32 statistics keep their
        names and files)."""
        out = asdict(self)
        for k in ("weighting", "precision"):
            if not out[k]:
                del out[k]
        return out

    def dirname(self) -> str:
        slug = "".join(c if c.isalnum() or c in "-." else "-" for c in self.corpus.split(":")[0])
        h = hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:8]
        return f"{slug}_n{self.n_samples}_len{self.seq_len}_{self.dtype}_seed{self.seed}_{h}"


@dataclass(frozen=True)
class StatsCache:
    """Files under ``root/<fingerprint>/<key>/``: ``layer<l>.safetensors`` (final) and
    ``partial-rank<r>-of<w>.safetensors`` (progress of an unfinished run)."""

    root: Path
    key: StatsKey

    @property
    def dir(self) -> Path:
        return Path(self.root) / self.key.fingerprint / self.key.dirname()

    def layer_path(self, layer: int) -> Path:
        return self.dir / f"layer{layer:03d}.safetensors"

    def _matches(self, meta: dict[str, Any], **extra: Any) -> bool:
        want = {**self.key.as_dict(), "format": FORMAT, **extra}
        return all(meta.get(k) == v for k, v in want.items())

    def load(self, layer: int) -> Tensor | None:
        """E[k kᵀ] [d_key, d_key] of ``layer`` when a file with matching metadata exists, else ``None``."""
        path = self.layer_path(layer)
        if not path.exists():
            return None
        tensors, meta = io.load_tensors(path)
        if not self._matches(meta, layer=layer) or "mom2" not in tensors:
            log.warning(
                "statistics in %s do not match this run (model/corpus/settings changed): recomputing", path
            )
            return None
        return tensors["mom2"]

    def save(self, layer: int, mom2: Tensor, n_tokens: int, n_chunks: int, module: str) -> Path:
        path = self.layer_path(layer)
        meta = {
            **self.key.as_dict(),
            "format": FORMAT,
            "layer": layer,
            "module": module,
            "n_tokens": n_tokens,
            "n_chunks": n_chunks,
        }
        io.save_tensors(path, {"mom2": mom2}, meta)
        return path

    def partial_path(self, rank: int, world_size: int) -> Path:
        return self.dir / f"partial-rank{rank}-of{world_size}.safetensors"

    def save_partial(
        self,
        rank: int,
        world_size: int,
        layers: Sequence[int],
        chunks: int,
        states: dict[int, tuple[Tensor, Tensor]],
    ) -> None:
        tensors = {}
        for layer, (total, count) in states.items():
            tensors[f"total.{layer}"], tensors[f"count.{layer}"] = total, count
        meta = {
            **self.key.as_dict(),
            "format": FORMAT,
            "layers": list(layers),
            "chunks": chunks,
            "rank": rank,
            "world_size": world_size,
        }
        io.save_tensors(self.partial_path(rank, world_size), tensors, meta)

    def load_partial(
        self, rank: int, world_size: int, layers: Sequence[int]
    ) -> tuple[int, dict[int, tuple[Tensor, Tensor]]]:
        """(chunks done, per-layer partial sums) of this rank's unfinished run; (0, {}) when none matches."""
        path = self.partial_path(rank, world_size)
        if not path.exists():
            return 0, {}
        tensors, meta = io.load_tensors(path)
        if not self._matches(meta, layers=list(layers), rank=rank, world_size=world_size):
            return 0, {}
        states = {layer: (tensors[f"total.{layer}"], tensors[f"count.{layer}"]) for layer in layers}
        return int(meta["chunks"]), states

    def resume_chunks(self, layers: Sequence[int], rank: int, world_size: int) -> int:
        """Chunks this rank already processed (for :class:`~memit_pl.data.corpus.CorpusDataModule`'s ``skip``)."""
        return self.load_partial(rank, world_size, layers)[0]

    def clear_partials(self) -> None:
        for p in self.dir.glob("partial-rank*-of*.safetensors"):
            p.unlink(missing_ok=True)



def check_stats_config(stats: StatsConfig) -> None:
    """Fail early, naming the field, on settings that cannot work."""
    if stats.n_samples < 1:
        raise ValueError(f"stats.n_samples must be >= 1, got {stats.n_samples}")
    if stats.seq_len < 2:
        raise ValueError(f"stats.seq_len must be >= 2, got {stats.seq_len}")
    if stats.batch_size < 1:
        raise ValueError(f"stats.batch_size must be >= 1, got {stats.batch_size}")
    if stats.dtype not in ACCUM_DTYPES:
        raise ValueError(f"stats.dtype must be one of {', '.join(ACCUM_DTYPES)}, got {stats.dtype!r}")


def stats_cache(
    model: nn.Module, tokenizer, stats: StatsConfig, cache_dir: str | Path | None = None, precision: str | None = None
) -> StatsCache:
    """The cache entry for this model, tokenizer, statistics settings (resolves ``corpus="auto"``) and the
    compute dtype of the passes (``runtime.compute_dtype_of(trainer)``; None for float32)."""
    check_stats_config(stats)
    corpus = resolve_corpus(stats.corpus)
    key = StatsKey(
        fingerprint(model),
        tokenizer_fingerprint(tokenizer),
        corpus_id(corpus),
        stats.n_samples,
        stats.seq_len,
        stats.dtype,
        stats.seed,
        "post_norm_rms" if get_spec(model).mlp_post_norm is not None else "",
        precision or "",
    )
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "stats"
    return StatsCache(root, key)


