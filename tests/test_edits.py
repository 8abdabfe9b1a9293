"""Edit files: CounterFact, zsRE and the simple JSONL; every error names the record and the field."""

import json
from pathlib import Path

import pytest

from memit_pl.data.edits import (
    EditFileError,
    EditRequest,
    detect_format,
    fill,
    load_edits,
    target_ids,
    validate,
)

REPO = Path(__file__).parents[1]
COUNTERFACT = Path(__file__).parents[2] / "shared/data/counterfact_known_dev.json"


def _jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _simple(i: int, **kw) -> dict:
    rec = {"case_id": f"c{i}", "subject": f"Subject{i}", "prompt": "{} lives in", "target_new": "Rome"}
    rec.update(kw)
    return rec


@pytest.fixture(scope="module")
def empty_tok():
    """A real (word-level) tokenizer whose normaliser drops everything but ASCII letters."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers import models as tmodels
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(tmodels.WordLevel({"[UNK]": 0, "Paris": 1, "Rome": 2}, unk_token="[UNK]"))
    raw.normalizer = normalizers.Replace(Regex(r"[^A-Za-z ]"), "")
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")


@pytest.mark.skipif(not COUNTERFACT.exists(), reason="shared CounterFact file absent")
def test_counterfact_file_loads():
    reqs = load_edits(COUNTERFACT)
    assert len(reqs) == 584
    assert len({r.case_id for r in reqs}) == 584
    raw = json.loads(COUNTERFACT.read_text())
    r, rec = reqs[0], raw[0]
    rw = rec["requested_rewrite"]
    assert r.case_id == str(rec["case_id"])
    assert (r.subject, r.prompt, r.relation_id) == (rw["subject"], rw["prompt"], rw["relation_id"])
    assert r.target_new == rw["target_new"]["str"] and r.target_true == rw["target_true"]["str"]
    assert r.paraphrases == rec["paraphrase_prompts"] and r.neighborhood == rec["neighborhood_prompts"]
    assert r.attribute_prompts == rec["attribute_prompts"] and r.generation_prompts == rec["generation_prompts"]
    for q in reqs:
        assert q.subject in q.text and "{}" not in q.text
        assert q.target_new and q.target_true and q.target_new != q.target_true
        assert not q.target_new.startswith(" ")


@pytest.mark.skipif(not COUNTERFACT.exists(), reason="shared CounterFact file absent")
def test_counterfact_limit_and_tokenizer_validation(tok):
    reqs = load_edits(COUNTERFACT, tokenizer=tok, limit=10)
    assert [r.case_id for r in reqs] == [str(x["case_id"]) for x in json.loads(COUNTERFACT.read_text())[:10]]


def test_counterfact_errors_name_record_and_field(tmp_path):
    rec = {
        "case_id": 7,
        "requested_rewrite": {
            "prompt": "{} plays",
            "subject": "Messi",
            "target_new": {"str": "tennis"},
            "target_true": {"str": "soccer"},
            "relation_id": "P641",
        },
    }
    bad = json.loads(json.dumps(rec))
    del bad["requested_rewrite"]["target_new"]
    (tmp_path / "cf.json").write_text(json.dumps([rec, bad]))
    with pytest.raises(EditFileError, match=r"record 1 \(case_id 7\): field 'target_new': missing"):
        load_edits(tmp_path / "cf.json")
    (tmp_path / "cf2.json").write_text(json.dumps([{"case_id": 3, "requested_rewrite": "x"}]))
    with pytest.raises(EditFileError, match=r"record 0 \(case_id 3\): field 'requested_rewrite'"):
        load_edits(tmp_path / "cf2.json", fmt="counterfact")


def test_zsre_schema(tmp_path):
    records = [
        {
            "subject": "Watts Humphrey",
            "src": "What university did Watts Humphrey attend?",
            "pred": "Trinity College",
            "rephrase": "What university did Watts Humphrey take part in?",
            "alt": "University of Michigan",
            "answers": ["Illinois Institute of Technology"],
            "loc": "nq question: who played desmond doss father in hacksaw ridge",
            "loc_ans": "Hugo Weaving",
            "cond": "Trinity College >> University of Michigan || What university did Watts Humphrey attend?",
        },
        {
            "subject": "Ramalinaceae",
            "src": "Which family does Ramalinaceae belong to",
            "rephrase": "What family are Ramalinaceae?",
            "alt": "Lamiinae",
            "answers": ["Lecanorales"],
            "loc": "nq question: types of skiing in the winter olympics 2018",
            "loc_ans": "Downhill",
        },
    ]
    path = tmp_path / "zsre_eval.json"
    path.write_text(json.dumps(records))
    assert detect_format(records) == "zsre"
    reqs = load_edits(path)
    assert len(reqs) == 2
    r = reqs[0]
    assert r.case_id == "0" and r.subject == "Watts Humphrey"
    assert r.prompt == "What university did {} attend?" and r.text == records[0]["src"]
    assert r.target_new == "University of Michigan" and r.target_true == "Illinois Institute of Technology"
    assert r.paraphrases == [records[0]["rephrase"]]
    assert r.neighborhood == [records[0]["loc"] + "?"] and r.neighborhood_answers == ["Hugo Weaving"]
    assert reqs[1].prompt == "Which family does {} belong to"
    records[1]["src"] = "Which family does it belong to"
    path.write_text(json.dumps(records))
    with pytest.raises(EditFileError, match=r"record 1 \(case_id 1\): field 'src': does not contain the subject"):
        load_edits(path)


def test_simple_jsonl(tmp_path, tok):
    path = _jsonl(
        tmp_path / "e.jsonl",
        [
            {
                "subject": "Eiffel Tower",
                "prompt": "The {} is in",
                "target_new": "Rome",
                "target_true": "Paris",
                "paraphrases": ["Tourists visit the Eiffel Tower in"],
                "neighborhood": ["The Louvre is in"],
            },
            {"subject": "Messi", "prompt": "{} plays", "target_new": "tennis"},
        ],
    )
    reqs = load_edits(path, tokenizer=tok)
    assert reqs[0] == EditRequest(
        case_id="0",
        subject="Eiffel Tower",
        prompt="The {} is in",
        target_new="Rome",
        target_true="Paris",
        paraphrases=["Tourists visit the Eiffel Tower in"],
        neighborhood=["The Louvre is in"],
    )
    assert reqs[1].case_id == "1" and reqs[1].target_true is None and reqs[1].paraphrases == []
    assert reqs[0].text == "The Eiffel Tower is in"
    assert load_edits(path, limit=1) == reqs[:1]
    # JSON lines in a .json file, and a single JSON object, are read too
    (tmp_path / "e.json").write_text(path.read_text())
    assert load_edits(tmp_path / "e.json") == reqs
    (tmp_path / "one.json").write_text(json.dumps({"subject": "Messi", "prompt": "{} plays", "target_new": "golf"}))
    assert load_edits(tmp_path / "one.json")[0].target_new == "golf"


def test_demo_edits_file(tok):
    reqs = load_edits(REPO / "data/demo_edits.jsonl", tokenizer=tok)
    assert len(reqs) == 20
    assert len({r.case_id for r in reqs}) == 20
    for r in reqs:
        assert r.target_true and r.target_new != r.target_true
        assert r.subject in r.text and r.paraphrases and r.neighborhood
        assert all(r.subject in p for p in r.paraphrases)


@pytest.mark.parametrize(
    "record, field, what",
    [
        (_simple(1, prompt="lives in"), "prompt", "no '{}' placeholder"),
        (_simple(1, subject="  "), "subject", "empty"),
        (_simple(1, subject=""), "subject", "empty"),
        (_simple(1, target_new=""), "target_new", "empty"),
        (_simple(1, target_new=" "), "target_new", "empty"),
        (_simple(1, target_new=5), "target_new", "expected a string, got int"),
        (_simple(1, paraphrases=[1, 2]), "paraphrases", "expected a list of strings"),
        ({"case_id": "c1", "prompt": "{} x", "target_new": "y"}, "subject", "missing"),
        ({"case_id": "c1", "subject": "s", "target_new": "y"}, "prompt", "missing"),
        ({"case_id": "c1", "subject": "s", "prompt": "{} x"}, "target_new", "missing"),
        (_simple(1, case_id="c0"), "case_id", "duplicate of record 0"),
    ],
)
def test_bad_records_name_record_and_field(tmp_path, record, field, what):
    path = _jsonl(tmp_path / "bad.jsonl", [_simple(0), record, _simple(2)])
    with pytest.raises(EditFileError) as err:
        load_edits(path)
    msg = str(err.value)
    assert msg.startswith(f"record 1 (case_id {record['case_id']}): field '{field}'"), msg
    assert what in msg


def test_non_object_record(tmp_path):
    path = _jsonl(tmp_path / "bad.jsonl", [_simple(0), [1, 2]])
    with pytest.raises(EditFileError, match=r"record 1 \(case_id 1\): field 'record': expected an object"):
        load_edits(path)


def test_conflicting_requests(tmp_path):
    """Eqn. 5: one (subject, prompt) cannot take two new objects."""
    recs = [_simple(0), _simple(1, subject="Subject0", target_new="Paris")]
    with pytest.raises(EditFileError) as err:
        load_edits(_jsonl(tmp_path / "c.jsonl", recs))
    msg = str(err.value)
    assert msg.startswith("record 1 (case_id c1): field 'target_new': conflicts with record 0 (case_id c0)")
    assert "'Rome'" in msg and "'Paris'" in msg
    # the same new object twice is no conflict; a different prompt is another fact
    ok = [_simple(0), _simple(1, subject="Subject0"), _simple(2, subject="Subject0", prompt="{} works in", target_new="Paris")]
    assert len(load_edits(_jsonl(tmp_path / "ok.jsonl", ok))) == 3


def test_target_that_tokenises_to_nothing(tmp_path, empty_tok):
    assert target_ids(empty_tok, "¿¡") == []
    path = _jsonl(tmp_path / "t.jsonl", [_simple(0), _simple(1, target_new="¿¡")])
    assert len(load_edits(path)) == 2  # fine without a tokenizer
    with pytest.raises(EditFileError, match=r"record 1 \(case_id c1\): field 'target_new': '¿¡' tokenises to nothing"):
        load_edits(path, tokenizer=empty_tok)
    path = _jsonl(tmp_path / "t2.jsonl", [_simple(0, target_true="…")])
    with pytest.raises(EditFileError, match=r"record 0 \(case_id c0\): field 'target_true'"):
        load_edits(path, tokenizer=empty_tok)


def test_malformed_jsonl_names_its_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(_simple(0)) + "\n\n" + '{"subject": "x", "prompt": \n' + json.dumps(_simple(2)) + "\n")
    with pytest.raises(EditFileError, match=r"m\.jsonl: line 3: malformed JSON"):
        load_edits(path)


def test_malformed_json_list_names_its_line(tmp_path):
    path = tmp_path / "m.json"
    path.write_text('[\n  {"subject": "a", "prompt": "{} x", "target_new": "y"},\n  {"subject": "b",, }\n]\n')
    with pytest.raises(EditFileError, match=r"m\.json: line 3: malformed JSON"):
        load_edits(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="edits file not found"):
        load_edits(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(EditFileError, match="no records"):
        load_edits(tmp_path / "empty.jsonl")
    (tmp_path / "scalar.json").write_text("42")
    with pytest.raises(EditFileError, match="expected a JSON list"):
        load_edits(tmp_path / "scalar.json")
    with pytest.raises(ValueError, match="unknown edits format"):
        load_edits(_jsonl(tmp_path / "ok.jsonl", [_simple(0)]), fmt="csv")


def test_validate_requests_built_in_code():
    validate([EditRequest("a", "Paris", "{} is in", "Italy")])
    with pytest.raises(EditFileError, match=r"record 0 \(case_id a\): field 'prompt'"):
        validate([EditRequest("a", "Paris", "Paris is in", "Italy")])


def test_target_ids_and_fill(tok):
    assert target_ids(tok, "Paris") == tok(" Paris", add_special_tokens=False)["input_ids"]
    assert target_ids(tok, " Paris") == target_ids(tok, "Paris")
    assert target_ids(tok, "Paris") != tok("Paris", add_special_tokens=False)["input_ids"]
    assert fill("{} met {} in {{}}", "Ann") == "Ann met {} in {{}}"


def _easyedit(i, subject, prompt, new, truth="guitar", **kw):
    return {"case_id": i, "prompt": prompt, "target_new": new, "subject": subject, "ground_truth": truth,
            "rephrase_prompt": f"{subject} is incredible at", "locality_prompt": "John Lennon performs on the",
            "locality_ground_truth": truth, **kw}


def test_easyedit_counterfact_is_detected_and_templated(tmp_path):
    import json

    from memit_pl.data.edits import load_edits

    path = tmp_path / "cf.json"
    path.write_text(json.dumps([_easyedit(2, "Toko Yasuda", "Toko Yasuda, the", "piano"),
                                _easyedit(5, "Paris", "The mayor of Paris is", "Rome", truth="Hidalgo",
                                          locality_ground_truth="Guitar")]))
    a, b = load_edits(path)
    assert (a.case_id, a.prompt, a.text, a.target_new, a.target_true) == ("2", "{}, the", "Toko Yasuda, the", "piano", "guitar")
    assert a.paraphrases == ["Toko Yasuda is incredible at"] and a.neighborhood == ["John Lennon performs on the"]
    assert a.neighborhood_answers == []  # the locality answer is the true object: NS compares against it
    assert b.neighborhood_answers == ["Guitar"]


def test_easyedit_prompt_without_its_subject_names_the_record(tmp_path):
    import json

    from memit_pl.data.edits import EditFileError, load_edits

    path = tmp_path / "cf.json"
    path.write_text(json.dumps([_easyedit(2, "Toko Yasuda", "Toko Yasuda, the", "piano"),
                                _easyedit(9, "Miles Davis", "Toko Yasuda plays the", "drums")]))
    with pytest.raises(EditFileError, match=r"record 1 \(case_id 9\): field 'prompt': does not contain the subject 'Miles Davis'"):
        load_edits(path)


def test_conflicting_requests_are_an_error_or_dropped_and_counted(tmp_path, caplog):
    import json
    import logging

    from memit_pl.data.edits import EditFileError, drop_conflicts, load_edits

    recs = [_easyedit(1, "Berlin", "Berlin is the capital of", "France"),
            _easyedit(2, "Tokyo", "Tokyo is the capital of", "Peru"),
            _easyedit(3, "Berlin", "Berlin is the capital of", "Spain"),   # conflicts with case 1
            _easyedit(4, "Berlin", "Berlin is the capital of", "France"),  # the same fact again: no conflict
            _easyedit(5, "Oslo", "Oslo is the capital of", "Chile")]
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(recs))
    with pytest.raises(EditFileError, match=r"record 2 \(case_id 3\).*conflicts with record 0"):
        load_edits(path)
    with caplog.at_level(logging.INFO, logger="memit_pl.data.edits"):
        kept = load_edits(path, drop_conflicting=True, limit=3)
    assert [r.case_id for r in kept] == ["1", "2", "4"]  # the limit counts kept requests
    assert "dropped 1 requests" in caplog.text
    reqs = load_edits(path, drop_conflicting=True)
    k, d = drop_conflicts(reqs)
    assert d == [] and len(k) == 4


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(not (SHARED / "counterfact" / "counterfact-train.json").exists(), reason="needs ../shared/data")
def test_the_real_counterfact_train_split_loads_with_its_74_conflicts_dropped():
    from memit_pl.data.edits import EditFileError, load_edits

    path = SHARED / "counterfact" / "counterfact-train.json"
    with pytest.raises(EditFileError, match="conflicts with record"):
        load_edits(path)
    kept = load_edits(path, drop_conflicting=True)
    assert len(kept) == 10_000 - 74
    assert all("{}" in r.prompt and r.paraphrases and r.neighborhood for r in kept)


def test_empty_new_objects_are_an_error_or_dropped_before_the_limit(tmp_path, caplog):
    import json
    import logging

    from memit_pl.data.edits import EditFileError, load_edits

    recs = [_easyedit(1, "Berlin", "Berlin is the capital of", "France"),
            _easyedit(2, "Tokyo", "Tokyo is the capital of", " "),
            _easyedit(3, "Oslo", "Oslo is the capital of", "Chile")]
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(recs))
    with pytest.raises(EditFileError, match=r"record 1 \(case_id 2\).*target_new.*empty"):
        load_edits(path)
    with caplog.at_level(logging.INFO, logger="memit_pl.data.edits"):
        kept = load_edits(path, drop_empty=True, limit=2)
    assert [r.case_id for r in kept] == ["1", "3"]
    assert "dropped 1 requests with an empty new object, e.g. case 2" in caplog.text


@pytest.mark.skipif(not (SHARED / "zsre" / "zsre_mend_train-1k.json").exists(), reason="needs ../shared/data")
def test_the_real_zsre_records_load_with_their_two_empty_new_objects_dropped():
    from memit_pl.data.edits import EditFileError, load_edits

    path = SHARED / "zsre" / "zsre_mend_train-1k.json"
    with pytest.raises(EditFileError, match=r"record 534 .*target_new"):
        load_edits(path)
    kept = load_edits(path, drop_empty=True)
    assert len(kept) == 998
    assert all(r.neighborhood and r.neighborhood[0].startswith("nq question: ") for r in kept)
