"""The public editor API: MEMIT, EditRequest.of, EditDelta's methods, Config files, package data."""

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from memit_pl import MEMIT, Config, ConfigError, EditDelta, EditRequest, MemitConfig
from memit_pl.config import StatsConfig, demo_edits_path, packaged_configs
from memit_pl.data.edits import EditFileError
from memit_pl.functional.solve import solve_update
from memit_pl.modeling import loading
from memit_pl.modeling.spec import get_spec

REPO = Path(__file__).resolve().parents[1]
FACTS = [("{} plays the sport of", "Michael Jordan", "soccer"), ("The capital of {} is", "France", "Rome"),
         ("{} was a famous", "Mozart", "footballer")]


def requests():
    return [EditRequest.of(p, s, o) for p, s, o in FACTS]


def weights(editor, layers):
    spec = get_spec(editor.model)
    return {layer: spec.out_weight(editor.model, layer).detach().clone() for layer in layers}


def test_edit_request_of_builds_a_template_and_a_stable_id():
    a = EditRequest.of("{} plays the sport of", "Michael Jordan", "baseball")
    b = EditRequest.of("Michael Jordan plays the sport of", "Michael Jordan", "baseball")
    assert a.prompt == b.prompt == "{} plays the sport of" and a.text == "Michael Jordan plays the sport of"
    assert a.case_id == b.case_id and a.case_id != EditRequest.of("{} plays the sport of", "Michael Jordan", "golf").case_id
    assert EditRequest.of("{} is", "X", "y", case_id=7, paraphrases=["p"]).case_id == "7"
    with pytest.raises(EditFileError, match="field 'prompt'.*neither"):
        EditRequest.of("Somebody plays the sport of", "Michael Jordan", "baseball")


def test_the_editor_freezes_the_model(editor):
    assert not editor.model.training
    assert not any(p.requires_grad for p in editor.model.parameters())


def test_edit_returns_the_delta_that_was_added(editor, tmp_path):
    layers = editor.memit.layers
    before = weights(editor, layers)
    delta = editor.edit(requests())
    assert isinstance(delta, EditDelta) and delta.layers == layers
    after = weights(editor, layers)
    spec = get_spec(editor.model)
    for layer in layers:
        d = delta.dense(layer)
        assert float(d.norm()) > 0
        torch.testing.assert_close(after[layer], before[layer] + (d.T if spec.transposed else d), rtol=0, atol=1e-6)
    path = delta.save(tmp_path / "d.safetensors")
    loaded = EditDelta.load(path)
    loaded.revert(editor.model)
    for layer in layers:
        torch.testing.assert_close(weights(editor, [layer])[layer], before[layer], rtol=0, atol=1e-6)
    loaded.apply(editor.model)
    for layer in layers:
        torch.testing.assert_close(weights(editor, [layer])[layer], after[layer], rtol=0, atol=1e-6)


def test_edited_restores_the_weights_exactly(editor):
    before = weights(editor, editor.memit.layers)
    with editor.edited(requests()) as delta:
        inside = weights(editor, editor.memit.layers)
        assert all(not torch.equal(inside[x], before[x]) for x in delta.layers)
        top = editor.predict(requests()[0].text)
        assert isinstance(top, list) and len(top) == 1
        assert editor.evaluate(requests())["n_cases"] == 3
    for layer, w in weights(editor, editor.memit.layers).items():
        assert torch.equal(w, before[layer])


def test_a_solver_can_be_passed_in(editor):
    """One layer: a solver that doubles Eqn. 14's update gives twice the default delta; it is called once."""
    one = MemitConfig(**{**vars(editor.memit), "layers": [2]})
    with editor.edited(requests(), one) as default:
        pass
    calls = []

    def doubled(keys, resid, cov, lam, prev):
        calls.append(keys.shape)
        a, b = solve_update(keys, resid, cov, lam, prev)
        return 2 * a, b

    other = MEMIT(editor.model, editor.tokenizer, editor.config, work_dir=editor.work_dir, cache_dir=editor.cache_dir,
                  solver=doubled)
    with other.edited(requests(), one) as twice:
        pass
    assert len(calls) == 1 and calls[0][0] == 3
    torch.testing.assert_close(twice.dense(2), 2 * default.dense(2), rtol=1e-5, atol=1e-7)


def test_out_of_range_layers_fail_before_any_work(editor):
    bad = MemitConfig(**{**vars(editor.memit), "layers": [1, 40]})
    with pytest.raises(ConfigError, match=r"memit.layers \[40\] out of range: the model has layers 0..3"):
        editor.edit(requests(), bad)
    assert editor.z_runs == 0


def test_fingerprint_is_hashed_once_while_the_weights_stay(editor, monkeypatch):
    calls = []
    real = loading.hash_weights
    monkeypatch.setattr(loading, "hash_weights", lambda m: calls.append(1) or real(m))
    a = loading.fingerprint(editor.model)
    assert loading.fingerprint(editor.model) == a and len(calls) == 1
    with torch.no_grad():
        get_spec(editor.model).out_weight(editor.model, 1).add_(1e-3)
    b = loading.fingerprint(editor.model)
    assert b != a and len(calls) == 2
    assert b == real(editor.model)


def test_config_files_and_packaged_configs(tmp_path):
    shipped = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    assert packaged_configs() == shipped and "smollm2-135m" in shipped
    smol = Config.from_name("smollm2-135m")
    raw = yaml.safe_load((REPO / "configs" / "smollm2-135m.yaml").read_text())
    assert smol.memit.layers == raw["memit"]["layers"] and smol.stats.n_samples == raw["stats"]["n_samples"]
    # the defaults are the default model's shipped setting, not GPT-J's
    assert MemitConfig().layers == smol.memit.layers and MemitConfig().mom2_update_weight == smol.memit.mom2_update_weight
    assert MemitConfig.from_file(REPO / "configs" / "gpt-j-6b.yaml").layers == [3, 4, 5, 6, 7, 8]
    assert Config.for_model("EleutherAI/gpt-j-6b").memit.mom2_update_weight == 15000.0
    assert Config.for_model("someone/unknown-model") is None
    bad = tmp_path / "bad.yaml"
    bad.write_text("memit:\n  layerz: [1]\n")
    with pytest.raises(ConfigError, match=r"section 'memit': unknown key 'layerz'"):
        Config.from_file(bad)
    bad.write_text("memitt:\n  layers: [1]\n")
    with pytest.raises(ConfigError, match=r"unknown section 'memitt'"):
        Config.from_file(bad)
    bad.write_text("memit:\n  layers: [3, 1]\n")
    with pytest.raises(ConfigError, match=r"section 'memit': memit.layers must be strictly ascending"):
        Config.from_file(bad)
    with pytest.raises(ConfigError, match="no packaged config 'nope'"):
        Config.from_name("nope")
    assert demo_edits_path().read_text() == (REPO / "data" / "demo_edits.jsonl").read_text()


def test_importing_the_package_and_its_config_loads_no_torch():
    code = "import sys, memit_pl, memit_pl.config; memit_pl.config.Config.from_name('smollm2-135m'); " \
           "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"


def test_a_wheel_carries_the_configs_and_the_demo_facts_and_no_test_helpers(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("memit_pl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for cfg in (REPO / "configs").glob("*.yaml"):
        assert f"memit_pl/resources/configs/{cfg.name}" in names
    assert "memit_pl/resources/demo_edits.jsonl" in names
    assert not [n for n in names if n.startswith("tests/") or n.endswith(("testing.py", "z_reference.py"))]
    top = {n.split("/")[1] for n in names if n.startswith("memit_pl/") and n.count("/") == 1}
    assert len(top) <= 12, top
    # installed elsewhere, the package finds its data from any directory
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = "from memit_pl.config import Config, demo_edits_path; " \
           "print(Config.from_name('smollm2-135m').memit.layers, demo_edits_path().exists())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[0, 1, 2, 3, 4, 5, 6] True"


@pytest.mark.slow
def test_the_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    """The README's Python example, as written, on the packaged SmolLM2-135M; only the statistics are made
    smaller (100 chunks of the offline sample instead of the shipped config's 1,000) to keep the suite short."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    example = next(b for b in blocks if "MEMIT.from_pretrained" in b and "editor.edit(" in b)
    real = Config.for_model

    def small_stats(name):
        cfg = real(name)
        return cfg if cfg is None else Config(**{**vars(cfg), "stats": StatsConfig(corpus="wikipedia-sample", n_samples=100)})

    monkeypatch.setattr(Config, "for_model", staticmethod(small_stats))
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    editor, delta = namespace["editor"], namespace["delta"]
    assert isinstance(delta, EditDelta) and (tmp_path / "jordan.safetensors").exists()
    out = capsys.readouterr().out
    assert "['baseball']" in out  # the edited model's top prediction
    assert "'ES': 100.0" in out  # evaluated inside `edited`
    # reverted, then edited and restored: the model answers as before the edit again
    assert editor.predict("Michael Jordan plays the sport of") != ["baseball"]


def test_edit_in_rounds_evaluates_all_edits_so_far_and_resumes(editor, make_model, tok, tmp_path, monkeypatch):
    import memit_pl.stages.zmodule as zm

    reqs = [EditRequest.of(p, s, o, target_true="basketball", neighborhood=["Lionel Messi plays the sport of"])
            for p, s, o in FACTS]
    before = weights(editor, editor.memit.layers)
    rows = editor.edit_in_rounds(reqs, round_size=1, evaluate_every=2)
    assert [r["edits_so_far"] for r in rows] == [0, 2, 3] and [r["round"] for r in rows] == [0, 2, 3]
    assert rows[0]["locality"] == 100.0 and rows[-1]["ES"] is not None
    after = weights(editor, editor.memit.layers)
    assert all(not torch.equal(after[x], before[x]) for x in after)
    # a second run on the same work dir (the unedited model again): every round is re-applied, nothing optimised
    calls = []
    real = zm.optimize_z
    monkeypatch.setattr(zm, "optimize_z", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = make_model("llama")
    again = MEMIT(model, tok, editor.config, work_dir=editor.work_dir, cache_dir=editor.cache_dir)
    rows2 = again.edit_in_rounds(reqs, round_size=1, evaluate_every=2)
    assert calls == [] and [r["ES"] for r in rows2] == [r["ES"] for r in rows]
    # the re-applied rounds count the seconds they took when first computed, not the moments of re-applying
    assert [r["seconds"] for r in rows2] == [r["seconds"] for r in rows] and rows[-1]["seconds"] > 0
    for layer, w in weights(again, again.memit.layers).items():
        torch.testing.assert_close(w, after[layer], rtol=0, atol=1e-6)


def test_rounds_without_previous_keys_are_plain_edits_in_sequence(editor, make_model, tok, tmp_path):
    """keep_previous_keys=False: each round solved against the statistics alone, on the model the rounds before
    it left; the same weights as plain edits one after the other. Keeping the keys changes the update."""
    reqs = requests()
    editor.edit_in_rounds(reqs, round_size=2, evaluate_every=5, keep_previous_keys=False)
    plain = MEMIT(make_model("llama"), tok, editor.config, work_dir=tmp_path / "plain", cache_dir=editor.cache_dir)
    plain.edit(reqs[:2])
    plain.edit(reqs[2:])
    kept = MEMIT(make_model("llama"), tok, editor.config, work_dir=tmp_path / "kept", cache_dir=editor.cache_dir)
    kept.edit_in_rounds(reqs, round_size=2, evaluate_every=5)
    rounds, sequence, with_keys = (weights(e, editor.memit.layers) for e in (editor, plain, kept))
    for layer in rounds:
        torch.testing.assert_close(rounds[layer], sequence[layer], rtol=0, atol=1e-6)
    assert any(not torch.allclose(with_keys[layer], rounds[layer], atol=1e-5) for layer in rounds)


def test_alphaedit_is_a_method_of_the_same_editor(editor):
    alpha = MemitConfig(**{**vars(editor.memit), "method": "alphaedit", "nullspace_threshold": 1e9, "alphaedit_l2": 1.0})
    with editor.edited(requests()) as memit_delta:
        pass
    with editor.edited(requests(), alpha) as alpha_delta:
        pass
    assert alpha_delta.layers == memit_delta.layers
    assert not torch.allclose(alpha_delta.dense(2), memit_delta.dense(2))
    with pytest.raises(ValueError, match="memit.method must be one of memit, alphaedit, rome, ft"):
        MemitConfig(method="rome-ish")


def test_the_edit_command_runs_in_rounds(tiny_dir, tmp_path):
    import json

    from memit_pl import cli

    d, corpus = tiny_dir
    edits = tmp_path / "e.jsonl"
    edits.write_text("".join(json.dumps({"subject": s, "prompt": p, "target_new": o, "target_true": "x",
                                         "neighborhood": ["Lionel Messi plays for"]}) + "\n" for p, s, o in FACTS))
    rc = cli.main(["edit", "--edits", str(edits), "--model.name", str(d), "--model.device", "cpu", "--out",
                   str(tmp_path / "out"), "--round_size", "2", "--memit.layers", "[1, 2]", "--memit.v_num_grad_steps", "2",
                   "--memit.method", "alphaedit", "--keep_previous_keys", "false", "--stats.corpus", str(corpus), "--stats.n_samples", "16",
                   "--stats.seq_len", "16", "--model.cache_dir", str(tmp_path / "cache"), "--save_model", "false",
                   "--trainer.enable_progress_bar", "false", "--eval.max_generation_prompts", "0"])
    assert rc == 0
    res = json.loads((tmp_path / "out" / "rounds.json").read_text())
    assert [r["edits_so_far"] for r in res["rows"]] == [0, 2, 3] and {r["method"] for r in res["rows"]} == {"alphaedit"} and res["keep_previous_keys"] is False
    assert (tmp_path / "out" / "rounds.png").exists() and "| round |" in (tmp_path / "out" / "rounds.md").read_text()


def test_an_evaluation_of_the_same_weights_is_read_back_and_an_edit_invalidates_it(editor, monkeypatch):
    import json

    import memit_pl.stages.evaluate as ev

    reqs = [EditRequest.of(p, s, o, target_true="basketball") for p, s, o in FACTS]
    first = editor.evaluate(reqs)
    calls = []
    real = ev.evaluate_requests
    monkeypatch.setattr(ev, "evaluate_requests", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = editor.evaluate(reqs)
    assert calls == [] and again == json.loads(json.dumps(first))
    editor.evaluate(reqs[:2])  # other requests: evaluated
    assert calls == [1]
    with editor.edited(reqs):  # other weights: evaluated
        edited = editor.evaluate(reqs)
    assert calls == [1, 1] and edited["cases"][0]["prompts"] != first["cases"][0]["prompts"]
    editor.evaluate(reqs)  # the weights restored exactly: read back
    assert calls == [1, 1]
