"""bench/zbank.py: z optimised chunk by chunk in separate runs, banked, and seeded into a new run's store, is
the store one run over all edits makes; a bank made under other settings is refused."""

from dataclasses import replace

import pytest
import torch

import memit_pl.stages.zmodule as zm
from bench import zbank
from memit_pl import EditRequest

FACTS = [("{} plays the sport of", "Michael Jordan", "soccer"), ("The capital of {} is", "France", "Rome"),
         ("{} was a famous", "Mozart", "footballer"), ("{} is made by", "iPhone", "Nokia"),
         ("The mother tongue of {} is", "Danielle Darrieux", "English")]


def test_chunks_banked_in_separate_runs_seed_the_store_of_one_run(editor, tmp_path, monkeypatch):
    reqs = [EditRequest.of(p, s, o) for p, s, o in FACTS]
    whole = editor.zs(reqs, store_dir=tmp_path / "whole")
    bank = tmp_path / "bank"
    for first, end, secs in ((0, 2, 10.0), (2, 5, 30.0)):  # two sessions, two chunks
        d = tmp_path / f"chunk{first}"
        zbank.seed(d, bank, parts=False)
        store = editor.zs(reqs[first:end], store_dir=d)
        zbank.add_chunk(bank, store, [r.case_id for r in reqs[first:end]], first, secs, "float32")
    idx = zbank.read_index(bank)
    assert [(c["first"], c["n"]) for c in idx["chunks"]] == [(0, 2), (2, 3)] and idx["n_edits"] == 5
    assert zbank.banked_positions(bank) == set(range(5))
    assert zbank.banked_seconds(bank, 3) == pytest.approx(10.0 + 30.0 / 3)

    calls = []
    real = zm.optimize_z
    monkeypatch.setattr(zm, "optimize_z", lambda *a, **k: calls.append(1) or real(*a, **k))
    run = tmp_path / "run"
    assert zbank.seed(run, bank) == 2
    seeded = editor.zs(reqs, store_dir=run)
    assert calls == []  # nothing optimised again
    ids = [r.case_id for r in reqs]
    torch.testing.assert_close(seeded.z_for(ids), whole.z_for(ids), rtol=1e-4, atol=1e-5)

    other = replace(editor.memit, v_lr=editor.memit.v_lr * 2)  # another objective: another store key
    run2 = tmp_path / "run2"
    zbank.seed(run2, bank)
    with pytest.raises(ValueError, match="computed with another model, layer, objective"):
        editor.zs(reqs, other, store_dir=run2)


def test_a_chunk_banked_without_a_clean_time_has_no_seconds(editor, tmp_path):
    reqs = [EditRequest.of(p, s, o) for p, s, o in FACTS[:3]]
    store = editor.zs(reqs, store_dir=tmp_path / "z")
    bank = tmp_path / "bank"
    zbank.add_chunk(bank, store, [r.case_id for r in reqs[:2]], 0, None, "float32")
    zbank.add_chunk(bank, store, [reqs[2].case_id], 2, 6.0, "float32")
    assert zbank.banked_seconds(bank, 3) is None and zbank.banked_seconds(bank, 2) is None
    idx = zbank.read_index(bank)
    assert idx["n_edits"] == 3 and idx["n_edits_timed"] == 1 and idx["seconds"] == 6.0


def test_a_resumed_chunk_counts_what_the_interrupted_run_stored(editor, tmp_path):
    """An interrupted chunk's store directory already holds some z: they are counted (merged file and part
    files alike), and the chunk's index entry says how many edits its seconds were timed on."""
    from memit_pl.stages.zstore import PARTS, STORE_FILE

    reqs = [EditRequest.of(p, s, o) for p, s, o in FACTS[:3]]
    d = tmp_path / "chunk0"
    assert zbank.stored_ids(d) == set()
    store = editor.zs(reqs[:2], store_dir=d)
    assert (d / STORE_FILE).exists() and zbank.stored_ids(d) == {r.case_id for r in reqs[:2]}
    (d / PARTS).mkdir(exist_ok=True)
    (d / STORE_FILE).rename(d / PARTS / "b0.safetensors")  # as parts, before the merge
    assert zbank.stored_ids(d) == {r.case_id for r in reqs[:2]}
    bank = tmp_path / "bank"
    zbank.add_chunk(bank, store, [r.case_id for r in reqs[:2]], 0, 8.0, "float32", timed_edits=1)
    (entry,) = zbank.read_index(bank)["chunks"]
    assert entry["timed_edits"] == 1 and entry["seconds"] == 8.0 and entry["s_per_edit"] == 4.0


def test_bank_dir_names_the_layer_and_the_compute_dtype():
    assert zbank.bank_dir("m") == zbank.BANKS / "m"
    assert zbank.bank_dir("m", 8) == zbank.BANKS / "m-L8"
    assert zbank.bank_dir("m", compute_dtype="bfloat16") == zbank.BANKS / "m-bf16"
    assert zbank.bank_dir("m", 8, "float16") == zbank.BANKS / "m-L8-fp16"
    with pytest.raises(SystemExit, match="fixed compute dtype"):
        zbank.bank_dir("m", compute_dtype="auto")  # what auto picks depends on the machine
