"""The straightforward z algorithm, one edit at a time with a full forward pass every step.

It follows the published MEMIT procedure step by step (Adam on a single δ, clamp after each step,
stop when the total loss is below the threshold) and serves as the correctness oracle for the
batched optimiser and as the baseline of ``bench/z.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from memit_pl.config import MemitConfig
from memit_pl.data.edits import EditRequest
from memit_pl.modeling.hooks import edit_output
from memit_pl.modeling.loading import input_device
from memit_pl.modeling.spec import ModelSpec
from memit_pl.stages.zbatch import build_z_batch


def reference_z(
    model: nn.Module, tokenizer, spec: ModelSpec, request: EditRequest, prefixes: Sequence[str], cfg: MemitConfig
) -> tuple[torch.Tensor, float, int]:
    """(z [d_model], final loss, Adam steps taken) for one edit."""
    batch = build_z_batch(tokenizer, [request], prefixes, cfg.essence_prompt).to(input_device(model))
    layer_name = spec.name("block", cfg.target_layer)
    rows = torch.arange(batch.input_ids.shape[0], device=batch.input_ids.device)
    work = torch.promote_types(next(model.parameters()).dtype, torch.float32)
    delta = torch.zeros(spec.d_model(model), requires_grad=True, device=batch.input_ids.device, dtype=work)
    opt = torch.optim.Adam([delta], lr=cfg.v_lr)
    target_init, kl_init = None, None

    def add_delta(out: torch.Tensor) -> torch.Tensor:
        nonlocal target_init
        if target_init is None:
            target_init = out[batch.init_rows[0], batch.lookup[batch.init_rows[0]]].detach().clone().to(work)
        idx = torch.zeros_like(out, dtype=work)
        idx = idx.index_put((rows, batch.lookup), delta.expand(len(rows), -1))
        return out + idx.to(out.dtype)

    loss_value, it = 0.0, 0
    for it in range(cfg.v_num_grad_steps):
        opt.zero_grad()
        with edit_output(model, layer_name, add_delta):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        es = batch.essence_rows
        kl_logp = torch.log_softmax(logits[es, batch.lookup[es]].to(work), dim=-1)
        if kl_init is None:
            kl_init = kl_logp.detach().clone()
        rw = batch.rewrite_rows
        log_probs = torch.log_softmax(logits[rw].to(work), dim=-1)
        tids = batch.target_ids
        mask = tids != -100
        picked = log_probs[torch.arange(len(rw)).unsqueeze(-1), batch.target_pos.clamp(min=0)]
        tok_lp = picked.gather(-1, tids.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        nll = (-(tok_lp * mask).sum(1) / mask.sum(1)).mean()
        kl = cfg.kl_factor * F.kl_div(kl_init, kl_logp, log_target=True, reduction="batchmean")
        wd = cfg.v_weight_decay * (torch.norm(delta) / torch.norm(target_init) ** 2)
        loss = nll + kl + wd
        loss_value = float(loss.detach())
        if loss_value < cfg.v_loss_threshold or it == cfg.v_num_grad_steps - 1:
            break
        loss.backward()
        opt.step()
        max_norm = cfg.clamp_norm_factor * target_init.norm()
        if delta.norm() > max_norm:
            with torch.no_grad():
                delta[...] = delta * max_norm / delta.norm()
    return (target_init + delta).detach(), loss_value, it
