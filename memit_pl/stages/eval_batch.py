"""Evaluation batches: each case's prompts flattened into teacher-forced rows ``prompt + target``, cases
packed into padded batches (:class:`PackedCases`, :func:`collate`)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Sampler

from memit_pl.config import EvalConfig
from memit_pl.data.edits import EditRequest, target_ids
from memit_pl.metrics import ReferenceData
from memit_pl.modeling.tokens import position_ids

SCALE = 100.0
"""Reported metrics are multiplied by this, as in the paper's tables (the reference's summarize.py
multiplies every metric, Generation Entropy included, by 100)."""


# ---------------------------------------------------------------------------------------------
# Cases -> rows


@dataclass
class Target:
    """A target scored on one prompt: token ``ids[j]`` is predicted at row position ``start + j``."""

    label: str
    """Which target: "new", "true" or "answer" (a zsRE neighbourhood answer)."""
    ids: list[int]
    start: int
    kind: int
    """0 rewrite, 1 paraphrase, 2 neighbourhood prompt."""
    prompt_index: int


@dataclass
class Row:
    """One teacher-forced sequence: a prompt followed by all but the last token of one multi-token
    target; single-token targets of the same prompt are read off the prompt's last position."""

    ids: list[int]
    targets: list[Target]


def prompt_rows(p_ids: Sequence[int], targets: Sequence[tuple[str, list[int]]], kind: int, index: int) -> list[Row]:
    """The fewest rows that teacher-force every target after one prompt: one per multi-token target
    (at least one), single-token targets riding on the first (the reference uses one per target)."""
    start = len(p_ids) - 1
    multi = [(lab, t) for lab, t in targets if len(t) > 1]
    rows = [Row(list(p_ids) + list(t[:-1]), [Target(lab, list(t), start, kind, index)]) for lab, t in multi]
    if not rows:
        rows = [Row(list(p_ids), [])]
    rows[0].targets += [Target(lab, list(t), start, kind, index) for lab, t in targets if len(t) == 1]
    return rows


@dataclass
class CaseItem:
    """One request, tokenised: its rows, prompts and the metrics it cannot take part in (with why)."""

    index: int
    request: EditRequest
    prompts: dict[int, list[str]]
    rows: list[Row]
    generation_prompts: list[str]

    @property
    def targets(self) -> list[Target]:
        return [t for r in self.rows for t in r.targets]
    reference_texts: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    about_edited: frozenset[int] = frozenset()
    """Indices of the neighbourhood prompts that name an edited subject (left out of NSu)."""


def subject_pattern(subjects: Iterable[str]) -> re.Pattern | None:
    """A regex that finds any of ``subjects`` in a prompt as whole words (None for no subjects).

    In a batch of CounterFact edits a case's neighbourhood prompts are often about subjects that are
    edited themselves (neighbours share the true object, and so do many cases of one relation): there
    the edit is meant to lower P(true object), and Neighborhood Success counts that as a spill. NSu
    leaves those prompts out.
    """
    subs = sorted({s.strip() for s in subjects if s and s.strip()}, key=len, reverse=True)
    if not subs:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, subs)) + r")(?!\w)")


def nsu_of_records(cases: Sequence[dict[str, Any]], edited_subjects: Iterable[str]) -> float | None:
    """NSu (× :data:`SCALE`) of per-case records as :func:`evaluate_requests` returns them, for another
    set of edited subjects: e.g. the unedited model's NSu on exactly the prompts an edited run scored.
    ``None`` where no case has a neighbourhood prompt left."""
    pattern = subject_pattern(edited_subjects)
    rates = []
    for c in cases:
        if c.get("NS") is None:  # skipped (no target_true, zsRE, no neighbourhood prompts)
            continue
        ok = [p["nll_true"] < p["nll_new"] for p in c["prompts"]["neighborhood"]
              if pattern is None or not pattern.search(p["prompt"])]
        if ok:
            rates.append(sum(ok) / len(ok))
    return sum(rates) / len(rates) * SCALE if rates else None


def generation_sample(case_ids: Sequence[str], k: int | None, seed: int) -> set[str]:
    """The ``k`` case ids whose hash with ``seed`` ranks lowest (all when ``k`` is None or >= their number): a
    sample that does not depend on the order of the cases, and is the same in every run over them."""
    import hashlib

    if k is None or k >= len(case_ids):
        return set(case_ids)
    rank = sorted(case_ids, key=lambda c: hashlib.sha256(f"{seed}\x1f{c}".encode()).hexdigest())
    return set(rank[:k])


def build_case(
    tokenizer, request: EditRequest, index: int, eval_cfg: EvalConfig, reference: ReferenceData | None = None,
    edited: re.Pattern | None = None, generate: bool = True,
) -> CaseItem:
    """Tokenise a request's prompts and targets (targets with a leading space, ``edits.target_ids``);
    ``edited`` (:func:`subject_pattern`) marks the neighbourhood prompts about edited subjects."""
    r = request
    where = f"record {index} (case_id {r.case_id})"
    prompts = {0: [r.text], 1: list(r.paraphrases), 2: list(r.neighborhood)}
    t_new = target_ids(tokenizer, r.target_new)
    t_true = target_ids(tokenizer, r.target_true) if r.target_true and r.target_true.strip() else None
    if r.neighborhood_answers and len(r.neighborhood_answers) != len(r.neighborhood):
        raise ValueError(
            f"{where}: field 'neighborhood_answers': {len(r.neighborhood_answers)} answers for "
            f"{len(r.neighborhood)} neighbourhood prompts"
        )
    answers = [target_ids(tokenizer, a) for a in r.neighborhood_answers]
    for a, ids in zip(r.neighborhood_answers, answers):
        if not ids:
            raise ValueError(f"{where}: field 'neighborhood_answers': {a!r} tokenises to nothing")
    flat = [p for k in (0, 1, 2) for p in prompts[k]]
    enc = tokenizer(flat, add_special_tokens=True)["input_ids"] if flat else []
    rows: list[Row] = []
    j = 0
    for k in (0, 1, 2):
        for i, _ in enumerate(prompts[k]):
            p_ids = list(enc[j])
            j += 1
            if k == 2 and answers:
                targets = [("answer", answers[i])]
            else:
                targets = [("new", t_new)] + ([("true", t_true)] if t_true is not None else [])
            rows += prompt_rows(p_ids, targets, k, i)
    skipped: dict[str, str] = {}
    if t_true is None:
        for m in ("S", "ES", "PS", "NS", "EM", "PM", "NM"):
            skipped[m] = "no target_true"
        if not answers:
            skipped["acc_neighborhood"] = "no target_true"
    if not prompts[1]:
        skipped.update({m: "no paraphrase prompts" for m in ("PS", "PM", "acc_paraphrase")})
    if not prompts[2]:
        skipped.update({m: "no neighbourhood prompts" for m in ("NS", "NM", "acc_neighborhood")})
    elif answers:
        skipped.update({m: "neighbourhood prompts have their own answers (zsRE)" for m in ("NS", "NM")})
    about_edited = frozenset(i for i, p in enumerate(prompts[2]) if edited is not None and edited.search(p))
    if "NS" in skipped:
        skipped["NSu"] = skipped["NS"]
    elif len(about_edited) == len(prompts[2]):
        skipped["NSu"] = "every neighbourhood prompt is about an edited subject"
    gen = list(r.generation_prompts[: eval_cfg.max_generation_prompts])
    if not gen and eval_cfg.generation_from_rewrite and eval_cfg.max_generation_prompts:
        gen = [r.text]  # no generation prompts of its own: generate from the filled rewrite prompt
    if not generate:
        gen = []
        skipped["GE"] = "not in the generation sample (eval.generation_cases)"
    elif not gen:
        skipped["GE"] = "no generation prompts" if eval_cfg.max_generation_prompts else "generation disabled"
    ref_texts: list[str] = []
    if reference is None:
        skipped["RS"] = "no reference data"
    elif not gen:
        skipped["RS"] = skipped["GE"]
    else:
        ref_texts = reference.texts(r.relation_id, r.target_new_id)
        if not ref_texts:
            why = "no relation_id or target_new id" if not (r.relation_id and r.target_new_id) else "no reference texts"
            skipped["RS"] = why
    return CaseItem(index, r, prompts, rows, gen, ref_texts, skipped, about_edited)


class PackedCases(Sampler[list[int]]):
    """Consecutive cases packed into batches of at most ``max_rows`` rows (at least one case each)."""

    def __init__(self, n_rows: Sequence[int], max_rows: int) -> None:
        self.batches: list[list[int]] = []
        cur: list[int] = []
        size = 0
        for i, n in enumerate(n_rows):
            if cur and size + n > max_rows:
                self.batches.append(cur)
                cur, size = [], 0
            cur.append(i)
            size += n
        if cur:
            self.batches.append(cur)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def pad(seqs: Sequence[Sequence[int]], pad_id: int, side: str) -> tuple[Tensor, Tensor, Tensor]:
    """Pad id lists: input_ids, attention_mask [batch, pos] and each row's offset [batch]."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', not {side!r}")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    offset = torch.tensor([width - len(s) if side == "left" else 0 for s in seqs], dtype=torch.long)
    for i, (s, o) in enumerate(zip(seqs, offset.tolist())):
        ids[i, o : o + len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, o : o + len(s)] = 1
    return ids, mask, offset


def is_acc_target(t: Target) -> bool:
    """The target whose token accuracy is measured: target_new on rewrite/paraphrase prompts, the
    neighbourhood answer (zsRE) or else target_true on neighbourhood prompts."""
    return t.label == "answer" or t.label == ("new" if t.kind < 2 else "true")


def collate(items: Sequence[CaseItem], pad_id: int, padding_side: str) -> dict[str, Any]:
    """Flatten the rows of many cases into one padded batch.

    Besides the model inputs it holds ``keep`` [rows, k] (the positions whose logits are read, per
    row), per target its row and slots in ``keep`` (``target_row`` [targets], ``target_slot``
    [targets, t_max]) and ids (``target_ids``, -100 past its end), and index tensors over targets
    that pair target_new with target_true and pick the accuracy targets.
    """
    rows = [(c, r) for c in items for r in c.rows]
    ids, mask, offset = pad([r.ids for _, r in rows], pad_id, padding_side)
    keeps = [sorted({t.start + j for t in r.targets for j in range(len(t.ids))}) or [0] for _, r in rows]
    keep = torch.zeros((len(rows), max(map(len, keeps))), dtype=torch.long)
    for i, k in enumerate(keeps):
        keep[i, : len(k)] = torch.tensor(k) + offset[i]
    targets = [(c, i, t) for i, (c, r) in enumerate(rows) for t in r.targets]
    t_max = max(len(t.ids) for _, _, t in targets)
    slot = torch.zeros((len(targets), t_max), dtype=torch.long)
    tgt = torch.full((len(targets), t_max), -100, dtype=torch.long)
    for n, (_, i, t) in enumerate(targets):
        slot[n, : len(t.ids)] = torch.tensor([keeps[i].index(t.start + j) for j in range(len(t.ids))])
        tgt[n, : len(t.ids)] = torch.tensor(t.ids)
    where = {(c.index, t.kind, t.prompt_index, t.label): n for n, (c, _, t) in enumerate(targets)}
    pairs = [
        (case, kind, n, where[(case, kind, p, "true")], p)
        for (case, kind, p, label), n in where.items()
        if label == "new" and (case, kind, p, "true") in where
    ]
    edited = {(c.index, p) for c in items for p in c.about_edited}
    acc = [(c.index, t.kind, n) for n, (c, _, t) in enumerate(targets) if is_acc_target(t)]
    long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return {
        "case_ids": [c.index for c in items],
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": position_ids(mask),
        "keep": keep,
        "target_row": long([i for _, i, _ in targets]),
        "target_slot": slot,
        "target_ids": tgt,
        "pair_case": long([p[0] for p in pairs]),
        "pair_kind": long([p[1] for p in pairs]),
        "pair_new": long([p[2] for p in pairs]),
        "pair_true": long([p[3] for p in pairs]),
        "pair_free": torch.tensor([p[1] == 2 and (p[0], p[4]) not in edited for p in pairs], dtype=torch.bool),
        "acc_case": long([a[0] for a in acc]),
        "acc_kind": long([a[1] for a in acc]),
        "acc_target": long([a[2] for a in acc]),
    }


