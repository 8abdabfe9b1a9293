"""Does a change written into the residual stream at layer l arrive at the target layer L unchanged?

MEMIT spreads an edit over the layers R = {.., L}: layer l's update is asked to add a share r of the
wanted change δ to h^l at the subject's last token, on the assumption that the blocks between l and L
pass r on to h^L (the stream is a sum). This measures that assumption for a model: add a random r at
h^l and compare the change of h^L with r (measurements for the packaged models: docs/spread.md). The
ascending update works even where r does not arrive intact, because it re-measures h^L after every layer;
large errors make the lower layers of a window costly.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import torch
from torch import Tensor, nn

from memit_pl.data.edits import EditRequest
from memit_pl.modeling.hooks import edit_output, trace
from memit_pl.modeling.spec import ModelSpec, get_spec
from memit_pl.modeling.tokens import tokenize_with_subject


def _h(model: nn.Module, spec: ModelSpec, enc: tuple[Tensor, Tensor], layers: Sequence[int],
       add: tuple[int, Tensor, Tensor] | None = None) -> dict[int, Tensor]:
    """h^l [rows, pos, d] for each l in ``layers`` from one forward pass, optionally with
    ``add = (l, pos, r)``: r [rows, d] added to block l's output at position pos[row]."""
    names = {spec.name("block", layer): layer for layer in layers}
    with ExitStack() as stack:
        if add is not None:  # the edit goes on before the trace, so that l == layer shows the edited output
            at, pos, r = add

            def plus(y: Tensor) -> Tensor:
                rows = torch.arange(y.shape[0], device=y.device)
                y = y.clone()
                y[rows, pos.to(y.device)] += r.to(device=y.device, dtype=y.dtype)
                return y

            stack.enter_context(edit_output(model, spec.name("block", at), plus))
        tr = stack.enter_context(trace(model, list(names)))
        model(input_ids=enc[0], attention_mask=enc[1])
    return {layer: tr[name].output for name, layer in names.items()}


@torch.no_grad()
def spread_errors(
    model: nn.Module, tokenizer, requests: Sequence[EditRequest], target_layer: int, layers: Sequence[int],
    fraction: float, seed: int = 0,
) -> dict[str, Any]:
    """For each l in ``layers``: add a random r with ‖r‖ = ``fraction`` · ‖h^L‖ to h^l at each rewrite
    prompt's subject token and report the mean relative error ‖Δh^L − r‖ / ‖r‖ and the mean cosine of
    Δh^L and r over the prompts (0 and 1 where the stream carries r unchanged), and ‖h^l‖ there."""
    spec = get_spec(model)
    dev = next(model.parameters()).device
    pb = tokenize_with_subject(tokenizer, [r.prompt for r in requests], [r.subject for r in requests])
    enc = (pb.input_ids.to(dev), pb.attention_mask.to(dev))
    pos = pb.subject_last.to(dev)
    rows = torch.arange(len(requests), device=dev)
    bad = [layer for layer in layers if layer > target_layer]
    if bad:
        raise ValueError(f"layer {bad[0]} lies above the target layer {target_layer}")
    unedited = {layer: h[rows, pos].float() for layer, h in _h(model, spec, enc, [*layers, target_layer]).items()}
    h_target = unedited[target_layer]
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(h_target.shape, generator=gen).to(dev)
    r = r / r.norm(dim=-1, keepdim=True) * fraction * h_target.norm(dim=-1, keepdim=True)
    out: dict[str, Any] = {"target_layer": target_layer, "fraction": fraction, "n_prompts": len(requests), "layers": {}}
    for layer in layers:
        moved = _h(model, spec, enc, [target_layer], add=(layer, pos, r))[target_layer][rows, pos].float() - h_target
        err = (moved - r).norm(dim=-1) / r.norm(dim=-1)
        cos = torch.nn.functional.cosine_similarity(moved, r, dim=-1)
        out["layers"][layer] = {"rel_error": float(err.mean()), "cos": float(cos.mean()),
                                "gain": float((moved.norm(dim=-1) / r.norm(dim=-1)).mean()),
                                "h_norm": float(unedited[layer].norm(dim=-1).mean())}
    out["h_target_norm"] = float(h_target.norm(dim=-1).mean())
    out["mean_rel_error"] = sum(v["rel_error"] for v in out["layers"].values()) / max(1, len(out["layers"]))
    return out
