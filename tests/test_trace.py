"""Causal tracing on tiny random models: exactness of restorations, batching, summaries, the CLI."""

import json

import pytest
import torch
import yaml

from memit_pl.data.edits import EditFileError, target_ids
from memit_pl.experiments.trace import (
    ROWS,
    Fact,
    Tracer,
    embedding_std,
    grouped,
    load_facts,
    mean_ci,
    subject_range,
    suggest_layers,
    summarize,
    token_groups,
    yaml_snippet,
)

FACT = Fact("0", "Michael Jordan", "{} plays the sport of", "basketball")


def _setup(tracer, fact=FACT):
    ids, start, end = subject_range(tracer.tok, fact.template, fact.subject)
    probs, clean = tracer.clean_run(ids)
    noise = tracer.noise(end - start)
    capture = tracer.names("mlp") + tracer.names("attn")
    low_probs, corrupt, start_from = tracer.corrupted_run(ids, (start, end), noise, capture, clean)
    return ids, (start, end), noise, probs, clean, corrupt, start_from, low_probs


def test_subject_range(tok):
    ids, start, end = subject_range(tok, "The capital of {} is", "France")
    toks = [tok.decode([i]) for i in ids.tolist()]
    assert "".join(toks[start:end]).strip() == "France"
    assert "".join(toks) == "The capital of France is"


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("skip", [True, False])
def test_restoring_everything_recovers_clean_probability(make_model, tok, family, skip):
    model = make_model(family)
    tracer = Tracer(model, tok, noise_std=3.0, samples=3, batch_size=64, skip_layers=skip)
    ids, subj, noise, probs, clean, corrupt, start_from, low_probs = _setup(tracer)
    answer = int(probs.argmax())
    n_pos, n_layers = ids.shape[0], tracer.n_layers
    high, low = float(probs[answer]), float(low_probs[:, answer].mean())
    assert abs(low - high) / high > 1e-4  # the noise matters
    configs = [[("hidden", layer, t, "clean") for t in range(n_pos)] for layer in range(n_layers)]
    configs.append([(k, j, t, "clean") for k in ("mlp", "attn") for j in range(n_layers) for t in range(n_pos)])
    got = tracer.run(ids, subj, noise, answer, configs, clean, corrupt, start_from if skip else None)
    torch.testing.assert_close(got, torch.full_like(got, high), atol=1e-8, rtol=1e-5)


def test_zero_noise_gives_zero_effect(make_model, tok):
    tracer = Tracer(make_model("llama"), tok, noise_std=0.0, samples=2, window=3)
    out = tracer.trace_fact(FACT, require_correct=False)
    assert out.low == pytest.approx(out.high, abs=1e-6)
    for kind in ("hidden", "mlp", "attn"):
        assert out.effect(kind).abs().max() < 1e-5
    for key in ("none", "mlp", "attn"):
        assert (out.severed[key] - out.low).abs().max() < 1e-5


def test_heatmap_shape_is_tokens_by_layers(make_model, tok):
    model = make_model("llama", n_layer=3)
    tracer = Tracer(model, tok, noise_std=0.5, samples=2, window=2)
    out = tracer.trace_fact(FACT, require_correct=False)
    n_pos = len(out.tokens)
    assert n_pos == len(tok(FACT.prompt)["input_ids"])
    for kind in ("hidden", "mlp", "attn"):
        assert out.scores[kind].shape == (n_pos, 3)
        assert grouped(out.effect(kind), out.subject).shape == (len(ROWS), 3)
    assert out.severed["mlp"].shape == (3,)
    start = out.subject[0]
    assert (out.scores["hidden"][:start] == out.low).all()  # never corrupted: no effect


def test_batched_equals_unbatched(make_model, tok):
    model = make_model("llama")
    kw = dict(noise_std=0.4, samples=3, window=3)
    one = Tracer(model, tok, batch_size=1, skip_layers=False, **kw).trace_fact(FACT, require_correct=False)
    many = Tracer(model, tok, batch_size=512, skip_layers=True, **kw).trace_fact(FACT, require_correct=False)
    assert one.low == pytest.approx(many.low, abs=1e-6)
    for kind in one.scores:
        torch.testing.assert_close(one.scores[kind], many.scores[kind], atol=2e-6, rtol=1e-5)
    for key in one.severed:
        torch.testing.assert_close(one.severed[key], many.severed[key], atol=2e-6, rtol=1e-5)


def test_severing_above_the_last_layer_changes_nothing(make_model, tok):
    tracer = Tracer(make_model("llama"), tok, noise_std=0.5, samples=2, window=2)
    out = tracer.trace_fact(FACT, kinds=("hidden",), require_correct=False)
    last = tracer.n_layers - 1
    assert float(out.severed["mlp"][last]) == pytest.approx(float(out.severed["none"][last]), abs=1e-6)
    assert not torch.allclose(out.severed["mlp"], out.severed["none"])  # but severing does matter below


def test_embedding_std_matches_direct_computation(make_model, tok):
    model = make_model("llama")
    subjects = ["Paris", "Michael Jordan", "the Eiffel Tower"]
    ids = [i for s in subjects for i in tok(s, add_special_tokens=False)["input_ids"]]
    expected = model.get_input_embeddings()(torch.tensor(ids)).std()
    assert embedding_std(model, tok, subjects) == pytest.approx(float(expected), rel=1e-5)


def test_token_groups():
    # 8 tokens, subject at 1..3 (exclusive end 4): first 1, middle 2, last 3, next 4, further 5-6, last 7
    assert token_groups(8, (1, 4)) == [[1], [2], [3], [4], [5, 6], [7]]
    assert token_groups(5, (0, 1)) == [[0], [], [0], [1], [2, 3], [4]]
    eff = torch.arange(16.0).view(8, 2)
    g = grouped(eff, (1, 4))
    assert torch.isnan(grouped(torch.zeros(5, 2), (0, 1))[1]).all()
    torch.testing.assert_close(g[4], (eff[5] + eff[6]) / 2)


def test_mean_ci_and_suggestion():
    x = torch.tensor([[1.0, 2.0], [3.0, float("nan")], [5.0, 4.0]])
    mean, half, n = mean_ci(x)
    assert mean.tolist() == [3.0, 3.0] and n.tolist() == [3, 2]
    assert float(half[0]) == pytest.approx(1.96 * 2.0 / 3**0.5)
    gap = torch.tensor([0.0, 0.1, 0.5, 0.4, 0.3, 0.0, 0.2])
    assert suggest_layers(gap, k=3) == [2, 3, 4]
    assert suggest_layers(gap, k=10) == list(range(7))
    assert yaml.safe_load(yaml_snippet([2, 3, 4])) == {"memit": {"layers": [2, 3, 4]}}


def test_summarize(make_model, tok):
    tracer = Tracer(make_model("llama"), tok, noise_std=0.5, samples=2, window=2)
    facts = [FACT, Fact("1", "Paris", "{} is the capital of", "France")]
    traces = [tracer.trace_fact(f, require_correct=False) for f in facts]
    s = summarize(traces, k=2)
    assert s["n_facts"] == 2 and len(s["kinds"]["hidden"]["mean"]) == len(ROWS)
    gap = torch.stack([t.severed["none"] - t.severed["mlp"] for t in traces]).mean(0)
    assert s["suggested_layers"] == suggest_layers(gap, 2)
    last = torch.stack([t.effect("hidden")[t.subject[1] - 1] for t in traces]).mean(0)
    torch.testing.assert_close(torch.tensor(s["kinds"]["hidden"]["mean"][2]), last, atol=1e-5, rtol=0)
    json.dumps(s)


def test_load_facts_known_schema_and_edits(tmp_path):
    known = [{"known_id": 7, "subject": "Paris", "prompt": "Paris is the capital of", "attribute": "France"}]
    p = tmp_path / "known.json"
    p.write_text(json.dumps(known))
    [f] = load_facts(p)
    assert (f.case_id, f.template, f.prompt, f.answer) == ("7", "{} is the capital of", "Paris is the capital of", "France")
    p.write_text(json.dumps([{**known[0], "prompt": "The capital of France"}]))
    with pytest.raises(EditFileError, match="record 0.*'prompt'"):
        load_facts(p)
    cf = [{"case_id": 3, "requested_rewrite": {"prompt": "{} plays", "subject": "Messi",
                                               "target_new": {"str": "tennis"}, "target_true": {"str": "soccer"}}}]
    p.write_text(json.dumps(cf))
    [f] = load_facts(p)
    assert (f.prompt, f.answer) == ("Messi plays", "soccer")
    del cf[0]["requested_rewrite"]["target_true"]
    p.write_text(json.dumps(cf))
    with pytest.raises(EditFileError, match="target_true"):
        load_facts(p)


def test_cli_on_tiny_model(make_model, tok, tmp_path, capsys):
    from memit_pl.cli.trace import main

    model = make_model("llama", n_layer=3)
    tracer = Tracer(model, tok, noise_std=0.1, samples=1)
    known = []
    for i, (subject, rest) in enumerate([("Paris", " is the capital of"), ("Mozart", " was a famous"),
                                          ("Toyota", " is a car company from"), ("Lionel Messi", " plays soccer for"),
                                          ("Albert Einstein", " was a"), ("The Eiffel Tower", " is located in the city of")]):
        ids, _, _ = subject_range(tok, "{}" + rest, subject)
        top = int(tracer.clean_run(ids)[0].argmax())
        word = tok.decode([top]).strip()
        if word and target_ids(tok, word)[0] == top:
            known.append({"known_id": i, "subject": subject, "prompt": subject + rest, "attribute": word})
    assert len(known) >= 2, "the tiny model should predict a space-led token for some prompts"
    known.append({"known_id": 99, "subject": "Paris", "prompt": "Paris is the capital of", "attribute": "zzzq"})
    facts = tmp_path / "known.json"
    facts.write_text(json.dumps(known))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    out = tmp_path / "out"
    rc = main(["--model.name", str(tmp_path / "m"), "--model.device", "cpu", "--facts", str(facts), "--n", "2",
               "--samples", "2", "--window", "2", "--k", "2", "--examples", "1", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "trace.json").read_text())
    assert summary["n_facts"] == 2 and summary["n_layers"] == 3 and len(summary["suggested_layers"]) == 2
    snippet = yaml.safe_load((out / "suggested_layers.yaml").read_text())
    assert snippet["memit"]["layers"] == summary["suggested_layers"]
    for name in ("aie_hidden.png", "aie_mlp.png", "aie_attn.png", "severed.png", "example_0.png", "config.yaml"):
        assert (out / name).stat().st_size > 0
    assert "memit:" in capsys.readouterr().out
