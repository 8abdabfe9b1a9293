"""Run a model from a layer's residual stream onwards, reusing the model's own modules.

One ordinary forward pass records the arguments every later block is called with (attention
masks, position embeddings, ...); afterwards the blocks above layer L can be re-run on an edited
residual stream without recomputing layers 0..L, and the LM head only at the positions a loss reads.

``record_tail_cached`` goes further when the edit sits at one position per row: nothing before that
position depends on the edit, so the rows are re-aligned to put it in one column ``start``, the
columns before it run once (filling the model's own key/value cache), and every re-run computes
only the columns from ``start`` on, attending to the cached keys and values.
"""

from __future__ import annotations

import copy
import inspect
import logging
import weakref
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from memit_pl.modeling.hooks import CallArgs, capture_args, edit_output, trace
from memit_pl.modeling.loading import cache_kwarg
from memit_pl.modeling.spec import ModelSpec

log = logging.getLogger(__name__)

_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""block -> its torch.compile'd callable (or the block itself where compiling failed)."""


def compiled(block: nn.Module):
    """``torch.compile(block, dynamic=True)``, made once per block; the block itself where torch.compile is
    unavailable. A compile error at the first call falls back to the eager block too (see :meth:`Tail.run`)."""
    fn = _COMPILED.get(block)
    if fn is None:
        try:
            fn = torch.compile(block, dynamic=True)
        except Exception as e:  # noqa: BLE001 (no backend on this platform: eager is always correct)
            log.warning("torch.compile is unavailable (%s); running the blocks eagerly", e)
            fn = block
        _COMPILED[block] = fn
    return fn


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
    shift: Tensor | None = None
    """Cached tails: how far each row was shifted right to align its edit position at ``start``."""
    start: int = 0
    """Cached tails: the first column the tail holds (the columns before it are in ``frozen``)."""
    frozen: object | None = None
    """Cached tails: the model's key/value cache of the columns before ``start`` (a transformers Cache)."""

    def col(self, rows: Tensor, pos: Tensor) -> Tensor:
        """Column in ``hidden`` of original position ``pos`` of batch row ``rows`` (broadcast over pos's
        trailing dims); positions before ``start`` come out negative."""
        if self.shift is None:
            return pos
        shift = self.shift.to(pos.device)[rows]
        while shift.ndim < pos.ndim:
            shift = shift.unsqueeze(-1)
        return pos + shift - self.start

    @property
    def batch(self) -> int:
        return self.hidden.shape[0]

    def run(self, model: nn.Module, hidden: Tensor, rows: Tensor | None = None, compile: bool = False) -> Tensor:
        """Blocks ``layer+1..`` and the final norm on ``hidden`` [rows, pos, d_model] -> [rows, pos, d_model].

        ``rows`` selects which rows of the recorded batch ``hidden`` holds (all when None); ``compile`` runs
        each block through :func:`compiled` (falling back to eager, with a warning, where that fails).
        """
        n = self.batch
        h = hidden
        cache = None if self.frozen is None else _select_cache(self.frozen, rows)
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
            if cache is not None:
                args = tuple(cache if _is_cache(v) else v for v in args)
                kwargs = {k: (cache if _is_cache(v) else v) for k, v in kwargs.items()}
            block = self.spec.module(model, "block", layer)
            h = h.to(_device_of(block, h))
            out = _call(block, compile, h, args, kwargs, positional=bool(call.args))
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


def _call(block: nn.Module, compile: bool, h: Tensor, args: tuple, kwargs: dict, positional: bool):
    fn = compiled(block) if compile else block
    try:
        return fn(h, *args, **kwargs) if positional else fn(hidden_states=h, **kwargs)
    except Exception as e:  # noqa: BLE001
        if fn is block:
            raise
        log.warning("torch.compile failed on %s (%s: %s); running it eagerly from now on",
                    type(block).__name__, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        _COMPILED[block] = block
        return block(h, *args, **kwargs) if positional else block(hidden_states=h, **kwargs)


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
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **_few_logits(model))
    return Tail(spec, layer, tr[block_name].output, {i: calls[name] for name, i in later.items()})


@torch.no_grad()
def record_tail_from(model: nn.Module, spec: ModelSpec, first: int, input_ids: Tensor, attention_mask: Tensor) -> Tail:
    """Like :func:`record_tail`, re-running from block ``first`` itself (its input is the recorded hidden
    state), so that a change of block ``first``'s own weights reaches the output; ``first`` may be 0."""
    later = {spec.name("block", i): i for i in range(first, spec.n_layers(model))}
    with capture_args(model, list(later)) as calls:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **_few_logits(model))
    call = calls[spec.name("block", first)]
    hidden = call.args[0] if call.args else call.kwargs["hidden_states"]
    return Tail(spec, first - 1, hidden, {i: calls[name] for name, i in later.items()})


def _few_logits(model: nn.Module) -> dict:
    """Forward kwargs that skip the LM head at all but the last position (the tail computes its own)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _is_cache(x) -> bool:
    from transformers.cache_utils import Cache

    return isinstance(x, Cache)


def _select_cache(frozen, rows: Tensor | None):
    """A fresh cache holding the frozen columns of ``rows`` (every re-run appends its own columns to it)."""
    cache = copy.copy(frozen)
    cache.layers = []
    for layer in frozen.layers:
        fresh = copy.copy(layer)
        if rows is not None and getattr(layer, "keys", None) is not None and layer.keys.numel():
            fresh.keys = layer.keys.index_select(0, rows.to(layer.keys.device))
            fresh.values = layer.values.index_select(0, rows.to(layer.values.device))
        cache.layers.append(fresh)
    return cache


def right_padded(attention_mask: Tensor) -> bool:
    """Whether every row's real tokens come first, then its padding."""
    lengths = attention_mask.sum(1)
    cols = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return bool(torch.equal(attention_mask, (cols < lengths[:, None]).to(attention_mask.dtype)))


def align(input_ids: Tensor, attention_mask: Tensor, at: Tensor, pad_id: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Shift each right-padded row so that its position ``at[row]`` lands in one column ``max(at)``.

    Returns (input_ids, attention_mask, position_ids, shift) of the aligned batch; each token keeps
    its original position id, so the aligned batch computes exactly what the original did."""
    lengths = attention_mask.sum(1)
    if not right_padded(attention_mask):
        raise ValueError("align() expects right-padded rows")
    start = int(at.max())
    shift = start - at
    width = start + int((lengths - at).max())
    rows, cols = attention_mask.nonzero(as_tuple=True)
    new_cols = cols + shift[rows]
    ids = torch.full((input_ids.shape[0], width), pad_id, dtype=input_ids.dtype, device=input_ids.device)
    mask = torch.zeros((input_ids.shape[0], width), dtype=attention_mask.dtype, device=input_ids.device)
    pos = torch.zeros_like(ids)
    ids[rows, new_cols] = input_ids[rows, cols]
    mask[rows, new_cols] = 1
    pos[rows, new_cols] = cols
    # right padding continues the positions (as an unaligned batch would); left padding stays at 0
    after = torch.arange(width, device=ids.device)[None, :] - shift[:, None]
    tail_pad = after >= lengths[:, None]
    pos[tail_pad] = after[tail_pad]
    return ids, mask, pos, shift


@torch.no_grad()
def record_tail_cached(
    model: nn.Module, spec: ModelSpec, layer: int, input_ids: Tensor, attention_mask: Tensor, at: Tensor, pad_id: int = 0
) -> Tail:
    """Like :func:`record_tail`, for edits at position ``at[row]`` of each (right-padded) row: the
    returned tail holds only the columns from the aligned edit position on (see :func:`align`)."""
    from transformers import DynamicCache

    ids, mask, pos, shift = align(input_ids, attention_mask, at, pad_id)
    start = int(at.max())
    if start == 0:
        return record_tail(model, spec, layer, input_ids, attention_mask)
    cache = DynamicCache(config=model.config)
    cache_arg = cache_kwarg(model)
    # a left-padding column attends to nothing; some attention kernels answer NaN there, which the
    # next layer's keys and values would carry into real columns, so those columns are zeroed
    keep = mask[:, :start, None].bool()
    with ExitStack() as stack:
        for i in range(spec.n_layers(model)):
            stack.enter_context(edit_output(model, spec.name("block", i), lambda y: torch.where(keep.to(y.device), y, 0)))
        model(input_ids=ids[:, :start], attention_mask=mask[:, :start], position_ids=pos[:, :start],
              use_cache=True, **{cache_arg: cache}, **_few_logits(model))
    frozen = _select_cache(cache, None)  # the layers' tensors before the next pass appends to them
    later = {spec.name("block", i): i for i in range(layer + 1, spec.n_layers(model))}
    block_name = spec.name("block", layer)
    with capture_args(model, list(later)) as calls, trace(model, [block_name]) as tr:
        model(input_ids=ids[:, start:], attention_mask=mask, position_ids=pos[:, start:],
              use_cache=True, **{cache_arg: cache}, **_few_logits(model))
    return Tail(spec, layer, tr[block_name].output, {i: calls[name] for name, i in later.items()},
                shift=shift, start=start, frozen=frozen)
