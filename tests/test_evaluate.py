"""Batched evaluation on tiny models: equals per-record and unpadded scoring, is padding-side free,
and its Generation Entropy / zsRE accuracy match hand computations; reports and the CLI."""

import json
import math
from collections import Counter
from dataclasses import replace

import pytest
import torch

from memit_pl.config import EvalConfig
from memit_pl.data.edits import EditRequest, target_ids
from memit_pl.delta import EditDelta, apply_delta, save_delta
from memit_pl.metrics.functional import tfidf_cosine
from memit_pl.modeling.spec import get_spec
from memit_pl.stages.eval_report import aggregate, relation_breakdown, write_reports
from memit_pl.stages.evaluate import METRICS, evaluate_requests, generate, generate_ids, nsu_of_records

CFG = EvalConfig(batch_size=64, generation_length=6, max_generation_prompts=2)


def cf_requests():
    """CounterFact-style cases: multi-token targets, a case without target_true, one without paraphrases."""
    return [
        EditRequest("0", "Michael Jordan", "{} plays the sport of", "baseball", "basketball", "P641",
                    paraphrases=["Therefore, Michael Jordan is a player of", "Michael Jordan plays"],
                    neighborhood=["Lionel Messi plays the sport of", "Toyota is a car company from"],
                    generation_prompts=["Michael Jordan is", "The sport of Michael Jordan", "unused third"]),
        EditRequest("1", "The Eiffel Tower", "{} is located in the city of", "Rome", "Paris", "P276",
                    paraphrases=["It was a sunny day. The Eiffel Tower is in"],
                    neighborhood=["The capital of France is"], generation_prompts=["The Eiffel Tower"]),
        EditRequest("2", "Mozart", "{} was a famous", "painter", None, "P106",
                    paraphrases=["Mozart worked as a"], neighborhood=["Albert Einstein was a famous"]),
        EditRequest("3", "Danielle Darrieux", "{}'s mother tongue is", "English", "French", "P103",
                    neighborhood=["The official language of Canada is", "Toyota is a car company from",
                                  "Danielle Darrieux speaks"], generation_prompts=["Danielle Darrieux"]),
    ]


def zsre_request():
    return EditRequest("z0", "Watts Humphrey", "What university did {} attend?", "University of Michigan",
                       "Carnegie Mellon", paraphrases=["Which college did Watts Humphrey go to?"],
                       neighborhood=["nq question: who played the sport of basketball?"],
                       neighborhood_answers=["Michael Jordan"])


def prompts_of(case):
    return [(k, e) for k in ("rewrite", "paraphrase", "neighborhood") for e in case["prompts"][k]]


def assert_same(a, b, atol=1e-5):
    for m in METRICS:
        va, vb = a["metrics"][m], b["metrics"][m]
        assert (va is None) == (vb is None), m
        if va is not None:
            assert va == pytest.approx(vb, abs=atol * 100), m
    for ca, cb in zip(a["cases"], b["cases"]):
        assert ca["generations"] == cb["generations"]
        for (_, ea), (_, eb) in zip(prompts_of(ca), prompts_of(cb)):
            for key in ea:
                if key != "prompt":
                    assert ea[key] == pytest.approx(eb[key], abs=atol), key


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_equals_per_record_and_padding_side_does_not_matter(make_model, tok, family):
    model = make_model(family)
    reqs = cf_requests() + [zsre_request()]
    batched = evaluate_requests(model, tok, reqs, CFG)
    assert batched["n_cases"] == 5
    per_record = evaluate_requests(model, tok, reqs, CFG, per_record=True)
    right = evaluate_requests(model, tok, reqs, CFG, padding_side="right")
    assert_same(batched, per_record)
    assert_same(batched, right)


def unpadded_nll_and_acc(model, tok, prompt, target):
    """Direct teacher forcing of one sequence, no padding: mean NLL per token and token accuracy."""
    p = tok(prompt)["input_ids"]
    t = target_ids(tok, target)
    logits = model(torch.tensor([p + t])).logits[0]
    lp = torch.log_softmax(logits[len(p) - 1 : len(p) - 1 + len(t)].double(), -1)
    nll = -sum(lp[j, tid].item() for j, tid in enumerate(t)) / len(t)
    acc = sum(int(lp[j].argmax().item() == tid) for j, tid in enumerate(t)) / len(t)
    return nll, acc


def test_scores_equal_unpadded_teacher_forcing(make_model, tok):
    model = make_model("llama")
    reqs = cf_requests()
    res = evaluate_requests(model, tok, reqs, EvalConfig(max_generation_prompts=0))
    assert len(target_ids(tok, "baseball")) > 1  # multi-token targets are exercised
    for r, case in zip(reqs, res["cases"]):
        for _, e in prompts_of(case):
            nll, acc = unpadded_nll_and_acc(model, tok, e["prompt"], r.target_new)
            assert e["nll_new"] == pytest.approx(nll, abs=1e-5)
            if r.target_true:
                nll_t, acc_t = unpadded_nll_and_acc(model, tok, e["prompt"], r.target_true)
                assert e["nll_true"] == pytest.approx(nll_t, abs=1e-5)
        # per-case success rates, recomputed by hand from the unpadded scores
        if r.target_true:
            rw = [unpadded_nll_and_acc(model, tok, p, t)[0] for p in [r.text] for t in (r.target_new, r.target_true)]
            assert case["ES"] == float(rw[0] < rw[1])
            ns = [unpadded_nll_and_acc(model, tok, p, r.target_true)[0] < unpadded_nll_and_acc(model, tok, p, r.target_new)[0]
                  for p in r.neighborhood]
            assert case["NS"] == pytest.approx(sum(ns) / len(ns))
            nm = [math.exp(-unpadded_nll_and_acc(model, tok, p, r.target_true)[0])
                  - math.exp(-unpadded_nll_and_acc(model, tok, p, r.target_new)[0]) for p in r.neighborhood]
            assert case["NM"] == pytest.approx(sum(nm) / len(nm), abs=1e-6)


def test_zsre_accuracy_by_hand(make_model, tok):
    model = make_model("llama")
    r = zsre_request()
    case = evaluate_requests(model, tok, [r], EvalConfig(max_generation_prompts=0))["cases"][0]
    for key, prompts, target in (("acc_rewrite", [r.text], r.target_new),
                                 ("acc_paraphrase", r.paraphrases, r.target_new),
                                 ("acc_neighborhood", r.neighborhood, r.neighborhood_answers[0])):
        hits = total = 0
        for p in prompts:
            ids, t = tok(p)["input_ids"], target_ids(tok, target)
            logits = model(torch.tensor([ids + t])).logits[0]
            for j, tid in enumerate(t):
                hits += int(logits[len(ids) - 1 + j].argmax().item() == tid)
                total += 1
        assert case[key] == pytest.approx(hits / total)
    # the neighbourhood has its own answer: no probability comparison against target_true there
    assert case["NS"] is None and "zsRE" in case["skipped"]["NS"]


def test_generation_entropy_against_a_hand_count(make_model, tok):
    model = make_model("llama")
    reqs = cf_requests()
    res = evaluate_requests(model, tok, reqs, replace(CFG, generation_top_k=1))
    case = res["cases"][0]
    assert len(case["generations"]) == 2  # max_generation_prompts
    for prompt, text in zip(reqs[0].generation_prompts, case["generations"]):
        ids = tok(prompt)["input_ids"]
        for _ in range(CFG.generation_length):  # greedy without cache or padding
            ids = ids + [int(model(torch.tensor([ids])).logits[0, -1].argmax())]
        assert text == tok.decode(ids, skip_special_tokens=True).replace("\n\n", " ")
    from memit_pl.metrics.functional import word_tokenize

    hand = []
    for text in case["generations"]:
        words = word_tokenize(text)
        hs = []
        for n in (2, 3):
            grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
            tot = sum(grams.values())
            hs.append(-sum(c / tot * math.log2(c / tot) for c in grams.values()) if tot else 0.0)
        hand.append((2 / 3 * hs[0] + 4 / 3 * hs[1]) / 2)
    assert case["GE"] == pytest.approx(sum(hand) / len(hand))
    with_ge = [c["GE"] for c in res["cases"] if c["GE"] is not None]
    # case 2 has no generation prompts: it generates from its filled rewrite prompt
    assert len(with_ge) == 4 and res["cases"][2]["generations"][0].startswith(reqs[2].text)
    assert res["metrics"]["GE"] == pytest.approx(100 * sum(with_ge) / 4)
    off = evaluate_requests(model, tok, reqs, replace(CFG, generation_top_k=1, generation_from_rewrite=False))
    assert off["cases"][2]["skipped"]["GE"] == "no generation prompts"
    assert off["metrics"]["GE"] == pytest.approx(100 * sum(with_ge[:2] + with_ge[3:]) / 3)


def test_generation_entropy_on_a_fixed_hashed_sample_of_cases(make_model, tok):
    from memit_pl.stages.eval_batch import generation_sample

    ids = [str(i) for i in range(20)]
    s = generation_sample(ids, 5, seed=0)
    assert len(s) == 5 and s == generation_sample(list(reversed(ids)), 5, seed=0) and s != generation_sample(ids, 5, 1)
    assert generation_sample(ids, None, 0) == set(ids) == generation_sample(ids, 50, 0)
    res = evaluate_requests(make_model("llama"), tok, cf_requests(), replace(CFG, generation_cases=2))
    sampled = generation_sample([r.case_id for r in cf_requests()], 2, CFG.generation_seed)
    assert {c["case_id"] for c in res["cases"] if c["GE"] is not None} == sampled
    assert res["skipped"]["GE"] == {"not in the generation sample (eval.generation_cases)": 2}


def test_generation_entropy_hand_count_on_fixed_text(make_model, tok, monkeypatch):
    """GE of a case whose generations are fixed texts with a known n-gram count."""
    import memit_pl.stages.evaluate as ev

    fixed = ["x y x y x", "x y z"]  # H2: 1 and 1 bit; H3: h(2/3, 1/3) and 0
    monkeypatch.setattr(ev, "generate", lambda model, tok, prompts, n, top_k, seed: fixed[: len(prompts)])
    r = cf_requests()[0]
    res = evaluate_requests(make_model("llama"), tok, [r], CFG)
    h3 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    expected = ((2 / 3 * 1 + 4 / 3 * h3) / 2 + (2 / 3 * 1 + 0) / 2) / 2
    assert res["cases"][0]["GE"] == pytest.approx(expected)
    assert res["metrics"]["GE"] == pytest.approx(100 * expected)


def test_generate_greedy_batched_equals_single(make_model, tok):
    model = make_model("gpt2")
    prompts = ["The capital of France is", "Mozart", "Therefore, because I think you are right, the"]
    batched = generate(model, tok, prompts, 5, top_k=1)
    assert batched == [generate(model, tok, [p], 5, top_k=1)[0] for p in prompts]


def test_sampled_generation_is_per_prompt_deterministic_and_top_k(make_model, tok):
    """Sampling (the reference's top-k 5) gives each prompt the same text alone or in any batch, changes
    with the seed, and only ever picks one of the k most likely next tokens."""
    model = make_model("gpt2")
    prompts = ["The capital of France is", "Mozart", "Therefore, because I think you are right, the"]
    batched = generate(model, tok, prompts, 6, top_k=5, seed=0)
    assert batched == [generate(model, tok, [p], 6, top_k=5, seed=0)[0] for p in reversed(prompts)][::-1]
    assert generate(model, tok, prompts, 6, top_k=5, seed=1) != batched
    # every sampled token is among the top 5 given its prefix, and the draws are not all the argmax
    ids = tok(prompts[1])["input_ids"]
    non_greedy = 0
    for seed in range(4):
        full = ids + generate_ids(model, tok, [ids], [prompts[1]], 4, top_k=5, seed=seed)[0]
        with torch.no_grad():
            logits = model(torch.tensor([full])).logits[0]
        for t in range(len(ids), len(full)):
            top = logits[t - 1].topk(5).indices.tolist()
            assert full[t] in top
            non_greedy += full[t] != top[0]
    assert non_greedy > 0
    with pytest.raises(ValueError, match="top_k"):
        generate(model, tok, prompts, 2, top_k=0)


def test_nsu_leaves_out_neighbourhood_prompts_about_edited_subjects(make_model, tok):
    toyota = EditRequest("4", "Toyota", "{} is a car company from", "Germany", "Japan", "P495",
                         neighborhood=["Toyotaville is a town in", "Michael Jordan plays the sport of"])
    reqs = cf_requests() + [toyota]
    res = evaluate_requests(make_model("llama"), tok, reqs, CFG)
    about = {c["case_id"]: [bool(p.get("about_edited_subject")) for p in c["prompts"]["neighborhood"]]
             for c in res["cases"]}
    # "Toyota" and "Michael Jordan" are edited in this batch, Danielle Darrieux too; "Toyotaville" is
    # another word
    assert about == {"0": [False, True], "1": [False], "2": [False], "3": [False, True, True], "4": [False, True]}

    def hand(case, keep):
        ps = [p for p, k in zip(case["prompts"]["neighborhood"], keep) if k]
        return sum(p["nll_true"] < p["nll_new"] for p in ps) / len(ps)

    by_id = {c["case_id"]: c for c in res["cases"]}
    assert by_id["2"]["NSu"] is None and by_id["2"]["skipped"]["NSu"] == "no target_true"
    expect = {}
    for cid, flags in about.items():
        if cid == "2":
            continue
        expect[cid] = hand(by_id[cid], [not f for f in flags])
        assert by_id[cid]["NSu"] == pytest.approx(expect[cid])
        assert by_id[cid]["NS"] == pytest.approx(hand(by_id[cid], [True] * len(flags)))
    assert res["metrics"]["NSu"] == pytest.approx(100 * sum(expect.values()) / len(expect))
    assert res["counts"]["NSu"] == 4
    # nothing edited: NSu is NS; a batch that edits France leaves case 1 without an NSu prompt
    none = evaluate_requests(make_model("llama"), tok, reqs, CFG, edited_subjects=[])
    assert none["metrics"]["NSu"] == pytest.approx(none["metrics"]["NS"])
    assert [c["NSu"] for c in none["cases"]] == [c["NS"] for c in none["cases"]]
    france = evaluate_requests(make_model("llama"), tok, reqs, CFG, edited_subjects=["France"])
    assert france["cases"][1]["NSu"] is None
    assert france["skipped"]["NSu"] == {"no target_true": 1, "every neighbourhood prompt is about an edited subject": 1}
    # the same figures from the records alone, for any set of edited subjects
    assert nsu_of_records(res["cases"], [r.subject for r in reqs]) == pytest.approx(res["metrics"]["NSu"])
    assert nsu_of_records(france["cases"], ["France"]) == pytest.approx(france["metrics"]["NSu"])
    sub = evaluate_requests(make_model("llama"), tok, reqs[:2], CFG, edited_subjects=["Toyota"])
    assert nsu_of_records(res["cases"][:2], ["Toyota"]) == pytest.approx(sub["metrics"]["NSu"])


def test_skips_are_explicit_and_reports_agree_with_the_metrics(make_model, tok):
    res = evaluate_requests(make_model("llama"), tok, cf_requests(), CFG)
    no_true = res["cases"][2]
    for m in ("ES", "PS", "NS", "EM", "PM", "NM"):
        assert no_true[m] is None and no_true["skipped"][m] == "no target_true"
    assert no_true["acc_rewrite"] is not None  # accuracy does not need target_true
    assert res["skipped"]["ES"] == {"no target_true": 1}
    assert res["skipped"]["PS"] == {"no target_true": 1, "no paraphrase prompts": 1}
    assert res["skipped"]["RS"] == {"no reference data": 4}
    assert res["counts"]["ES"] == 3 and res["counts"]["PS"] == 2 and res["counts"]["acc_rewrite"] == 4
    agg = aggregate(res["cases"])
    for m in METRICS:
        if res["metrics"][m] is None:
            assert agg[m] is None
        else:
            assert agg[m] == pytest.approx(res["metrics"][m], abs=1e-9)
    rel = relation_breakdown(res["cases"])
    assert set(rel) == {"P641", "P276", "P106", "P103"} and rel["P106"]["ES"] is None


def test_reference_score_end_to_end(make_model, tok, tmp_path):
    from memit_pl.metrics import ReferenceData

    vocab = {"sport": 0, "basketball": 1, "baseball": 2, "paris": 3, "rome": 4}
    ref = ReferenceData({"P641": {"Q5369": [{"name": "x", "text": "Baseball is a sport. Baseball!"}]}},
                        vocab, torch.tensor([1.0, 2.0, 2.0, 1.5, 1.5]))
    reqs = cf_requests()[:2]
    reqs[0].target_new_id = "Q5369"
    res = evaluate_requests(make_model("llama"), tok, reqs, CFG, reference=ref)
    c0 = res["cases"][0]
    assert c0["RS"] == pytest.approx(
        tfidf_cosine(" ".join(c0["generations"]), "Baseball is a sport. Baseball!", vocab, ref.idf)
    )
    assert res["cases"][1]["RS"] is None and res["cases"][1]["skipped"]["RS"] == "no relation_id or target_new id"
    assert res["counts"]["RS"] == 1


def test_bad_neighbourhood_answers_fail_naming_the_record(make_model, tok):
    r = zsre_request()
    r.neighborhood_answers = ["a", "b"]
    with pytest.raises(ValueError, match=r"record 0 \(case_id z0\): field 'neighborhood_answers'"):
        evaluate_requests(make_model("llama"), tok, [r], CFG)


def counterfact_file(path, requests):
    recs = [{
        "case_id": int(r.case_id),
        "requested_rewrite": {"prompt": r.prompt, "subject": r.subject, "relation_id": r.relation_id,
                              "target_new": {"str": r.target_new, "id": None},
                              "target_true": {"str": r.target_true, "id": None}},
        "paraphrase_prompts": r.paraphrases, "neighborhood_prompts": r.neighborhood,
        "generation_prompts": r.generation_prompts,
    } for r in requests if r.target_true]
    path.write_text(json.dumps(recs))
    return path


def test_cli_before_and_after_a_hand_made_delta(make_model, tok, tmp_path, capsys):
    from memit_pl.cli.evaluate import main

    model = make_model("gpt2")
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    spec = get_spec(model)
    g = torch.Generator().manual_seed(1)
    d_model, d_key = spec.d_model(model), spec.d_key(model)
    delta = EditDelta({layer: (torch.randn(d_model, 2, generator=g), torch.randn(d_key, 2, generator=g)) for layer in (1, 2)},
                      {"family": spec.family})
    run = tmp_path / "run"
    save_delta(run, delta)
    edits = counterfact_file(tmp_path / "cf.json", cf_requests())
    argv = ["--edits", str(edits), "--delta", str(run), "--model.name", str(model_dir), "--model.device", "cpu",
            "--eval.generation_length", "4", "--trainer.enable_progress_bar", "false"]
    assert main(argv) == 0
    out = run / "eval"
    data = json.loads((out / "metrics.json").read_text())
    assert set(data["metrics"]) == {"unedited", "edited"} and data["n_cases"] == 3
    assert data["metrics"]["unedited"] != data["metrics"]["edited"]
    report = (out / "report.md").read_text()
    assert "| Editor | Score S | ES | EM | PS | PM | NS | NSu | NM | GE | RS |" in report and "P641" in report
    for png in ("metrics.png", "relations.png", "margins.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "cases.jsonl").read_text().splitlines()) == 3
    assert (out / "config.yaml").exists()
    assert "Score S" in capsys.readouterr().out
    # the CLI's numbers are those of evaluate_requests on the same model with the delta applied
    reqs = [r for r in cf_requests() if r.target_true]
    cfg = EvalConfig(generation_length=4)
    before = evaluate_requests(model, tok, reqs, cfg)
    apply_delta(model, run)
    after = evaluate_requests(model, tok, reqs, cfg)
    for m in METRICS:
        for label, res in (("unedited", before), ("edited", after)):
            if res["metrics"][m] is not None:
                assert data["metrics"][label][m] == pytest.approx(res["metrics"][m], abs=1e-3), (label, m)


def test_cli_rejects_a_delta_that_does_not_fit_before_evaluating(make_model, tok, tmp_path):
    from memit_pl.cli.evaluate import main

    model = make_model("llama")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    save_delta(tmp_path / "run", EditDelta({1: (torch.zeros(7, 1), torch.zeros(5, 1))}, {"family": "llama"}))
    edits = counterfact_file(tmp_path / "cf.json", cf_requests())
    with pytest.raises(ValueError, match="layer 1: delta shape"):
        main(["--edits", str(edits), "--delta", str(tmp_path / "run"), "--model.name", str(tmp_path / "model"),
              "--model.device", "cpu"])
    assert not (tmp_path / "run" / "eval").exists()


def test_write_reports_for_one_run(make_model, tok, tmp_path):
    res = evaluate_requests(make_model("llama"), tok, cf_requests(), EvalConfig(max_generation_prompts=0))
    paths = write_reports(tmp_path, {"unedited": res}, {"model": "tiny", "edits_file": "x.json"})
    assert {p.name for p in paths} == {"metrics.json", "cases.jsonl", "report.md", "metrics.png", "relations.png",
                                        "margins.png"}
    data = json.loads((tmp_path / "metrics.json").read_text())
    assert data["skipped"]["unedited"]["GE"] == {"generation disabled": 4}
    assert data["relations"]["unedited"]["P641"]["n"] == 1


def test_prompt_rows_share_the_prompt_between_single_token_targets():
    from memit_pl.stages.evaluate import prompt_rows

    rows = prompt_rows([5, 6, 7], [("new", [10]), ("true", [11])], kind=0, index=0)
    assert len(rows) == 1 and rows[0].ids == [5, 6, 7]
    assert [(t.label, t.start) for t in rows[0].targets] == [("new", 2), ("true", 2)]
    rows = prompt_rows([5, 6, 7], [("new", [10, 12, 13]), ("true", [11])], kind=2, index=3)
    assert len(rows) == 1 and rows[0].ids == [5, 6, 7, 10, 12]  # target_true rides on target_new's row
    rows = prompt_rows([5, 6], [("new", [10, 12]), ("true", [11, 14])], kind=1, index=0)
    assert [r.ids for r in rows] == [[5, 6, 10], [5, 6, 11]]
    assert all(t.start == 1 and t.kind == 1 for r in rows for t in r.targets)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])
def test_target_scores_equal_the_full_logits_layout_in_any_chunking(make_model, tok, family, monkeypatch):
    """Scoring only the real target tokens from the final norm, in chunks, gives what the [targets,
    t_max, vocab] layout gives (log-probabilities, argmax hits and tokens), one chunk or many."""
    from memit_pl.metrics.functional import target_token_stats
    from memit_pl.stages import evaluate as ev

    model = make_model(family)
    items = [ev.build_case(tok, r, i, CFG) for i, r in enumerate([*cf_requests(), zsre_request()])]
    batch = ev.collate(items, tok.pad_token_id or 0, "right")
    assert (batch["target_ids"] == -100).any()  # padding slots exist and must stay out
    ref_logits = ev.target_logits(model, batch)
    lp0, ok0, mask0 = target_token_stats(ref_logits, batch["target_ids"])
    top0 = ref_logits.argmax(-1).masked_fill(~mask0, -1)
    vocab = ref_logits.shape[-1]
    for chunk in (ev.SCORE_CHUNK, 3 * vocab, vocab):  # one chunk, chunks of 3 tokens, one token each
        monkeypatch.setattr(ev, "SCORE_CHUNK", chunk)
        lp, ok, mask, top = ev.target_scores(model, batch)
        assert torch.equal(mask, mask0) and torch.equal(ok, ok0) and torch.equal(top, top0)
        torch.testing.assert_close(lp, lp0, atol=1e-5, rtol=0)


def test_target_scores_of_a_model_without_a_spec_take_the_reference_layout(make_model, tok, monkeypatch):
    from memit_pl.modeling import spec as spec_mod
    from memit_pl.stages import evaluate as ev

    model = make_model("llama")
    items = [ev.build_case(tok, r, i, CFG) for i, r in enumerate(cf_requests())]
    batch = ev.collate(items, tok.pad_token_id or 0, "right")
    want = ev.target_scores(model, batch)
    monkeypatch.delitem(spec_mod.SPECS, "llama")
    got = ev.target_scores(model, batch)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_smollm2_scores_match_the_reference_algorithm(smollm2):
    """On the real tokenizer: our per-prompt NLLs equal the reference's ``test_batch_prediction``
    (``f"{prompt} {target}"`` tokenised jointly, right padding, full logits), batched = per-record."""
    from pathlib import Path

    from memit_pl.data.edits import load_edits

    model, tok = smollm2
    path = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "counterfact_known_dev.json"
    if not path.exists():
        pytest.skip(f"{path} not available")
    reqs = load_edits(path, tokenizer=tok, limit=3)
    cfg = EvalConfig(max_generation_prompts=0)
    res = evaluate_requests(model, tok, reqs, cfg)
    assert_same(res, evaluate_requests(model, tok, reqs, cfg, per_record=True), atol=1e-4)
    for r, case in zip(reqs, res["cases"]):
        prefixes = [r.text, *r.paraphrases, *r.neighborhood]
        prefix_lens = [len(n) for n in tok(prefixes)["input_ids"]]
        side, tok.padding_side = tok.padding_side, "right"  # the reference pads on the right
        try:
            enc = tok([f"{p} {s}" for p in prefixes for s in (r.target_new, r.target_true)], padding=True,
                      return_tensors="pt")
        finally:
            tok.padding_side = side
        targets = [tok(f" {n}")["input_ids"] for n in (r.target_new, r.target_true)]
        with torch.no_grad():
            logits = model(**enc).logits
        ours = [(e["nll_new"], e["nll_true"]) for _, e in prompts_of(case)]
        for i in range(logits.shape[0]):
            t = targets[i % 2]
            lp = torch.log_softmax(logits[i, prefix_lens[i // 2] - 1 : prefix_lens[i // 2] - 1 + len(t)], -1)
            ref = -sum(lp[j, tid].item() for j, tid in enumerate(t)) / len(t)
            assert ours[i // 2][i % 2] == pytest.approx(ref, abs=1e-4)


def _rec(case_id, rewrite, paraphrase, neighbourhood):
    return {"case_id": case_id, "prompts": {
        "rewrite": [{"token_acc": a} for a in rewrite],
        "paraphrase": [{"token_acc": a} for a in paraphrase],
        "neighborhood": [{"argmax": ids} for ids in neighbourhood]}}


def test_easyedit_metrics_by_hand():
    from memit_pl.stages.eval_report import easyedit_metrics

    before = [_rec("a", [0.0], [0.0, 0.5], [[1, 2, 3], [4]]), _rec("b", [0.5], [], [[7, 7]])]
    after = [_rec("a", [1.0], [0.5, 1.0], [[1, 9, 3], [4]]), _rec("b", [0.5], [], [[7, 8]])]
    m = easyedit_metrics(after, before)
    # Reliability: cases a 1.0, b 0.5 -> 75; Generalization: only case a has paraphrases, (0.5 + 1) / 2 -> 75
    assert m["reliability"] == pytest.approx(75.0) and m["generalization"] == pytest.approx(75.0)
    # Locality: case a: prompts 2/3 and 1/1 -> 5/6; case b: 1/2; mean (5/6 + 1/2) / 2 = 2/3
    assert m["locality"] == pytest.approx(100 * 2 / 3)
    assert easyedit_metrics(after)["locality"] is None
    assert easyedit_metrics(before, before)["locality"] == pytest.approx(100.0)


def test_easyedit_locality_end_to_end_against_argmax_by_hand(make_model, tok):
    """The records hold the teacher-forced argmax tokens of each neighbourhood prompt's answer; Locality of a
    changed model equals the hand-counted share of those tokens that stayed."""
    from memit_pl.stages.eval_report import easyedit_metrics

    reqs = cf_requests()
    cfg = EvalConfig(max_generation_prompts=0)
    a, b = make_model("llama", seed=0), make_model("llama", seed=0)
    with torch.no_grad():
        get_spec(b).out_weight(b, 1).add_(torch.randn_like(get_spec(b).out_weight(b, 1)) * 0.5)
    ra, rb = evaluate_requests(a, tok, reqs, cfg), evaluate_requests(b, tok, reqs, cfg)

    def argmax(model, prompt, target):
        ids, t = tok(prompt)["input_ids"], target_ids(tok, target)
        logits = model(torch.tensor([ids + t])).logits[0]
        return [int(logits[len(ids) - 1 + j].argmax()) for j in range(len(t))]

    shares = []
    for r, case in zip(reqs, ra["cases"]):
        if r.target_true is None:
            continue
        per = []
        for i, p in enumerate(r.neighborhood):
            before, after = argmax(a, p, r.target_true), argmax(b, p, r.target_true)
            assert case["prompts"]["neighborhood"][i]["argmax"] == before
            per.append(sum(x == y for x, y in zip(before, after)) / len(before))
        shares.append(sum(per) / len(per))
    assert easyedit_metrics(rb["cases"], ra["cases"])["locality"] == pytest.approx(100 * sum(shares) / len(shares))


def test_a_zsre_evaluation_heads_with_the_zsre_table(make_model, tok):
    from memit_pl.metrics.functional import harmonic_mean
    from memit_pl.stages.eval_report import headline_table, is_zsre

    model = make_model("llama")
    z = evaluate_requests(model, tok, [zsre_request(), replace(zsre_request(), case_id="z1")], EvalConfig(max_generation_prompts=0))
    cf = evaluate_requests(model, tok, cf_requests(), EvalConfig(max_generation_prompts=0))
    assert is_zsre(z) and not is_zsre(cf)
    head = headline_table({"unedited": z})
    assert head.splitlines()[0] == "| Editor | Score | Efficacy | Paraphrase | Specificity |"
    m = z["metrics"]
    vals = [m["acc_rewrite"], m["acc_paraphrase"], m["acc_neighborhood"]]
    if min(vals) > 0:
        assert f"{float(harmonic_mean(vals)):.1f}" in head
    assert "| Editor | Score S | ES |" in headline_table({"unedited": cf})
