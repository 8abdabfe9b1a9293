"""Where Neighborhood Success goes when SmolLM2 takes all 584 edits at once: which neighbourhood prompts flip.

    .venv/bin/python -m bench.experiments.e2026_11_25_ns_loss.ns_loss --z_dir RUN/z [--config configs/smollm2-135m.yaml]

A neighbourhood prompt succeeds when P(true object) > P(new object), i.e. nll_true < nll_new. The script
scores every neighbourhood prompt of the 584 cases on the unedited model, after editing all 584 in one
batch, and after editing only `memit-pl tune`'s seed-0 tuning half (292 cases, scored on those cases).
Of the prompts that succeed unedited it reports the fraction that fail after the edit ("flip rate"):

- by the unedited margin nll_new − nll_true (how sure the model was of the true object);
- by the case's co-edits: the other cases in the batch with the same relation and the same new object;
- for the tuning half, under 292 and under 584 edits: the same prompts, more co-edits;
- by whether the prompt names a subject edited in the same batch (whose P(true) that subject's own edit
  is meant to lower; NSu leaves those prompts out).

Layers, λ and everything else from ``--config``; z from ``--z_dir`` (the 584-edit `edit` run's store, so no z
is optimised). Generation Entropy is not computed (it plays no part here).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from bench.experiments.common import command, load, parser, save, without_generation  # noqa: E402
from memit_pl.experiments.tune import split  # noqa: E402
from memit_pl.stages.eval_report import aggregate  # noqa: E402
from memit_pl.stages.evaluate import nsu_of_records  # noqa: E402

MARGINS = [(0.0, 0.5), (0.5, 1.0), (1.0, 2.0), (2.0, 4.0), (4.0, float("inf"))]
CO_EDITS = [(0, 0), (1, 1), (2, 3), (4, 10**9)]


def neighbour_scores(result: dict) -> dict[tuple[str, int], tuple[float, float]]:
    """{(case_id, prompt index): (nll_new, nll_true)} for every neighbourhood prompt."""
    return {(c["case_id"], i): (p["nll_new"], p["nll_true"])
            for c in result["cases"] for i, p in enumerate(c["prompts"]["neighborhood"])}


def about_edited(result: dict) -> set[tuple[str, int]]:
    """The neighbourhood prompts that name a subject edited in the evaluated batch."""
    return {(c["case_id"], i) for c in result["cases"] for i, p in enumerate(c["prompts"]["neighborhood"])
            if p.get("about_edited_subject")}


def co_edits(requests) -> dict[str, int]:
    """case_id → how many other cases share its relation and new object."""
    key = Counter((r.relation_id, r.target_new) for r in requests)
    return {r.case_id: key[(r.relation_id, r.target_new)] - 1 for r in requests}


def flip_table(base: dict, edited: dict, group, bins) -> list[dict]:
    """Flip rate of the unedited successes in ``edited``, grouped by ``group(key, margin)`` into ``bins``."""
    rows = []
    for lo, hi in bins:
        keys = [k for k, (new, true) in base.items() if k in edited and true < new and lo <= group(k, new - true) <= hi]
        flips = sum(1 for k in keys if edited[k][1] >= edited[k][0])
        rows.append({"bin": f"{lo:g}-{hi:g}" if hi < 10**8 else f">={lo:g}", "prompts": len(keys),
                     "flipped": flips, "flip_rate": round(100 * flips / len(keys), 1) if keys else None})
    return rows


def ns(result: dict, case_ids=None) -> float:
    """The NS of ``result``'s records (of the cases in ``case_ids``, default all), as the metric averages it."""
    cases = [c for c in result["cases"] if case_ids is None or c["case_id"] in case_ids]
    return round(aggregate(cases)["NS"], 2)


def main() -> None:
    ap = parser(__doc__, "ns_loss")
    args = ap.parse_args()
    memit, ed, requests = load(args)
    without_generation(ed)
    half, _ = split(requests, 0.5, 0)
    store = ed.zs(requests, memit)
    unedited = ed.evaluate(requests)
    base = neighbour_scores(unedited)
    res584 = ed.edited_evaluation(requests, store, memit, "n584")
    res292 = ed.edited_evaluation(half, store, memit, "n292")
    all584, only292 = neighbour_scores(res584), neighbour_scores(res292)
    about584, about292 = about_edited(res584), about_edited(res292)
    yes_no = [(0, 0), (1, 1)]
    by_about = {"584": flip_table(base, all584, lambda k, m: int(k in about584), yes_no),
                "292": flip_table(base, only292, lambda k, m: int(k in about292), yes_no)}
    co584, co292 = co_edits(requests), co_edits(half)
    by_margin = {"584": flip_table(base, all584, lambda k, m: m, MARGINS),
                 "292": flip_table(base, only292, lambda k, m: m, MARGINS)}
    by_co = {"584": flip_table(base, all584, lambda k, m: co584[k[0]], CO_EDITS),
             "292": flip_table(base, only292, lambda k, m: co292[k[0]], CO_EDITS)}
    # The tuning half's prompts under 584 edits, binned by their co-edits in the 292-edit batch, so each
    # bin holds the same prompts under both batches.
    half_under_584 = {k: v for k, v in all584.items() if k[0] in co292}
    same_prompts = {"292": by_co["292"], "584": flip_table(base, half_under_584, lambda k, m: co292[k[0]], CO_EDITS)}
    result = {
        "layers": memit.layers, "lam": memit.mom2_update_weight,
        "NS": {"unedited_584": ns(unedited), "edited_584": ns(res584),
               "unedited_half": ns(unedited, co292), "half_edited_292": ns(res292),
               "half_edited_584": ns(res584, co292)},
        "NSu": {"unedited_584": round(nsu_of_records(unedited["cases"], [r.subject for r in requests]), 2),
                "edited_584": round(res584["metrics"]["NSu"], 2),
                "unedited_half": round(nsu_of_records([c for c in unedited["cases"] if c["case_id"] in co292],
                                                      [r.subject for r in half]), 2),
                "half_edited_292": round(res292["metrics"]["NSu"], 2)},
        "flip_by_unedited_margin": by_margin, "flip_by_co_edits": by_co,
        "half_flip_by_co_edits_in_292": same_prompts,
        "flip_by_names_an_edited_subject": by_about,
        # the same tables over the prompts that name no edited subject (those NSu scores)
        "free_flip_by_unedited_margin": {
            "584": flip_table(base, all584, lambda k, m: -1 if k in about584 else m, MARGINS),
            "292": flip_table(base, only292, lambda k, m: -1 if k in about292 else m, MARGINS)},
        "free_flip_by_co_edits": {
            "584": flip_table(base, all584, lambda k, m: -1 if k in about584 else co584[k[0]], CO_EDITS),
            "292": flip_table(base, only292, lambda k, m: -1 if k in about292 else co292[k[0]], CO_EDITS)},
        "command": command(__file__),
    }
    save(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
