"""hooks.py against output_hidden_states, for every family; hooks always removed; out of place."""

import pytest
import torch
from torch import nn

from memit_pl.modeling.hooks import (
    add_to_output,
    edit_input,
    edit_output,
    gather_positions,
    scatter_add,
    stop_after,
    trace,
)
from memit_pl.modeling.spec import get_spec
from tests.support.tiny import FAMILIES


def _hooks_of(model: nn.Module) -> set:
    """Every registered forward / pre-forward hook, by module and id.

    Transformers installs its own output-capturing hooks on the first ``output_hidden_states``
    call and keeps them; ours must leave exactly that set behind.
    """
    return {
        (name, kind, key)
        for name, m in model.named_modules()
        for kind in ("_forward_hooks", "_forward_pre_hooks")
        for key in getattr(m, kind)
    }


@pytest.fixture(scope="module")
def models(tok):
    from tests.support.tiny import tiny_model

    out = {}
    for f in FAMILIES:
        model = tiny_model(f, vocab_size=len(tok))
        model(torch.zeros(1, 2, dtype=torch.long), output_hidden_states=True, use_cache=False)
        model.baseline_hooks = _hooks_of(model)  # transformers' own
        out[f] = model
    return out


def _no_hooks(model: nn.Module) -> bool:
    """No hook of ours is left (only the model's own)."""
    return _hooks_of(model) == getattr(model, "baseline_hooks", set())


def _ids(tok, batch: int = 2, pos: int = 7) -> torch.Tensor:
    return torch.randint(0, len(tok), (batch, pos))


@pytest.mark.parametrize("family", FAMILIES)
def test_trace_blocks_equal_hidden_states(models, family, tok):
    model = models[family]
    spec = get_spec(model)
    n = spec.n_layers(model)
    ids = _ids(tok)
    ref = model(ids, output_hidden_states=True, use_cache=False)
    blocks = [spec.name("block", i) for i in range(n)]
    with trace(model, [*blocks, spec.name("final_norm")], inputs=True) as tr:
        out = model(ids, use_cache=False)
    assert _no_hooks(model)
    assert len(ref.hidden_states) == n + 1
    for i in range(n - 1):  # hidden_states[i + 1] is block i's output ...
        torch.testing.assert_close(tr[blocks[i]].output, ref.hidden_states[i + 1], rtol=0, atol=0)
        torch.testing.assert_close(tr[blocks[i + 1]].input, ref.hidden_states[i + 1], rtol=0, atol=0)
    # ... except the last, which Hugging Face reports after the final norm
    torch.testing.assert_close(tr[spec.name("final_norm")].input, tr[blocks[-1]].output, rtol=0, atol=0)
    torch.testing.assert_close(tr[spec.name("final_norm")].output, ref.hidden_states[-1], rtol=0, atol=0)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)  # tracing changes nothing
    assert tr[blocks[0]].output.requires_grad is False


@pytest.mark.parametrize("family", FAMILIES)
def test_trace_mlp_out_inputs(models, family, tok):
    """The captured input of mlp_out (the key) reproduces its output when fed back."""
    model = models[family]
    spec = get_spec(model)
    ids = _ids(tok)
    names = [spec.name("mlp_out", i) for i in range(spec.n_layers(model))]
    with trace(model, names, inputs=True, outputs=True) as tr:
        model(ids, use_cache=False)
    for name in names:
        k = tr[name].input
        assert k.shape == (2, 7, spec.d_key(model))
        torch.testing.assert_close(model.get_submodule(name)(k), tr[name].output)
    assert tr[names[0]].input is not tr[names[1]].input
    with trace(model, names[:1], inputs=True, outputs=False) as tr:
        model(ids, use_cache=False)
    assert tr[names[0]].output is None and tr[names[0]].input is not None


def test_trace_without_detach_keeps_the_graph(models, tok):
    model = models["llama"]
    spec = get_spec(model)
    emb = model.get_input_embeddings()(_ids(tok)).requires_grad_(True)
    with trace(model, [spec.name("block", 1)], detach=False) as tr:
        model(inputs_embeds=emb, use_cache=False)
    tr[spec.name("block", 1)].output.sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3_text"])
def test_trace_stop_really_stops(models, family, tok):
    model = models[family]
    spec = get_spec(model)
    ids = _ids(tok)
    full = model(ids, output_hidden_states=True, use_cache=False)
    reached = []
    with trace(model, [spec.name("block", 2), spec.name("final_norm"), spec.name("lm_head")]) as outer:
        with trace(model, [spec.name("block", 1), spec.name("mlp_out", 0)], stop=True) as tr:
            model(ids, use_cache=False)
            reached.append("after the forward")  # never runs: the pass was stopped
    assert reached == []
    torch.testing.assert_close(tr[spec.name("block", 1)].output, full.hidden_states[2])
    assert tr[spec.name("mlp_out", 0)].output is not None
    for later in outer.values():
        assert later.output is None  # nothing past block 1 ran
    assert _no_hooks(model)
    model(ids, use_cache=False)  # the model still works afterwards


def test_trace_without_stop_runs_everything(models, tok):
    model = models["llama"]
    spec = get_spec(model)
    with trace(model, [spec.name("final_norm")]) as outer:
        with trace(model, [spec.name("block", 0)]):
            model(_ids(tok), use_cache=False)
    assert outer[spec.name("final_norm")].output is not None


def test_stop_after(models, tok):
    model = models["qwen2"]
    spec = get_spec(model)
    ran = []
    with trace(model, [spec.name("block", 1), spec.name("block", 2), spec.name("lm_head")]) as tr:
        with stop_after(model, spec.name("block", 1)):
            model(_ids(tok), use_cache=False)
            ran.append(True)
    assert ran == []
    assert tr[spec.name("block", 1)].output is not None
    assert tr[spec.name("block", 2)].output is None and tr[spec.name("lm_head")].output is None
    assert _no_hooks(model)


@pytest.mark.parametrize(
    "ctx",
    [
        lambda m, s: trace(m, [s.name("block", 0), s.name("mlp_out", 1)], inputs=True),
        lambda m, s: trace(m, [s.name("block", 0)], stop=True),
        lambda m, s: stop_after(m, s.name("block", 3)),
        lambda m, s: edit_output(m, s.name("block", 1), lambda y: y + 1),
        lambda m, s: edit_input(m, s.name("mlp_out", 1), lambda x: x * 2),
        lambda m, s: add_to_output(m, s.name("block", 1), torch.ones(1, 32), torch.tensor([0]), torch.tensor([2])),
    ],
    ids=["trace", "trace-stop", "stop_after", "edit_output", "edit_input", "add_to_output"],
)
def test_hooks_removed_after_block_and_after_exception(models, tok, ctx):
    model = models["gpt2"]
    spec = get_spec(model)
    with ctx(model, spec):
        assert not _no_hooks(model)
        model(_ids(tok), use_cache=False)
    assert _no_hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with ctx(model, spec):
            assert not _no_hooks(model)
            raise RuntimeError("boom")
    assert _no_hooks(model)


def test_bad_module_name_leaves_no_hook(models):
    model = models["llama"]
    with pytest.raises(AttributeError):
        with trace(model, ["model.layers.0", "model.layers.99"]):
            pass
    assert _no_hooks(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_add_to_output_exactly_at_positions(models, family, tok):
    model = models[family]
    spec = get_spec(model)
    ids = _ids(tok, batch=3, pos=6)
    name = spec.name("block", 1)
    b_idx, p_idx = torch.tensor([0, 2, 2]), torch.tensor([3, 1, 5])
    delta = torch.randn(3, spec.d_model(model))
    with trace(model, [name, spec.name("block", 2)]) as clean:
        ref = model(ids, use_cache=False)
    with add_to_output(model, name, delta, b_idx, p_idx):
        with trace(model, [name, spec.name("block", 2)]) as tr:  # registered after: sees the edit
            out = model(ids, use_cache=False)
    assert _no_hooks(model)
    expected = torch.zeros_like(clean[name].output)
    expected[b_idx, p_idx] = delta
    torch.testing.assert_close(tr[name].output - clean[name].output, expected, rtol=0, atol=1e-6)
    # downstream: the untouched row is unchanged; edited rows change only from the first edited position
    torch.testing.assert_close(out.logits[1], ref.logits[1])
    torch.testing.assert_close(out.logits[0, :3], ref.logits[0, :3])
    torch.testing.assert_close(out.logits[2, :1], ref.logits[2, :1])
    assert (out.logits[0, 3] - ref.logits[0, 3]).abs().max() > 1e-4
    assert (tr[spec.name("block", 2)].output[2, 1] - clean[spec.name("block", 2)].output[2, 1]).abs().max() > 1e-4


def test_add_to_output_is_differentiable_in_delta(tok):
    from tests.support.tiny import tiny_model

    # GPT-2: its norms compute in the input dtype (Llama's RMSNorm upcasts to float32 only)
    model = tiny_model("gpt2", vocab_size=len(tok), n_layer=2, d_model=16, d_ff=32).double()
    spec = get_spec(model)
    ids = _ids(tok, batch=2, pos=5)
    b_idx, p_idx = torch.tensor([0, 1]), torch.tensor([2, 4])

    def f(delta):
        with add_to_output(model, spec.name("block", 0), delta, b_idx, p_idx):
            return model(ids, use_cache=False).logits[:, -1, :5]

    delta = torch.randn(2, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (delta,), eps=1e-6, atol=1e-5)
    loss = f(delta).sum()
    loss.backward()
    assert delta.grad.abs().sum() > 0
    assert _no_hooks(model)


def test_hooks_do_not_mutate_tensors(models, tok):
    """An earlier hook's view of the output is not changed by a later editing hook."""
    model = models["llama"]
    spec = get_spec(model)
    ids = _ids(tok)
    name = spec.name("block", 1)
    with trace(model, [name]) as clean:
        model(ids, use_cache=False)
    with trace(model, [name]) as before:  # registered first: captures the module's own output
        with add_to_output(model, name, torch.ones(1, 32) * 5, torch.tensor([1]), torch.tensor([3])):
            with edit_output(model, name, lambda y: y * 3):
                model(ids, use_cache=False)
    torch.testing.assert_close(before[name].output, clean[name].output, rtol=0, atol=0)

    x = torch.randn(2, 4, 32)
    x0 = x.clone()
    out = scatter_add(x, torch.tensor([0, 1]), torch.tensor([1, 1]), torch.ones(2, 32))
    assert torch.equal(x, x0) and out.data_ptr() != x.data_ptr()


def test_scatter_add_and_gather_positions():
    x = torch.randn(3, 5, 4)
    delta = torch.randn(3, 4)
    out = scatter_add(x, torch.tensor([1, 1, 2]), torch.tensor([0, 0, 4]), delta)
    expected = x.clone()
    expected[1, 0] += delta[0] + delta[1]  # repeated positions accumulate
    expected[2, 4] += delta[2]
    torch.testing.assert_close(out, expected)
    pos = torch.tensor([4, 0, 2])
    torch.testing.assert_close(gather_positions(x, pos), x[torch.arange(3), pos])
    # a non-contiguous input works too
    xt = torch.randn(5, 3, 4).transpose(0, 1)
    torch.testing.assert_close(scatter_add(xt, torch.tensor([0]), torch.tensor([1]), delta[:1])[0, 1], xt[0, 1] + delta[0])


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "mistral"])
def test_edit_output_feeds_the_next_block(models, family, tok):
    """Block outputs (tuples for some families) are replaced in their first element only."""
    model = models[family]
    spec = get_spec(model)
    ids = _ids(tok)
    const = torch.full((spec.d_model(model),), 0.5)
    with edit_output(model, spec.name("block", 1), lambda y: y * 0 + const):
        with trace(model, [spec.name("block", 2)], inputs=True) as tr:
            out = model(ids, use_cache=False)
    torch.testing.assert_close(tr[spec.name("block", 2)].input, const.expand(2, 7, -1))
    # every position sees the same residual from block 2 on, so rows of equal length agree at a position
    assert out.logits.shape == (2, 7, len(tok))
    assert _no_hooks(model)


def test_edit_input_positional_and_keyword(models, tok):
    model = models["llama"]
    spec = get_spec(model)
    name = spec.name("mlp_out", 2)
    proj = model.get_submodule(name)
    x = torch.randn(2, 3, spec.d_key(model))
    x0 = x.clone()
    with edit_input(model, name, lambda t: t * 2 + 1):
        y_pos = proj(x)
        y_kw = proj(input=x)
    assert torch.equal(x, x0)  # the caller's tensor is not mutated
    torch.testing.assert_close(y_pos, proj(x0 * 2 + 1))
    torch.testing.assert_close(y_kw, proj(x0 * 2 + 1))
    assert _no_hooks(model)
    # in a full pass: doubling the key of layer 2 doubles that layer's MLP output (no bias)
    ids = _ids(tok)
    with trace(model, [name]) as clean:
        model(ids, use_cache=False)
    with edit_input(model, name, lambda t: 2 * t), trace(model, [name]) as tr:
        model(ids, use_cache=False)
    torch.testing.assert_close(tr[name].output, 2 * clean[name].output)

