"""Top next-token predictions for batches of prompts."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from memit_pl.modeling.loading import input_device
from memit_pl.modeling.tokens import last_token_index, position_ids


@torch.no_grad()
def top_ids(model, tokenizer, prompts: Sequence[str], k: int = 1, batch_size: int = 32) -> Tensor:
    """Ids of the ``k`` most likely next tokens after each prompt, best first: [batch, k] (CPU).

    Works with either padding side (the last real token of each row is read).
    """
    out: list[Tensor] = []
    dev = input_device(model)
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(list(prompts[i : i + batch_size]), padding=True, return_tensors="pt").to(dev)
        mask = enc["attention_mask"]
        # positions count real tokens only, so left padding does not shift absolute position embeddings
        logits = model(input_ids=enc["input_ids"], attention_mask=mask, position_ids=position_ids(mask),
                       use_cache=False).logits
        last = last_token_index(mask)
        rows = logits[torch.arange(len(last), device=logits.device), last]
        out.append(rows.topk(k, dim=-1).indices.cpu())
    return torch.cat(out) if out else torch.empty(0, k, dtype=torch.long)


def top_predictions(model, tokenizer, prompts: Sequence[str], k: int = 1, batch_size: int = 32) -> list[list[str]]:
    """The ``k`` most likely next tokens (decoded, stripped) after each prompt."""
    ids = top_ids(model, tokenizer, prompts, k=k, batch_size=batch_size)
    return [[tokenizer.decode([t]).strip() for t in row] for row in ids.tolist()]
