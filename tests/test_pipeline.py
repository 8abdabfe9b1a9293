"""End to end through the CLI on a tiny model saved with save_pretrained (the real from_pretrained path)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from memit_pl.cli.main import main
from memit_pl.delta import load_delta
from memit_pl.modeling.spec import get_spec
from tests.support.tiny import CORPUS

EDITS = [
    {"case_id": "a", "subject": "Michael Jordan", "prompt": "{} plays the sport of", "target_new": "soccer",
     "target_true": "basketball", "paraphrases": ["Everyone knows that Michael Jordan plays"]},
    {"case_id": "b", "subject": "France", "prompt": "The capital of {} is", "target_new": "Rome", "target_true": "Paris"},
    {"case_id": "c", "subject": "Toyota", "prompt": "{} is a car company from", "target_new": "Sweden"},
]


@pytest.fixture
def setup(make_model, tok, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model_dir = tmp_path / "tiny"
    make_model("llama").save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 8))
    edits = tmp_path / "edits.jsonl"
    edits.write_text("\n".join(json.dumps(e) for e in EDITS))
    common = [
        "--model.name", str(model_dir), "--model.device", "cpu", "--model.cache_dir", str(tmp_path / "cache"),
        "--memit.layers", "[1, 2]", "--memit.v_num_grad_steps", "4", "--memit.v_lr", "0.05",
        "--memit.context_templates", "[[3, 1]]", "--memit.mom2_update_weight", "1.0",
        "--stats.corpus", str(corpus), "--stats.n_samples", "24", "--stats.seq_len", "16",
        "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
    ]
    return model_dir, edits, common


def weights(model, layers=(1, 2)):
    spec = get_spec(model)
    return {layer: spec.out_weight(model, layer).clone() for layer in layers}


def test_edit_table_shows_the_first_edits_and_the_check_counts_all(setup, tmp_path, capsys, monkeypatch):
    """The before -> after table lists the first TABLE_ROWS edits (10,000 rows of top-1 predictions would
    take an hour); summary.json's efficacy check still counts every edit."""
    from memit_pl.cli import edit as edit_cli
    from memit_pl.stages import pipeline

    model_dir, edits, common = setup
    monkeypatch.setattr(edit_cli, "TABLE_ROWS", 2)
    checked = []  # how many edits each efficacy check (before, after) was given
    check = pipeline.efficacy_top1
    monkeypatch.setattr(pipeline, "efficacy_top1", lambda m, t, reqs: checked.append(len(reqs)) or check(m, t, reqs))
    out = tmp_path / "run"
    assert main(["edit", *common, "--edits", str(edits), "--out", str(out), "--save_model", "false"]) == 0
    printed = capsys.readouterr().out
    assert "(the first 2 of 3 edits)" in printed and "3 edits in one batch" in printed
    rows = [line for line in printed.splitlines() if " -> " in line and "edits" not in line]
    assert len(rows) == 2, rows
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_edits"] == 3 and checked == [3, 3]


def test_an_alphaedit_run_records_what_its_null_space_keeps(setup, tmp_path):
    _, edits, common = setup
    out = tmp_path / "alpha"
    assert main(["edit", *common, "--edits", str(edits), "--out", str(out), "--save_model", "false",
                 "--memit.method", "alphaedit", "--memit.nullspace_energy", "0.05"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    spaces = summary["null_space"]
    assert set(spaces) == {"1", "2"}
    for report in spaces.values():
        assert 0 < report["null_dims"] < report["d_key"] and 0 <= report["energy_pct"] <= 5.0


def test_edit_apply_delta_revert_and_split_stages(setup, tmp_path, capsys):
    model_dir, edits, common = setup
    out = tmp_path / "run"
    assert main(["edit", *common, "--edits", str(edits), "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "Michael Jordan plays the sport of" in table and "3 edits in one batch" in table
    for name in ("delta.safetensors", "summary.json", "config.yaml", "z/zs.safetensors", "z/context_prefixes.json",
                 "layers/layer1.safetensors", "model/config.json"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_edits"] == 3 and summary["resid_norm_after"] < summary["resid_norm_before"]
    assert list(summary["timings"]) == ["stats_s", "z_s", "apply_s", "save_s"]
    assert set(summary["peak_rss_mb"]) == {"stats", "z", "apply", "save"} and summary["rss_source"] == "sampled"
    assert all(50 < v < 24_000 for v in summary["peak_rss_mb"].values())  # a real process's MB, not bytes or KiB
    assert "memit:" in (out / "config.yaml").read_text()

    original = AutoModelForCausalLM.from_pretrained(model_dir)
    edited = AutoModelForCausalLM.from_pretrained(out / "model")
    delta = load_delta(out)
    w0, w1 = weights(original), weights(edited)
    for layer in (1, 2):
        torch.testing.assert_close(w1[layer], w0[layer] + delta.dense(layer), atol=1e-6, rtol=1e-6)

    assert main(["apply-delta", *common, "--delta", str(out), "--out", str(tmp_path / "applied")]) == 0
    applied = weights(AutoModelForCausalLM.from_pretrained(tmp_path / "applied"))
    common_edited = [*common]
    common_edited[common.index("--model.name") + 1] = str(out / "model")
    assert main(["revert", *common_edited, "--delta", str(out), "--out", str(tmp_path / "reverted")]) == 0
    reverted = weights(AutoModelForCausalLM.from_pretrained(tmp_path / "reverted"))
    for layer in (1, 2):
        torch.testing.assert_close(applied[layer], w1[layer])
        torch.testing.assert_close(reverted[layer], w0[layer], atol=1e-6, rtol=0)

    # the two stages on their own (train_z.py, apply_edits.py) give the same edit
    assert main(["z", *common, "--edits", str(edits), "--out", str(tmp_path / "z")]) == 0
    assert main(["apply", *common, "--edits", str(edits), "--z", str(tmp_path / "z"), "--out", str(tmp_path / "split"),
                 "--save_model", "false"]) == 0
    split = load_delta(tmp_path / "split")
    for layer in (1, 2):
        torch.testing.assert_close(split.dense(layer), delta.dense(layer), atol=1e-5, rtol=1e-4)


def test_bad_edit_file_fails_before_model_work(setup, tmp_path, capsys):
    _, _, common = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"subject": "X", "prompt": "no placeholder", "target_new": "y"}) + "\n")
    assert main(["edit", *common, "--edits", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "record 0" in err and "'prompt'" in err
    assert not (tmp_path / "o" / "z").exists()


def test_model_spread_over_devices_takes_the_in_process_paths(make_model, tok, tmp_path, monkeypatch):
    """A model placed by accelerate over several devices runs statistics, z and the update without
    Lightning moving it; simulated on the CPU with a two-entry device map, the edit equals the normal one."""
    from memit_pl.config import Config, MemitConfig, StatsConfig, TrainerConfig
    from memit_pl.data.edits import load_edits
    from memit_pl.editor import MEMIT
    from memit_pl.stages import runtime
    from memit_pl.stages.pipeline import run_edit
    from memit_pl.stages.stats import CovarianceModule

    real_predict = runtime.predict

    def no_trainer(cfg, module, **kw):  # the statistics stage still runs in Lightning (README: limits)
        if not isinstance(module, CovarianceModule):
            raise AssertionError("Trainer used")
        return real_predict(cfg, module, **kw)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 8))
    edits = tmp_path / "edits.jsonl"
    edits.write_text("\n".join(json.dumps(e) for e in EDITS))
    requests = load_edits(edits, tokenizer=tok)
    memit = MemitConfig(layers=[1, 2], v_num_grad_steps=3, v_lr=0.05, context_templates=[[3, 1]], mom2_update_weight=1.0)
    stats = StatsConfig(corpus=str(corpus), n_samples=16, seq_len=16)
    tcfg = TrainerConfig(accelerator="cpu", enable_progress_bar=False)
    deltas = {}
    for name in ("normal", "spread"):
        model = make_model("llama")
        if name == "spread":
            model.hf_device_map = {"model.embed_tokens": "cpu", "model.layers": "cpu:other"}
            monkeypatch.setattr(runtime, "predict", no_trainer)
        editor = MEMIT(model, tok, Config(memit=memit, stats=stats, trainer=tcfg), work_dir=tmp_path / name,
                       cache_dir=tmp_path / f"cache-{name}")
        run_edit(editor, requests, tmp_path / name, save_model=False)
        deltas[name] = load_delta(tmp_path / name)
    for layer in (1, 2):
        torch.testing.assert_close(deltas["spread"].dense(layer), deltas["normal"].dense(layer), atol=1e-5, rtol=1e-4)
