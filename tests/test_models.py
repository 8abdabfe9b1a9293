"""Model loading: local directories through the real from_pretrained path, packaged GGUF models
through the cache, dtype/device, the tokenizer's pad token and padding side, fingerprints."""

import time
from pathlib import Path

import pytest
import torch

from memit_pl.modeling import loading as models
from memit_pl.modeling.loading import (
    default_cache_dir,
    fingerprint,
    input_device,
    load_model,
    load_tokenizer,
    packaged_model_dir,
    resolve_dtype,
)
from memit_pl.modeling.spec import get_spec
from tests.support.tiny import tiny_model


@pytest.fixture
def offline(monkeypatch):
    """No hub access: HF_HUB_OFFLINE=1 (also patched into huggingface_hub's constants)."""
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)


@pytest.fixture
def saved_dir(tmp_path, tok):
    """A tiny llama and the BPE tokenizer written by ``save_pretrained``."""
    model = tiny_model("llama", vocab_size=len(tok), seed=3)
    d = tmp_path / "tiny-llama"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d, model


def test_resolve_dtype():
    assert resolve_dtype("bf16") is torch.bfloat16
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        resolve_dtype("int8")


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMIT_PL_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("MEMIT_PL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "memit_pl"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "memit_pl"


def test_local_directory_loads_offline(offline, saved_dir, tok):
    d, ref = saved_dir
    model, t = load_model(str(d), dtype="float32", device="cpu", padding_side="left")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert get_spec(model).family == "llama"
    for (n, p), (n2, q) in zip(sorted(model.named_parameters()), sorted(ref.named_parameters())):
        assert n == n2 and torch.equal(p, q)
    assert t.padding_side == "left" and t.pad_token is not None
    assert t("Paris is")["input_ids"] == tok("Paris is")["input_ids"]
    assert input_device(model) == torch.device("cpu")
    assert fingerprint(model) == fingerprint(ref)  # the path it came from does not matter


def test_dtype_and_device_are_honoured(offline, saved_dir, tok):
    d, ref = saved_dir
    model, t = load_model(str(d), dtype="bfloat16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device for p in model.parameters()} == {torch.device("cpu")}
    assert t.padding_side == "right"
    ids = torch.tensor([tok("The capital of France is Paris")["input_ids"]])
    out = model(ids, use_cache=False).logits
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref(ids, use_cache=False).logits, atol=0.1, rtol=0.05)
    with pytest.raises(ValueError, match="padding_side"):
        load_model(str(d), device="cpu", padding_side="middle")
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(str(d), dtype="int3", device="cpu")


def test_tokenizer_without_pad_token_gets_eos(offline, tmp_path, tok):
    d = tmp_path / "tok"
    tok.save_pretrained(d)
    import json

    cfg_path = d / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("pad_token", None)
    cfg_path.write_text(json.dumps(cfg))
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(d)).pad_token is None  # the file really has none
    t = load_tokenizer(str(d), padding_side="left")
    assert t.pad_token == t.eos_token and t.padding_side == "left"
    batch = t(["a", "Paris is big"], padding=True)
    assert batch["attention_mask"][0][0] == 0  # left padded


def test_missing_local_model_fails(offline, tmp_path):
    with pytest.raises(OSError):
        load_model(str(tmp_path / "nope"), device="cpu")


def test_fingerprint_tracks_weights_exactly(tok):
    a = tiny_model("gpt2", vocab_size=len(tok), seed=1)
    b = tiny_model("gpt2", vocab_size=len(tok), seed=1)
    fa = fingerprint(a)
    assert len(fa) == 16 and fa == fingerprint(a) == fingerprint(b)
    assert fingerprint(tiny_model("gpt2", vocab_size=len(tok), seed=2)) != fa
    w = get_spec(a).out_weight(a, 2)
    with torch.no_grad():
        old = w[5, 7].item()
        w[5, 7] = torch.nextafter(w[5, 7], torch.tensor(10.0))  # the smallest possible change
        assert fingerprint(a) != fa
        w[5, 7] = old
    assert fingerprint(a) == fa
    with torch.no_grad():  # swapping two entries keeps every sum the same
        w[[0, 1], 0] = w[[1, 0], 0]
    assert fingerprint(a) != fa
    assert fingerprint(b.to(torch.bfloat16)) != fa
    a2 = tiny_model("gpt2", vocab_size=len(tok), seed=1)
    a2.config.layer_norm_epsilon = 1e-3  # the config is part of it
    assert fingerprint(a2) != fa


@pytest.mark.slow
def test_smollm2_loads_through_the_cache(smollm2, monkeypatch):
    model, tok = smollm2
    assert get_spec(model).family == "llama" and get_spec(model).n_layers(model) == 30
    assert tok.pad_token is not None and tok.padding_side == "right"
    path = packaged_model_dir("smollm2-135m")
    assert (path / "model.safetensors").exists() and (path / "config.json").exists()

    def no_conversion(*a, **k):
        raise AssertionError("the cached conversion should have been reused")

    monkeypatch.setattr(models, "_gguf_path", no_conversion)
    t0 = time.perf_counter()
    again, tok2 = load_model("smollm2-135m", device="cpu", padding_side="left")
    elapsed = time.perf_counter() - t0
    assert elapsed < 30, elapsed  # ~1-2 s on an idle CPU; generous for a shared machine
    assert tok2.padding_side == "left" and tok2.pad_token_id is not None
    assert fingerprint(again) == fingerprint(model)
    enc = tok2(["The capital of France is", "The Eiffel Tower is located in the city of"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = again(**enc, use_cache=False).logits[:, -1]
    assert [tok2.decode(i).strip() for i in logits.argmax(-1)] == ["Paris", "Paris"]


@pytest.mark.slow
def test_smollm2_bfloat16_on_cpu(smollm2):
    model, tok = load_model("smollm2-135m", dtype="bfloat16", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert input_device(model) == torch.device("cpu")
    enc = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        top = model(**enc, use_cache=False).logits[0, -1].argmax().item()
    assert tok.decode(top).strip() == "Paris"
    assert fingerprint(model) != fingerprint(smollm2[0])


@pytest.mark.slow
def test_packaged_tokenizer_without_converting_the_model(tmp_path, smollm2):
    """load_tokenizer reads the GGUF's tokenizer into <cache>/tokenizers; the weights are not converted."""
    t = load_tokenizer("smollm2-135m", cache_dir=tmp_path, padding_side="left")
    assert (tmp_path / "tokenizers" / "smollm2-135m" / "tokenizer_config.json").exists()
    assert not (tmp_path / "models").exists()
    ref = smollm2[1]
    text = "Danielle Darrieux's mother tongue is French."
    assert t(text)["input_ids"] == ref(text)["input_ids"]
    assert t.padding_side == "left" and t.pad_token == ref.pad_token
    t0 = time.perf_counter()
    load_tokenizer("smollm2-135m", cache_dir=tmp_path)  # now from the saved directory
    assert time.perf_counter() - t0 < 10


def test_cache_dir_argument_is_respected(offline, tmp_path, tok, monkeypatch):
    """A packaged short name resolves under the given cache_dir (a converted directory placed
    there is what loads), and the default cache is not consulted."""
    tiny = tiny_model("qwen2", vocab_size=len(tok), seed=5)
    target = tmp_path / "models" / "smollm2-135m"
    tiny.save_pretrained(target)
    tok.save_pretrained(target)
    monkeypatch.setenv("MEMIT_PL_CACHE", str(tmp_path / "elsewhere"))

    def no_conversion(*a, **k):
        raise AssertionError("nothing should be converted")

    monkeypatch.setattr(models, "_gguf_path", no_conversion)
    assert packaged_model_dir("smollm2-135m", cache_dir=tmp_path) == target
    model, t = load_model("smollm2-135m", device="cpu", cache_dir=tmp_path, padding_side="left")
    assert get_spec(model).family == "qwen2" and fingerprint(model) == fingerprint(tiny)
    assert len(t) == len(tok) and t.padding_side == "left"
    assert load_tokenizer("smollm2-135m", cache_dir=str(tmp_path))("Paris")["input_ids"] == tok("Paris")["input_ids"]
    assert not (tmp_path / "elsewhere").exists()
    # without cache_dir the environment's default is used: there is nothing there, so it would convert
    with pytest.raises(AssertionError, match="nothing should be converted"):
        load_model("smollm2-135m", device="cpu")


@pytest.mark.slow
def test_gemma3_270m_loads(offline):
    """The second packaged model (first conversion ~75 s, then cached under the default dir)."""
    model, tok = load_model("gemma3-270m", device="cpu", padding_side="left")
    spec = get_spec(model)
    assert spec.family == "gemma3_text" and not spec.transposed
    assert spec.d_model(model) == 640 and spec.n_layers(model) == 18
    assert tok.pad_token == "<pad>" and tok.padding_side == "left"
    enc = tok("The Eiffel Tower is located in the city of", return_tensors="pt")
    with torch.no_grad():
        top = model(**enc, use_cache=False).logits[0, -1].argmax().item()
    assert tok.decode(top).strip() == "Paris"
