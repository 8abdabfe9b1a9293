"""Generation for Generation Entropy: continuations of prompts, top-k sampled as the reference's
``generate_fast`` (each prompt from its own seeded generator) or greedy, batched with left padding."""

from __future__ import annotations

import unicodedata
import zlib
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from memit_pl.modeling.loading import cache_kwarg, input_device
from memit_pl.modeling.tokens import position_ids
from memit_pl.stages.eval_batch import pad


def prompt_seed(seed: int, prompt: str) -> int:
    """The sampling seed of one prompt: a function of the prompt's text only, so a prompt draws the same
    random numbers in every batch, in every order, and in the edited and the unedited model alike."""
    return (seed * 1_000_003 + zlib.crc32(prompt.encode("utf-8"))) % (2**63)


def generate(model: nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int, top_k: int = 1,
             seed: int = 0) -> list[str]:
    """Continuations of ``prompts`` (prompt included, as the reference's texts): greedy for ``top_k`` 1,
    else sampled from the ``top_k`` most likely tokens as the reference's ``generate_fast`` (top-k 5).

    Batched with left padding and explicit positions; no early stop at EOS (the reference generates to a
    fixed length). Each prompt samples with its own generator seeded by :func:`prompt_seed`, so its text
    does not depend on the batch it lands in. Special tokens are dropped when decoding; the text is
    NFKD-normalised with blank lines joined.
    """
    enc = tokenizer(list(prompts), add_special_tokens=True)["input_ids"] if prompts else []
    texts = []
    for e, n in zip(enc, generate_ids(model, tokenizer, enc, prompts, max_new_tokens, top_k, seed)):
        text = tokenizer.decode(list(e) + n, skip_special_tokens=True)
        texts.append(unicodedata.normalize("NFKD", text).replace("\n\n", " "))
    return texts


@torch.no_grad()
def generate_ids(model: nn.Module, tokenizer, enc: Sequence[Sequence[int]], prompts: Sequence[str],
                 max_new_tokens: int, top_k: int = 1, seed: int = 0) -> list[list[int]]:
    """The new token ids of :func:`generate` for tokenised prompts ``enc`` (``prompts``: their texts,
    which seed the sampling)."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1 (1 is greedy), got {top_k}")
    if not enc:
        return []
    dev = input_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, mask, _ = pad(enc, pad_id, "left")
    ids, mask = ids.to(dev), mask.to(dev)
    pos = position_ids(mask)
    gens = [torch.Generator().manual_seed(prompt_seed(seed, p)) for p in prompts] if top_k > 1 else []
    out: list[Tensor] = []
    past = None
    step_ids, step_mask, step_pos = ids, mask, pos
    cache_arg = cache_kwarg(model)
    for _ in range(max_new_tokens):
        res = model(input_ids=step_ids, attention_mask=step_mask, position_ids=step_pos,
                    use_cache=True, logits_to_keep=1, **{cache_arg: past})
        past = getattr(res, cache_arg)
        logits = res.logits[:, -1]
        if top_k == 1:
            nxt = logits.argmax(-1)
        else:
            top, idx = logits.float().topk(min(top_k, logits.shape[-1]), dim=-1)
            cdf = top.softmax(-1).cumsum(-1).cpu()
            u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in gens]).to(cdf.dtype)
            pick = (cdf < u.unsqueeze(-1)).sum(-1).clamp(max=top.shape[-1] - 1)
            nxt = idx.gather(-1, pick.to(idx.device).unsqueeze(-1)).squeeze(-1)
        out.append(nxt)
        step_ids = nxt.unsqueeze(-1)
        step_mask = torch.cat([step_mask, torch.ones_like(step_ids)], dim=1)
        step_pos = step_pos[:, -1:] + 1
    new = torch.stack(out, dim=1).cpu() if out else torch.zeros((len(enc), 0), dtype=torch.long)
    return new.tolist()


