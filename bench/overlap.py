"""How much of an edit file's neighbourhood is edited by the file itself (no model needed).

    .venv/bin/python bench/overlap.py [--edits ../shared/data/counterfact_known_dev.json]

Counts the neighbourhood prompts that name a subject edited by another case of the file (as NSu finds
them, `memit_pl.evaluate.subject_pattern`), those whose named subject shares the case's relation and true
object, and those whose named subject is edited to the case's own new object in the same relation: a
perfect editor fails Neighborhood Success there. ``forced_ns_points`` is that share averaged per case (the
way NS averages), i.e. the NS points a perfect editor loses on the whole file edited in one batch.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memit_pl.edits import load_edits  # noqa: E402
from memit_pl.evaluate import subject_pattern  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--edits", default=str(ROOT.parent / "shared/data/counterfact_known_dev.json"))
    ap.add_argument("--out", default=str(ROOT / "bench/results/overlap.json"))
    args = ap.parse_args()
    requests = load_edits(args.edits)
    by_subject = defaultdict(list)
    for r in requests:
        by_subject[r.subject].append(r)
    pattern = subject_pattern(by_subject)
    prompts = named = same_true = forced = 0
    forced_share = []
    for r in requests:
        if not r.neighborhood or not r.target_true:
            continue
        f = 0
        for p in r.neighborhood:
            prompts += 1
            m = pattern.search(p) if pattern is not None else None
            if not m:
                continue
            named += 1
            others = by_subject[m.group(0)]
            same_true += any(o.relation_id == r.relation_id and o.target_true == r.target_true for o in others)
            if any(o.relation_id == r.relation_id and o.target_new == r.target_new for o in others):
                f += 1
        forced += f
        forced_share.append(f / len(r.neighborhood))
    result = {"edits": args.edits, "cases": len(forced_share), "neighbourhood_prompts": prompts,
              "name_an_edited_subject": named, "same_relation_and_true_object": same_true,
              "edited_to_the_cases_new_object": forced,
              "forced_ns_points": round(100 * sum(forced_share) / len(forced_share), 2),
              "command": "python bench/overlap.py " + " ".join(sys.argv[1:])}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
