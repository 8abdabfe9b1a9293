import pytest
import torch

from memit_pl.data.edits import EditRequest
from memit_pl.experiments.spread import spread_errors
from memit_pl.modeling.spec import get_spec

REQUESTS = [
    EditRequest("0", "Michael Jordan", "{} plays the sport of", "soccer"),
    EditRequest("1", "France", "The capital of {} is", "Rome"),
    EditRequest("2", "Toyota", "{} is a car company from", "Japan"),
]


def test_the_target_layer_itself_carries_the_change_exactly(make_model, tok):
    model = make_model("llama").double()
    out = spread_errors(model, tok, REQUESTS, target_layer=2, layers=[0, 1, 2], fraction=0.1)
    assert out["layers"][2]["rel_error"] == pytest.approx(0.0, abs=1e-6)
    assert out["layers"][2]["cos"] == pytest.approx(1.0, abs=1e-6)
    assert out["layers"][0]["rel_error"] > 1e-3  # a random model's blocks do not pass r on unchanged


def test_blocks_that_add_nothing_pass_the_change_on(make_model, tok):
    """With the attention and MLP outputs of blocks 1..3 zeroed, those blocks are the identity on the
    stream: a change at layer 0 reaches layer 3 exactly."""
    model = make_model("llama").double()
    spec = get_spec(model)
    with torch.no_grad():
        for layer in range(1, 4):
            spec.module(model, "mlp_out", layer).weight.zero_()
            model.model.layers[layer].self_attn.o_proj.weight.zero_()
    out = spread_errors(model, tok, REQUESTS, target_layer=3, layers=[0, 1, 2, 3], fraction=0.5)
    for layer in range(4):
        assert out["layers"][layer]["rel_error"] == pytest.approx(0.0, abs=1e-6)  # measured in float32
        assert out["layers"][layer]["gain"] == pytest.approx(1.0, abs=1e-6)


def test_a_layer_above_the_target_is_refused(make_model, tok):
    with pytest.raises(ValueError, match="above the target"):
        spread_errors(make_model("llama"), tok, REQUESTS, target_layer=1, layers=[2], fraction=0.1)


def test_spread_command_writes_its_table(tmp_path, tok, make_model):
    import json

    from memit_pl import cli

    model = make_model("llama", seed=1)
    d = tmp_path / "tiny"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    edits = tmp_path / "e.jsonl"
    edits.write_text("".join(json.dumps({"case_id": r.case_id, "subject": r.subject, "prompt": r.prompt,
                                         "target_new": r.target_new}) + "\n" for r in REQUESTS))
    rc = cli.main(["spread", "--edits", str(edits), "--model.name", str(d), "--model.device", "cpu",
                   "--windows", "[[0,1,2],[2,3]]", "--out", str(tmp_path / "out")])
    assert rc == 0
    res = json.loads((tmp_path / "out" / "spread.json").read_text())
    assert [w["window"] for w in res["windows"]] == [[0, 1, 2], [2, 3]]
    assert res["windows"][0]["fraction"] == pytest.approx(0.75 / 3)  # clamp_norm_factor / window size
    assert res["windows"][1]["layers"]["3"]["rel_error"] == pytest.approx(0.0, abs=1e-6)
    assert "| 2–3 | 3 |" in (tmp_path / "out" / "spread.md").read_text()
