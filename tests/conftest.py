import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: one intra-op thread. On a busy machine a tiny forward pass with 2 threads takes
# ~1 s instead of ~10 ms (thread oversubscription); MEMIT_PL_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("MEMIT_PL_TEST_THREADS", "1")))

from tests.support.tiny import bpe_tokenizer, tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tok():
    """A GPT-2-style byte-level BPE tokenizer (400 tokens) trained in code."""
    return bpe_tokenizer()


@pytest.fixture
def make_model(tok):
    """Factory: a tiny random model of a family, vocabulary matching ``tok``."""

    def make(family: str = "llama", seed: int = 0, **kw):
        return tiny_model(family, vocab_size=len(tok), seed=seed, **kw)

    return make


@pytest.fixture(scope="session")
def smollm2():
    """The packaged SmolLM2-135M (float32, CPU) and its tokenizer; for `slow` tests."""
    from memit_pl.modeling.loading import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def editor(make_model, tok, tmp_path, monkeypatch):
    """A MEMIT editor over a tiny Llama: layers 1-2, 3 z steps, statistics of the tiny corpus."""
    from memit_pl import MEMIT, Config, MemitConfig
    from memit_pl.config import EvalConfig, StatsConfig, TrainerConfig
    from tests.support.tiny import CORPUS

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 8))
    model = make_model("llama")
    model.train().requires_grad_(True)  # as from_pretrained leaves a model: the editor must freeze it
    cfg = Config(memit=MemitConfig(layers=[1, 2], v_num_grad_steps=3, v_lr=0.05, context_templates=[[3, 1]],
                                   mom2_update_weight=1.0),
                 stats=StatsConfig(corpus=str(corpus), n_samples=16, seq_len=16),
                 trainer=TrainerConfig(accelerator="cpu", enable_progress_bar=False),
                 eval=EvalConfig(batch_size=16, max_generation_prompts=0))
    return MEMIT(model, tok, cfg, work_dir=tmp_path / "work", cache_dir=tmp_path / "cache")


@pytest.fixture
def tiny_dir(make_model, tok, tmp_path, monkeypatch):
    """(a saved tiny Llama with its tokenizer, a statistics corpus file) for CLI runs, offline."""
    from tests.support.tiny import CORPUS

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d = tmp_path / "tiny"
    make_model("llama").save_pretrained(d)
    tok.save_pretrained(d)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 8))
    return d, corpus
