"""ModelSpec per family, on tiny random models built in code (no download)."""

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from memit_pl.modeling import spec as spec_mod
from memit_pl.modeling.hooks import trace
from memit_pl.modeling.spec import ModelSpec, UnknownModelFamily, get_spec, register_spec
from tests.support.tiny import FAMILIES

FIELDS = ("block", "mlp", "mlp_out", "attn", "final_norm", "lm_head", "embed")
D_MODEL, D_FF, N_LAYER = 32, 64, 4


@pytest.fixture(scope="module")
def models(tok):
    """One tiny model per family (built once for this file)."""
    from tests.support.tiny import tiny_model

    return {f: tiny_model(f, vocab_size=len(tok)) for f in FAMILIES}


def test_every_family_has_a_spec():
    assert set(FAMILIES) <= set(spec_mod.SPECS)


@pytest.mark.parametrize("family", FAMILIES)
def test_module_paths_resolve(models, family):
    model = models[family]
    spec = get_spec(model)
    assert spec.family == family
    assert spec.n_layers(model) == N_LAYER
    for layer in range(N_LAYER):
        for what in FIELDS:
            assert isinstance(spec.module(model, what, layer), nn.Module), (family, what, layer)
    # layer-wise templates really depend on the layer; global ones do not
    assert spec.name("mlp_out", 0) != spec.name("mlp_out", 1)
    assert spec.name("final_norm", 0) == spec.name("final_norm", 3)
    assert spec.module(model, "embed") is model.get_input_embeddings()
    assert spec.module(model, "lm_head") is model.get_output_embeddings()
    # the block list: block i is the i-th element of one ModuleList
    blocks = [spec.module(model, "block", i) for i in range(N_LAYER)]
    assert len({id(b) for b in blocks}) == N_LAYER
    for i in range(N_LAYER):
        for what in ("mlp", "mlp_out", "attn"):
            assert spec.name(what, i).startswith(spec.name("block", i) + ".")


@pytest.mark.parametrize("family", FAMILIES)
def test_sizes_and_transposed(models, family):
    model = models[family]
    spec = get_spec(model)
    assert spec.d_model(model) == D_MODEL
    assert spec.d_key(model) == D_FF
    assert spec.transposed is (family == "gpt2")
    w = spec.out_weight(model, 2)
    assert w is spec.module(model, "mlp_out", 2).weight
    assert tuple(w.shape) == ((D_FF, D_MODEL) if spec.transposed else (D_MODEL, D_FF))


@pytest.mark.parametrize("family", FAMILIES)
def test_modules_play_their_roles(models, family, tok):
    """mlp_out is the MLP's last op (its input is the key), final_norm/lm_head make the logits."""
    model = models[family]
    spec = get_spec(model)
    ids = torch.randint(0, len(tok), (2, 6))
    names = [spec.name("mlp_out", 1), spec.name("mlp", 1), spec.name("attn", 1), spec.name("final_norm"), spec.name("lm_head")]
    with trace(model, names, inputs=True) as tr:
        out = model(ids, use_cache=False, output_hidden_states=True)
    key = tr[spec.name("mlp_out", 1)].input
    assert key.shape == (2, 6, spec.d_key(model))
    torch.testing.assert_close(tr[spec.name("mlp_out", 1)].output, tr[spec.name("mlp", 1)].output)
    # the edited weight maps the key to the MLP output (plus bias): W k or k W for Conv1D
    w = spec.out_weight(model, 1)
    bias = getattr(spec.module(model, "mlp_out", 1), "bias", None)
    lin = key @ w if spec.transposed else key @ w.T
    if bias is not None:
        lin = lin + bias
    torch.testing.assert_close(lin, tr[spec.name("mlp_out", 1)].output)
    assert tr[spec.name("attn", 1)].output.shape == (2, 6, D_MODEL)
    torch.testing.assert_close(tr[spec.name("final_norm")].output, out.hidden_states[-1])
    torch.testing.assert_close(tr[spec.name("lm_head")].output, out.logits)


def _tiny(model_type: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, vocab_size=100, **kw)).eval()


def test_unknown_family_message_lists_modules_and_how_to_add():
    model = _tiny("opt", num_hidden_layers=2, hidden_size=32, num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32)
    with pytest.raises(UnknownModelFamily) as err:
        get_spec(model)
    msg = str(err.value)
    assert "'opt'" in msg
    assert "model.decoder.layers" in msg
    for name in ("model.decoder.layers.0.fc2", "model.decoder.layers.0.self_attn", "model.decoder.final_layer_norm", "lm_head"):
        assert name in msg
    assert "model.decoder.layers.1.fc2" not in msg  # only the first block is listed
    assert "register_spec(ModelSpec(" in msg and "'{}'" in msg and "mlp_out" in msg
    assert isinstance(err.value, ValueError)


def test_register_spec_makes_a_new_family_work(monkeypatch):
    monkeypatch.setattr(spec_mod, "SPECS", dict(spec_mod.SPECS))  # leave the real table alone
    model = _tiny("bloom", n_layer=2, hidden_size=32, n_head=4)
    with pytest.raises(UnknownModelFamily, match="bloom"):
        get_spec(model)
    bloom = ModelSpec(
        family="bloom",
        block="transformer.h.{}",
        mlp="transformer.h.{}.mlp",
        mlp_out="transformer.h.{}.mlp.dense_4h_to_h",
        attn="transformer.h.{}.self_attention",
        final_norm="transformer.ln_f",
        lm_head="lm_head",
        embed="transformer.word_embeddings",
        n_layer_attr="n_layer",
    )
    register_spec(bloom)
    spec = get_spec(model)
    assert spec is bloom
    assert spec.n_layers(model) == 2 and spec.d_model(model) == 32 and spec.d_key(model) == 128
    assert spec.module(model, "mlp_out", 1) is model.transformer.h[1].mlp.dense_4h_to_h
    # registering again replaces
    register_spec(ModelSpec(**{**bloom.__dict__, "attn": "transformer.h.{}.self_attention.dense"}))
    assert get_spec(model).attn.endswith("dense")


def test_model_without_config_is_unknown():
    with pytest.raises(UnknownModelFamily, match="None"):
        get_spec(nn.Sequential(nn.Linear(2, 2)))
