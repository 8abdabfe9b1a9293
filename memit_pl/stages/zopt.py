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
from memit_pl.functional.losses import (
    RowAdam,
    clamp_rows,
    delta_decay,
    essence_kl,
    mean_per_edit,
    target_nll_flat,
)
from memit_pl.modeling.hooks import scatter_add
from memit_pl.modeling.spec import ModelSpec
from memit_pl.modeling.tail import Tail, record_tail, record_tail_cached
from memit_pl.stages.zbatch import ZBatch


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


def _local(rows: Tensor, wanted: Tensor) -> Tensor:
    """Where each of the batch rows ``wanted`` sits in ``rows``."""
    where = torch.full((int(rows.max()) + 1,), -1, dtype=torch.long, device=rows.device)
    where[rows] = torch.arange(len(rows), device=rows.device)
    return where[wanted.to(rows.device)]


@dataclass
class _Rows:
    """A group of the batch's rows with its own tail (layers 0..L run once, without grad)."""

    tail: Tail
    lookup: Tensor  # [rows] the tail column of each row's edit position
    edit: Tensor  # [rows] the edit each row belongs to

    @classmethod
    def record(cls, model: nn.Module, spec: ModelSpec, cfg: MemitConfig, batch: ZBatch, rows: Tensor,
               cut_after_lookup: bool) -> _Rows:
        ids, mask, at = batch.input_ids[rows], batch.attention_mask[rows], batch.lookup[rows]
        if cut_after_lookup:  # the rows end at their edit position (right padding after it)
            width = int(at.max()) + 1
            ids, mask = ids[:, :width], mask[:, :width] * (torch.arange(width, device=at.device) <= at[:, None])
        if cfg.z_prefix_cache:
            tail = record_tail_cached(model, spec, cfg.target_layer, ids, mask, at)
        else:
            tail = record_tail(model, spec, cfg.target_layer, ids, mask)
        dev = tail.hidden.device
        local = torch.arange(len(rows), device=dev)
        return cls(tail, tail.col(local, at.to(dev)), batch.edit_of_row[rows].to(dev))

    def run(self, model: nn.Module, delta: Tensor, active: Tensor, compile: bool = False) -> tuple[Tensor, Tensor]:
        """The rows of the ``active`` edits with δ added at their edit position, through the blocks
        above L and the final norm: (their indices in this group, [rows, cols, d_model])."""
        rows = torch.isin(self.edit, active).nonzero().squeeze(-1)
        h = scatter_add(self.tail.hidden.index_select(0, rows), torch.arange(len(rows), device=rows.device),
                        self.lookup[rows], delta[self.edit[rows]])
        return rows, self.tail.run(model, h, rows=rows, compile=compile)


StepHook = Callable[[int, int, float], None]
"""Called after each step with (step, number of active edits, their mean loss)."""

TraceHook = Callable[[int, Tensor, Tensor], None]
"""Called at each step with (step, every edit's loss [n_edits] (a stopped edit's last one), δ [n_edits, d]
before the step's update): the state an optimisation cut off after that many steps would end in."""


def optimize_z(
    model: nn.Module, spec: ModelSpec, batch: ZBatch, cfg: MemitConfig, on_step: StepHook | None = None,
    trace: TraceHook | None = None,
) -> ZResult:
    """Optimise δ for every edit of ``batch`` jointly; each edit follows the reference algorithm
    (Adam, clamp after every step, early stop on its own loss) as if it were alone."""
    # Two groups of rows, each with its own tail: the rewrite prompts, and the essence prompts cut
    # after the subject's last token (the KL reads the logits there; later tokens cannot change them,
    # so re-running them every step would be wasted work).
    rw = _Rows.record(model, spec, cfg, batch, batch.rewrite_rows, cut_after_lookup=False)
    es = _Rows.record(model, spec, cfg, batch, batch.essence_rows, cut_after_lookup=True)
    n = batch.n_edits
    dev = rw.tail.hidden.device
    init_local = _local(batch.rewrite_rows, batch.init_rows).to(dev)
    h_init = rw.tail.hidden[init_local, rw.lookup[init_local]]
    h_init = h_init.to(torch.promote_types(h_init.dtype, torch.float32))  # [n_edits, d_model]
    h_norm = h_init.norm(dim=-1)
    max_norm = cfg.clamp_norm_factor * h_norm

    delta = torch.zeros_like(h_init, requires_grad=True)
    adam = RowAdam(delta, lr=cfg.v_lr)
    target_pos = batch.target_pos.to(dev)  # indexed like the rewrite rows
    target_ids_all = batch.target_ids.to(dev)

    kl_init = None
    active = torch.arange(n, device=dev)
    final_loss = torch.zeros(n, device=dev, dtype=h_init.dtype)
    final_nll = torch.zeros_like(final_loss)
    steps = torch.zeros(n, dtype=torch.long, device=dev)
    for it in range(cfg.v_num_grad_steps):
        # rewrite rows: logits at the positions predicting the target tokens
        rows, normed = rw.run(model, delta, active, cfg.z_compile)
        tpos = rw.tail.col(rows, target_pos[rows])
        tids = target_ids_all[rows]
        real = tids != -100  # the LM head only at real target tokens, not at padding slots
        at = normed[torch.arange(len(rows), device=dev).unsqueeze(-1).expand_as(tpos)[real], tpos[real]]
        log_probs = torch.log_softmax(Tail.logits(model, spec, at).to(h_init.dtype), dim=-1)
        nll = mean_per_edit(target_nll_flat(log_probs, tids[real].to(log_probs.device), real).to(dev),
                            rw.edit[rows], n)

        # essence rows: next-token distribution at the subject's last token
        rows, normed = es.run(model, delta, active, cfg.z_compile)
        es_edit = es.edit[rows]
        es_logp = torch.log_softmax(
            Tail.logits(model, spec, normed[torch.arange(len(rows), device=dev), es.lookup[rows]]).to(h_init.dtype),
            dim=-1,
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
        if trace is not None:
            trace(it, final_loss.clone(), delta.detach().clone())
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
