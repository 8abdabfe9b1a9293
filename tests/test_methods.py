"""The methods beside MEMIT: ROME's sequential rank-one updates and FT-W, against their definitions."""

import pytest
import torch

from memit_pl import MemitConfig, io
from memit_pl.functional.solve import rome_update
from memit_pl.modeling.spec import get_spec
from memit_pl.stages.finetune import finetune
from memit_pl.stages.zbatch import build_z_batch
from tests.test_editor import requests, weights


def _problem(n=5, d_model=6, d_key=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, d_key, generator=g, dtype=torch.float64)
    cov = x.T @ x / 200
    return (torch.randn(n, d_key, generator=g, dtype=torch.float64), torch.randn(n, d_model, generator=g, dtype=torch.float64),
            cov, torch.randn(d_model, d_key, generator=g, dtype=torch.float64))


def test_one_rome_edit_is_the_papers_closed_form():
    k, r, cov, w = _problem(n=1)
    a, b = rome_update(k, r, cov)
    v_star = w @ k[0] + r[0]  # the value the edit asks W k* to become
    c_inv_k = torch.linalg.inv(cov) @ k[0]
    expected = w + torch.outer((v_star - w @ k[0]) / (c_inv_k @ k[0]), c_inv_k)  # Ŵ = W + Λ (C⁻¹k*)ᵀ
    torch.testing.assert_close((w + a.double() @ b.double().T), expected, rtol=1e-5, atol=1e-5)


def test_rome_applies_the_edits_one_after_the_other():
    k, r, cov, w = _problem(n=6)
    a, b = rome_update(k, r, cov)
    cur = w.clone()
    for i in range(len(k)):  # each edit on the weight the previous ones left, towards its own target
        v_star = w @ k[i] + r[i]
        u = torch.linalg.solve(cov, k[i])
        cur = cur + torch.outer((v_star - cur @ k[i]) / (u @ k[i]), u)
    torch.testing.assert_close(w + a.double() @ b.double().T, cur, rtol=1e-4, atol=1e-4)
    # the last edit hits its target exactly; earlier ones were moved by the later updates
    assert torch.allclose(cur @ k[-1], w @ k[-1] + r[-1], atol=1e-8)
    assert not torch.allclose(cur @ k[0], w @ k[0] + r[0], atol=1e-3)


def test_rome_edits_only_layer_l_from_the_same_z(editor):
    rome = MemitConfig(**{**vars(editor.memit), "method": "rome"})
    layers = editor.memit.layers
    before = weights(editor, layers)
    with editor.edited(requests()) as memit_delta:
        pass
    runs = editor.z_runs
    with editor.edited(requests(), rome) as delta:
        after = weights(editor, layers)
    assert delta.layers == [max(layers)] and memit_delta.layers == layers
    assert editor.z_runs == runs + 1  # the z stage ran (its store is the one MEMIT wrote: same layer L)
    for layer in layers[:-1]:
        assert torch.equal(after[layer], before[layer])
    assert not torch.equal(after[max(layers)], before[max(layers)])
    for layer, w in weights(editor, layers).items():  # restored on exit
        assert torch.equal(w, before[layer])


def _nll(model, tok, reqs):
    """Mean NLL of the new objects after the rewrite prompts, by a plain full forward pass."""
    batch = build_z_batch(tok, reqs, [""])
    rows = batch.rewrite_rows
    logp = torch.log_softmax(model(input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows]).logits, -1)
    total = []
    for i in range(len(rows)):
        t = batch.target_ids[i]
        p = batch.target_pos[i]
        real = t != -100
        total.append(-logp[i, p[real], t[real]].mean())
    return float(torch.stack(total).mean())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_ft_first_step_is_adam_on_the_full_models_gradient(make_model, tok, family):
    model = make_model(family)
    spec = get_spec(model)
    reqs = requests()
    cfg = MemitConfig(layers=[1, 2], ft_layer=1, ft_steps=1, ft_lr=1e-3, ft_loss_threshold=0.0)
    w = spec.out_weight(model, 1)
    w0 = w.detach().clone()
    # the reference: autograd through the whole model's forward pass
    w.requires_grad_(True)
    batch = build_z_batch(tok, reqs, [""])
    rows = batch.rewrite_rows
    logp = torch.log_softmax(model(input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows]).logits, -1)
    losses = []
    for i in range(len(rows)):
        t, p = batch.target_ids[i], batch.target_pos[i]
        real = t != -100
        losses.append(-logp[i, p[real], t[real]].mean())
    torch.stack(losses).mean().backward()
    g = w.grad.detach().clone()
    w.grad = None
    w.requires_grad_(False)
    expected = w0 - 1e-3 * g / (g.abs() + 1e-8)  # Adam's first step
    delta = finetune(model, tok, reqs, cfg)
    assert delta.layers == [1]
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=2e-6)
    d = delta.dense(1)
    torch.testing.assert_close(d.T if spec.transposed else d, w.detach() - w0, rtol=0, atol=1e-6)
    assert not any(p.requires_grad for p in model.parameters())


def test_ft_lowers_the_nll_and_the_decay_keeps_the_weight_closer(make_model, tok):
    reqs = requests()
    norms = {}
    for wd in (0.0, 50.0):
        model = make_model("llama")
        before = _nll(model, tok, reqs)
        delta = finetune(model, tok, reqs, MemitConfig(layers=[1, 2], ft_lr=3e-2, ft_steps=10, ft_weight_decay=wd))
        assert _nll(model, tok, reqs) < before - (0.3 if wd == 0 else 0.0)
        assert delta.metadata["ft_steps"] <= 10
        norms[wd] = float(delta.dense(2).norm())
    assert norms[50.0] < 0.9 * norms[0.0]


def test_ft_stops_early_at_the_loss_threshold(make_model, tok):
    model = make_model("llama")
    seen = []
    delta = finetune(model, tok, requests(), MemitConfig(layers=[1, 2], ft_lr=0.1, ft_steps=25, ft_loss_threshold=5.8),
                     on_step=lambda step, nll: seen.append(nll))
    assert seen[-1] < 5.8 < seen[-2] and len(seen) < 25 and delta.metadata["ft_steps"] == len(seen)
    assert abs(_nll(model, tok, requests()) - seen[-1]) < 1e-4  # the model holds the weight that reached it


def test_ft_resumes_from_its_checkpoint_on_the_same_trajectory(make_model, tok, tmp_path):
    """An FT-W run stopped after two steps and resumed from its checkpoint ends where an uninterrupted run
    does (weight, steps, NLL); a checkpoint of another run is refused."""
    cfg = MemitConfig(layers=[1, 2], ft_lr=3e-2, ft_steps=5, ft_weight_decay=1.0, ft_loss_threshold=0.0)
    full_nll = []
    full = finetune(make_model("llama"), tok, requests(), cfg, on_step=lambda s, nll: full_nll.append(nll))
    ckpt = tmp_path / "ft.safetensors"

    class Stop(Exception):
        pass

    def stop_at_2(step, nll):
        if step == 2:
            raise Stop

    model = make_model("llama")
    w0 = get_spec(model).out_weight(model, 2).detach().clone()
    with pytest.raises(Stop):
        finetune(model, tok, requests(), cfg, on_step=stop_at_2, checkpoint=ckpt)
    assert ckpt.exists()
    model = make_model("llama")  # a new process: the unedited weights again
    torch.testing.assert_close(get_spec(model).out_weight(model, 2), w0, rtol=0, atol=0)
    before = io.load_tensors(ckpt)[1]["seconds"]
    seen = []
    resumed = finetune(model, tok, requests(), cfg, on_step=lambda s, nll: seen.append(s), checkpoint=ckpt)
    assert seen == [2, 3, 4] and resumed.metadata["ft_steps"] == full.metadata["ft_steps"] == 5
    assert resumed.metadata["ft_final_nll"] == pytest.approx(full_nll[-1], rel=1e-5)
    assert resumed.metadata["ft_seconds"] >= before > 0  # the interrupted steps' seconds count
    torch.testing.assert_close(resumed.dense(2), full.dense(2), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not of this run"):
        finetune(make_model("llama"), tok, requests()[:1], cfg, checkpoint=ckpt)


def test_ft_through_the_editor_resumes_and_restores(editor):
    ft = MemitConfig(**{**vars(editor.memit), "method": "ft", "ft_layer": 0, "ft_lr": 5e-3, "ft_steps": 3})
    before = weights(editor, [0, 1, 2])
    with editor.edited(requests(), ft) as delta:
        after = weights(editor, [0, 1, 2])
    assert delta.layers == [0] and not torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert all(torch.equal(w, before[k]) for k, w in weights(editor, [0, 1, 2]).items())
    runs = editor.z_runs
    with editor.edited(requests(), ft) as again:  # the saved delta is re-applied, nothing is recomputed
        torch.testing.assert_close(again.dense(0), delta.dense(0))
        torch.testing.assert_close(weights(editor, [0])[0], after[0], rtol=0, atol=1e-6)
    assert editor.z_runs == runs
    with pytest.raises(ValueError, match="no z store"):
        editor.apply(requests(), None, ft)


@pytest.mark.parametrize("method, layers", [("ft", [0]), ("rome", [2])])
def test_the_edit_command_takes_every_method(tiny_dir, tmp_path, method, layers):
    import json

    from memit_pl import cli
    from tests.test_editor import FACTS

    d, corpus = tiny_dir
    edits = tmp_path / "e.jsonl"
    edits.write_text("".join(json.dumps({"subject": s, "prompt": p, "target_new": o}) + "\n" for p, s, o in FACTS))
    out = tmp_path / "out"
    rc = cli.main(["edit", "--edits", str(edits), "--model.name", str(d), "--model.device", "cpu", "--out", str(out),
                   "--memit.layers", "[1, 2]", "--memit.v_num_grad_steps", "2", "--memit.method", method,
                   "--memit.ft_layer", "0", "--memit.ft_steps", "2", "--stats.corpus", str(corpus),
                   "--stats.n_samples", "16", "--stats.seq_len", "16", "--model.cache_dir", str(tmp_path / "cache"),
                   "--save_model", "true", "--trainer.enable_progress_bar", "false"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["layers"] == layers
    stages = ["ft"] if method == "ft" else ["stats", "z", "apply"]
    assert list(summary["peak_rss_mb"]) == [*stages, "save"] and list(summary["timings"]) == [f"{s}_s" for s in [*stages, "save"]]
    assert (out / "model" / "config.json").exists()
    from memit_pl import EditDelta

    assert EditDelta.load(out).layers == layers
