"""The only module that registers hooks: context managers that always remove them.

Hooks return new tensors; they never edit a module's input or output in place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import Tensor, nn


class StopForward(Exception):
    """Raised by a hook to end a forward pass early; swallowed by the context manager."""


@dataclass
class Captured:
    """What a trace saw at one module (``None`` when not requested)."""

    input: Tensor | None = None
    output: Tensor | None = None


def _first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def _replace_first(x, new: Tensor):
    if isinstance(x, tuple):
        return (new, *x[1:])
    if isinstance(x, list):
        return [new, *x[1:]]
    return new


@contextmanager
def _hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def trace(
    model: nn.Module,
    names: Iterable[str],
    *,
    inputs: bool = False,
    outputs: bool = True,
    detach: bool = True,
    stop: bool = False,
) -> Iterator[dict[str, Captured]]:
    """Capture the first input and/or output tensor of each named module.

    With ``stop=True`` the forward pass ends after the last of them has run (its
    ``StopForward`` is swallowed here), so nothing past the deepest module is computed.
    """
    names = list(dict.fromkeys(names))
    captured = {n: Captured() for n in names}
    remaining = set(names)
    handles = []

    def make_hook(name: str):
        def hook(module, args, kwargs, output):
            rec = captured[name]
            if inputs:
                x = args[0] if args else next(iter(kwargs.values()))
                rec.input = x.detach() if detach else x
            if outputs:
                y = _first(output)
                rec.output = y.detach() if detach else y
            remaining.discard(name)
            if stop and not remaining:
                raise StopForward
            return None

        return hook

    modules = {n: model.get_submodule(n) for n in names}  # a bad name fails before any hook exists
    for n in names:
        handles.append(modules[n].register_forward_hook(make_hook(n), with_kwargs=True))
    with _hooks(handles):
        try:
            yield captured
        except StopForward:
            pass


@dataclass
class CallArgs:
    """The positional and keyword arguments one module was called with."""

    args: tuple = ()
    kwargs: dict | None = None


@contextmanager
def capture_args(model: nn.Module, names: Iterable[str]) -> Iterator[dict[str, CallArgs]]:
    """Record the arguments each named module is called with (e.g. the attention mask and
    position embeddings a block receives), so that the module can be re-run on new inputs."""
    names = list(dict.fromkeys(names))
    captured = {n: CallArgs() for n in names}
    handles = []

    def make_hook(name: str):
        def hook(module, args, kwargs):
            captured[name] = CallArgs(tuple(args), dict(kwargs))
            return None

        return hook

    modules = {n: model.get_submodule(n) for n in names}  # a bad name fails before any hook exists
    for n in names:
        handles.append(modules[n].register_forward_pre_hook(make_hook(n), with_kwargs=True))
    with _hooks(handles):
        yield captured


@contextmanager
def stop_after(model: nn.Module, name: str) -> Iterator[None]:
    """End the forward pass right after module ``name``."""

    def hook(module, args, output):
        raise StopForward

    with _hooks([model.get_submodule(name).register_forward_hook(hook)]):
        try:
            yield
        except StopForward:
            pass


@contextmanager
def edit_output(model: nn.Module, name: str, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Replace module ``name``'s (first) output ``y`` by ``fn(y)`` (a new tensor)."""

    def hook(module, args, output):
        return _replace_first(output, fn(_first(output)))

    with _hooks([model.get_submodule(name).register_forward_hook(hook)]):
        yield


@contextmanager
def edit_input(model: nn.Module, name: str, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Replace module ``name``'s first input ``x`` by ``fn(x)`` (positional, else the first keyword)."""

    def hook(module, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        key = next(iter(kwargs))
        return args, {**kwargs, key: fn(kwargs[key])}

    with _hooks([model.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True)]):
        yield


def scatter_add(x: Tensor, batch_idx: Tensor, pos_idx: Tensor, delta: Tensor) -> Tensor:
    """``x`` [batch, pos, d] with ``delta`` [n, d] added at (batch_idx[i], pos_idx[i]); out of place."""
    flat = x.reshape(-1, x.shape[-1])
    index = (batch_idx.to(x.device) * x.shape[1] + pos_idx.to(x.device)).long()
    out = flat.index_add(0, index, delta.to(device=x.device, dtype=x.dtype))
    return out.view_as(x)


def scatter_set(x: Tensor, batch_idx: Tensor, pos_idx: Tensor, values: Tensor) -> Tensor:
    """``x`` [batch, pos, d] with rows (batch_idx[i], pos_idx[i]) replaced by ``values`` [n, d]; out of place.

    The (batch_idx, pos_idx) pairs must be distinct.
    """
    flat = x.reshape(-1, x.shape[-1])
    index = (batch_idx.to(x.device) * x.shape[1] + pos_idx.to(x.device)).long()
    out = flat.index_copy(0, index, values.to(device=x.device, dtype=x.dtype))
    return out.view_as(x)


@contextmanager
def replace_at(
    model: nn.Module, name: str, values: Tensor, batch_idx: Tensor, pos_idx: Tensor
) -> Iterator[None]:
    """Set module ``name``'s output at (batch_idx, pos_idx) [n] to ``values`` [n, d] (e.g. restored
    clean states in causal tracing)."""
    with edit_output(model, name, lambda y: scatter_set(y, batch_idx, pos_idx, values)):
        yield


@contextmanager
def add_to_output(
    model: nn.Module, name: str, delta: Tensor, batch_idx: Tensor, pos_idx: Tensor
) -> Iterator[None]:
    """Add ``delta`` [n, d_model] to module ``name``'s output at (batch_idx, pos_idx) [n]."""
    with edit_output(model, name, lambda y: scatter_add(y, batch_idx, pos_idx, delta)):
        yield


def gather_positions(x: Tensor, pos_idx: Tensor) -> Tensor:
    """Rows ``x[b, pos_idx[b]]`` of ``x`` [batch, pos, d] -> [batch, d]."""
    idx = pos_idx.to(x.device).long().view(-1, 1, 1).expand(-1, 1, x.shape[-1])
    return x.gather(1, idx).squeeze(1)


def forward(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs):
    """Run the model (no cache), for passes that hooks may stop early."""
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)


__all__ = [
    "CallArgs",
    "capture_args",
    "Captured",
    "StopForward",
    "add_to_output",
    "edit_input",
    "edit_output",
    "forward",
    "gather_positions",
    "replace_at",
    "scatter_add",
    "scatter_set",
    "stop_after",
    "trace",
]
