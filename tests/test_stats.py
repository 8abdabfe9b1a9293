"""The statistics stage: the metric, one pass for all layers, padding, DDP, resume, cache, CLI."""

import pytest
import torch
from lightning.pytorch import Callback

from memit_pl import io
from memit_pl.config import StatsConfig, TrainerConfig
from memit_pl.data.corpus import CorpusDataModule, collate
from memit_pl.modeling import hooks
from memit_pl.modeling.spec import get_spec
from memit_pl.stages import stats
from memit_pl.stages.stats import (
    CovarianceModule,
    SecondMoment,
    _second_moment_update,
    compute_covariances,
    layer_covariances,
    second_moment,
    stats_cache,
)
from tests.support.tiny import CORPUS

CPU = TrainerConfig(accelerator="cpu", devices=1, enable_progress_bar=False)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(CORPUS * 8) + "\n", encoding="utf-8")
    return path


def _cfg(text_file, **kw) -> StatsConfig:
    base = dict(corpus=str(text_file), n_samples=12, seq_len=16, batch_size=4, dtype="float64")
    return StatsConfig(**{**base, **kw})


def _direct(model, tok, layer: int, cfg: StatsConfig, per_output_rms: bool = False) -> torch.Tensor:
    """E[k kᵀ] of one layer: full forward passes (no early stop), float64, over the same chunks
    (``per_output_rms``: E[k kᵀ / rms(W k)²])."""
    name = get_spec(model).name("mlp_out", layer)
    total, count = 0, 0
    dm = CorpusDataModule(tok, cfg.corpus, cfg.n_samples, cfg.seq_len, batch_size=5, seed=cfg.seed)
    for batch in dm.predict_dataloader():
        with torch.no_grad(), hooks.trace(model, [name], inputs=True, outputs=True) as rec:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        keys = rec[name].input.double()
        if per_output_rms:
            keys = keys / rec[name].output.double().pow(2).mean(-1, keepdim=True).sqrt()
        m = batch["attention_mask"].bool()
        total = total + torch.einsum("bpi,bpj->ij", keys * m[..., None], keys)
        count += int(m.sum())
    return total / count


# --- the metric ------------------------------------------------------------------------------------


def test_second_moment_functional_and_metric():
    keys = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    rows = keys[mask.bool()]
    expected = rows.double().T @ rows.double() / rows.shape[0]
    total, count = _second_moment_update(keys, mask, torch.float64)
    assert count.item() == 9 and total.dtype == torch.float64
    torch.testing.assert_close(second_moment(keys, mask, torch.float64), expected)
    m = SecondMoment(4, "float64")
    for b in range(3):  # batch by batch = all at once
        m.update(keys[b : b + 1], mask[b : b + 1])
    torch.testing.assert_close(m.compute(), expected)
    m32 = SecondMoment(4)
    m32.update(keys.half(), mask)  # accumulation dtype, whatever the keys' dtype
    assert m32.total.dtype == torch.float32
    assert SecondMoment.higher_is_better is None and SecondMoment.full_state_update is False
    with pytest.raises(ValueError, match="float32 or float64"):
        SecondMoment(4, "float16")
    with pytest.raises(ValueError, match="no keys"):
        SecondMoment(4).compute()


# --- one pass, padding -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_one_pass_for_all_layers_equals_per_layer_passes(make_model, tok, text_file, tmp_path, family):
    model = make_model(family)
    cfg = _cfg(text_file)
    covs = layer_covariances(model, tok, [0, 2, 3], cfg, cache_dir=tmp_path / "stats", trainer=CPU)
    assert sorted(covs) == [0, 2, 3]
    for layer, c in covs.items():
        assert c.dtype == torch.float32 and c.device.type == "cpu" and c.shape == (64, 64)
        torch.testing.assert_close(c.double(), _direct(model, tok, layer, cfg), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(covs[0], covs[3])


def test_a_norm_after_the_mlp_weighs_each_key_by_its_output_size(make_model, tok, text_file, tmp_path):
    """Gemma 3: E[k kᵀ / rms(W k)²], in a cache entry of its own."""
    model = make_model("gemma3_text")
    cfg = _cfg(text_file)
    covs = layer_covariances(model, tok, [1], cfg, cache_dir=tmp_path / "stats", trainer=CPU)
    torch.testing.assert_close(covs[1].double(), _direct(model, tok, 1, cfg, per_output_rms=True), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(covs[1].double(), _direct(model, tok, 1, cfg), rtol=1e-2)
    assert stats_cache(model, tok, cfg, tmp_path / "stats").key.weighting == "post_norm_rms"
    assert stats_cache(make_model("llama"), tok, cfg, tmp_path / "stats").key.as_dict().get("weighting") is None


def test_the_pass_stops_after_the_deepest_layer(make_model, tok):
    model = make_model("llama")
    module = CovarianceModule(model, [0, 1], "float32")
    seen = []
    with hooks.trace(model, [get_spec(model).name("block", 2)], outputs=True) as rec:
        module.predict_step(collate([torch.arange(1, 9)]), 0)
        seen.append(rec[get_spec(model).name("block", 2)].output)
    assert seen == [None] and module.chunks == 1 and module.tokens == 8


def test_padding_positions_are_excluded(make_model, tok):
    model = make_model("llama")
    chunks = [torch.arange(3, 19), torch.arange(40, 47), torch.arange(100, 104)]
    padded = CovarianceModule(model, [1, 3], "float64")
    padded.predict_step(collate(chunks, pad_id=0), 0)
    alone = CovarianceModule(model, [1, 3], "float64")
    for c in chunks:
        alone.predict_step(collate([c]), 0)
    for layer in (1, 3):
        assert int(padded.moments[str(layer)].count) == 16 + 7 + 4
        torch.testing.assert_close(padded.moments[str(layer)].compute(), alone.moments[str(layer)].compute())
    with_pad = CovarianceModule(model, [1], "float64")
    batch = collate(chunks, pad_id=0)
    with_pad.predict_step({**batch, "attention_mask": torch.ones_like(batch["attention_mask"])}, 0)
    assert not torch.allclose(with_pad.moments["1"].compute(), alone.moments["1"].compute())


# --- DDP ---------------------------------------------------------------------------------------------


@pytest.mark.multiprocess
def test_two_processes_give_the_same_matrices_as_one(make_model, tok, text_file, tmp_path):
    # float64 weights: the ranks batch other chunks together and may run other thread counts, and a float32
    # forward differs by its rounding between those; the test is about the split and the merge.
    model = make_model("llama").double()
    cfg = _cfg(text_file, n_samples=13, batch_size=2)  # odd: the ranks get 7 and 6 chunks
    one = layer_covariances(model, tok, [1, 2], cfg, cache_dir=tmp_path / "one", trainer=CPU)
    ddp = TrainerConfig(accelerator="cpu", devices=2, strategy="ddp_spawn", enable_progress_bar=False)
    two = layer_covariances(model, tok, [1, 2], cfg, cache_dir=tmp_path / "two", trainer=ddp)
    for layer in (1, 2):
        torch.testing.assert_close(two[layer], one[layer], rtol=1e-10, atol=1e-12)
    meta = io.load_tensors(stats_cache(model, tok, cfg, tmp_path / "two").layer_path(1))[1]
    assert meta["n_chunks"] == 13


# --- resume ------------------------------------------------------------------------------------------


class Interrupt(Callback):
    def __init__(self, after: int):
        self.after = after

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch_idx + 1 == self.after:
            raise RuntimeError("interrupted")


class CountBatches(Callback):
    def __init__(self):
        self.n = 0

    def on_predict_batch_end(self, *args, **kwargs):
        self.n += 1


def test_an_interrupted_run_resumes_to_the_same_result(make_model, tok, text_file, tmp_path):
    model = make_model("llama")
    cfg = _cfg(text_file, n_samples=12, batch_size=2, dtype="float32")  # 6 batches
    whole = compute_covariances(model, tok, [1, 3], cfg, cache_dir=tmp_path / "a", trainer=CPU)
    with pytest.raises(RuntimeError, match="interrupted"):
        compute_covariances(
            model,
            tok,
            [1, 3],
            cfg,
            cache_dir=tmp_path / "b",
            trainer=CPU,
            callbacks=[Interrupt(after=3)],
            checkpoint_every=4,
        )
    cache = stats_cache(model, tok, cfg, tmp_path / "b")
    assert cache.load_partial(0, 1, [1, 3])[0] == 4 and cache.load(1) is None
    counter = CountBatches()
    resumed = compute_covariances(
        model,
        tok,
        [1, 3],
        cfg,
        cache_dir=tmp_path / "b",
        trainer=CPU,
        callbacks=[counter],
        checkpoint_every=4,
    )
    assert counter.n == 4  # the 2 checkpointed batches were not redone
    assert not list(cache.dir.glob("partial-*"))
    for layer in (1, 3):
        torch.testing.assert_close(resumed[layer], whole[layer], rtol=1e-6, atol=1e-9)
    assert io.load_tensors(cache.layer_path(1))[1]["n_chunks"] == 12


# --- cache -------------------------------------------------------------------------------------------


def test_cache_reuse_and_invalidation(make_model, tok, text_file, tmp_path, monkeypatch):
    runs = []
    real = stats._run_stage

    def spy(model, tokenizer, layers, *args):
        runs.append(list(layers))
        return real(model, tokenizer, layers, *args)

    monkeypatch.setattr(stats, "_run_stage", spy)
    model = make_model("llama")
    cfg = _cfg(text_file)
    root = tmp_path / "stats"
    first = layer_covariances(model, tok, [1, 2], cfg, cache_dir=root, trainer=CPU)
    again = layer_covariances(model, tok, [1, 2], cfg, cache_dir=root, trainer=CPU)
    assert runs == [[1, 2]] and all(torch.equal(first[k], again[k]) for k in (1, 2))

    more = layer_covariances(model, tok, [1, 3], cfg, cache_dir=root, trainer=CPU)  # layer: only 3 is new
    assert runs[-1] == [3] and torch.equal(more[1], first[1])

    other = make_model("llama", seed=1)  # model
    changed = layer_covariances(other, tok, [1], cfg, cache_dir=root, trainer=CPU)
    assert runs[-1] == [1] and not torch.allclose(changed[1], first[1])

    fewer = layer_covariances(
        model, tok, [1], _cfg(text_file, n_samples=5), cache_dir=root, trainer=CPU
    )  # count
    assert runs[-1] == [1] and not torch.allclose(fewer[1], first[1])

    path = stats_cache(model, tok, cfg, root).layer_path(2)  # a file whose metadata does not match
    tensors, meta = io.load_tensors(path)
    io.save_tensors(path, tensors, {**meta, "n_samples": 999})
    n = len(runs)
    layer_covariances(model, tok, [2], cfg, cache_dir=root, trainer=CPU)
    assert len(runs) == n + 1 and runs[-1] == [2]
    assert io.load_tensors(path)[1]["n_samples"] == cfg.n_samples


def test_bad_input_fails_before_any_work(make_model, tok, text_file, tmp_path):
    model = make_model("llama")
    with pytest.raises(ValueError, match="memit.layers"):
        layer_covariances(model, tok, [1, 9], _cfg(text_file), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="stats.dtype"):
        layer_covariances(model, tok, [1], _cfg(text_file, dtype="float16"), cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="stats.corpus"):
        layer_covariances(
            model, tok, [1], _cfg(text_file, corpus=str(tmp_path / "missing.txt")), cache_dir=tmp_path
        )
    assert not list(tmp_path.glob("*/"))


# --- CLI ---------------------------------------------------------------------------------------------


def test_cli_stats(make_model, tok, text_file, tmp_path, capsys):
    from memit_pl.cli.main import main

    model_dir = tmp_path / "tiny"
    make_model("gpt2").save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    argv = [
        "stats",
        "--model.name",
        str(model_dir),
        "--model.device",
        "cpu",
        "--model.cache_dir",
        str(tmp_path / "c"),
        "--memit.layers",
        "[1, 2]",
        "--stats.corpus",
        str(text_file),
        "--stats.n_samples",
        "6",
        "--stats.seq_len",
        "16",
        "--trainer.accelerator",
        "cpu",
        "--trainer.enable_progress_bar",
        "false",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    files = sorted((tmp_path / "c" / "stats").rglob("layer*.safetensors"))
    assert [f.name for f in files] == ["layer001.safetensors", "layer002.safetensors"]
    assert str(files[0]) in out and "6 chunks x 16 tokens" in out
    assert (files[0].parent / "config.yaml").exists()
    meta = io.load_tensors(files[0])[1]
    assert meta["n_samples"] == 6 and meta["layer"] == 1 and meta["module"] == "transformer.h.1.mlp.c_proj"


def test_the_stage_also_runs_as_a_test_loop(make_model, tok, text_file, tmp_path):
    from memit_pl.stages.runtime import make_trainer
    from memit_pl.stages.stats import StatsProgress

    model = make_model("llama")
    cfg = _cfg(text_file)
    cache = stats_cache(model, tok, cfg, tmp_path)
    dm = CorpusDataModule(tok, cfg.corpus, cfg.n_samples, cfg.seq_len, cfg.batch_size, cfg.seed)
    make_trainer(CPU, [StatsProgress(cache, [2])], distributed_sampler=False).test(
        CovarianceModule(model, [2], cfg.dtype), datamodule=dm
    )
    torch.testing.assert_close(cache.load(2), _direct(model, tok, 2, cfg), rtol=1e-5, atol=1e-7)


def test_statistics_in_another_compute_precision_are_a_cache_entry_of_their_own(make_model, tok, text_file, tmp_path):
    model = make_model("llama")
    cfg = _cfg(text_file)
    fp32 = stats_cache(model, tok, cfg, tmp_path)
    assert fp32.key.as_dict().get("precision") is None  # float32 entries keep their names
    assert stats_cache(model, tok, cfg, tmp_path, None).dir == fp32.dir
    assert stats_cache(model, tok, cfg, tmp_path, "bfloat16").dir != fp32.dir
