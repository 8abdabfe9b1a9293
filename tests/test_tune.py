import pytest
import torch

import memit_pl.stages.zmodule as zm
from memit_pl.config import Config, EvalConfig, MemitConfig, StatsConfig, TrainerConfig
from memit_pl.data.edits import EditRequest
from memit_pl.editor import MEMIT as Editor
from memit_pl.experiments.sweep import log_grid, scaling_sweep
from memit_pl.experiments.tune import default_windows, excess, held_breaks, select, split, tune
from memit_pl.modeling.spec import get_spec
from tests.support.tiny import CORPUS

FACTS = [("Michael Jordan", "{} plays the sport of", "soccer", "basketball"),
         ("France", "The capital of {} is", "Rome", "Paris"),
         ("Toyota", "{} is a car company from", "Sweden", "Japan"),
         ("Albert Einstein", "{} was a famous", "painter", "physicist"),
         ("Mozart", "{} was a famous", "footballer", "composer"),
         ("Canada", "The official language of {} is", "French", "English")]
REQUESTS = [EditRequest(str(i), s, p, n, t, paraphrases=[f"Yes. {p.replace('{}', s)}"],
                        neighborhood=["Lionel Messi plays for"]) for i, (s, p, n, t) in enumerate(FACTS)]


@pytest.fixture
def editor(make_model, tok, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 8))
    model = make_model("llama")
    cfg = Config(stats=StatsConfig(corpus=str(corpus), n_samples=16, seq_len=16),
                 trainer=TrainerConfig(accelerator="cpu", enable_progress_bar=False),
                 eval=EvalConfig(batch_size=16, generation_length=5, max_generation_prompts=1))
    return Editor(model, tok, cfg, work_dir=tmp_path / "work", cache_dir=tmp_path / "cache")


MEMIT = MemitConfig(layers=[1, 2], v_num_grad_steps=3, v_lr=0.05, z_batch_size=2, context_templates=[[3, 1]])


def test_select_picks_the_best_feasible_point():
    base = {"S": 10, "NS": 80, "GE": 600}
    rows = [{"lam": lam, "S": s, "NS": ns, "GE": ge} for lam, s, ns, ge in
            [(1, 90, 60, 600), (10, 85, 74, 598), (100, 80, 77, 590), (1000, 40, 80, 600)]]
    # NS >= 75 and GE >= 595: λ=100 loses too much GE, so λ=1000 is the only point within both bounds
    assert select(rows, base) == (rows[3], True)
    rows[2]["GE"] = 596
    assert select(rows, base) == (rows[2], True)
    assert select(rows, base, max_ns_drop=10)[0]["lam"] == 10
    worst = [{"lam": 1, "S": 90, "NS": 10, "GE": 600}, {"lam": 2, "S": 50, "NS": 70, "GE": 600}]
    assert select(worst, base) == (worst[1], False)


def test_select_can_bound_nsu_instead_of_ns():
    base = {"S": 10, "NS": 80, "NSu": 84, "GE": 600}
    rows = [{"lam": lam, "S": s, "NS": ns, "NSu": nsu, "GE": 600} for lam, s, ns, nsu in
            [(1, 90, 60, 76), (10, 85, 70, 80), (100, 60, 77, 83)]]
    # NS within 5 admits only λ=100; NSu within 5 (>= 79) admits λ=10, the better score
    assert select(rows, base)[0]["lam"] == 100
    assert select(rows, base, ns_metric="NSu") == (rows[1], True)
    with pytest.raises(ValueError, match="ns_metric"):
        select(rows, base, ns_metric="ES")


def test_excess_counts_the_points_beyond_each_bound():
    base = {"NS": 80, "NSu": 84, "GE": 600}
    assert excess({"NS": 74, "GE": 594.5}, base) == {"NS": 1.0, "GE": 0.5}
    assert excess({"NS": 76, "GE": 596}, base) == {"NS": 0.0, "GE": 0.0}
    assert excess({"NS": 60, "NSu": 78, "GE": None}, base, ns_metric="NSu") == {"NSu": 1.0, "GE": 0.0}
    assert excess({"NS": 60, "NSu": 78, "GE": 500}, base, max_ns_drop=10, max_ge_drop=200, ns_metric="NSu") == \
        {"NSu": 0.0, "GE": 0.0}


def test_split_and_windows():
    a, b = split(REQUESTS, 0.5, seed=0)
    assert len(a) == 3 and len(b) == 3 and not {r.case_id for r in a} & {r.case_id for r in b}
    assert split(REQUESTS, 0.5, seed=0) == (a, b) and split(REQUESTS, 0.5, seed=1) != (a, b)
    assert default_windows(30) == [[1, 2, 3, 4, 5], [3, 4, 5, 6, 7], [5, 6, 7, 8, 9]]
    assert default_windows(4, size=3) == [[1, 2, 3], [3]]
    assert log_grid(584) == [1, 10, 100, 584] and log_grid(100) == [1, 10, 100] and log_grid(1) == [1]


def test_lambda_sweep_optimises_no_z_again_and_finds_the_known_best(editor, monkeypatch):
    calls = []
    real = zm.optimize_z
    monkeypatch.setattr(zm, "optimize_z", lambda *a, **k: calls.append(a[2].case_ids) or real(*a, **k))
    lambdas = [0.1, 10.0, 1000.0]

    # a known trade-off: efficacy falls and specificity rises with λ; the evaluation is real, then shifted
    real_eval = editor.evaluate

    def shaped(requests):
        res = real_eval(requests)
        lam = editor._last_lam
        m = dict(res["metrics"])
        m.update({"ES": 100 - lam / 20, "PS": 90 - lam / 20, "NS": 50 + min(lam, 100) / 4, "GE": 500.0})
        m["S"] = 3 / sum(1 / m[k] for k in ("ES", "PS", "NS"))
        return {**res, "metrics": m}

    real_edit = editor.edited_evaluation

    def remember(requests, store, memit, tag, eval_requests=None):
        editor._last_lam = memit.mom2_update_weight
        return real_edit(requests, store, memit, tag, eval_requests)

    editor._last_lam = 0.0
    monkeypatch.setattr(editor, "evaluate", shaped)
    monkeypatch.setattr(editor, "edited_evaluation", remember)
    result = tune(editor, REQUESTS, MEMIT, lambdas, [[1, 2]], max_ns_drop=30.0)
    # scores: λ=0.1 -> NS 50.0 (drop 0 vs the unedited 50.0 at λ 0): all feasible; S is best at λ=10
    assert [r["lam"] for r in result["rows"]] == lambdas
    expected = max(result["rows"], key=lambda r: r["S"])
    assert result["chosen"]["mom2_update_weight"] == expected["lam"] == 10.0
    # held back: the unedited evaluation ran last at λ 1000 (NS 75), the edit at λ 10 gives NS 52.5: −22.5 of 30
    assert result["held"]["NS"] == 52.5 and result["unedited_held"]["NS"] == 75.0
    assert result["held_within_bounds"] is True
    tuned = sorted(c for batch in calls for c in batch)
    assert tuned == sorted(r.case_id for r in REQUESTS)  # every edit's z optimised exactly once


def test_scaling_sweep_restores_weights_and_reuses_z(editor):
    spec = get_spec(editor.model)
    before = {layer: spec.out_weight(editor.model, layer).clone() for layer in MEMIT.layers}
    rows = scaling_sweep(editor, REQUESTS, MEMIT, [1, 3, 6])
    assert [r["n"] for r in rows] == [0, 1, 3, 6]
    assert editor.z_runs == 1
    assert all(r["ES"] is not None and r["NS"] is not None for r in rows)
    assert rows[-1]["NSu_unedited"] == pytest.approx(rows[0]["NSu"], abs=0.01)  # all cases: the same prompts
    for layer in MEMIT.layers:
        assert torch.equal(spec.out_weight(editor.model, layer), before[layer])


def test_editor_reuses_a_given_z_store(editor, tmp_path, monkeypatch):
    """A store from an earlier run (``--z_dir``) serves its target layer without new optimisation;
    another target layer gets its own store in the work directory."""
    first = editor.zs(REQUESTS, MEMIT)
    reuse = Editor(editor.model, editor.tokenizer, editor.config, work_dir=tmp_path / "other",
                   cache_dir=editor.cache_dir, z_dir=next(editor.work_dir.glob(f"z-L{MEMIT.target_layer}-*")))
    calls = []
    real = zm.optimize_z
    monkeypatch.setattr(zm, "optimize_z", lambda *a, **k: calls.append(a[2].case_ids) or real(*a, **k))
    again = reuse.zs(REQUESTS[:4], MEMIT)
    assert calls == []
    assert torch.equal(again.z_for(["0", "3"]), first.z_for(["0", "3"]))
    reuse.zs(REQUESTS[:2], MemitConfig(**{**vars(MEMIT), "layers": [1]}))
    assert calls and list((tmp_path / "other").glob("z-L1-*"))


def test_write_tune_outputs_a_loadable_config_that_names_its_batch_size(tmp_path):
    import json

    import yaml

    from memit_pl.experiments.tune import write_tune

    unedited = {"n": 0, "S": 10.0, "ES": 5.0, "PS": 5.0, "NS": 80.0, "GE": 600.0}
    rows = [{"n": 6, "lam": lam, "layers": "1-2", "window": [1, 2], "S": s, "ES": s, "PS": s, "NS": ns, "GE": 600.0}
            for lam, s, ns in [(10.0, 90.0, 70.0), (100.0, 60.0, 78.0)]]
    chosen = MemitConfig(layers=[1, 2], mom2_update_weight=100.0)
    result = {"n_tune": 6, "n_held": 6, "seed": 0, "bounds": {"max_ns_drop": 5.0, "max_ge_drop": 5.0},
              "unedited_tune": unedited, "rows": rows,
              "chosen": {"layers": [1, 2], "mom2_update_weight": 100.0, "within_bounds": True},
              "unedited_held": unedited, "held": {**rows[1], "n": 6}, "memit": chosen.__dict__, "command": "x"}
    path = write_tune(tmp_path, result, {"name": "tiny"}, {"n_samples": 10}, "tiny")
    text = path.read_text()
    assert "for 6 edits in one batch" in text.splitlines()[0]
    cfg = yaml.safe_load(text)
    assert cfg["memit"]["mom2_update_weight"] == 100.0 and cfg["memit"]["layers"] == [1, 2]
    assert MemitConfig(**cfg["memit"]) == chosen
    assert "λ 100 (within the bounds: NS −5, GE −5), for 6 edits in one batch" in (tmp_path / "tune.md").read_text()
    assert json.loads((tmp_path / "tune.json").read_text())["chosen"]["mom2_update_weight"] == 100.0
    assert (tmp_path / "tune.png").stat().st_size > 0
    # the held-back line is derived from the numbers: NS 78 and GE 600 against 80 and 600 keep both bounds
    assert "held-back part (within the bounds):" in (tmp_path / "tune.md").read_text()

    # the chosen point breaks the GE bound on the held-back part: tune.md says which bound and by how much
    held = {**rows[1], "n": 6, "GE": 594.0}
    write_tune(tmp_path, {**result, "held": held}, {"name": "tiny"}, {}, "tiny")
    assert "held-back part (OUTSIDE the bounds: GE -6.00 (bound −5)):" in (tmp_path / "tune.md").read_text()
    assert held_breaks({**result, "held": held}) == "GE -6.00 (bound −5)"
    assert held_breaks(result) == ""


def _recording(editor, monkeypatch):
    """Record the MemitConfig of every edited evaluation (the grid points, then the held-back run)."""
    seen = []
    real = editor.edited_evaluation

    def record(requests, store, memit, tag, eval_requests=None):
        seen.append((memit, store))
        return real(requests, store, memit, tag, eval_requests)

    monkeypatch.setattr(editor, "edited_evaluation", record)
    return seen


def test_tune_ft_searches_its_layer_and_decay_without_z(editor, monkeypatch):
    seen = _recording(editor, monkeypatch)
    ft = MemitConfig(method="ft", layers=[1, 2], ft_lr=0.05, ft_steps=3)
    result = tune(editor, REQUESTS, ft, [0.0, 10.0], [[1], [2]], max_ns_drop=100.0, max_ge_drop=1000.0)
    points = [(m.ft_layer, m.layers, m.ft_weight_decay) for m, _ in seen]
    assert points[:4] == [(1, [1], 0.0), (1, [1], 10.0), (2, [2], 0.0), (2, [2], 10.0)]
    assert all(store is None for _, store in seen) and editor.z_runs == 0  # FT-W needs no z
    assert [(r["layers"], r["decay"]) for r in result["rows"]] == [("1-1", 0.0), ("1-1", 10.0), ("2-2", 0.0), ("2-2", 10.0)]
    chosen = max(result["rows"], key=lambda r: r["S"])  # all within the (wide) bounds
    assert result["chosen"] == {"layers": chosen["window"], "ft_weight_decay": chosen["decay"], "within_bounds": True}
    assert (result["memit"]["ft_layer"], result["memit"]["ft_weight_decay"]) == (chosen["window"][0], chosen["decay"])
    assert points[4] == (chosen["window"][0], chosen["window"], chosen["decay"])  # the held-back run
    # a decay that pins W to W0 changes what FT-W writes: the two decays give different models
    by_decay = {r["decay"]: r for r in result["rows"] if r["layers"] == "1-1"}
    assert by_decay[0.0]["ES"] != by_decay[10.0]["ES"] or by_decay[0.0]["NS"] != by_decay[10.0]["NS"] \
        or by_decay[0.0]["PS"] != by_decay[10.0]["PS"]


def test_tune_alphaedit_searches_its_ridge_not_lambda(editor, monkeypatch):
    seen = _recording(editor, monkeypatch)
    alpha = MemitConfig(**{**vars(MEMIT), "method": "alphaedit"})
    result = tune(editor, REQUESTS, alpha, [1.0, 100.0], [[1, 2]], max_ns_drop=100.0, max_ge_drop=1000.0)
    assert [m.alphaedit_l2 for m, _ in seen[:2]] == [1.0, 100.0]
    assert {m.mom2_update_weight for m, _ in seen} == {MEMIT.mom2_update_weight}  # λ untouched: AlphaEdit ignores it
    assert [r["alpha"] for r in result["rows"]] == [1.0, 100.0] and "lam" not in result["rows"][0]
    assert result["chosen"]["alphaedit_l2"] in (1.0, 100.0) and result["searched"]["key"] == "alphaedit_l2"


def test_tune_rome_searches_layers_only(editor, monkeypatch):
    seen = _recording(editor, monkeypatch)
    rome = MemitConfig(**{**vars(MEMIT), "method": "rome"})
    result = tune(editor, REQUESTS, rome, [], [[1], [2]], max_ns_drop=100.0, max_ge_drop=1000.0)
    assert [m.layers for m, _ in seen[:2]] == [[1], [2]]
    assert [r["window"] for r in result["rows"]] == [[1], [2]] and result["searched"] is None
    assert set(result["chosen"]) == {"layers", "within_bounds"}


@pytest.mark.parametrize("method,values,windows,message", [
    ("ft", [0.0], [[0, 1]], "writes one layer, so each window is one layer"),
    ("rome", [1.0], [[1]], "has no setting to search besides its layer"),
    ("alphaedit", [], [[1, 2]], "give at least one value of alphaedit_l2"),
    ("memit", [1.0], [[]], "non-empty layer window"),
])
def test_tune_refuses_a_grid_the_method_cannot_use_before_any_work(method, values, windows, message):
    from memit_pl.config import ConfigError
    from memit_pl.experiments.tune import check_grid

    with pytest.raises(ConfigError, match=message):
        check_grid(MemitConfig(layers=[1, 2], method=method), values, windows)


def test_tune_cli_rejects_lambdas_for_another_method_in_one_line(capsys):
    from memit_pl import cli

    rc = cli.main(["tune", "--edits", "x.json", "--out", "y", "--memit.method", "ft", "--lambdas", "[1000]"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lambdas is MEMIT's λ; for memit.method ft give --values" in err[0]
    # --values reaches the grid check as the list given (a ROME search takes none)
    rc = cli.main(["tune", "--edits", "x.json", "--out", "y", "--memit.method", "rome", "--values", "[3, 30]",
                   "--windows", "[[1]]"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "has no setting to search besides its layer" in err[0]


def test_write_tune_names_the_searched_setting_and_plots_a_zero_decay(tmp_path):
    from memit_pl.experiments.tune import write_tune

    unedited = {"n": 0, "S": 10.0, "ES": 5.0, "PS": 5.0, "NS": 80.0, "GE": 600.0}
    rows = [{"n": 6, "decay": d, "layers": "0-0", "window": [0], "S": s, "ES": s, "PS": s, "NS": ns, "GE": 600.0}
            for d, s, ns in [(0.0, 90.0, 60.0), (0.01, 70.0, 78.0), (0.1, 50.0, 79.0)]]
    chosen = MemitConfig(layers=[0], method="ft", ft_layer=0, ft_weight_decay=0.01)
    result = {"n_tune": 6, "n_held": 6, "seed": 0, "bounds": {"max_ns_drop": 5.0, "max_ge_drop": 5.0},
              "method": "ft", "searched": {"key": "ft_weight_decay", "column": "decay"},
              "unedited_tune": unedited, "rows": rows,
              "chosen": {"layers": [0], "ft_weight_decay": 0.01, "within_bounds": True},
              "unedited_held": unedited, "held": {**rows[1], "n": 6}, "memit": chosen.__dict__, "command": "x"}
    path = write_tune(tmp_path, result, {"name": "tiny"}, {}, "tiny")
    md = (tmp_path / "tune.md").read_text()
    assert "| layers | decay | S |" in md and "method ft" in md.splitlines()[0]
    assert "chosen: layers [0], decay 0.01 (within the bounds" in md
    assert (tmp_path / "tune.png").stat().st_size > 0
    import yaml

    assert MemitConfig(**yaml.safe_load(path.read_text())["memit"]) == chosen


def test_a_sweep_varies_the_methods_own_setting(editor, monkeypatch, tmp_path):
    """``values`` is MEMIT's λ, AlphaEdit's ridge, FT-W's decay: each row is edited at its value, named by
    the method's column, and the model is restored after each."""
    from memit_pl.experiments.sweep import write_sweep

    spec = get_spec(editor.model)
    before = spec.out_weight(editor.model, 1).clone()
    seen = []
    real = editor.edited_evaluation
    monkeypatch.setattr(editor, "edited_evaluation",
                        lambda reqs, store, cfg, tag, **kw: seen.append((cfg, tag)) or real(reqs, store, cfg, tag, **kw))
    ft = MemitConfig(layers=[1], method="ft", ft_layer=1, ft_steps=3)
    rows = scaling_sweep(editor, REQUESTS, ft, [2, 6], values=[0.0, 0.5])
    assert [(r["n"], r.get("decay")) for r in rows] == [(0, None), (2, 0.0), (6, 0.0), (2, 0.5), (6, 0.5)]
    assert [(c.ft_weight_decay, t) for c, t in seen] == [(0.0, "n2_decay0"), (0.0, "n6_decay0"), (0.5, "n2_decay0.5"),
                                                         (0.5, "n6_decay0.5")]
    assert editor.z_runs == 0  # FT-W has no z
    assert torch.equal(spec.out_weight(editor.model, 1), before)
    write_sweep(tmp_path, rows, {"model": "tiny", "method": "ft"})
    assert (tmp_path / "sweep.md").read_text().startswith("| n | decay | S |")
    assert (tmp_path / "sweep.png").stat().st_size > 0
    seen.clear()
    rows = scaling_sweep(editor, REQUESTS, MEMIT, [6], values=[10.0, 1000.0])
    assert [r.get("lam") for r in rows] == [None, 10.0, 1000.0]
    assert [c.mom2_update_weight for c, _ in seen] == [10.0, 1000.0] and editor.z_runs == 1


def test_a_sweep_of_a_setting_rome_does_not_have_is_refused(editor):
    from memit_pl.config import ConfigError

    with pytest.raises(ConfigError, match="memit.method rome has no setting to vary besides its layer"):
        scaling_sweep(editor, REQUESTS, MemitConfig(layers=[1], method="rome"), [1, 2], values=[10.0, 100.0])
    assert editor.z_runs == 0


@pytest.mark.parametrize("args, message", [
    (["--memit.method", "ft", "--lambdas", "[1000]"], "--lambdas is MEMIT's λ; for memit.method ft give --values"),
    (["--memit.method", "rome", "--values", "[3]"], "memit.method rome has no setting to vary besides its layer"),
])
def test_sweep_cli_rejects_a_grid_the_method_cannot_use_in_one_line(capsys, args, message):
    from memit_pl import cli

    rc = cli.main(["sweep", "--edits", "x.json", "--out", "y", *args])  # before the file or the model is read
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0]


def test_plot_arms_draws_each_arm_once_per_metric_from_its_unedited_start(tmp_path, monkeypatch):
    """The rounds comparison: one panel per metric, one line per arm starting at its 0-edit row, the unedited
    level dotted; a missing metric leaves that arm's line out of that panel only."""
    from memit_pl import io
    from memit_pl.experiments.sweep import plot_arms

    rows = [{"method": m, "edits_so_far": n, "ES": es, "NS": 70.0 - n / 100, "GE": ge}
            for m, es0 in (("memit", 90.0), ("alphaedit", 95.0))
            for n, es, ge in ((0, 30.0, 540.0), (100, es0, 530.0), (200, es0 - 5, None if m == "memit" else 520.0))]
    figs = []
    real = io.save_figure
    monkeypatch.setattr(io, "save_figure", lambda fig, path, **kw: figs.append(fig) or real(fig, path, **kw))
    path = plot_arms(rows, "edits_so_far", tmp_path / "rounds.png", "t", metrics=("ES", "NS", "GE"))
    assert path.stat().st_size > 1000
    axes = figs[0].axes
    assert [a.get_title() for a in axes] == ["ES (%)", "NS (%)", "GE (×100)"]
    drawn = {a.get_title(): {ln.get_label(): list(ln.get_xdata()) for ln in a.lines if not ln.get_label().startswith("_")}
             for a in axes}
    assert drawn["ES (%)"] == {"memit": [0, 100, 200], "alphaedit": [0, 100, 200]}
    assert drawn["GE (×100)"] == {"memit": [0, 100], "alphaedit": [0, 100, 200]}
    dotted = [ln for ln in axes[0].lines if ln.get_linestyle() == ":"]
    assert len(dotted) == 1 and list(dotted[0].get_ydata()) == [30.0, 30.0]


def test_plot_rows_draws_four_groups(tmp_path):
    """The fourth group's line style is a dash pattern (not a format string): four groups plot."""
    from memit_pl.experiments.sweep import plot_rows

    rows = [{"n": n, "arm": g, "ES": 50.0 + g, "PS": 40.0, "NS": 60.0, "GE": 500.0 + g} for g in range(4) for n in (1, 10)]
    assert plot_rows(rows, "n", tmp_path / "p.png", "t", group="arm").stat().st_size > 1000
