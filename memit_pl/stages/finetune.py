"""FT-W, the fine-tuning baseline of the MEMIT paper (Appendix B.1): one MLP output weight W of layer l,
fine-tuned on the rewrite prompts of all edits at once.

    min_W  mean_i NLL(o_i | p(s_i, r_i); W)  +  wd · ‖W − W₀‖²_F

Full-batch Adam (the gradient of every edit accumulated over chunks of ``z_batch_size`` edits, then one step),
at most ``ft_steps`` steps, stopping once the mean NLL falls below ``ft_loss_threshold``. The regulariser
keeps the weight near the original (the reference passes ``weight_decay`` to Adam, which decays W towards
zero instead). It reuses the z stage's parts: the rows are the z batch's rewrite rows without context
prefixes (``build_z_batch``), layers 0..l−1 run once without grad (:func:`tail.record_tail_from`), and
every step re-runs blocks l.. with the LM head only at the target tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from memit_pl.config import MemitConfig
from memit_pl.data.edits import EditRequest
from memit_pl.delta import EditDelta
from memit_pl.functional.losses import target_nll_flat
from memit_pl.modeling.loading import input_device
from memit_pl.modeling.spec import get_spec
from memit_pl.modeling.tail import Tail, record_tail_from
from memit_pl.stages.zbatch import build_z_batch

log = logging.getLogger(__name__)


def finetune(model: nn.Module, tokenizer, requests: Sequence[EditRequest], memit: MemitConfig,
             on_step=None) -> EditDelta:
    """Fine-tune layer ``memit.ft_layer``'s (default L) MLP output weight in place; return the change as a delta
    (A = I, B = (W − W₀)ᵀ). ``on_step(step, mean_nll)`` is called after every step's loss."""
    spec = get_spec(model)
    layer = memit.target_layer if memit.ft_layer is None else memit.ft_layer
    weight = spec.out_weight(model, layer)
    dev = input_device(model)
    chunks = []
    for i in range(0, len(requests), memit.z_batch_size):
        batch = build_z_batch(tokenizer, requests[i : i + memit.z_batch_size], [""]).to(dev)
        rows = batch.rewrite_rows
        tail = record_tail_from(model, spec, layer, batch.input_ids[rows], batch.attention_mask[rows])
        tids = batch.target_ids  # indexed like the rewrite rows
        real = tids != -100
        r = torch.arange(len(rows), device=dev).unsqueeze(-1).expand_as(tids)
        chunks.append((tail, r[real], batch.target_pos[real], tids[real], real))

    w0 = weight.detach().clone()
    master = weight.detach().float().clone().requires_grad_(True)  # the optimised copy, float32
    opt = torch.optim.Adam([master], lr=memit.ft_lr)
    was = weight.requires_grad
    steps, nll = 0, float("nan")
    try:
        weight.requires_grad_(True)
        for step in range(memit.ft_steps):
            with torch.no_grad():
                weight.copy_(master.to(weight.dtype))
            weight.grad = None
            total = 0.0
            for tail, rows, cols, ids, real in chunks:
                normed = tail.run(model, tail.hidden)
                logp = torch.log_softmax(Tail.logits(model, spec, normed[rows, cols]).float(), dim=-1)
                per_edit = target_nll_flat(logp, ids.to(logp.device), real)
                loss = per_edit.sum() / len(requests)
                loss.backward()
                total += float(loss.detach())
            nll, steps = total, step + 1
            if on_step is not None:
                on_step(step, nll)
            if nll < memit.ft_loss_threshold:
                break
            master.grad = weight.grad.float()
            if memit.ft_weight_decay:
                master.grad += 2 * memit.ft_weight_decay * (master.detach() - w0.float())
            opt.step()
            opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            if nll >= memit.ft_loss_threshold:  # the last step's update is in master, not yet in the model
                weight.copy_(master.to(weight.dtype))
    finally:
        weight.requires_grad_(was)
        weight.grad = None
    change = (weight.detach().float() - w0.float()).cpu()
    change = change.T if spec.transposed else change  # [d_model, d_key], as deltas are stored
    a, b = torch.eye(change.shape[0]), change.T.contiguous()  # Δ = I Δ: exact, rank d_model <= d_key
    log.info("ft: layer %d, %d steps, mean NLL %.4f, ‖ΔW‖ = %.4f", layer, steps, nll, float(change.norm()))
    return EditDelta({layer: (a, b)}, {"family": spec.family, "layers": [layer], "method": "ft",
                                       "case_ids": [r.case_id for r in requests], "ft_steps": steps,
                                       "ft_final_nll": nll})

