"""Tokenising prompts and finding the subject's last token (the position MEMIT edits at)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PromptBatch:
    """Padded prompts with the positions the algorithm reads.

    ``subject_last[b]`` is the index of the subject's last token in row b, ``last[b]`` the
    index of the row's last real token (padding side taken into account).
    """

    input_ids: Tensor  # [batch, pos]
    attention_mask: Tensor  # [batch, pos]
    subject_last: Tensor  # [batch]
    last: Tensor  # [batch]

    def to(self, device) -> PromptBatch:
        return PromptBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.subject_last, self.last)))


def subject_char_end(template: str, subject: str, prefix: str = "") -> tuple[str, int]:
    """Fill ``prefix + template`` with ``subject``; return the text and the end of the subject (chars)."""
    at = template.index("{}")
    text = prefix + template[:at] + subject + template[at + 2 :]
    return text, len(prefix) + at + len(subject)


def _char_to_token(enc, row: int, char_end: int, text: str) -> int:
    """The token holding the last non-space character before ``char_end``."""
    c = char_end - 1
    while c > 0 and text[c].isspace():
        c -= 1
    tok = enc.char_to_token(row, c)
    while tok is None and c > 0:  # a character merged into no token (rare): step back
        c -= 1
        tok = enc.char_to_token(row, c)
    if tok is None:
        raise ValueError(f"cannot locate the subject in {text!r}")
    return tok


def _prefix_lookup(tokenizer, texts: Sequence[str], ends: Sequence[int], add_special_tokens: bool) -> list[int]:
    """Slow-tokenizer fallback: the subject's last token is the last token of the text up to it."""
    return [len(tokenizer(t[:e], add_special_tokens=add_special_tokens)["input_ids"]) - 1 for t, e in zip(texts, ends)]


def tokenize_with_subject(
    tokenizer,
    templates: Sequence[str],
    subjects: Sequence[str],
    prefixes: Sequence[str] | None = None,
    *,
    suffixes: Sequence[str] | None = None,
    add_special_tokens: bool = True,
) -> PromptBatch:
    """Tokenise ``prefix + template.replace("{}", subject) + suffix`` for each row, padded on
    the tokenizer's padding side, and locate the subject's last token in each row."""
    n = len(templates)
    prefixes = prefixes or [""] * n
    suffixes = suffixes or [""] * n
    texts, ends = [], []
    for tpl, subj, pre, suf in zip(templates, subjects, prefixes, suffixes):
        text, end = subject_char_end(tpl, subj, pre)
        texts.append(text + suf)
        ends.append(end)
    enc = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=add_special_tokens)
    mask = enc["attention_mask"]
    if getattr(tokenizer, "is_fast", False):
        subject_last = [_char_to_token(enc, i, e, t) for i, (t, e) in enumerate(zip(texts, ends))]
    else:
        lens = mask.sum(1).tolist()
        width = mask.shape[1]
        offsets = [width - n_ if tokenizer.padding_side == "left" else 0 for n_ in lens]
        subject_last = [o + i for o, i in zip(offsets, _prefix_lookup(tokenizer, texts, ends, add_special_tokens))]
    return PromptBatch(
        input_ids=enc["input_ids"],
        attention_mask=mask,
        subject_last=torch.tensor(subject_last, dtype=torch.long),
        last=last_token_index(mask),
    )


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens only, so that left padding does not shift them: [batch, pos]."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of each row's last real token, for left or right padding: [batch]."""
    pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return torch.where(attention_mask.bool(), pos, -1).max(dim=1).values


def tokenize_with_targets(
    tokenizer,
    prompts: Sequence[str],
    targets: Sequence[Sequence[int]],
    *,
    add_special_tokens: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Prompts followed by target token ids (teacher forcing), right-padded.

    Returns:
        input_ids [batch, pos], attention_mask [batch, pos], target_pos [batch, t_max] (the
        position whose logits predict each target token; -1 where the target is shorter), and
        target_ids [batch, t_max] (-100 where absent).
    """
    rows, tpos, tids = [], [], []
    for p, t in zip(prompts, targets):
        ids = tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]
        start = len(ids)
        rows.append(list(ids) + list(t[:-1]) if len(t) > 1 else list(ids))
        tpos.append([start - 1 + j for j in range(len(t))])
        tids.append(list(t))
    width = max(len(r) for r in rows)
    t_max = max(len(t) for t in tids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    target_pos = torch.full((len(rows), t_max), -1, dtype=torch.long)
    target_ids = torch.full((len(rows), t_max), -100, dtype=torch.long)
    for i, (r, tp, ti) in enumerate(zip(rows, tpos, tids)):
        input_ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        target_pos[i, : len(tp)] = torch.tensor(tp)
        target_ids[i, : len(ti)] = torch.tensor(ti)
    return input_ids, mask, target_pos, target_ids
