import pytest
import torch

import memit_pl.stages.zmodule as zm
from memit_pl.config import MemitConfig, TrainerConfig
from memit_pl.data.edits import EditRequest
from memit_pl.delta import apply_delta, load_delta, save_delta
from memit_pl.modeling.hooks import trace
from memit_pl.modeling.spec import get_spec
from memit_pl.stages import runtime
from memit_pl.stages.apply import KeyCollate, apply_memit, keys_and_h, prefix_groups, residual_norms
from tests.support.tiny import FAMILIES

TCFG = TrainerConfig(accelerator="cpu", enable_progress_bar=False)
REQUESTS = [
    EditRequest("0", "Michael Jordan", "{} plays the sport of", "soccer"),
    EditRequest("1", "France", "The capital of {} is", "Rome"),
    EditRequest("2", "Toyota", "{} is a car company from", "Japan"),
    EditRequest("3", "Albert Einstein", "{} was a famous", "painter"),
]
MORE = [
    EditRequest("4", "Mozart", "{} was a famous", "footballer"),
    EditRequest("5", "Canada", "The official language of {} is", "French"),
]


def memit_cfg(**kw):
    base = dict(layers=[1, 2], v_num_grad_steps=6, v_lr=0.05, z_batch_size=3, context_templates=[[3, 2]],
                mom2_update_weight=1.0, clamp_norm_factor=4.0)
    return MemitConfig(**{**base, **kw})


def covariances(model, layers, n=48, seed=0):
    """E[k kᵀ] over random token sequences (plenty of tokens: full rank)."""
    spec = get_spec(model)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (n, 24), generator=g)
    names = [spec.name("mlp_out", layer) for layer in layers]
    with torch.no_grad(), trace(model, names, inputs=True) as tr:
        model(input_ids=ids)
    out = {}
    for layer, name in zip(layers, names):
        k = tr[name].input.reshape(-1, tr[name].input.shape[-1])
        out[layer] = k.T @ k / len(k)
    return out


@pytest.fixture
def edited(make_model, tok, tmp_path):
    def run(family="llama", requests=REQUESTS, cfg=None, out="run", model=None, **kw):
        model = model if model is not None else make_model(family)
        cfg = cfg or memit_cfg()
        store = zm.compute_zs(model, tok, requests, cfg, tmp_path / out / "z", TCFG)
        before = residual_norms(model, tok, requests, store, cfg)
        delta = apply_memit(model, tok, requests, store, covariances(model, cfg.layers), cfg, tmp_path / out,
                            trainer=TCFG, **kw)
        after = residual_norms(model, tok, requests, store, cfg)
        return model, store, delta, before, after

    return run


def test_keys_are_averaged_per_context_group(make_model, tok):
    model = make_model("llama")
    spec = get_spec(model)
    prefixes = ["", "One two. ", "Three four five. ", "Six. "]
    groups = prefix_groups([[2, 2], [1, 1]])
    assert groups == [0, 1, 1, 2]
    batch = KeyCollate(tok, prefixes, groups)(REQUESTS[:2])
    keys, h = keys_and_h(model, spec, batch, 1, 2)
    name = spec.name("mlp_out", 1)
    for e, r in enumerate(REQUESTS[:2]):
        rows = []
        for p in prefixes:
            one = KeyCollate(tok, [p], [0])([r])
            with trace(model, [name], inputs=True) as tr:
                model(input_ids=one.input_ids, attention_mask=one.attention_mask)
            rows.append(tr[name].input[0, one.lookup[0]])
        expected = (rows[0] + (rows[1] + rows[2]) / 2 + rows[3]) / 3
        torch.testing.assert_close(keys[e], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])
def test_keys_below_l_and_h_in_two_passes_equal_one_full_pass(make_model, tok, family):
    """Below L the prefixed rows stop at layer l and only the bare prompts go on to block L: the same k,
    h^L and W k as one pass of every row through block L (the reference's form)."""
    model = make_model(family)
    spec = get_spec(model)
    prefixes = ["", "One two. ", "Three four five. "]
    batch = KeyCollate(tok, prefixes, prefix_groups([[3, 2]]))(REQUESTS)
    key_name, h_name = spec.name("mlp_out", 0), spec.name("block", 2)
    with torch.no_grad(), trace(model, [key_name, h_name], inputs=True) as tr:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    rows = torch.arange(len(batch.lookup))
    want_k = tr[key_name].input[rows, batch.lookup].view(len(REQUESTS), 3, -1)
    want_k = (want_k[:, 0] + want_k[:, 1:].mean(1)) / 2
    want_m = tr[key_name].output[rows, batch.lookup].view(len(REQUESTS), 3, -1)
    want_m = (want_m[:, 0] + want_m[:, 1:].mean(1)) / 2
    want_h = tr[h_name].output[batch.init_rows, batch.lookup[batch.init_rows]]
    keys, h, m = keys_and_h(model, spec, batch, 0, 2, mlp_out=True)
    torch.testing.assert_close(keys, want_k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m, want_m, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, want_h, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layer", [0, 2])
def test_shared_context_prefixes_give_the_same_keys_and_h(make_model, tok, family, layer):
    """memit.update_prefix_cache: the tokens a prefix's rows share run once (key/value cache) and each row
    only its own after them; k, W k and h^L equal the plain passes', below L and at L, in every family."""
    from memit_pl.stages.apply import _shared_prefix_rows

    model = make_model(family)
    spec = get_spec(model)
    prefixes = ["", "One two. ", "Three four five. ", "Six seven. "]
    batch = KeyCollate(tok, prefixes, prefix_groups([[3, 3]]))(REQUESTS + MORE)
    rows = torch.arange(1, len(batch.lookup), len(prefixes))  # the rows behind "One two. "
    common = (batch.input_ids[rows] == batch.input_ids[rows[:1]]).all(0).long().cumprod(0).sum()
    assert common >= 2  # the prefix's tokens are shared: the cached path is exercised
    calls = {False: [], True: []}
    real = model.forward
    for shared in (False, True):
        model.forward = lambda *a, **k: calls[shared].append(k["input_ids"].shape) or real(*a, **k)  # noqa: B023
        if shared:
            got = keys_and_h(model, spec, batch, layer, 2, mlp_out=True, share_prefixes=True)
        else:
            want = keys_and_h(model, spec, batch, layer, 2, mlp_out=True)
    model.forward = real
    assert sum(r * c for r, c in calls[True]) < sum(r * c for r, c in calls[False])  # fewer positions computed
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    # a left-padded batch falls back to the plain passes
    left = KeyCollate(tok, prefixes, prefix_groups([[3, 3]]))(REQUESTS)
    n = left.attention_mask.sum(1)
    width = left.attention_mask.shape[1]
    ids = torch.stack([torch.cat([r.new_zeros(width - k), r[:k]]) for r, k in zip(left.input_ids, n)])
    flipped = type(left)(**{**left.__dict__, "input_ids": ids, "attention_mask": (ids * 0 + 1) * (
        torch.arange(width) >= (width - n)[:, None]), "lookup": left.lookup + width - n})
    for w, g in zip(keys_and_h(model, spec, flipped, layer, 2), keys_and_h(model, spec, flipped, layer, 2,
                                                                        share_prefixes=True)):
        torch.testing.assert_close(g, w, atol=0, rtol=0)
    name, one = spec.name("mlp_out", layer), slice(1, 2)
    with torch.no_grad(), trace(model, [name], inputs=True) as tr:
        model(input_ids=batch.input_ids[one], attention_mask=batch.attention_mask[one])
    with torch.no_grad():
        x_in, x_out = _shared_prefix_rows(model, name, batch.input_ids[one], batch.attention_mask[one],
                                          batch.lookup[one])  # one row: every column before the key cached
    at = int(batch.lookup[1])
    torch.testing.assert_close(x_in[0], tr[name].input[0, at], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x_out[0], tr[name].output[0, at], atol=1e-5, rtol=1e-5)


def test_the_update_with_shared_prefixes_writes_the_same_delta(edited):
    _, _, plain, _, after_plain = edited(out="plain")
    _, _, shared, _, after_shared = edited(cfg=memit_cfg(update_prefix_cache=True), out="shared")
    for layer in plain.layers:
        torch.testing.assert_close(shared.dense(layer), plain.dense(layer), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(after_shared, after_plain, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_update_moves_h_toward_z(edited, family):
    """After the update, h^L is much closer to z (gpt2: a transposed Conv1D weight)."""
    model, store, delta, before, after = edited(family, cfg=memit_cfg(mom2_update_weight=1e-3))
    assert delta.layers == [1, 2]
    assert float(after.mean()) < 0.2 * float(before.mean())


def test_a_norm_after_the_mlp_is_inverted(edited, monkeypatch):
    """Gemma 3 normalises the MLP's output before adding it to the stream. With the targets mapped
    through the norm, h^L moves toward z (not all the way: a norm's output has a fixed size, so two
    layers cannot express the radial part of z − h^L); added unmapped, the update overshoots and h^L
    ends further from z than it started, which is why a spec that omits such a norm is refused."""
    *_, before, after = edited("gemma3_text", cfg=memit_cfg(mom2_update_weight=1e-3))
    assert float(after.mean()) < 0.5 * float(before.mean())
    import dataclasses

    from memit_pl.modeling import spec as spec_module
    from memit_pl.stages import apply as apply_module

    plain = dataclasses.replace(spec_module.SPECS["gemma3_text"], mlp_post_norm=None)
    monkeypatch.setitem(spec_module.SPECS, "gemma3_text", plain)
    with pytest.raises(ValueError, match="post_feedforward_layernorm.*mlp_post_norm"):
        edited("gemma3_text", cfg=memit_cfg(mom2_update_weight=1e-3), out="refused")
    monkeypatch.setattr(apply_module, "_check_post_norm", lambda model, spec: None)
    *_, before, after = edited("gemma3_text", cfg=memit_cfg(mom2_update_weight=1e-3), out="unmapped")
    assert float(after.mean()) > 2 * float(before.mean())


def test_apply_then_revert_restores_logits(edited, make_model, tok, tmp_path):
    model, store, delta, *_ = edited("llama")
    fresh = make_model("llama")
    enc = tok(["Michael Jordan plays the sport of", "The capital of France is"], return_tensors="pt", padding=True)
    reference = fresh(**enc).logits
    assert (model(**enc).logits - reference).abs().max() > 1e-3
    path = save_delta(tmp_path / "d", delta)
    apply_delta(model, path, sign=-1)
    assert (model(**enc).logits - reference).abs().max() <= 1e-5
    apply_delta(fresh, load_delta(tmp_path / "d"))  # the saved delta reproduces the edit on a fresh model
    apply_delta(model, load_delta(tmp_path / "d"))
    torch.testing.assert_close(model(**enc).logits, fresh(**enc).logits)


def test_resume_reuses_saved_layers(edited, make_model, tok, tmp_path, monkeypatch):
    model, store, delta, *_ = edited("llama")
    fresh = make_model("llama")
    monkeypatch.setattr(runtime, "predict", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    cfg = memit_cfg()
    again = apply_memit(fresh, tok, REQUESTS, store, covariances(fresh, cfg.layers), cfg, tmp_path / "run", trainer=TCFG)
    spec = get_spec(model)
    for layer in cfg.layers:
        torch.testing.assert_close(spec.out_weight(fresh, layer), spec.out_weight(model, layer))
        torch.testing.assert_close(again.dense(layer), delta.dense(layer))
    # the layers' seconds are those the first run recorded, so a resumed update's total stays whole
    assert delta.metadata["reused_layers"] == [] and again.metadata["reused_layers"] == list(cfg.layers)
    assert again.metadata["layer_seconds"] == delta.metadata["layer_seconds"]
    assert all(s > 0 for s in delta.metadata["layer_seconds"].values())


def test_sequential_rounds_keep_the_first(edited, make_model, tok, tmp_path):
    """Round 2 with round 1's keys preserved disturbs round 1's edits less than round 2 alone."""
    from memit_pl.stages.pipeline import previous_keys

    cfg = memit_cfg(mom2_update_weight=0.5)
    kept = {}
    for name, prev in (("plain", None), ("kept", True)):
        model, store1, *_ = edited("llama", cfg=cfg, out=f"r1-{name}")
        first = residual_norms(model, tok, REQUESTS, store1, cfg)
        kw = {"prev_keys": previous_keys([tmp_path / f"r1-{name}"], cfg.layers)} if prev else {}
        edited("llama", requests=MORE, cfg=cfg, out=f"r2-{name}", model=model, **kw)
        kept[name] = float((residual_norms(model, tok, REQUESTS, store1, cfg) - first).abs().mean())
    assert kept["kept"] < 0.5 * kept["plain"]


def test_store_layer_mismatch_is_an_error(edited, make_model, tok, tmp_path):
    model = make_model("llama")
    store = zm.compute_zs(model, tok, REQUESTS[:1], memit_cfg(), tmp_path / "z", TCFG)
    cfg = memit_cfg(layers=[1, 3])
    with pytest.raises(ValueError, match="layer"):
        apply_memit(model, tok, REQUESTS[:1], store, covariances(model, cfg.layers), cfg, tmp_path / "x", trainer=TCFG)


@pytest.mark.slow
def test_smollm2_ten_edits_take(smollm2, tmp_path, monkeypatch):
    """SmolLM2-135M, 10 demo facts in one batch with the shipped config: efficacy ≥ 90%, and the
    edit is reverted exactly by its delta."""
    from pathlib import Path

    import yaml

    from memit_pl.config import Config, EvalConfig, StatsConfig
    from memit_pl.data.edits import load_edits
    from memit_pl.editor import MEMIT
    from memit_pl.stages.evaluate import evaluate_requests
    from memit_pl.stages.pipeline import run_edit

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = Path(__file__).resolve().parents[1]
    model, tok = smollm2
    requests = load_edits(root / "data" / "demo_edits.jsonl", tokenizer=tok, limit=10)
    memit = MemitConfig(**yaml.safe_load((root / "configs" / "smollm2-135m.yaml").read_text())["memit"])
    memit.mom2_update_weight = 1000.0  # the demo's efficacy-first λ (the shipped one is tuned for hundreds of edits)
    spec = get_spec(model)
    original = {layer: spec.out_weight(model, layer).clone() for layer in memit.layers}
    try:
        editor = MEMIT(model, tok, Config(memit=memit, stats=StatsConfig(corpus="wikipedia-sample", n_samples=100),
                                          trainer=TCFG), work_dir=tmp_path)
        summary = run_edit(editor, requests, tmp_path, save_model=False)
        res = evaluate_requests(model, tok, requests, EvalConfig(max_generation_prompts=0))
        assert res["metrics"]["ES"] >= 90.0
        assert summary["top1_new_after"] >= 0.8
        assert summary["resid_norm_after"] < summary["resid_norm_before"]
        apply_delta(model, load_delta(tmp_path), sign=-1)
        for layer in memit.layers:
            torch.testing.assert_close(spec.out_weight(model, layer), original[layer], atol=1e-5, rtol=0)
    finally:
        with torch.no_grad():
            for layer in memit.layers:
                spec.out_weight(model, layer).copy_(original[layer])
