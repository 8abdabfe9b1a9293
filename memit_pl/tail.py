"""Run a model from a layer's residual stream onwards, reusing the model's own modules.

One ordinary forward pass records the arguments every later block is called with (attention
masks, position embeddings, ...); afterwards the blocks above layer L can be re-run on an edited
residual stream without recomputing layers 0..L, and the LM head only at the positions a loss reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from memit_pl.hooks import CallArgs, capture_args, trace
from memit_pl.spec import ModelSpec


def _select_rows(x, rows: Tensor, n: int):
    """Index batch rows of every tensor with a leading batch dimension of size ``n`` (ndim >= 2)."""
    if isinstance(x, Tensor):
        if x.ndim >= 2 and x.shape[0] == n and n > 1:
            return x.index_select(0, rows.to(x.device))
        return x
    if isinstance(x, tuple):
        return tuple(_select_rows(v, rows, n) for v in x)
    if isinstance(x, list):
        return [_select_rows(v, rows, n) for v in x]
    if isinstance(x, dict):
        return {k: _select_rows(v, rows, n) for k, v in x.items()}
    return x


@dataclass
class Tail:
    """Everything needed to re-run the model above ``layer`` for one padded batch."""

    spec: ModelSpec
    layer: int
    hidden: Tensor
    """Block ``layer``'s output (no grad): [batch, pos, d_model]."""
    calls: dict[int, CallArgs]
    """Arguments of each block above ``layer``."""

    @property
    def batch(self) -> int:
        return self.hidden.shape[0]

    def run(self, model: nn.Module, hidden: Tensor, rows: Tensor | None = None) -> Tensor:
        """Blocks ``layer+1..`` and the final norm on ``hidden`` [rows, pos, d_model] -> [rows, pos, d_model].

        ``rows`` selects which rows of the recorded batch ``hidden`` holds (all when None).
        """
        n = self.batch
        h = hidden
        for layer in sorted(self.calls):
            call = self.calls[layer]
            kwargs = dict(call.kwargs or {})
            if call.args:
                args = call.args[1:]
            else:  # hidden states passed by keyword
                args = ()
                kwargs.pop("hidden_states", None)
            if rows is not None:
                args, kwargs = _select_rows(args, rows, n), _select_rows(kwargs, rows, n)
            block = self.spec.module(model, "block", layer)
            h = h.to(_device_of(block, h))
            out = block(h, *args, **kwargs) if call.args else block(hidden_states=h, **kwargs)
            h = out[0] if isinstance(out, (tuple, list)) else out
        return self.spec.module(model, "final_norm")(h)

    @staticmethod
    def logits(model: nn.Module, spec: ModelSpec, normed: Tensor) -> Tensor:
        """LM head on final-norm outputs [..., d_model] -> [..., vocab] (with any logit soft-capping)."""
        head = spec.module(model, "lm_head")
        logits = head(normed.to(head.weight.device))
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


def _device_of(module: nn.Module, fallback: Tensor) -> torch.device:
    for p in module.parameters():
        return p.device
    return fallback.device


@torch.no_grad()
def record_tail(model: nn.Module, spec: ModelSpec, layer: int, input_ids: Tensor, attention_mask: Tensor) -> Tail:
    """One no-grad forward pass: block ``layer``'s output and the call arguments of every later block."""
    later = {spec.name("block", i): i for i in range(layer + 1, spec.n_layers(model))}
    block_name = spec.name("block", layer)
    with capture_args(model, list(later)) as calls, trace(model, [block_name]) as tr:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return Tail(spec, layer, tr[block_name].output, {i: calls[name] for name, i in later.items()})
