"""Evaluation: CounterFact / zsRE metrics of a (possibly edited) model, many cases per padded batch.

Every prompt of every case in a batch is flattened into teacher-forced rows ``prompt + target``
(targets: target_new, target_true, or a zsRE neighbourhood answer; single-token targets share their
prompt's row, the reference runs one row per target); one forward pass scores them all, projecting to
the vocabulary only the positions that predict target tokens. Generation Entropy uses
continuations of the cases' generation prompts (top-k sampled as the reference, or greedy), batched the
same way.

Entry point for other stages (e.g. a sweep on an already-edited model)::

    result = evaluate_requests(model, tokenizer, requests, EvalConfig())
    result["metrics"]["S"], result["cases"][0]["ES"]

Reports (``metrics.json``, ``cases.jsonl``, ``report.md``, PNG plots) live in
:mod:`memit_pl.stages.eval_report`.
"""

from __future__ import annotations

import logging
import math
import re
import time
import unicodedata
import warnings
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler
from typing_extensions import override

from memit_pl.config import EvalConfig, TrainerConfig
from memit_pl.data.edits import EditRequest, target_ids
from memit_pl.metrics import (
    KINDS,
    EditingScore,
    GenerationEntropy,
    PromptMagnitude,
    PromptSuccess,
    ReferenceData,
    ReferenceScore,
    TokenAccuracy,
)
from memit_pl.metrics.functional import (
    _generation_entropy_update,
    case_means,
    mean_nll,
    prob_margin,
    prob_success,
    target_token_stats,
    tfidf_cosine,
)
from memit_pl.modeling.loading import cache_kwarg, input_device, spread_over_devices
from memit_pl.modeling.tokens import position_ids
from memit_pl.stages import runtime

log = logging.getLogger(__name__)

SCALE = 100.0
"""Reported metrics are multiplied by this, as in the paper's tables (the reference's summarize.py
multiplies every metric, Generation Entropy included, by 100)."""

METRICS = ("S", "ES", "PS", "NS", "NSu", "EM", "PM", "NM", "GE", "RS", "acc_rewrite", "acc_paraphrase",
           "acc_neighborhood")
"""Keys of ``result["metrics"]``: Editing Score, success rates, magnitudes, Generation Entropy,
Reference Score, top-1 token accuracies (zsRE's efficacy, paraphrase and specificity). ``NSu`` is
Neighborhood Success on the neighbourhood prompts whose subject is not itself edited (see
:func:`subject_pattern`)."""

_SUCCESS = {0: ("ES", "EM", "new"), 1: ("PS", "PM", "new"), 2: ("NS", "NM", "true")}


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


def build_case(
    tokenizer, request: EditRequest, index: int, eval_cfg: EvalConfig, reference: ReferenceData | None = None,
    edited: re.Pattern | None = None,
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
    if not gen:
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


def _is_acc_target(t: Target) -> bool:
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
    acc = [(c.index, t.kind, n) for n, (c, _, t) in enumerate(targets) if _is_acc_target(t)]
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


# ---------------------------------------------------------------------------------------------
# Model calls


def _keeps_row_positions() -> bool:
    """Whether this transformers version takes per-row ``logits_to_keep`` positions ([batch, n])."""
    try:
        from transformers.modeling_utils import slice_logits_to_keep  # noqa: F401
    except ImportError:
        return False
    return True


def target_logits(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """Logits at the positions that predict each target token: [targets, t_max, vocab]."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    keep = batch["keep"]
    logits = None
    if _keeps_row_positions():  # the vocabulary projection only where needed
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
        if logits.shape[:2] != keep.shape:
            logits = None
    if logits is None:
        full = model(**inputs, use_cache=False).logits
        logits = full.gather(1, keep.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
    return logits[batch["target_row"].unsqueeze(-1), batch["target_slot"]]


def prompt_seed(seed: int, prompt: str) -> int:
    """The sampling seed of one prompt: a function of the prompt's text only, so a prompt draws the same
    random numbers in every batch, in every order, and in the edited and the unedited model alike."""
    return (seed * 1_000_003 + zlib.crc32(prompt.encode("utf-8"))) % (2**63)


def generate(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int, top_k: int = 1,
             seed: int = 0) -> list[str]:
    """Continuations of ``prompts`` (prompt included, as the reference's texts): greedy for ``top_k`` 1,
    else sampled from the ``top_k`` most likely tokens as the reference's ``generate_fast`` (top-k 5).

    Batched with left padding and explicit positions; no early stop at EOS (the reference generates to a
    fixed length). Each prompt samples with its own generator seeded by :func:`prompt_seed`, so its text
    does not depend on the batch it lands in. Special tokens are dropped when decoding; the text is
    NFKD-normalised with blank lines joined.
    """
    enc = tokenizer(list(prompts), add_special_tokens=True)["input_ids"] if prompts else []
    texts = []
    for e, n in zip(enc, generate_ids(model, tokenizer, enc, prompts, max_new_tokens, top_k, seed)):
        text = tokenizer.decode(list(e) + n, skip_special_tokens=True)
        texts.append(unicodedata.normalize("NFKD", text).replace("\n\n", " "))
    return texts


@torch.no_grad()
def generate_ids(model: nn.Module, tokenizer, enc: Sequence[Sequence[int]], prompts: Sequence[str],
                 max_new_tokens: int, top_k: int = 1, seed: int = 0) -> list[list[int]]:
    """The new token ids of :func:`generate` for tokenised prompts ``enc`` (``prompts``: their texts,
    which seed the sampling)."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1 (1 is greedy), got {top_k}")
    if not enc:
        return []
    dev = input_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask, _ = pad(enc, pad_id, "left")
    ids, mask = ids.to(dev), mask.to(dev)
    pos = position_ids(mask)
    gens = [torch.Generator().manual_seed(prompt_seed(seed, p)) for p in prompts] if top_k > 1 else []
    out: list[Tensor] = []
    past = None
    step_ids, step_mask, step_pos = ids, mask, pos
    cache_arg = cache_kwarg(model)
    for _ in range(max_new_tokens):
        res = model(input_ids=step_ids, attention_mask=step_mask, position_ids=step_pos,
                    use_cache=True, logits_to_keep=1, **{cache_arg: past})
        past = getattr(res, cache_arg)
        logits = res.logits[:, -1]
        if top_k == 1:
            nxt = logits.argmax(-1)
        else:
            top, idx = logits.float().topk(min(top_k, logits.shape[-1]), dim=-1)
            cdf = top.softmax(-1).cumsum(-1).cpu()
            u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in gens]).to(cdf.dtype)
            pick = (cdf < u.unsqueeze(-1)).sum(-1).clamp(max=top.shape[-1] - 1)
            nxt = idx.gather(-1, pick.to(idx.device).unsqueeze(-1)).squeeze(-1)
        out.append(nxt)
        step_ids = nxt.unsqueeze(-1)
        step_mask = torch.cat([step_mask, torch.ones_like(step_ids)], dim=1)
        step_pos = step_pos[:, -1:] + 1
    new = torch.stack(out, dim=1).cpu() if out else torch.zeros((len(enc), 0), dtype=torch.long)
    return new.tolist()


# ---------------------------------------------------------------------------------------------
# The Lightning system


def _by_case(ids: Tensor, values: Tensor) -> dict[int, float]:
    return dict(zip(ids.tolist(), values.tolist()))


def _value(x: Tensor | float) -> float | None:
    v = float(x)
    return None if math.isnan(v) else v


class EvalModule(L.LightningModule):
    """Scores batches of packed cases (``predict_step``), updating one metric object per metric and
    returning per-case records; ``compute_metrics`` gives the aggregates."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        items: Sequence[CaseItem],
        eval_cfg: EvalConfig,
        reference: ReferenceData | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.items = list(items)
        self.eval_cfg = eval_cfg
        m: dict[str, nn.Module] = {"S": EditingScore()}
        for _k, (succ, mag, correct) in _SUCCESS.items():
            m[succ] = PromptSuccess(correct)
            m[mag] = PromptMagnitude(correct)
        for kind in KINDS:
            m[f"acc_{kind}"] = TokenAccuracy()
        m["NSu"] = PromptSuccess("true")
        m["GE"] = GenerationEntropy()
        if reference is not None:
            m["RS"] = ReferenceScore(reference.vocab, reference.idf)
        self.metrics = nn.ModuleDict(m)

    @override
    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0) -> list[dict[str, Any]]:
        lp, ok, tmask = target_token_stats(target_logits(self.model, batch), batch["target_ids"])
        nll = mean_nll(lp, tmask)
        pc, pk, pn, pt = (batch[k] for k in ("pair_case", "pair_kind", "pair_new", "pair_true"))
        ac, ak, ar = batch["acc_case"], batch["acc_kind"], batch["acc_target"]
        per_case: dict[str, dict[int, float]] = {}
        if pn.numel():
            self.metrics["S"].update(nll[pn], nll[pt], pc, pk)
        for k, (succ, mag, correct) in _SUCCESS.items():
            sel = pk == k
            if sel.any():
                new, true, case = nll[pn[sel]], nll[pt[sel]], pc[sel]
                self.metrics[succ].update(new, true, case)
                self.metrics[mag].update(new, true, case)
                per_case[succ] = _by_case(*case_means(prob_success(new, true, correct).double(), case))
                per_case[mag] = _by_case(*case_means(prob_margin(new, true, correct), case))
            sel = ak == k
            if sel.any():
                tg, case = ar[sel], ac[sel]
                self.metrics[f"acc_{KINDS[k]}"].update(ok[tg], tmask[tg], case)
                flat_case = case.unsqueeze(-1).expand_as(tmask[tg])[tmask[tg]]
                per_case[f"acc_{KINDS[k]}"] = _by_case(*case_means(ok[tg][tmask[tg]].double(), flat_case))
        sel = batch["pair_free"]
        if sel.any():
            new, true, case = nll[pn[sel]], nll[pt[sel]], pc[sel]
            self.metrics["NSu"].update(new, true, case)
            per_case["NSu"] = _by_case(*case_means(prob_success(new, true, "true").double(), case))
        items = [self.items[i] for i in batch["case_ids"]]
        texts = self._generate(items)
        records = []
        at = 0
        nll_l, acc_l = nll.tolist(), (ok.sum(-1).double() / tmask.sum(-1)).tolist()
        for c, gen in zip(items, texts):
            n = len(c.targets)
            records.append(self._record(c, nll_l[at : at + n], acc_l[at : at + n], per_case, gen))
            at += n
        return records

    def _generate(self, items: Sequence[CaseItem]) -> list[list[str]]:
        prompts = [p for c in items for p in c.generation_prompts]
        cfg = self.eval_cfg
        flat = generate(self.model, self.tokenizer, prompts, cfg.generation_length, cfg.generation_top_k,
                        cfg.generation_seed)
        texts, i = [], 0
        for c in items:
            texts.append(flat[i : i + len(c.generation_prompts)])
            i += len(c.generation_prompts)
        with_gen = [t for t in texts if t]
        if with_gen:
            self.metrics["GE"].update(with_gen)
        if "RS" in self.metrics:
            pairs = [(t, c.reference_texts) for c, t in zip(items, texts) if t and c.reference_texts]
            if pairs:
                self.metrics["RS"].update([p[0] for p in pairs], [p[1] for p in pairs])
        return texts

    def _record(self, c: CaseItem, nll: list[float], acc: list[float], per_case: dict, gen: list[str]) -> dict:
        r = c.request
        prompts: dict[str, list[dict]] = {k: [{"prompt": p} for p in c.prompts[i]] for i, k in enumerate(KINDS)}
        for t, v, a in zip(c.targets, nll, acc):
            entry = prompts[KINDS[t.kind]][t.prompt_index]
            entry[f"nll_{t.label}"] = v
            if _is_acc_target(t):
                entry["token_acc"] = a
        for i in c.about_edited:
            prompts["neighborhood"][i]["about_edited_subject"] = True
        rec: dict[str, Any] = {
            "case_id": r.case_id,
            "relation_id": r.relation_id,
            "subject": r.subject,
            "target_new": r.target_new,
            "target_true": r.target_true,
        }
        for m in METRICS:
            rec[m] = None if m in c.skipped else per_case.get(m, {}).get(c.index)
        rec["S"] = None  # a harmonic mean of rates over cases; not defined per case
        if gen:
            total, _ = _generation_entropy_update([gen])
            rec["GE"] = float(total)
        if gen and c.reference_texts and "RS" in self.metrics:
            m = self.metrics["RS"]
            rec["RS"] = tfidf_cosine(" ".join(gen), " ".join(c.reference_texts), m.vocab, m.idf)
        rec["prompts"] = prompts
        rec["generations"] = gen
        rec["skipped"] = dict(c.skipped)
        return rec

    def compute_metrics(self) -> dict[str, float | None]:
        """Aggregated metrics (× :data:`SCALE`; ``None`` where no case contributed)."""
        out: dict[str, float | None] = {}
        for m in METRICS:
            if m in self.metrics and self.metrics[m].update_count:
                v = _value(self.metrics[m].compute())
                out[m] = None if v is None else v * SCALE
            else:
                out[m] = None
        return out

    def counts(self) -> dict[str, int]:
        """How many cases each metric averages over."""
        out = {m: int(self.metrics[m].count) for m in METRICS if m in self.metrics and m != "S"}
        out["S"] = int(self.metrics["S"].count.min())
        return out


# ---------------------------------------------------------------------------------------------
# Entry point


def evaluate_requests(
    model: nn.Module,
    tokenizer,
    requests: Sequence[EditRequest],
    eval_cfg: EvalConfig | None = None,
    trainer_cfg: TrainerConfig | None = None,
    *,
    reference: ReferenceData | None = None,
    per_record: bool = False,
    padding_side: str = "left",
    edited_subjects: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` as it is now on ``requests``; the weights are not touched.

    Args:
        per_record: one case per forward pass (as the reference), instead of packing cases into
            batches of ``eval_cfg.batch_size`` rows.
        padding_side: how rows are padded (the results do not depend on it).
        edited_subjects: the subjects edited in the batch whose effect is measured; NSu leaves out the
            neighbourhood prompts that name one. Default: the subjects of ``requests`` (the evaluated
            cases are the edited ones). Pass the same subjects for the unedited model to compare.

    Returns:
        ``{"metrics": {name: value × 100 or None}, "counts": {name: cases averaged},
        "skipped": {name: {reason: n_cases}}, "cases": [per-case records], "n_cases", "seconds"}``;
        metric names are :data:`METRICS`.
    """
    eval_cfg = eval_cfg or EvalConfig()
    trainer_cfg = trainer_cfg or TrainerConfig(enable_progress_bar=False)
    if not requests:
        raise ValueError("no edit requests to evaluate")
    world = trainer_cfg.num_nodes * (trainer_cfg.devices if isinstance(trainer_cfg.devices, int) else 1)
    if world > 1:
        raise ValueError("evaluation runs on one device; set trainer.devices=1 and trainer.num_nodes=1")
    start = time.perf_counter()
    edited = subject_pattern(edited_subjects if edited_subjects is not None else (r.subject for r in requests))
    items = [build_case(tokenizer, r, i, eval_cfg, reference, edited) for i, r in enumerate(requests)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sampler = PackedCases([len(c.rows) for c in items], 1 if per_record else eval_cfg.batch_size)
    loader = DataLoader(
        items, batch_sampler=sampler, collate_fn=lambda b: collate(b, pad_id, padding_side), num_workers=0
    )
    module = EvalModule(model, tokenizer, items, eval_cfg, reference)
    was_training = model.training
    if spread_over_devices(model):  # placed by accelerate: Lightning must not move it
        module.metrics.to(input_device(model))
        with torch.inference_mode():
            batches = [module.predict_step(b, i) for i, b in runtime.plain_batches(model, loader)]
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*custom batch sampler.*")  # PackedCases yields every case
            batches = runtime.predict(runtime.on_model_device(trainer_cfg, model), module, dataloaders=loader,
                                      return_predictions=True)
    model.train(was_training)
    cases = [rec for b in batches for rec in b]
    skipped: dict[str, dict[str, int]] = {}
    for c in items:
        for m, why in c.skipped.items():
            skipped.setdefault(m, {}).setdefault(why, 0)
            skipped[m][why] += 1
    seconds = time.perf_counter() - start
    metrics = module.compute_metrics()
    log.info("evaluated %d cases in %.1fs: %s", len(items), seconds,
             ", ".join(f"{k} {v:.1f}" for k, v in metrics.items() if v is not None))
    return {
        "metrics": metrics,
        "counts": module.counts(),
        "skipped": skipped,
        "cases": cases,
        "n_cases": len(items),
        "seconds": seconds,
    }
