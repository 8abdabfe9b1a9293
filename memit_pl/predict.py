"""Top next-token predictions for batches of prompts."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from memit_pl.models import input_device
from memit_pl.tokens import last_token_index


@torch.no_grad()
def top_predictions(model, tokenizer, prompts: Sequence[str], k: int = 1, batch_size: int = 32) -> list[list[str]]:
    """The ``k`` most likely next tokens (decoded, stripped) after each prompt."""
    out: list[list[str]] = []
    dev = input_device(model)
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(list(prompts[i : i + batch_size]), padding=True, return_tensors="pt").to(dev)
        logits = model(**enc, use_cache=False).logits
        last = last_token_index(enc["attention_mask"])
        rows = logits[torch.arange(len(last), device=logits.device), last]
        for ids in rows.topk(k, dim=-1).indices.tolist():
            out.append([tokenizer.decode([t]).strip() for t in ids])
    return out
