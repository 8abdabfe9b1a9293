"""Context prefixes x_j for the z objective (Eqn. 16), sampled once from the model itself."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from memit_pl.modeling.loading import input_device
from memit_pl.modeling.tokens import position_ids


@torch.no_grad()
def sample_text(
    model: nn.Module, tokenizer, starts: Sequence[str], length: int, *, generator: torch.Generator, top_k: int = 5
) -> list[str]:
    """Continue each start word by ``length`` tokens, sampling from the top-k (the reference's
    ``generate_fast``), all starts in one left-padded batch, with an explicit seeded generator."""
    dev = input_device(model)
    enc = [tokenizer(s)["input_ids"] for s in starts]
    width = max(len(e) for e in enc)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(e)) + list(e) for e in enc], device=dev)
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc], device=dev)
    for _ in range(length):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False).logits[:, -1]
        top = logits.float().topk(top_k, dim=-1)
        probs = torch.softmax(top.values, -1).cpu()
        choice = torch.multinomial(probs, 1, generator=generator).to(dev)
        ids = torch.cat([ids, top.indices.gather(1, choice)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return [tokenizer.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(ids, mask)]


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
