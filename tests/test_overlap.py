"""bench/overlap.py: the neighbourhood prompts an edit file edits itself, and the perfect editor's NS,
against hand counts."""

import importlib.util
import json
from pathlib import Path

from memit_pl.data.edits import EditRequest

ROOT = Path(__file__).resolve().parents[1]


def _overlap():
    spec = importlib.util.spec_from_file_location("overlap", ROOT / "bench" / "overlap.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _requests():
    # a: pope -> bishop. Its neighbours: Pius (edited pope -> bishop: forced), Leo (edited pope -> cardinal:
    # named but not forced), Gregory (not edited). b: Pius. c: Leo, whose neighbour names Pius in another
    # relation (named, not forced).
    return [
        EditRequest("a", "John", "{} is a", "bishop", "pope", "P39",
                    neighborhood=["Pius is a", "Leo is a", "Gregory is a"]),
        EditRequest("b", "Pius", "{} is a", "bishop", "pope", "P39", neighborhood=["Gregory is a"]),
        EditRequest("c", "Leo", "{} is a", "cardinal", "pope", "P39", neighborhood=["Pius was born in"]),
        EditRequest("d", "Pia", "{} lives in", "Rome", None, "P551", neighborhood=["Pius is a"]),  # no true object
    ]


def test_count_against_hand_count():
    counts, forced_at = _overlap().count(_requests())
    assert forced_at == {"a": {0}, "b": set(), "c": set()}
    assert counts["cases"] == 3 and counts["neighbourhood_prompts"] == 5
    assert counts["name_an_edited_subject"] == 3  # Pius, Leo (case a); Pius (case c)
    assert counts["same_relation_and_true_object"] == 3  # Pius and Leo are edited in P39 from pope, as are John, Leo
    assert counts["edited_to_the_cases_new_object"] == 1
    assert counts["forced_ns_points"] == round(100 * (1 / 3) / 3, 2)


def test_perfect_editor_against_hand_count(tmp_path):
    def case(case_id, succeeds):
        prompts = [{"prompt": "", "nll_true": 1.0 if s else 3.0, "nll_new": 2.0} for s in succeeds]
        return {"case_id": case_id, "unedited": {"NS": 1.0, "prompts": {"neighborhood": prompts}}}

    rows = [case("a", [True, True, False]), case("b", [True]), case("c", [False]), case("z", [False])]
    path = tmp_path / "cases.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    _, forced_at = _overlap().count(_requests())
    got = _overlap().perfect_editor(str(path), forced_at)
    # unedited: a 2/3, b 1, c 0 (z is not in the edits file); perfect editor: a loses its forced prompt 0
    assert got["scored_cases"] == 3
    assert got["unedited_ns"] == round(100 * (2 / 3 + 1 + 0) / 3, 2)
    assert got["perfect_editor_ns"] == round(100 * (1 / 3 + 1 + 0) / 3, 2)
    assert got["slack"] == round(100 * (1 / 3 - 2 / 3) / 3 + 10, 2)  # perfect − (unedited − 10)
