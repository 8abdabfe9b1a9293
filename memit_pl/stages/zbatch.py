"""Tokenised batches for the z objective: every edit's rewrite prompts (one per context prefix,
teacher-forced on the new object) and its essence prompt, flattened into one padded batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from memit_pl.data.edits import EditRequest, target_ids
from memit_pl.modeling.tokens import tokenize_with_subject


@dataclass
class ZBatch:
    """B edits as R = B·(P + 1) right-padded rows (P rewrite prompts and 1 essence prompt each)."""

    case_ids: list[str]
    input_ids: Tensor  # [rows, pos]
    attention_mask: Tensor  # [rows, pos]
    lookup: Tensor  # [rows] subject's last token
    edit_of_row: Tensor  # [rows] which edit a row belongs to
    rewrite_rows: Tensor  # [rw] rows of rewrite prompts
    target_pos: Tensor  # [rw, t_max] positions predicting each target token (-1: none)
    target_ids: Tensor  # [rw, t_max] (-100: none)
    essence_rows: Tensor  # [n_edits] row of each edit's essence prompt
    init_rows: Tensor  # [n_edits] row of each edit's bare prompt (no prefix): h^L is read there

    @property
    def n_edits(self) -> int:
        return len(self.case_ids)

    def to(self, device) -> ZBatch:
        return ZBatch(
            **{f.name: (getattr(self, f.name).to(device) if isinstance(getattr(self, f.name), Tensor)
                        else getattr(self, f.name)) for f in fields(self)}
        )


def build_z_batch(
    tokenizer, requests: Sequence[EditRequest], prefixes: Sequence[str], essence_prompt: str = "{} is a"
) -> ZBatch:
    """Rows per edit: ``prefix + prompt`` (subject filled) followed by the new object's tokens but
    its last (teacher forcing), for each prefix; then ``essence_prompt`` with the subject."""
    rows: list[list[int]] = []
    lookup, edit_of_row, rewrite_rows, tpos, tids, essence_rows, init_rows = [], [], [], [], [], [], []
    for e, r in enumerate(requests):
        tgt = target_ids(tokenizer, r.target_new)
        for j, prefix in enumerate(prefixes):
            pb = tokenize_with_subject(tokenizer, [r.prompt], [r.subject], [prefix])
            ids = pb.input_ids[0].tolist()
            if j == 0:
                init_rows.append(len(rows))
            rewrite_rows.append(len(rows))
            tpos.append([len(ids) - 1 + t for t in range(len(tgt))])
            tids.append(tgt)
            rows.append(ids + tgt[:-1])
            lookup.append(int(pb.subject_last[0]))
            edit_of_row.append(e)
        pb = tokenize_with_subject(tokenizer, [essence_prompt], [r.subject])
        essence_rows.append(len(rows))
        rows.append(pb.input_ids[0].tolist())
        lookup.append(int(pb.subject_last[0]))
        edit_of_row.append(e)
    width = max(len(x) for x in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, x in enumerate(rows):
        input_ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    t_max = max(len(t) for t in tids)
    target_pos = torch.full((len(tids), t_max), -1, dtype=torch.long)
    target_id = torch.full((len(tids), t_max), -100, dtype=torch.long)
    for i, (p, t) in enumerate(zip(tpos, tids)):
        target_pos[i, : len(p)] = torch.tensor(p)
        target_id[i, : len(t)] = torch.tensor(t)
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return ZBatch(
        case_ids=[r.case_id for r in requests],
        input_ids=input_ids,
        attention_mask=mask,
        lookup=as_long(lookup),
        edit_of_row=as_long(edit_of_row),
        rewrite_rows=as_long(rewrite_rows),
        target_pos=target_pos,
        target_ids=target_id,
        essence_rows=as_long(essence_rows),
        init_rows=as_long(init_rows),
    )


def live_length(tokenizer, request: EditRequest) -> int:
    """Columns a step re-runs for this edit's rewrite rows with the prefix cache: from the subject's
    last token to the end of the teacher-forced target (the context prefix does not change it)."""
    pb = tokenize_with_subject(tokenizer, [request.prompt], [request.subject])
    return int(pb.attention_mask[0].sum()) - int(pb.subject_last[0]) + len(target_ids(tokenizer, request.target_new)) - 1


def by_live_length(tokenizer, requests: Sequence[EditRequest]) -> list[EditRequest]:
    """``requests`` ordered (stably) by :func:`live_length`, so that a batch pads its rows little."""
    lengths = [live_length(tokenizer, r) for r in requests]
    return [requests[i] for i in sorted(range(len(requests)), key=lambda i: lengths[i])]


class ZCollate:
    """DataLoader ``collate_fn``: a list of EditRequests -> ZBatch (picklable for worker processes)."""

    def __init__(self, tokenizer, prefixes: Sequence[str], essence_prompt: str):
        self.tokenizer, self.prefixes, self.essence_prompt = tokenizer, list(prefixes), essence_prompt

    def __call__(self, requests: list[EditRequest]) -> ZBatch:
        return build_z_batch(self.tokenizer, requests, self.prefixes, self.essence_prompt)
