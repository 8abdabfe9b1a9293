"""Batched optimisation of the target vectors z_i = h_i^L + δ_i (Eqn. 16) for many edits at once.

Layers 0..L do not depend on δ: they run once per batch, without grad (``tail.record_tail``);
each step re-runs only the blocks above L, and the LM head only at the positions the loss reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from memit_pl.config import MemitConfig
from memit_pl.hooks import scatter_add
from memit_pl.losses import RowAdam, clamp_rows, delta_decay, essence_kl, mean_per_edit, target_nll_flat
from memit_pl.spec import ModelSpec
from memit_pl.tail import Tail, record_tail, record_tail_cached
from memit_pl.zbatch import ZBatch


@dataclass
class ZResult:
    """Per edit: the target vector and how its optimisation went."""

    case_ids: list[str]
    z: Tensor  # [n_edits, d_model]
    h_norm: Tensor  # [n_edits] ‖h^L‖ at the subject's last token
    delta_norm: Tensor  # [n_edits]
    loss: Tensor  # [n_edits] total loss when it stopped
    nll: Tensor  # [n_edits] NLL part of it
    steps: Tensor  # [n_edits] Adam steps taken

    def to_tensors(self) -> dict[str, Tensor]:
        return {k: getattr(self, k).detach().cpu() for k in ("z", "h_norm", "delta_norm", "loss", "nll", "steps")}


StepHook = Callable[[int, int, float], None]
"""Called after each step with (step, number of active edits, their mean loss)."""


def optimize_z(
    model: nn.Module, spec: ModelSpec, batch: ZBatch, cfg: MemitConfig, on_step: StepHook | None = None
) -> ZResult:
    """Optimise δ for every edit of ``batch`` jointly; each edit follows the reference algorithm
    (Adam, clamp after every step, early stop on its own loss) as if it were alone."""
    layer = cfg.target_layer
    if cfg.z_prefix_cache:
        tail = record_tail_cached(model, spec, layer, batch.input_ids, batch.attention_mask, batch.lookup)
    else:
        tail = record_tail(model, spec, layer, batch.input_ids, batch.attention_mask)
    n = batch.n_edits
    dev = tail.hidden.device
    all_rows = torch.arange(batch.input_ids.shape[0], device=dev)
    lookup = tail.col(all_rows, batch.lookup.to(dev))  # the subject's last token, as a column of the tail
    edit_of_row = batch.edit_of_row.to(dev)
    h_init = tail.hidden[batch.init_rows.to(dev), lookup[batch.init_rows.to(dev)]]
    h_init = h_init.to(torch.promote_types(h_init.dtype, torch.float32))  # [n_edits, d_model]
    h_norm = h_init.norm(dim=-1)
    max_norm = cfg.clamp_norm_factor * h_norm

    delta = torch.zeros_like(h_init, requires_grad=True)
    adam = RowAdam(delta, lr=cfg.v_lr)
    # which rewrite-row slot each batch row has (-1 for essence rows)
    slot = torch.full((batch.input_ids.shape[0],), -1, dtype=torch.long, device=dev)
    slot[batch.rewrite_rows.to(dev)] = torch.arange(len(batch.rewrite_rows), device=dev)
    is_essence = torch.zeros_like(slot, dtype=torch.bool)
    is_essence[batch.essence_rows.to(dev)] = True

    kl_init = None
    active = torch.arange(n, device=dev)
    final_loss = torch.zeros(n, device=dev, dtype=h_init.dtype)
    final_nll = torch.zeros_like(final_loss)
    steps = torch.zeros(n, dtype=torch.long, device=dev)
    for it in range(cfg.v_num_grad_steps):
        row_active = torch.isin(edit_of_row, active)
        rows = row_active.nonzero().squeeze(-1)
        h = scatter_add(
            tail.hidden.index_select(0, rows), torch.arange(len(rows), device=dev), lookup[rows],
            delta[edit_of_row[rows]],
        )
        normed = tail.run(model, h, rows=rows)  # [r, pos, d_model]

        # rewrite rows: logits at the positions predicting the target tokens
        rw_local = (slot[rows] >= 0).nonzero().squeeze(-1)
        rw_slot = slot[rows][rw_local]
        tpos = tail.col(rows[rw_local], batch.target_pos.to(dev)[rw_slot])
        tids = batch.target_ids.to(dev)[rw_slot]
        real = tids != -100  # the LM head only at real target tokens, not at padding slots
        at = normed[rw_local.unsqueeze(-1).expand_as(tpos)[real], tpos[real]]  # [targets, d_model]
        log_probs = torch.log_softmax(Tail.logits(model, spec, at).to(h_init.dtype), dim=-1)
        nll = mean_per_edit(target_nll_flat(log_probs, tids[real].to(log_probs.device), real).to(dev),
                            edit_of_row[rows][rw_local], n)

        # essence rows: next-token distribution at the subject's last token
        es_local = is_essence[rows].nonzero().squeeze(-1)
        es_edit = edit_of_row[rows][es_local]
        es_logp = torch.log_softmax(
            Tail.logits(model, spec, normed[es_local, lookup[rows][es_local]]).to(h_init.dtype), dim=-1
        )
        if kl_init is None:
            kl_init = torch.zeros(n, es_logp.shape[-1], device=es_logp.device, dtype=es_logp.dtype)
            kl_init[es_edit] = es_logp.detach()
        kl = mean_per_edit(essence_kl(kl_init[es_edit], es_logp).to(dev), es_edit, n)

        loss = nll + cfg.kl_factor * kl + cfg.v_weight_decay * delta_decay(delta, h_norm)  # [n_edits]
        loss_a = loss[active]
        final_loss[active] = loss_a.detach()
        final_nll[active] = nll[active].detach()
        steps[active] = it
        if on_step is not None:
            on_step(it, len(active), float(loss_a.detach().mean()))
        keep = (loss_a >= cfg.v_loss_threshold) & (it < cfg.v_num_grad_steps - 1)
        active = active[keep]
        if len(active) == 0:
            break
        delta.grad = None
        loss[active].sum().backward()
        adam.step(active)
        with torch.no_grad():
            delta[active] = clamp_rows(delta[active], max_norm[active])

    delta = delta.detach()
    z = h_init + delta
    return ZResult(
        case_ids=list(batch.case_ids),
        z=z,
        h_norm=h_norm,
        delta_norm=delta.norm(dim=-1),
        loss=final_loss,
        nll=final_nll,
        steps=steps,
    )
