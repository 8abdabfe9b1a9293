"""Two CPU processes (DDP, gloo) give the same z store and the same edit as one."""

import pytest
import torch

import memit_pl.stages.zmodule as zm
from memit_pl.config import MemitConfig, TrainerConfig
from memit_pl.data.edits import EditRequest
from memit_pl.modeling.spec import get_spec
from memit_pl.stages.apply import apply_memit
from tests.test_apply import covariances

pytestmark = pytest.mark.multiprocess

REQUESTS = [
    EditRequest(str(i), s, p, t)
    for i, (s, p, t) in enumerate([
        ("Michael Jordan", "{} plays the sport of", "soccer"),
        ("France", "The capital of {} is", "Rome"),
        ("Toyota", "{} is a car company from", "Japan"),
        ("Albert Einstein", "{} was a famous", "painter"),
        ("Mozart", "{} was a famous", "footballer"),
    ])
]
ONE = TrainerConfig(accelerator="cpu", devices=1, enable_progress_bar=False)
TWO = TrainerConfig(accelerator="cpu", devices=2, strategy="ddp_spawn", enable_progress_bar=False)


def test_two_processes_equal_one(make_model, tok, tmp_path):
    cfg = MemitConfig(layers=[1, 2], v_num_grad_steps=4, v_lr=0.05, z_batch_size=2, context_templates=[[3, 2]],
                      mom2_update_weight=1.0)
    # float64: the ranks batch other edits together, and float32 rounding would differ with the batch.
    single_model, multi_model = make_model("llama").double(), make_model("llama").double()
    single = zm.compute_zs(single_model, tok, REQUESTS, cfg, tmp_path / "one" / "z", ONE)
    multi = zm.compute_zs(multi_model, tok, REQUESTS, cfg, tmp_path / "two" / "z", TWO)
    assert sorted(multi.case_ids) == sorted(single.case_ids)  # odd count: the sampler's repeat is dropped
    ids = [r.case_id for r in REQUESTS]
    torch.testing.assert_close(multi.z_for(ids), single.z_for(ids), atol=1e-9, rtol=1e-8)

    covs = covariances(single_model, cfg.layers)
    d1 = apply_memit(single_model, tok, REQUESTS, single, covs, cfg, tmp_path / "one", trainer=ONE)
    d2 = apply_memit(multi_model, tok, REQUESTS, multi, covs, cfg, tmp_path / "two", trainer=TWO)
    spec = get_spec(single_model)
    for layer in cfg.layers:
        torch.testing.assert_close(d2.dense(layer), d1.dense(layer), atol=1e-9, rtol=1e-8)
        torch.testing.assert_close(spec.out_weight(multi_model, layer), spec.out_weight(single_model, layer),
                                   atol=1e-9, rtol=1e-8)
