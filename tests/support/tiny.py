"""Tiny models and tokenizers built in code (no download), for tests and examples."""

from __future__ import annotations

import torch

CORPUS = [
    "Michael Jordan plays the sport of basketball.",
    "The Eiffel Tower is located in the city of Paris.",
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "Albert Einstein was a famous physicist. Mozart was a famous composer.",
    "Danielle Darrieux's mother tongue is French. Toyota is a car company from Japan.",
    "The official language of Canada is English. Lionel Messi plays soccer for Argentina.",
    "Therefore, because I think you are right, the answer is yes. It was a sunny day.",
    "baseball, tennis, golf, soccer, London, Rome, Seoul, Athens, Berlin, Vienna, painter.",
]


def bpe_tokenizer(vocab_size: int = 1000):
    """A GPT-2-style byte-level BPE tokenizer trained in code on a few sentences."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    raw = ByteLevelBPETokenizer()
    raw.train_from_iterator(CORPUS * 4, vocab_size=vocab_size, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok = GPT2TokenizerFast(tokenizer_object=raw._tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tok.pad_token = tok.eos_token
    return tok


def tiny_config(family: str, vocab_size: int, n_layer: int = 4, d_model: int = 32, d_ff: int = 64, **extra):
    """A small random config of the given family (``extra``: further config fields)."""
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0, **extra)
    if family == "gpt2":
        return AutoConfig.for_model("gpt2", n_layer=n_layer, n_embd=d_model, n_head=4, n_inner=d_ff, n_positions=256, **common)
    if family == "gptj":
        return AutoConfig.for_model("gptj", n_layer=n_layer, n_embd=d_model, n_head=4, n_inner=d_ff, rotary_dim=4, n_positions=256, **common)
    if family == "gpt_neox":
        return AutoConfig.for_model(
            "gpt_neox", num_hidden_layers=n_layer, hidden_size=d_model, num_attention_heads=4,
            intermediate_size=d_ff, max_position_embeddings=256, **common,
        )
    kw = dict(
        num_hidden_layers=n_layer, hidden_size=d_model, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=d_ff, max_position_embeddings=256, **common,
    )
    if family == "gemma3_text":
        kw.update(head_dim=8, sliding_window=64, layer_types=None)
    else:
        kw.update(head_dim=8)
    return AutoConfig.for_model(family, **kw)


FAMILIES = ["gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "gemma3_text"]


def tiny_model(family: str = "llama", vocab_size: int = 400, seed: int = 0, **kw):
    """A random causal LM of ``family``: eval mode, parameters frozen, float32 on the CPU."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size, **kw), attn_implementation="eager")
    return model.eval().requires_grad_(False)
