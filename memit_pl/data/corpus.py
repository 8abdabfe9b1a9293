"""Text corpora for the key statistics: streamed through ``datasets``, cut into fixed-length token chunks.

Corpora (``StatsConfig.corpus``):

- ``"wikitext"``: WikiText-103 (raw) from the Hugging Face hub, the paper's corpus (needs a network);
- ``"wikipedia-sample"``: the shortened English Wikipedia dump shipped in the gensim wheel
  (~106 articles, markup stripped with ``mwparserfromhell``), usable offline;
- local text files: comma-separated paths or globs, read with ``datasets``' ``text`` builder;
- ``"auto"``: WikiText-103 when the hub is reachable, else the Wikipedia sample.

Texts are tokenised, packed into one stream and cut into chunks of exactly ``seq_len`` tokens
(the last chunk may be shorter); chunk order is a seeded buffer shuffle, so a given
(corpus, tokenizer, seq_len, seed, n_samples) always yields the same chunks. Chunk ``i`` of that
stream goes to rank ``i % world_size``.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import logging
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader
from torch.utils.data import IterableDataset as TorchIterableDataset

from memit_pl.data.wikipedia import (  # noqa: F401  (re-exported: part of the corpus API)
    WIKIPEDIA_SAMPLE,
    iter_wikipedia_articles,
    strip_markup,
    wikipedia_rows,
    wikipedia_sample_path,
)

log = logging.getLogger(__name__)

WIKITEXT = ("wikitext", "wikitext-103-raw-v1")
NAMED = ("auto", "wikitext", "wikipedia-sample")
SHUFFLE_BUFFER = 4096
"""Most chunks held by the seeded buffer shuffle (at most ``n_samples``)."""
HUB_PROBE_TIMEOUT_S = 3.0

# --- where the text comes from -------------------------------------------------------------------


def is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` is set (to 1/true/yes/on)."""
    truthy = {"1", "true", "yes", "on"}
    return any(
        os.environ.get(v, "").strip().lower() in truthy for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the Hugging Face hub opens within ``timeout`` seconds."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_corpus(corpus: str) -> str:
    """``"auto"`` -> ``"wikitext"`` when online, else ``"wikipedia-sample"`` (with a warning when the
    hub was tried and failed); other names are checked and returned unchanged."""
    corpus = corpus.strip()
    if corpus == "auto":
        if is_offline():
            log.info(
                "offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE): statistics on the packaged Wikipedia sample"
            )
            return "wikipedia-sample"
        if hub_reachable():
            return "wikitext"
        log.warning(
            "the Hugging Face hub is not reachable: statistics on the packaged Wikipedia sample instead of "
            "WikiText-103 (set stats.corpus to choose explicitly)"
        )
        return "wikipedia-sample"
    if corpus not in NAMED:
        corpus_files(corpus)  # fails early, naming the pattern that matched nothing
    return corpus


def corpus_files(spec: str) -> list[Path]:
    """Text files named by comma-separated paths or globs, each checked to exist."""
    files: list[Path] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        matches = sorted(glob.glob(os.path.expanduser(part)))
        if not matches:
            raise FileNotFoundError(
                f"stats.corpus: {part!r} is not 'auto', 'wikitext', 'wikipedia-sample' nor an existing text file/glob"
            )
        files.extend(Path(m).resolve() for m in matches)
    if not files:
        raise ValueError(f"stats.corpus: no file named in {spec!r}")
    return list(dict.fromkeys(files))


def corpus_id(corpus: str) -> str:
    """A stable id of a resolved corpus for the statistics cache (files: names, sizes and mtimes)."""
    if corpus == "wikitext":
        return "/".join(WIKITEXT)
    if corpus == "wikipedia-sample":
        return "wikipedia-sample:" + Path(WIKIPEDIA_SAMPLE).name
    if corpus == "auto":
        raise ValueError("resolve 'auto' with resolve_corpus() first")
    h = hashlib.sha256()
    files = corpus_files(corpus)
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return f"files:{files[0].name}{'+' if len(files) > 1 else ''}:{h.hexdigest()[:12]}"


def text_dataset(corpus: str):
    """A streaming ``datasets.IterableDataset`` of ``{"text"}`` rows and whether rows are whole
    documents (joined with EOS) rather than lines (joined as they are)."""
    from datasets import IterableDataset, load_dataset

    if corpus == "auto":
        corpus = resolve_corpus(corpus)
    if corpus == "wikitext":
        return load_dataset(*WIKITEXT, split="train", streaming=True), False
    if corpus == "wikipedia-sample":
        ds = IterableDataset.from_generator(
            wikipedia_rows, gen_kwargs={"path": str(wikipedia_sample_path())}
        )
        return ds, True
    files = [str(f) for f in corpus_files(corpus)]
    return load_dataset("text", data_files=files, split="train", streaming=True, keep_linebreaks=True), False


# --- tokens ----------------------------------------------------------------------------------------


def special_prefix(tokenizer) -> list[int]:
    """Ids the tokenizer puts before any text by default (e.g. Gemma's BOS); often empty."""
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    n = len(with_special) - len(plain)
    if n > 0 and with_special[n:] == plain:
        return list(with_special[:n])
    return []


def iter_chunks(
    texts: Iterable[str],
    tokenizer,
    seq_len: int,
    *,
    documents: bool = False,
    batch: int = 64,
    max_chars: int = 32768,
) -> Iterator[np.ndarray]:
    """Pack tokenised ``texts`` into chunks of ``seq_len`` ids (int64 [pos]), each starting with the
    tokenizer's default prefix (BOS where it adds one); ``documents`` appends EOS after each text.
    The last chunk holds what is left (shorter, never empty)."""
    prefix = special_prefix(tokenizer)
    body = seq_len - len(prefix)
    if body < 1:
        raise ValueError(
            f"stats.seq_len={seq_len} leaves no room after the tokenizer's {len(prefix)} prefix tokens"
        )
    eos = [tokenizer.eos_token_id] if documents and tokenizer.eos_token_id is not None else []
    buf: list[int] = []
    for group in _groups(texts, batch, max_chars):
        for ids in tokenizer(group, add_special_tokens=False, verbose=False)["input_ids"]:
            buf.extend(ids)
            buf.extend(eos)
        n_full = len(buf) // body
        for i in range(n_full):
            yield np.asarray(prefix + buf[i * body : (i + 1) * body], dtype=np.int64)
        buf = buf[n_full * body :]
    if buf:
        yield np.asarray(prefix + buf, dtype=np.int64)


def _groups(texts: Iterable[str], batch: int, max_chars: int) -> Iterator[list[str]]:
    """Consecutive texts, at most ``batch`` of them or ``max_chars`` characters (past one text) a group."""
    group: list[str] = []
    chars = 0
    for text in texts:
        group.append(text)
        chars += len(text)
        if len(group) >= batch or chars >= max_chars:
            yield group
            group, chars = [], 0
    if group:
        yield group


def _chunk_rows(corpus: str, tokenizer, seq_len: int) -> Iterator[dict[str, np.ndarray]]:
    texts, documents = text_dataset(corpus)
    for ids in iter_chunks((row["text"] for row in texts), tokenizer, seq_len, documents=documents):
        yield {"input_ids": ids}


def chunk_dataset(corpus: str, tokenizer, seq_len: int, n_samples: int, seed: int):
    """The first ``n_samples`` chunks of ``corpus`` in a seeded shuffled order (``datasets.IterableDataset``)."""
    from datasets import IterableDataset

    ds = IterableDataset.from_generator(
        _chunk_rows, gen_kwargs={"corpus": resolve_corpus(corpus), "tokenizer": tokenizer, "seq_len": seq_len}
    )
    return ds.shuffle(seed=seed, buffer_size=max(1, min(n_samples, SHUFFLE_BUFFER))).take(n_samples)


class ChunkShard(TorchIterableDataset):
    """Rank ``rank``'s share of a chunk stream (chunks ``rank, rank + world, ...``), minus the first
    ``skip`` of them (already done by an interrupted run)."""

    def __init__(self, chunks, n_samples: int, rank: int = 0, world_size: int = 1, skip: int = 0):
        self.chunks, self.n_samples, self.rank, self.world_size, self.skip = (
            chunks,
            n_samples,
            rank,
            world_size,
            skip,
        )

    def __iter__(self) -> Iterator[Tensor]:
        start = self.rank + self.world_size * self.skip
        for row in itertools.islice(iter(self.chunks), start, None, self.world_size):
            yield torch.as_tensor(np.asarray(row["input_ids"]), dtype=torch.long)

    def __len__(self) -> int:
        """Chunks expected on this rank (fewer when the corpus runs out first)."""
        mine = max(0, (self.n_samples - self.rank + self.world_size - 1) // self.world_size)
        return max(0, mine - self.skip)


def collate(chunks: Sequence[Tensor], pad_id: int = 0) -> dict[str, Tensor]:
    """Right-pad chunks into ``input_ids`` and ``attention_mask`` [batch, pos]."""
    width = max(len(c) for c in chunks)
    ids = torch.full((len(chunks), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunks), width), dtype=torch.long)
    for i, c in enumerate(chunks):
        ids[i, : len(c)] = c
        mask[i, : len(c)] = 1
    return {"input_ids": ids, "attention_mask": mask}


class _Collate:
    """Picklable collate function (spawned DDP workers)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, chunks: Sequence[Tensor]) -> dict[str, Tensor]:
        return collate(chunks, self.pad_id)


class CorpusDataModule(LightningDataModule):
    """Token chunks of a corpus for the statistics stage (predict/test), sharded across ranks.

    Args:
        skip: chunks each rank has already processed (an int, or ``fn(rank, world_size) -> int``),
            so an interrupted run resumes where it stopped.
    """

    def __init__(
        self,
        tokenizer,
        corpus: str = "auto",
        n_samples: int = 100000,
        seq_len: int = 256,
        batch_size: int = 8,
        seed: int = 0,
        skip: int | Callable[[int, int], int] = 0,
        num_workers: int = 0,
    ):
        super().__init__()
        if n_samples < 1:
            raise ValueError(f"stats.n_samples must be >= 1, got {n_samples}")
        if seq_len < 2:
            raise ValueError(f"stats.seq_len must be >= 2, got {seq_len}")
        if batch_size < 1:
            raise ValueError(f"stats.batch_size must be >= 1, got {batch_size}")
        self.tokenizer = tokenizer
        self.corpus = resolve_corpus(corpus)
        self.n_samples, self.seq_len, self.batch_size, self.seed = n_samples, seq_len, batch_size, seed
        self.skip, self.num_workers = skip, num_workers
        self.shard: ChunkShard | None = None

    def setup(self, stage: str | None = None) -> None:
        rank, world = (
            (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        )
        skip = self.skip(rank, world) if callable(self.skip) else int(self.skip)
        chunks = chunk_dataset(self.corpus, self.tokenizer, self.seq_len, self.n_samples, self.seed)
        self.shard = ChunkShard(chunks, self.n_samples, rank, world, skip)

    def _loader(self) -> DataLoader:
        if self.shard is None:
            self.setup()
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return DataLoader(
            self.shard, batch_size=self.batch_size, collate_fn=_Collate(pad), num_workers=self.num_workers
        )

    def predict_dataloader(self) -> DataLoader:
        return self._loader()

    def test_dataloader(self) -> DataLoader:
        return self._loader()
