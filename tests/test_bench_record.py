"""The benchmarks' result schema: paths scrubbed, machine paths refused, the schema fields present."""

import argparse
import json

import pytest

from bench import record as rec


def test_paths_under_the_repository_and_the_cache_are_scrubbed(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMIT_PL_CACHE", str(tmp_path / "cache"))
    text = f"{rec.ROOT}/bench/results/z.json and {tmp_path}/cache/stats/abc"
    assert rec.scrub_text(text) == "bench/results/z.json and <cache>/stats/abc"
    assert rec.machine_paths(rec.scrub({"a": [text]})) == []


def test_a_record_naming_a_machine_path_is_refused(tmp_path):
    figures = {"seconds": 1.5, "store": "/tmp/somewhere/z"}
    r = rec.record("z", figures, config={}, args=argparse.Namespace(n=3), argv=["--n", "3"])
    with pytest.raises(rec.MachinePathError):
        rec.write(tmp_path / "out.json", r)
    assert not (tmp_path / "out.json").exists()


def test_a_benchmarks_own_result_files_do_not_make_its_commit_dirty(tmp_path):
    """A run that has written a row into a tracked result file is still the code of HEAD; a changed source
    file (also one under bench/) is not."""
    import subprocess

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    (tmp_path / "bench/results").mkdir(parents=True)
    files = {"bench/results/t.json": "{}", "bench/results/t.png": "x", "bench/run.py": "a = 1\n", "lib.py": "b = 2\n"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    head = rec.git_commit(tmp_path)
    assert head is not None and not head.endswith("-dirty")
    (tmp_path / "bench/results/t.json").write_text('{"rows": []}')
    (tmp_path / "bench/results/t.png").write_text("y")
    assert rec.git_commit(tmp_path) == head
    for name in ("bench/run.py", "lib.py"):
        (tmp_path / name).write_text("changed = True\n")
        assert rec.git_commit(tmp_path) == head + "-dirty"
        git("checkout", "-q", "--", name)


def test_a_record_has_the_schema_and_the_figures_at_the_top_level(tmp_path):
    r = rec.record("z", {"fp32_s_per_edit": 2.0}, config={"memit": {"layers": [1]}},
                   args=argparse.Namespace(n=3), argv=["--n", "3"])
    out = tmp_path / "z.json"
    rec.write(out, r)
    data = json.loads(out.read_text())
    assert all(k in data for k in rec.SCHEMA)
    assert data["command"] == "python -m bench.z --n 3"
    assert data["fp32_s_per_edit"] == data["figures"]["fp32_s_per_edit"] == 2.0
    assert data["packages"]["torch"] and data["device"]["threads"] >= 1


def test_the_methods_benchmark_reads_per_method_settings():
    from bench import methods
    from memit_pl.config import Config

    got = methods._overrides(["ft.ft_layer=3", "ft.ft_weight_decay=1e-3", "alphaedit.alphaedit_l2=5"])
    assert got == {"ft": {"ft_layer": 3, "ft_weight_decay": 1e-3}, "alphaedit": {"alphaedit_l2": 5}}
    for bad in ("ft_layer=3", "mend.x=1", "ft.ft_layer="):
        with pytest.raises(SystemExit, match="METHOD.KEY=VALUE"):
            methods._overrides([bad])
    cfg = Config()
    assert methods._settings(cfg, "ft", got)["ft_layer"] == 3
    assert methods._settings(cfg, "memit", got) == {"layers": cfg.memit.layers, "mom2_update_weight": cfg.memit.mom2_update_weight}
    assert methods._settings(cfg, "unedited", got) is None


def _tiny_methods_inputs(tiny_dir, tmp_path):
    """bench.methods' inputs on a tiny Llama: a CounterFact file of cf_requests() and a config."""
    from tests.test_evaluate import cf_requests, counterfact_file

    d, corpus = tiny_dir
    edits = counterfact_file(tmp_path / "cf.json", cf_requests())
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"model: {{name: {d}, device: cpu, cache_dir: {tmp_path / 'cache'}}}\n"
                   "memit: {layers: [1, 2], v_num_grad_steps: 2, z_batch_size: 2, context_templates: [[3, 1]]}\n"
                   f"stats: {{corpus: {corpus}, n_samples: 16, seq_len: 16}}\n"
                   "eval: {batch_size: 16, generation_length: 4}\n")
    return edits, cfg


def test_the_methods_benchmark_end_to_end_on_a_tiny_model(tiny_dir, tmp_path, monkeypatch):
    """bench.methods on a tiny Llama: the rows the checks read, each stage's seconds and peak memory, and a
    re-run keeping the rows it already has."""
    import json
    import sys

    from bench import methods
    edits, cfg = _tiny_methods_inputs(tiny_dir, tmp_path)
    out = tmp_path / "table2.json"
    monkeypatch.setattr(sys, "argv", ["methods", "--edits", str(edits), "--n", "2", "--config", str(cfg),
                                      "--methods", "unedited,rome,memit", "--ge-cases", "1",
                                      "--work", str(tmp_path / "work"), "--out", str(out)])
    monkeypatch.setattr(methods.record, "preflight", lambda *a, **k: None)  # tmp paths are machine paths
    monkeypatch.setattr(methods.record, "write", lambda path, rec: path.write_text(json.dumps(rec)))
    methods.main()
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["unedited", "rome", "memit"]
    for r in rows:
        assert r["n_edits"] == 2 and all(r[k] is not None for k in ("ES", "PS", "NS", "GE", "seconds"))
    rome, memit = rows[1], rows[2]
    assert rome["z_s"] == memit["z_s"] >= 0  # one z stage, shared (a tiny model's can round to 0.0 s)
    assert memit["seconds"] == pytest.approx(memit["z_s"] + memit["update_s"], abs=0.11)
    assert set(memit["peak_rss_mb"]) == {"z", "update", "eval"} and min(memit["peak_rss_mb"].values()) > 50
    assert rome["layers"] == [2] and memit["layers"] == [1, 2]
    methods.main()  # everything kept
    assert json.loads(out.read_text())["rows"] == rows
    # the results file lost, the work folder kept: MEMIT's layers and evaluation are reused, and the row still
    # reports what they cost (the layer files' seconds, the evaluation's own)
    from memit_pl import io

    again = tmp_path / "again.json"
    monkeypatch.setattr(sys, "argv", ["methods", "--edits", str(edits), "--n", "2", "--config", str(cfg),
                                      "--methods", "unedited,memit", "--ge-cases", "1",
                                      "--work", str(tmp_path / "work"), "--out", str(again)])
    methods.main()
    resumed = json.loads(again.read_text())["rows"][-1]
    (run_dir,) = {f.parent.parent for f in (tmp_path / "work").rglob("layer1.safetensors")}
    layer_s = sum(io.load_tensors(f)[1]["seconds"] for f in (run_dir / "layers").glob("layer*.safetensors"))
    assert resumed["resumed_layers"] == 2 and "resumed_layers" not in memit
    assert layer_s > 0 and resumed["update_s"] >= round(layer_s, 1) and resumed["eval_s"] == memit["eval_s"]


def test_the_methods_benchmark_grid_writes_figure_5(tiny_dir, tmp_path, monkeypatch):
    """--grid edits the first n of the N cases for each n (z of the N cases shared), --sweep-out writes Figure 5
    from MEMIT's rows with the unedited model as n = 0; a smaller n's row equals a run at --n n, and a
    re-run keeps every row."""
    import json
    import sys

    from bench import methods
    edits, cfg = _tiny_methods_inputs(tiny_dir, tmp_path)
    monkeypatch.setattr(methods.record, "preflight", lambda *a, **k: None)  # tmp paths are machine paths
    monkeypatch.setattr(methods.record, "write", lambda path, rec: path.write_text(json.dumps(rec)))

    def run(out, n, *extra):
        monkeypatch.setattr(sys, "argv", ["methods", "--edits", str(edits), "--n", str(n), "--config", str(cfg),
                                          "--ge-cases", "1", "--work", str(tmp_path / "work"), "--out", str(out),
                                          *extra])
        methods.main()
        return json.loads(out.read_text())["rows"]

    sweep = tmp_path / "sweep"
    rows = run(tmp_path / "grid.json", 3, "--methods", "unedited,memit", "--grid", "1,2", "--sweep-out", str(sweep))
    assert [(r["method"], r["n_edits"]) for r in rows] == [("memit", 1), ("memit", 2), ("unedited", 3), ("memit", 3)]
    small = [r for r in rows if r["n_edits"] < 3]
    assert all(r["z_s"] is None and r["seconds"] is None and r["update_s"] >= 0 and r["eval_s"] >= 0
               for r in small)  # z timed for N only
    assert rows[-1]["z_s"] >= 0 and rows[-1]["seconds"] == pytest.approx(rows[-1]["z_s"] + rows[-1]["update_s"], abs=0.11)
    fig = json.loads((sweep / "sweep.json").read_text())
    assert [r["n"] for r in fig["rows"]] == [0, 1, 2, 3] and fig["model"] and fig["git_commit"] is not None
    assert fig["rows"][0]["ES"] == rows[2]["ES"] and fig["rows"][2] == rows[1]
    assert (sweep / "sweep.png").stat().st_size > 1000 and "| 3 |" in (sweep / "sweep.md").read_text()
    for r in fig["rows"]:
        assert all(r[k] is not None for k in ("ES", "PS", "NS", "GE", "reliability", "generalization", "locality"))
    alone = run(tmp_path / "alone.json", 2, "--methods", "unedited,memit")  # the same 2 edits at --n 2
    for k in ("ES", "PS", "NS", "reliability", "generalization", "locality"):
        assert alone[1][k] == pytest.approx(rows[1][k], abs=1e-6), k
    # each edited row carries the unedited model's NS on its own cases: the level its NS compares with
    assert rows[1]["NS_unedited"] == pytest.approx(alone[0]["NS"], abs=0.01)
    assert rows[3]["NS_unedited"] == pytest.approx(rows[2]["NS"], abs=0.01)
    assert run(tmp_path / "grid.json", 3, "--methods", "unedited,memit", "--grid", "1,2") == rows  # all kept
    # each row names where it was measured: a kept row keeps its own, a re-measured row gets this run's
    assert all(set(r["measured"]) == {"device", "git_commit", "date"} and r["measured"]["device"]["cpu"] for r in rows)
    data = json.loads((tmp_path / "grid.json").read_text())
    data["rows"][0]["measured"]["device"]["cpu"] = "an earlier CPU"
    data["rows"] = data["rows"][:3]  # the n = 3 MEMIT row is measured again
    (tmp_path / "grid.json").write_text(json.dumps(data))
    again = run(tmp_path / "grid.json", 3, "--methods", "unedited,memit", "--grid", "1,2", "--sweep-out", str(sweep))
    assert again[0]["measured"]["device"]["cpu"] == "an earlier CPU" and again[1:3] == rows[1:3]
    assert again[3]["measured"]["device"] == rows[3]["measured"]["device"] and again[3]["ES"] == rows[3]["ES"]
    fig = json.loads((sweep / "sweep.json").read_text())
    assert fig["rows"][1]["measured"]["device"]["cpu"] == "an earlier CPU"
    with pytest.raises(SystemExit, match="outside 1..--n"):
        run(tmp_path / "bad.json", 3, "--methods", "memit", "--grid", "0,2")
    with pytest.raises(SystemExit, match="add unedited"):
        run(tmp_path / "bad.json", 3, "--methods", "memit", "--sweep-out", str(sweep))


def test_the_edit_benchmark_keeps_the_rows_of_other_n(tmp_path, monkeypatch):
    """bench.edit writes after every N and keeps an earlier record's rows of other N for the same edits file
    (a 10,000-edit row measured in a later session joins the 1,000 one); another file's rows are dropped."""
    import argparse
    import json

    from bench import edit

    monkeypatch.setattr(edit.record, "write", lambda path, rec: path.write_text(json.dumps(rec)))
    out = tmp_path / "edit.json"

    def write(edits, rows):
        args = argparse.Namespace(edits=edits, config="configs/smollm2-135m.yaml", out=str(out), n=[r["n_edits"] for r in rows])
        return edit._write(args, rows, 1.0, 100.0)

    write("cf.json", [{"n_edits": 1000, "total_s": 10.0, "peak_rss_mb": 1.0}])
    rec = write("cf.json", [{"n_edits": 10000, "total_s": 99.0, "peak_rss_mb": 2.0}])
    assert [(r["n_edits"], r["total_s"]) for r in rec["rows"]] == [(1000, 10.0), (10000, 99.0)]
    assert json.loads(out.read_text())["rows"] == rec["rows"]
    rec = write("cf.json", [{"n_edits": 1000, "total_s": 11.0, "peak_rss_mb": 1.0}])  # a re-run replaces its N
    assert [(r["n_edits"], r["total_s"]) for r in rec["rows"]] == [(1000, 11.0), (10000, 99.0)]
    rec = write("other.json", [{"n_edits": 5, "total_s": 1.0, "peak_rss_mb": 1.0}])
    assert [r["n_edits"] for r in rec["rows"]] == [5]


def test_precision_z_figures_compare_only_the_edits_own_rows():
    """A store seeded from the bank holds more rows than the N edits: the figures read only theirs."""
    import torch

    from bench.precision import z_figures
    from memit_pl.stages.zstore import ZStore

    def store(ids, loss, z):
        n = len(ids)
        return ZStore(list(ids), {"loss": torch.tensor(loss), "nll": torch.tensor(loss) / 2,
                                  "steps": torch.full((n,), 3), "z": torch.tensor(z)}, {})

    big = store(["a", "b", "x"], [0.2, 0.4, 9.0], [[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])  # "x": not an edit here
    small = store(["b", "a"], [0.33, 0.22], [[0.0, 2.2], [1.0, 0.0]])
    per_arm, figs = z_figures(big, small, ["a", "b"])
    assert per_arm["fp32"]["mean_z_loss"] == 0.3  # (0.2 + 0.4) / 2, not 3.2 with "x"
    assert per_arm["compute"]["mean_z_loss"] == 0.275
    assert figs["mean_z_loss_rel_diff"] == round(0.025 / 0.3, 4)
    assert figs["median_rel_z_diff"] == 0.05  # a: 0, b: 0.2 / 2 = 0.1
    assert figs["max_rel_z_diff"] == 0.1
