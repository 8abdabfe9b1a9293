"""Generation metrics as torchmetrics ``Metric``s: Generation Entropy and Reference Score, and the
loader of the reference's TF-IDF files."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torchmetrics import Metric

from memit_pl.metrics.functional import (
    _case_mean_compute,
    _generation_entropy_update,
    _reference_score_update,
)


class _CaseMeanText(Metric):
    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def _add(self, total: Tensor, count: Tensor) -> None:
        self.total += total.to(self.total.device)
        self.count += count.to(self.count.device)

    def compute(self) -> Tensor:
        return _case_mean_compute(self.total, self.count)


class GenerationEntropy(_CaseMeanText):
    """Generation Entropy (fluency, Eqn. 27): per case the mean over its generated texts of
    ``(2/3 · H_2 + 4/3 · H_3) / 2`` (bigram / trigram entropy in bits of the text's word n-grams),
    averaged over cases. Low values mean repetitive text.

    >>> ge = GenerationEntropy()
    >>> ge.update([["a b a b a"], ["a b c d", "a a a a"]])
    >>> round(ge.compute().item(), 4)  # case 1: 0.9455; case 2: mean(1.1950, 0)
    0.7715
    """

    plot_lower_bound = 0.0

    def update(self, texts_per_case: Sequence[Sequence[str]]) -> None:
        self._add(*_generation_entropy_update(texts_per_case))


class ReferenceScore(_CaseMeanText):
    """Reference Score (consistency): per case, the TF-IDF cosine between its joined generations and
    the joined reference texts about its new object; averaged over cases.

    >>> rs = ReferenceScore({"paris": 0, "rome": 1}, torch.tensor([1.0, 2.0]))
    >>> rs.update([["Paris Paris"]], [["paris rome"]])
    >>> round(rs.compute().item(), 4)
    0.4472
    """

    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    def __init__(self, vocab: Mapping[str, int], idf: Tensor, **kwargs) -> None:
        super().__init__(**kwargs)
        self.vocab = dict(vocab)
        self.idf = torch.as_tensor(idf, dtype=torch.float64).cpu()

    def update(self, generated: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> None:
        self._add(*_reference_score_update(generated, references, self.vocab, self.idf))


@dataclass
class ReferenceData:
    """The reference's Reference Score files: attribute snippets and TF-IDF statistics.

    ``snippets[relation_id][target_id]`` lists ``{"name", "text"}`` samples (Wikipedia text about
    subjects whose ``relation_id`` object is ``target_id``).
    """

    snippets: dict[str, dict[str, list[dict]]]
    vocab: dict[str, int]
    idf: Tensor

    @classmethod
    def load(cls, directory: str | Path) -> ReferenceData:
        """Read ``attribute_snippets.json``, ``idf.npy`` and ``tfidf_vocab.json`` from a directory."""
        import numpy as np

        d = Path(directory)
        paths = {n: d / n for n in ("attribute_snippets.json", "idf.npy", "tfidf_vocab.json")}
        missing = [str(p) for p in paths.values() if not p.exists()]
        if missing:
            raise FileNotFoundError(f"Reference Score files missing: {', '.join(missing)}")
        raw = json.loads(paths["attribute_snippets.json"].read_text(encoding="utf-8"))
        snippets: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
        for i, el in enumerate(raw):
            for key in ("relation_id", "target_id", "samples"):
                if key not in el:
                    raise ValueError(f"{paths['attribute_snippets.json']}: record {i}: field {key!r}: missing")
            snippets[str(el["relation_id"])][str(el["target_id"])].extend(el["samples"])
        vocab = json.loads(paths["tfidf_vocab.json"].read_text(encoding="utf-8"))
        idf = torch.from_numpy(np.load(paths["idf.npy"], allow_pickle=False)).double()
        if vocab and max(vocab.values()) >= idf.numel():
            raise ValueError(f"tfidf_vocab.json indexes {max(vocab.values()) + 1} terms, idf.npy has {idf.numel()}")
        return cls({k: dict(v) for k, v in snippets.items()}, vocab, idf)

    def texts(self, relation_id: str | None, target_id: str | None) -> list[str]:
        """Reference texts about a (relation, new object) pair; empty when unknown."""
        if relation_id is None or target_id is None:
            return []
        return [s["text"] for s in self.snippets.get(str(relation_id), {}).get(str(target_id), [])]
