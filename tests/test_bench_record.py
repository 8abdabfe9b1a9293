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
