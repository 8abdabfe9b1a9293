"""Context prefixes x_j for the z objective (Eqn. 16), sampled once from the model itself."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from memit_pl.models import input_device


@torch.no_grad()
def sample_text(
    model: nn.Module, tokenizer, starts: Sequence[str], length: int, *, generator: torch.Generator, top_k: int = 5
) -> list[str]:
    """Continue each start word by ``length`` tokens, sampling from the top-k (the reference's
    ``generate_fast``), with an explicit seeded generator; returns the decoded texts."""
    dev = input_device(model)
    texts = []
    for start in starts:
        ids = tokenizer(start, return_tensors="pt")["input_ids"].to(dev)
        n_prompt = ids.shape[1]
        while ids.shape[1] < n_prompt + length:
            logits = model(input_ids=ids, use_cache=False).logits[0, -1].float()
            top = logits.topk(top_k)
            probs = torch.softmax(top.values, -1).cpu()
            choice = torch.multinomial(probs, 1, generator=generator).item()
            ids = torch.cat([ids, top.indices[choice].view(1, 1)], dim=1)
        texts.append(tokenizer.decode(ids[0], skip_special_tokens=True))
    return texts


def context_prefixes(
    model: nn.Module,
    tokenizer,
    spec: Sequence[Sequence[int]],
    starts: Sequence[str] = ("The", "Therefore", "Because", "I", "You"),
    seed: int = 0,
) -> list[str]:
    """The prefixes put before each rewrite prompt: "" (the bare prompt) first, then for each
    [length, count] pair, ``count`` sampled texts of ``length`` tokens, each ending in ". ".

    As the reference, braces are removed from the sampled text.
    """
    gen = torch.Generator().manual_seed(seed)
    prefixes = [""]
    for length, count in spec:
        chosen = [starts[i % len(starts)] for i in range(count)]
        for text in sample_text(model, tokenizer, chosen, int(length), generator=gen):
            prefixes.append(text.replace("{", " ").replace("}", " ") + ". ")
    return prefixes
