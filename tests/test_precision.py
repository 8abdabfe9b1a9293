"""The compute dtype: resolution (auto, explicit, refused), bf16 autocast against fp32 on every stage,
accumulations kept in fp32, Δ's survival of the weights' dtype, and the same checks on CUDA when present."""

import logging

import pytest
import torch

from memit_pl import MEMIT, Config, EditRequest, MemitConfig
from memit_pl.config import ConfigError, EvalConfig, ModelConfig, StatsConfig, TrainerConfig
from memit_pl.delta import add_to_weight
from memit_pl.modeling.spec import get_spec
from memit_pl.stages import runtime
from tests.support.tiny import CORPUS

FACTS = [("{} plays the sport of", "Michael Jordan", "soccer"), ("The capital of {} is", "France", "Rome"),
         ("{} was a famous", "Mozart", "footballer"), ("{} is a car company from", "Toyota", "Sweden")]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def requests():
    return [EditRequest.of(p, s, o) for p, s, o in FACTS]


def make_editor(model, tok, tmp_path, compute: str, name: str, device: str = "cpu") -> MEMIT:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 8))
    cfg = Config(model=ModelConfig(compute_dtype=compute),
                 memit=MemitConfig(layers=[1, 2], v_num_grad_steps=8, v_lr=0.1, context_templates=[[3, 1]],
                                   mom2_update_weight=1.0),
                 stats=StatsConfig(corpus=str(corpus), n_samples=16, seq_len=16),
                 trainer=TrainerConfig(accelerator="gpu" if device == "cuda" else "cpu", enable_progress_bar=False),
                 eval=EvalConfig(batch_size=16, max_generation_prompts=0))
    return MEMIT(model.to(device), tok, cfg, work_dir=tmp_path / f"work-{name}", cache_dir=tmp_path / f"cache-{name}")


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_explicit_dtypes_resolve_as_given_and_bad_ones_are_refused():
    assert runtime.resolve_compute_dtype("float32", "cpu") == "float32"
    assert runtime.resolve_compute_dtype("bfloat16", "cpu") == "bfloat16"
    with pytest.raises(ValueError, match="float16 needs a GPU"):
        runtime.resolve_compute_dtype("float16", "cpu")
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        runtime.resolve_compute_dtype("int8", "cpu")
    with pytest.raises(ValueError, match="compute_dtype must be auto"):
        ModelConfig(compute_dtype="fp8")
    assert runtime.lightning_precision("bfloat16") == "bf16-mixed"


@pytest.mark.parametrize("speedup, expected", [(4.0, "bfloat16"), (0.3, "float32")])
def test_auto_on_the_cpu_follows_the_measured_bf16_speed(monkeypatch, caplog, speedup, expected):
    monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda: speedup)
    with caplog.at_level(logging.INFO, logger="memit_pl.stages.runtime"):
        assert runtime.resolve_compute_dtype("auto", "cpu") == expected
    assert f"auto -> {expected}" in caplog.text and f"{speedup:.2f}x" in caplog.text


def test_auto_with_a_model_times_the_model_itself(make_model, monkeypatch, caplog):
    model = make_model("llama")
    s = runtime.model_bf16_speedup(model, batch=2, seq=8, repeats=1)
    assert s > 0 and not any(p.grad is not None for p in model.parameters())
    monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda: 100.0)  # a matmul probe would say bf16
    monkeypatch.setattr(runtime, "model_bf16_speedup", lambda m: 0.9)
    with caplog.at_level(logging.INFO, logger="memit_pl.stages.runtime"):
        assert runtime.resolve_compute_dtype("auto", "cpu", model) == "float32"
    assert "the model's forward and backward passes run 0.90x" in caplog.text


def test_the_bf16_speed_probe_measures_something():
    runtime.cpu_bf16_speedup.cache_clear()
    s = runtime.cpu_bf16_speedup(n=64, repeats=3)
    assert s > 0 and s == runtime.cpu_bf16_speedup(n=64, repeats=3)


def test_bf16_compute_matches_fp32_on_every_stage(make_model, tok, tmp_path, monkeypatch):
    """Same tiny model, fp32 vs bf16 autocast: statistics, z, Δ and the evaluation agree to bf16's precision;
    the weights stay fp32 and Σ k kᵀ is accumulated in fp32."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = {}
    for compute in ("float32", "bfloat16"):
        ed = make_editor(make_model("llama"), tok, tmp_path, compute, compute)
        assert ed.compute_dtype == compute
        covs = ed.covariances()
        assert all(c.dtype == torch.float32 for c in covs.values())
        with ed.edited(requests()) as delta:
            ev = ed.evaluate(requests())
        store = ed.zs(requests())
        out[compute] = (covs, store, delta, ev)
        assert delta.metadata["compute_dtype"] == compute
        assert all(p.dtype == torch.float32 for p in ed.model.parameters())
    (c32, z32, d32, e32), (c16, z16, d16, e16) = out["float32"], out["bfloat16"]
    for layer in c32:
        assert rel(c16[layer], c32[layer]) < 2e-2
    ids = [r.case_id for r in requests()]
    assert rel(z16.z_for(ids), z32.z_for(ids)) < 5e-2
    assert 0 < rel(d16.dense(2), d32.dense(2)) < 0.2  # different (bf16 rounding), but the same update
    for m in ("ES", "PS"):
        if e32["metrics"].get(m) is not None:
            assert abs(e16["metrics"][m] - e32["metrics"][m]) <= 25.0  # 4 cases: at most one flips


def test_bf16_weights_are_edited_and_report_what_rounding_lost(make_model, tok, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = make_model("llama").to(torch.bfloat16)
    ed = make_editor(model, tok, tmp_path, "bfloat16", "bf16w")
    delta = ed.edit(requests())
    assert all(p.dtype == torch.bfloat16 for p in ed.model.parameters())
    errors = delta.metadata["cast_error"]
    assert set(errors) == {"1", "2"} and all(0 <= e < 1.5 for e in errors.values())


def test_cast_error_is_zero_for_fp32_and_large_when_bf16_rounds_delta_away(make_model, tok):
    model = make_model("llama")
    spec = get_spec(model)
    w = spec.out_weight(model, 1)
    small = torch.full((w.shape[0], w.shape[1]), 1e-6)
    assert add_to_weight(spec, model, 1, small) == 0.0
    model = model.to(torch.bfloat16)
    w = spec.out_weight(model, 1)
    with torch.no_grad():
        w.fill_(1.0)
    tiny = torch.full(tuple(w.shape), 1e-4)  # below bf16's spacing at 1.0 (2^-7): rounded away entirely
    assert add_to_weight(spec, model, 1, tiny) == pytest.approx(1.0, abs=1e-6)
    big = torch.full(tuple(w.shape), 0.5)  # representable exactly
    assert add_to_weight(spec, model, 1, big) == pytest.approx(0.0, abs=1e-6)


def test_fp16_compute_on_the_cpu_is_a_one_line_error(make_model, tok, tmp_path):
    with pytest.raises(ValueError, match="float16 needs a GPU"):
        make_editor(make_model("llama"), tok, tmp_path, "float16", "fp16")


def test_a_config_section_with_compute_dtype_reads_from_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  compute_dtype: bfloat16\n")
    assert Config.from_file(f).model.compute_dtype == "bfloat16"
    f.write_text("model:\n  compute_dtype: half\n")
    with pytest.raises(ConfigError, match="compute_dtype"):
        Config.from_file(f)


@CUDA
@pytest.mark.parametrize("compute", ["float32", "bfloat16", "auto"])
def test_the_editor_runs_on_cuda(make_model, tok, tmp_path, monkeypatch, compute):
    """On a GPU: every stage in the compute dtype, Δ equal to the CPU's fp32 edit within bf16 precision."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cpu = make_editor(make_model("llama"), tok, tmp_path, "float32", "cpu-ref")
    with cpu.edited(requests()) as ref:
        pass
    gpu = make_editor(make_model("llama"), tok, tmp_path, compute, f"cuda-{compute}", device="cuda")
    assert gpu.compute_dtype in ("float32", "bfloat16")
    with gpu.edited(requests()) as delta:
        assert next(gpu.model.parameters()).device.type == "cuda"
        ev = gpu.evaluate(requests())
    assert ev["n_cases"] == len(FACTS)
    tol = 1e-3 if gpu.compute_dtype == "float32" else 0.2
    assert rel(delta.dense(2), ref.dense(2)) < tol
