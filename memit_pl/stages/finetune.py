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
import time
from collections.abc import Sequence
from pathlib import Path

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
             on_step=None, checkpoint: str | Path | None = None) -> EditDelta:
    """Fine-tune layer ``memit.ft_layer``'s (default L) MLP output weight in place; return the change as a delta
    (A = I, B = (W − W₀)ᵀ). ``on_step(step, mean_nll)`` is called after every step's loss.

    ``checkpoint`` (a safetensors path): after every optimiser step the float32 weight and Adam's moments
    are written there (atomically), and a run that finds the file resumes after its last step, on the same
    trajectory as an uninterrupted run (one step over 10,000 edits takes minutes on a CPU). The caller
    keys the path by the requests, the settings and the unedited weights, and removes it when done."""
    started = time.perf_counter()
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
    first, nll, before = (_resume(checkpoint, master, opt, len(requests), layer) if checkpoint is not None
                          else (0, float("nan"), 0.0))
    started -= before  # an interrupted run's seconds count: ft_seconds is the whole run's
    was = weight.requires_grad
    steps, converged = first, False
    try:
        weight.requires_grad_(True)
        for step in range(first, memit.ft_steps):
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
                converged = True
                break
            master.grad = weight.grad.float()
            if memit.ft_weight_decay:
                master.grad += 2 * memit.ft_weight_decay * (master.detach() - w0.float())
            opt.step()
            opt.zero_grad(set_to_none=True)
            if checkpoint is not None:
                _save_checkpoint(checkpoint, master, opt, step + 1, nll, len(requests), layer,
                                 time.perf_counter() - started)
        with torch.no_grad():
            if not converged:  # the last step's update is in master, not yet in the model
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
                                       "ft_final_nll": nll, "ft_seconds": round(time.perf_counter() - started, 3)})



def _save_checkpoint(path, master: torch.Tensor, opt: torch.optim.Adam, steps: int, nll: float, n_edits: int,
                     layer: int, seconds: float) -> None:
    from memit_pl import io

    state = opt.state[master]
    io.save_tensors(path, {"weight": master.detach(), "exp_avg": state["exp_avg"], "exp_avg_sq": state["exp_avg_sq"],
                           "adam_step": torch.as_tensor(state["step"], dtype=torch.float32).reshape(1)},
                    {"steps": steps, "nll": nll, "n_edits": n_edits, "layer": layer, "seconds": round(seconds, 3)})


def _resume(path, master: torch.Tensor, opt: torch.optim.Adam, n_edits: int, layer: int) -> tuple[int, float, float]:
    """Load a checkpoint into ``master`` and ``opt``: (the steps it had done, the last mean NLL, the seconds
    they took); (0, nan, 0) without one."""
    from memit_pl import io

    path = Path(path)
    if not path.exists():
        return 0, float("nan"), 0.0
    tensors, meta = io.load_tensors(path, device=master.device)
    if (meta.get("n_edits"), meta.get("layer")) != (n_edits, layer) or tensors["weight"].shape != master.shape:
        raise ValueError(f"{path}: an FT-W checkpoint of {meta.get('n_edits')} edits at layer {meta.get('layer')}, "
                         f"not of this run ({n_edits} edits at layer {layer}); remove it to start again")
    with torch.no_grad():
        master.copy_(tensors["weight"])
    state = opt.state_dict()
    state["state"] = {0: {"step": tensors["adam_step"].reshape(()).cpu(), "exp_avg": tensors["exp_avg"],
                          "exp_avg_sq": tensors["exp_avg_sq"]}}
    opt.load_state_dict(state)
    log.info("ft: resumed from %s after %d steps (mean NLL %.4f)", path, meta["steps"], meta["nll"])
    return int(meta["steps"]), float(meta["nll"]), float(meta.get("seconds", 0.0))
