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
