"""The ``memit-pl`` console script and the ``predict`` command."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memit_pl import cli
from memit_pl.data.edits import target_ids
from memit_pl.modeling.predict import top_ids, top_predictions

REPO = Path(__file__).parents[1]


def _script() -> list[str]:
    exe = Path(sys.executable).parent / "memit-pl"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("memit-pl")
    return [found] if found else [sys.executable, "-m", "memit_pl"]


def _run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([*_script(), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def test_help_lists_every_command():
    res = _run("--help")
    assert res.returncode == 0, res.stderr
    for name in cli.COMMANDS:
        assert f"  {name} " in res.stdout
    assert "memit-pl COMMAND" in res.stdout


def test_unknown_command_exits_2(capsys):
    res = _run("frobnicate")
    assert res.returncode == 2
    assert "unknown command 'frobnicate'" in res.stderr and "Traceback" not in res.stderr
    assert cli.main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err
    assert cli.main([]) == 0 and "commands:" in capsys.readouterr().out


def test_bad_edits_file_is_one_clean_line(tmp_path):
    """Through the real console script: exit code 2, one line on stderr, no traceback, no model load."""
    path = tmp_path / "edits.jsonl"
    path.write_text('{"subject": "Paris", "prompt": "{} is in", "target_new": "Italy"}\n{"subject": "x", "prompt": \n')
    res = _run("predict", "--edits", str(path), "--model.name", str(tmp_path / "no-such-model"))
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith("memit-pl predict: error: ") and "edits.jsonl: line 2: malformed JSON" in res.stderr
    assert res.stdout == ""


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"subject": "Paris", "prompt": "is in", "target_new": "Italy"}\n', "record 0 (case_id 0): field 'prompt'"),
        ('[\n{"subject": "", "prompt": "{} is", "target_new": "x"}\n]', "record 0 (case_id 0): field 'subject': empty"),
        ('[\n{"subject": "a",\n "prompt": }]', "line 3: malformed JSON"),
        (None, "edits file not found"),
    ],
    ids=["no-placeholder", "empty-subject", "malformed-list", "missing"],
)
def test_bad_edits_files_in_process(tmp_path, capsys, content, expected):
    path = tmp_path / "edits.json"
    if content is not None:
        path.write_text(content)
    assert cli.main(["predict", "--edits", str(path), "--model.name", str(tmp_path / "no-such-model")]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("memit-pl predict: error: ")
    assert expected in captured.err and captured.out == ""


@pytest.fixture
def tiny_dir(tmp_path, tok, make_model):
    model = make_model("gpt2", seed=4)  # absolute positions: left padding must not shift them
    d = tmp_path / "tiny"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d, model


PROMPTS = [
    "Mozart was a famous",
    "The Eiffel Tower is located in the city of",
    "Lionel Messi plays soccer for",
    "The official language of Canada is",
    "Albert Einstein was a famous",
    "Toyota is",
]


def _alone_top1(model, tok, prompt: str) -> int:
    with torch.no_grad():
        return int(model(torch.tensor([tok(prompt)["input_ids"]]), use_cache=False).logits[0, -1].argmax())


def test_top_ids_batched_equals_one_at_a_time(tiny_dir, tok):
    _, model = tiny_dir
    alone = [_alone_top1(model, tok, p) for p in PROMPTS]
    try:
        for side in ("left", "right"):
            tok.padding_side = side
            ids = top_ids(model, tok, PROMPTS, k=3, batch_size=4)
            assert ids.shape == (len(PROMPTS), 3)
            assert ids[:, 0].tolist() == alone, side
    finally:
        tok.padding_side = "right"  # the session fixture's default
    assert top_predictions(model, tok, PROMPTS[:2], k=1) == [[tok.decode([a]).strip()] for a in alone[:2]]


def test_predict_counts_token_ids_not_strings(tiny_dir, tok, tmp_path, capsys):
    """'right' means: the top-1 id is the first id of target_ids(tok, target_true)."""
    d, model = tiny_dir
    records, expected, by_string = [], 0, 0
    for i, p in enumerate(PROMPTS):
        top1 = _alone_top1(model, tok, p)
        true = tok.decode([top1]).strip() or "x"  # the top-1 token's text: right as a string ...
        expected += target_ids(tok, true)[:1] == [top1]  # ... but as a token only with a leading space
        by_string += true.startswith(tok.decode([top1]).strip())
        records.append({"case_id": f"t{i}", "subject": p.split()[0], "prompt": "{}" + p[len(p.split()[0]):],
                        "target_new": "zz", "target_true": true})
    assert expected != by_string  # the data tells the two rules apart
    path = tmp_path / "e.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    rc = cli.main(["predict", "--edits", str(path), "--model.name", str(d), "--model.device", "cpu", "--k", "2"])
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0
    assert len(out) == len(PROMPTS) + 2
    assert out[-1] == f"top-1 is the first token of target_true for {expected}/{len(PROMPTS)} prompts"


@pytest.mark.slow
def test_predict_demo_edits_on_smollm2():
    res = _run("predict", "--edits", "data/demo_edits.jsonl", "--model.device", "cpu", timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 22
    assert lines[-1] == "top-1 is the first token of target_true for 20/20 prompts"


def test_bad_config_value_is_one_clean_line(capsys):
    assert cli.main(["predict", "--edits", str(REPO / "data/demo_edits.jsonl"), "--model.dtype", "int3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("memit-pl predict: error: config section 'model': ")
    assert "'int3'" in err
    assert cli.main(["predict", "--edits", str(REPO / "data/demo_edits.jsonl"), "--memit.layers", "[5, 3]"]) == 2
    assert "strictly ascending" in capsys.readouterr().err


def test_a_directory_without_a_model_and_out_of_range_layers_are_one_line_errors(tmp_path, capsys, make_model, tok):
    edits = tmp_path / "e.jsonl"
    edits.write_text('{"subject": "Paris", "prompt": "{} is in", "target_new": "Italy"}\n')
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["z", "--edits", str(edits), "--model.name", str(empty), "--out", str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no model (no config.json)" in err
    d = tmp_path / "tiny"
    make_model("llama").save_pretrained(d)
    tok.save_pretrained(d)
    assert cli.main(["z", "--edits", str(edits), "--model.name", str(d), "--model.device", "cpu",
                     "--memit.layers", "[2, 40]", "--out", str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err  # (after the loading bars of transformers)
    assert "Traceback" not in err and "\nmemit-pl z: error: memit.layers [40] out of range: the model has layers 0..3\n" in err
    assert not (tmp_path / "z" / "zs.safetensors").exists()
