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
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from typing_extensions import override

from memit_pl.config import EvalConfig, TrainerConfig
from memit_pl.data.edits import EditRequest
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
from memit_pl.modeling.loading import input_device, spread_over_devices
from memit_pl.stages import runtime
from memit_pl.stages.eval_batch import (  # noqa: F401  (re-exported: the batch layout is part of this stage's API)
    SCALE,
    CaseItem,
    PackedCases,
    Row,
    Target,
    build_case,
    collate,
    generation_sample,
    is_acc_target,
    nsu_of_records,
    pad,
    prompt_rows,
    subject_pattern,
)
from memit_pl.stages.generation import generate, generate_ids, prompt_seed  # noqa: F401

log = logging.getLogger(__name__)


METRICS = ("S", "ES", "PS", "NS", "NSu", "EM", "PM", "NM", "GE", "RS", "acc_rewrite", "acc_paraphrase",
           "acc_neighborhood")
"""Keys of ``result["metrics"]``: Editing Score, success rates, magnitudes, Generation Entropy,
Reference Score, top-1 token accuracies (zsRE's efficacy, paraphrase and specificity). ``NSu`` is
Neighborhood Success on the neighbourhood prompts whose subject is not itself edited (see
:func:`subject_pattern`)."""

_SUCCESS = {0: ("ES", "EM", "new"), 1: ("PS", "PM", "new"), 2: ("NS", "NM", "true")}


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
    """Logits at the positions that predict each target token: [targets, t_max, vocab] (padding slots too).

    The reference layout, kept for models without a ``ModelSpec``; :func:`target_scores` projects only
    the real target tokens and is what the evaluation uses."""
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


SCORE_CHUNK = 2**26
"""At most this many logits (rows x vocabulary) exist at once while target tokens are scored: 256 MB in
fp32, whatever the vocabulary (262,144 for Gemma 3) and however long the answers (zsRE's)."""


def target_scores(model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per target token [targets, t_max]: log-probability, whether it is the argmax, whether it exists, and
    the argmax token (-1 where absent); as :func:`target_token_stats` of :func:`target_logits`.

    The final norm's output is read with a hook (the forward stops there) and the LM head runs only on
    the positions of real target tokens, in chunks of :data:`SCORE_CHUNK` logits: no [targets, t_max,
    vocab] tensor is ever built (zsRE's multi-token answers padded it to gigabytes). Models without a
    ``ModelSpec`` take the reference layout."""
    from memit_pl.modeling.hooks import trace
    from memit_pl.modeling.spec import UnknownModelFamily, get_spec
    from memit_pl.modeling.tail import Tail

    tgt = batch["target_ids"]
    mask = tgt != -100
    try:
        spec = get_spec(model)
    except UnknownModelFamily:
        logits = target_logits(model, batch)
        lp, ok, mask = target_token_stats(logits, tgt)
        return lp, ok, mask, logits.argmax(-1).masked_fill(~mask, -1)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    name = spec.name("final_norm")
    with trace(model, [name], stop=True) as tr:
        model(**inputs, use_cache=False)
    normed = tr[name].output  # [rows, width, d_model], on the last device of a model spread over several
    rows = batch["target_row"].unsqueeze(-1).expand_as(tgt)[mask].to(normed.device)
    pos = batch["keep"][batch["target_row"].unsqueeze(-1), batch["target_slot"]][mask].to(normed.device)
    ids = tgt[mask]
    vocab = spec.module(model, "lm_head").weight.shape[0]
    step = max(1, SCORE_CHUNK // vocab)
    lp_f, ok_f, top_f = [], [], []
    for i in range(0, len(ids), step):
        logits = Tail.logits(model, spec, normed[rows[i : i + step], pos[i : i + step]]).float()
        want = ids[i : i + step].to(logits.device)
        lp_f.append(torch.log_softmax(logits, dim=-1).gather(-1, want.unsqueeze(-1)).squeeze(-1))
        top = logits.argmax(-1)
        ok_f.append(top == want)
        top_f.append(top)
    dev = tgt.device
    lp = torch.zeros(tgt.shape, dtype=torch.float32, device=dev)
    ok = torch.zeros(tgt.shape, dtype=torch.bool, device=dev)
    top = torch.full(tgt.shape, -1, dtype=torch.long, device=dev)
    if len(ids):
        lp[mask] = torch.cat(lp_f).to(dev)
        ok[mask] = torch.cat(ok_f).to(dev)
        top[mask] = torch.cat(top_f).to(dev)
    return lp, ok, mask, top


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
        lp, ok, tmask, top = target_scores(self.model, batch)  # top: EasyEdit's Locality compares these
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
        top_l = [[i for i in row if i >= 0] for row in top.tolist()]
        for c, gen in zip(items, texts):
            n = len(c.targets)
            records.append(self._record(c, nll_l[at : at + n], acc_l[at : at + n], per_case, gen, top_l[at : at + n]))
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

    def _record(self, c: CaseItem, nll: list[float], acc: list[float], per_case: dict, gen: list[str],
                top: list[list[int]]) -> dict:
        r = c.request
        prompts: dict[str, list[dict]] = {k: [{"prompt": p} for p in c.prompts[i]] for i, k in enumerate(KINDS)}
        for t, v, a, ids in zip(c.targets, nll, acc, top):
            entry = prompts[KINDS[t.kind]][t.prompt_index]
            entry[f"nll_{t.label}"] = v
            if is_acc_target(t):
                entry["token_acc"] = a
                if t.kind == 2:  # the argmax tokens, teacher-forced on the answer (EasyEdit's Locality)
                    entry["argmax"] = ids
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
    sample = generation_sample([r.case_id for r in requests], eval_cfg.generation_cases, eval_cfg.generation_seed)
    items = [build_case(tokenizer, r, i, eval_cfg, reference, edited, r.case_id in sample) for i, r in enumerate(requests)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sampler = PackedCases([len(c.rows) for c in items], 1 if per_record else eval_cfg.batch_size)
    loader = DataLoader(
        items, batch_sampler=sampler, collate_fn=lambda b: collate(b, pad_id, padding_side), num_workers=0
    )
    module = EvalModule(model, tokenizer, items, eval_cfg, reference)
    was_training = model.training
    if spread_over_devices(model):  # placed by accelerate: Lightning must not move it
        module.metrics.to(input_device(model))
        with torch.inference_mode(), runtime.plain_precision(model, trainer_cfg):
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
