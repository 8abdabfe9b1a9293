"""bench/rounds.py: each method's rows land in the result file as soon as its run ends, and a method measured
in an earlier session under the same protocol is kept when the other one is run."""

import json
import sys

import pytest

from bench import rounds


def fake_edit_run(cmd):
    """What `memit-pl edit --round_size R --evaluate_every K` leaves in its --out (tests/test_editor.py runs
    the real command): rows of all edits so far, per evaluated round."""
    args = dict(zip(cmd[1:], cmd[2:]))
    out, method = args["--out"], args["--memit.method"]
    n, size, every = int(args["--limit"]), int(args["--round_size"]), int(args["--evaluate_every"])
    rows = [{"method": method, "round": r, "edits_so_far": r * size, "ES": 90.0 + r, "PS": 80.0, "NS": 60.0,
             "GE": 500.0} for r in range(every, n // size + 1, every)]
    from pathlib import Path

    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "rounds.json").write_text(json.dumps({"rows": rows, "layers": [0, 1], "compute_dtype": "float32"}))
    return 1.0, 100.0


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.setattr(rounds, "run_measured", fake_edit_run)
    monkeypatch.chdir(tmp_path)

    def go(*argv):
        monkeypatch.setattr(sys, "argv", ["rounds", "--n", "40", "--round-size", "10", "--every", "2",
                                          "--work", "work", "--out", "res/rounds.json", *argv])
        rounds.main()
        return json.loads((tmp_path / "res/rounds.json").read_text())

    return go


def test_methods_run_in_separate_sessions_merge(run):
    first = run("--methods", "memit")
    assert [(r["method"], r["edits_so_far"]) for r in first["rows"]] == [("memit", 20), ("memit", 40)]
    both = run("--methods", "alphaedit")
    assert [(r["method"], r["edits_so_far"]) for r in both["rows"]] == [
        ("memit", 20), ("memit", 40), ("alphaedit", 20), ("alphaedit", 40)]
    assert set(both["runs"]) == {"memit", "alphaedit"} and "git_commit" in both["runs"]["memit"]
    again = run("--methods", "memit")  # re-measuring one method replaces its rows only
    assert sorted(r["method"] for r in again["rows"]) == ["alphaedit"] * 2 + ["memit"] * 2


def test_another_protocol_starts_a_new_file(run):
    run("--methods", "memit")
    other = run("--methods", "alphaedit", "--every", "4")
    assert [r["method"] for r in other["rows"]] == ["alphaedit"]


def test_a_labelled_variant_is_its_own_arm_with_its_overrides(run, monkeypatch):
    seen = []
    monkeypatch.setattr(rounds, "run_measured", lambda cmd: seen.append(cmd) or fake_edit_run(cmd))
    run("--methods", "alphaedit")
    both = run("--methods", "alphaedit", "--label", "alphaedit-e0.05", "--set", "memit.nullspace_energy=0.05")
    assert [r["method"] for r in both["rows"]] == ["alphaedit"] * 2 + ["alphaedit-e0.05"] * 2
    cmd = seen[-1]
    assert cmd[cmd.index("--memit.nullspace_energy") + 1] == "0.05" and cmd[cmd.index("--out") + 1] == "work/alphaedit-e0.05"
    assert both["runs"]["alphaedit-e0.05"]["method"] == "alphaedit"
    assert both["runs"]["alphaedit-e0.05"]["overrides"] == ["memit.nullspace_energy=0.05"]
    with pytest.raises(SystemExit):
        run("--methods", "memit,alphaedit", "--label", "x")
    with pytest.raises(SystemExit):
        run("--methods", "alphaedit", "--set", "memit.nullspace_energy")
