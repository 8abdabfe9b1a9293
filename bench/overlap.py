"""How much of an edit file's neighbourhood is edited by the file itself (no model needed).

    .venv/bin/python -m bench.overlap [--edits ../shared/data/counterfact_known_dev.json]

Counts the neighbourhood prompts that name a subject edited by another case of the file (as NSu finds
them, `memit_pl.stages.evaluate.subject_pattern`), those whose named subject shares the case's relation and true
object, and those whose named subject is edited to the case's own new object in the same relation: a
perfect editor fails Neighborhood Success there. ``forced_ns_points`` is that share averaged per case (the
way NS averages), i.e. the NS points a perfect editor loses on the whole file edited in one batch.

With ``--cases`` (the ``cases.jsonl`` of ``memit-pl evaluate`` on the unedited model, all cases of the same
file) it also scores that perfect editor exactly: every neighbourhood prompt keeps the unedited model's
answer except the forced ones, which fail. ``perfect_editor_ns`` is that NS, ``goal_ns`` the unedited NS
less 10 points, and ``slack`` their difference: the NS points left for every other change an edit makes.

    memit-pl evaluate --config configs/smollm2-135m.yaml --edits EDITS --eval.max_generation_prompts 0 --out OUT
    .venv/bin/python -m bench.overlap --cases OUT/cases.jsonl

Writes bench/results/overlap.json (the schema of bench/record.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import record  # noqa: E402
from memit_pl.data.edits import load_edits  # noqa: E402
from memit_pl.stages.evaluate import subject_pattern  # noqa: E402


def perfect_editor(cases_jsonl: str, forced_at: dict[str, set[int]]) -> dict:
    """NS of the unedited model and of a perfect editor (the forced prompts fail, every other prompt keeps
    the unedited answer) from an unedited evaluation's per-case records, averaged per case as NS is."""
    unedited, perfect = [], []
    for line in Path(cases_jsonl).read_text().splitlines():
        row = json.loads(line)
        case = next(v for k, v in row.items() if k != "case_id")
        if case.get("NS") is None or row["case_id"] not in forced_at:
            continue
        ok = [p["nll_true"] < p["nll_new"] for p in case["prompts"]["neighborhood"]]
        unedited.append(sum(ok) / len(ok))
        perfect.append(sum(o for j, o in enumerate(ok) if j not in forced_at[row["case_id"]]) / len(ok))
    if not unedited:
        raise SystemExit(f"{cases_jsonl}: no case with neighbourhood records matches the edits file")
    ns, best = 100 * sum(unedited) / len(unedited), 100 * sum(perfect) / len(perfect)
    return {"scored_cases": len(unedited), "unedited_ns": round(ns, 2), "perfect_editor_ns": round(best, 2),
            "goal_ns": round(ns - 10, 2), "slack": round(best - (ns - 10), 2)}


def count(requests) -> tuple[dict, dict]:
    """(the counts above, {case_id: indices of its forced neighbourhood prompts})."""
    by_subject = defaultdict(list)
    for r in requests:
        by_subject[r.subject].append(r)
    pattern = subject_pattern(by_subject)
    prompts = named = same_true = forced = 0
    forced_share = []
    forced_at: dict = {}
    for r in requests:
        if not r.neighborhood or not r.target_true:
            continue
        forced_at[r.case_id] = set()
        for j, p in enumerate(r.neighborhood):
            prompts += 1
            m = pattern.search(p) if pattern is not None else None
            if not m:
                continue
            named += 1
            others = by_subject[m.group(0)]
            same_true += any(o.relation_id == r.relation_id and o.target_true == r.target_true for o in others)
            if any(o.relation_id == r.relation_id and o.target_new == r.target_new for o in others):
                forced_at[r.case_id].add(j)
        forced += len(forced_at[r.case_id])
        forced_share.append(len(forced_at[r.case_id]) / len(r.neighborhood))
    counts = {"cases": len(forced_share), "neighbourhood_prompts": prompts, "name_an_edited_subject": named,
              "same_relation_and_true_object": same_true, "edited_to_the_cases_new_object": forced,
              "forced_ns_points": round(100 * sum(forced_share) / max(len(forced_share), 1), 2)}
    return counts, forced_at


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--edits", default=str(ROOT.parent / "shared/data/counterfact_known_dev.json"))
    ap.add_argument("--out", default=str(ROOT / "bench/results/overlap.json"))
    ap.add_argument("--cases", help="cases.jsonl of `memit-pl evaluate` on the unedited model (optional)")
    args = ap.parse_args()
    record.preflight("bench.overlap", args)
    counts, forced_at = count(load_edits(args.edits))
    result = {"edits": args.edits, **counts}
    if args.cases:
        result.update(perfect_editor(args.cases, forced_at))
    rec = record.record("overlap", result, args=args, config={}, compute_dtype="none (no model)")
    record.write(args.out, rec)
    print(json.dumps(rec, indent=2))


if __name__ == "__main__":
    main()
