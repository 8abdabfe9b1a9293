"""The paper's big models on paper: the memory plan and accelerate's placement on the meta device (no
weights), under the limits docs/scale.md states."""

import pytest
import torch

from memit_pl.experiments import scale

GIB = 1024**3


@pytest.fixture(scope="module")
def configs():
    return {"gptj": scale.gptj_6b_config(), "neox": scale.gpt_neox_20b_config()}


def test_the_plans_count_the_published_parameter_numbers(configs):
    j = scale.plan(configs["gptj"], [3, 4, 5, 6, 7, 8], 10_000, 4)
    x = scale.plan(configs["neox"], [6, 7, 8, 9, 10], 10_000, 2)
    assert 6.0e9 < j.n_params < 6.1e9 and 20.5e9 < x.n_params < 20.7e9  # GPT-J 6.05B, NeoX 20.6B
    # E[k kᵀ] of one layer: d_key² fp32 (GPT-J d_key 16,384: 1 GiB; NeoX 24,576: 2.25 GiB)
    assert j.stats_per_layer == 16384**2 * 4 and x.stats_per_layer == 24576**2 * 4
    assert j.keys == 10_000 * 16384 * 4 and x.zs == 10_000 * 6144 * 4
    assert x.update_peak > j.update_peak > 0


@pytest.mark.parametrize("model, dtype, gpus, fits", [
    ("gptj", torch.float32, 1, True),     # 22.6 GiB of weights + its reserve on one 48 GiB GPU
    ("neox", torch.float16, 1, False),    # 38.4 GiB of fp16 weights leave too little for the stages
    ("neox", torch.float16, 2, True),
    ("neox", torch.float16, 4, True),
])
def test_accelerate_places_the_models_as_the_plan_says(configs, model, dtype, gpus, fits):
    cfg = configs[model]
    layers = [3, 4, 5, 6, 7, 8] if model == "gptj" else [6, 7, 8, 9, 10]
    p = scale.plan(cfg, layers, 10_000, 4 if dtype == torch.float32 else 2, z_batch=32 if model == "gptj" else 8)
    reserve = max(p.update_peak, p.z_batch) / GIB + 2.0
    where = scale.place(cfg, dtype, gpus, 48.0, reserve)
    on_gpus = sum(v for k, v in where.items() if k != "cpu")
    assert on_gpus + where.get("cpu", 0.0) == pytest.approx(p.weights / GIB, abs=0.05)
    assert (where.get("cpu", 0.0) == 0.0) is fits
    for i in range(gpus):
        assert where.get(str(i), 0.0) <= 48.0 - reserve + 0.01
