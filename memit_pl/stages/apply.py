"""The ascending-layer MEMIT update as a Lightning stage.

For each edited layer l (ascending), a predict loop over the edits' prompts computes the keys k
(input of the MLP output projection at the subject's last token, averaged over the context
prefixes) and h^L on the current, partly edited model, stopping after layer L; the ``LayerUpdate``
callback then gathers them from every rank, solves Eqn. 14 and writes Δ_l into the weight.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import DataLoader

from memit_pl import io
from memit_pl.config import MemitConfig, TrainerConfig
from memit_pl.data.edits import EditRequest
from memit_pl.delta import EditDelta, add_to_weight
from memit_pl.functional.solve import output_rms, solve_update, spread_residual, through_post_norm
from memit_pl.modeling.hooks import trace
from memit_pl.modeling.loading import input_device, spread_over_devices
from memit_pl.modeling.spec import ModelSpec, get_spec
from memit_pl.modeling.tail import right_padded
from memit_pl.modeling.tokens import tokenize_with_subject
from memit_pl.stages import runtime
from memit_pl.stages.zstore import ZStore

log = logging.getLogger(__name__)

LAYERS_DIR = "layers"


@dataclass
class KeyBatch:
    """Each edit's prompt behind every context prefix (row 0 of an edit: no prefix)."""

    case_ids: list[str]
    input_ids: Tensor  # [rows, pos]
    attention_mask: Tensor  # [rows, pos]
    lookup: Tensor  # [rows] subject's last token
    edit_of_row: Tensor  # [rows]
    group_of_row: Tensor  # [rows] context-prefix group (0: the bare prompt)
    init_rows: Tensor  # [n_edits] each edit's bare prompt

    @property
    def n_edits(self) -> int:
        return len(self.case_ids)

    def to(self, device) -> KeyBatch:
        return KeyBatch(**{f.name: (v.to(device) if isinstance(v := getattr(self, f.name), Tensor) else v)
                           for f in fields(self)})


def prefix_groups(context_templates: Sequence[Sequence[int]]) -> list[int]:
    """Group of each prefix: 0 for the bare prompt, then one group per [length, count] pair."""
    groups = [0]
    for g, (_, count) in enumerate(context_templates, start=1):
        groups += [g] * int(count)
    return groups


class KeyCollate:
    """``collate_fn``: EditRequests -> KeyBatch (padding side of the tokenizer respected)."""

    def __init__(self, tokenizer, prefixes: Sequence[str], groups: Sequence[int]):
        if len(prefixes) != len(groups):
            raise ValueError(f"{len(prefixes)} context prefixes but {len(groups)} group labels")
        self.tokenizer, self.prefixes, self.groups = tokenizer, list(prefixes), list(groups)

    def __call__(self, requests: list[EditRequest]) -> KeyBatch:
        p = len(self.prefixes)
        pb = tokenize_with_subject(
            self.tokenizer,
            [r.prompt for r in requests for _ in self.prefixes],
            [r.subject for r in requests for _ in self.prefixes],
            [pre for _ in requests for pre in self.prefixes],
        )
        n = len(requests)
        return KeyBatch(
            case_ids=[r.case_id for r in requests],
            input_ids=pb.input_ids,
            attention_mask=pb.attention_mask,
            lookup=pb.subject_last,
            edit_of_row=torch.arange(n).repeat_interleave(p),
            group_of_row=torch.tensor(self.groups).repeat(n),
            init_rows=torch.arange(n) * p,
        )


@torch.no_grad()
def keys_and_h(model: nn.Module, spec: ModelSpec, batch: KeyBatch, layer: int, target_layer: int,
               mlp_out: bool = False, share_prefixes: bool = False) -> tuple[Tensor, ...]:
    """(k [n_edits, d_key], h^L [n_edits, d_model]) for one batch.
    With ``mlp_out``, also the output projection's output W k [n_edits, d_model], averaged as k.

    Keys are averaged within each context-prefix group, then over groups (as the reference's
    ``compute_ks``); h^L is read on the bare prompt. Below L that takes two passes: every row stops at
    layer l's output projection, and only the bare prompts (one row in 1 + #prefixes) go on to block L,
    on the same padded columns (so each row sees exactly the positions of the one-pass form).

    ``share_prefixes`` (right-padded batches): the tokens a context prefix's rows have in common run once,
    filling the model's key/value cache, and each row runs only its own tokens after them
    (:func:`_shared_prefix_rows`); the bare prompts run alone, through block L. Same keys and h^L.
    """
    if share_prefixes and right_padded(batch.attention_mask):
        return _keys_and_h_shared(model, spec, batch, layer, target_layer, mlp_out)
    key_name, h_name = spec.name("mlp_out", layer), spec.name("block", target_layer)
    names = [key_name, h_name] if layer == target_layer else [key_name]
    with trace(model, names, inputs=True, outputs=True, stop=True) as tr:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    rows = torch.arange(batch.input_ids.shape[0])
    lookup = batch.lookup.to(tr[key_name].input.device)
    if layer == target_layer:
        h_out, h_rows = tr[h_name].output, batch.init_rows
    else:
        init = batch.init_rows.to(batch.input_ids.device)
        with trace(model, [h_name], outputs=True, stop=True) as th:
            model(input_ids=batch.input_ids[init], attention_mask=batch.attention_mask[init], use_cache=False)
        h_out, h_rows = th[h_name].output, torch.arange(len(init))
    h = h_out[h_rows.to(h_out.device), batch.lookup[batch.init_rows].to(h_out.device)].float()
    keys = _edit_means(batch, tr[key_name].input[rows, lookup].float())
    if not mlp_out:
        return keys, h.cpu()
    return keys, h.cpu(), _edit_means(batch, tr[key_name].output[rows, lookup].float())


def _keys_and_h_shared(model: nn.Module, spec: ModelSpec, batch: KeyBatch, layer: int, target_layer: int,
                       mlp_out: bool) -> tuple[Tensor, ...]:
    key_name, h_name = spec.name("mlp_out", layer), spec.name("block", target_layer)
    dev = batch.input_ids.device
    n_rows = batch.input_ids.shape[0]
    prefix_of_row = torch.arange(n_rows, device=dev) - batch.init_rows.to(dev)[batch.edit_of_row.to(dev)]
    parts = []  # (rows, k at those rows, W k at those rows), one per pass

    # the bare prompts: keys at layer l and h^L in one pass, cut after their longest row
    init = batch.init_rows.to(dev)
    width = int(batch.attention_mask[init].sum(1).max())
    with trace(model, [key_name, h_name], inputs=True, outputs=True, stop=True) as tr:
        model(input_ids=batch.input_ids[init, :width], attention_mask=batch.attention_mask[init, :width],
              use_cache=False)
    at = batch.lookup[init].to(tr[key_name].input.device)
    local = torch.arange(len(init), device=at.device)
    parts.append((init, tr[key_name].input[local, at], tr[key_name].output[local, at]))
    h = tr[h_name].output[local.to(tr[h_name].output.device), at.to(tr[h_name].output.device)].float()
    for j in range(1, int(prefix_of_row.max()) + 1):
        rows = (prefix_of_row == j).nonzero().squeeze(-1)
        parts.append((rows, *_shared_prefix_rows(model, key_name, batch.input_ids[rows], batch.attention_mask[rows],
                                                 batch.lookup[rows].to(dev))))
    order = torch.cat([rows.cpu() for rows, _, _ in parts]).argsort()  # the passes' rows back in batch order
    k_in, k_out = (torch.cat([p[i].float().to(h.device) for p in parts])[order.to(h.device)] for i in (1, 2))
    keys = _edit_means(batch, k_in)
    if not mlp_out:
        return keys, h.cpu()
    return keys, h.cpu(), _edit_means(batch, k_out)


def _shared_prefix_rows(model: nn.Module, name: str, input_ids: Tensor, attention_mask: Tensor,
                        at: Tensor) -> tuple[Tensor, Tensor]:
    """Input and output of module ``name`` at column ``at[row]`` of each right-padded row. The columns all
    rows share (their common first tokens, at most up to the earliest ``at``) run once for one row, filling
    the model's key/value cache, which every row then attends to while only its own columns run."""
    from transformers import DynamicCache

    from memit_pl.modeling.loading import cache_kwarg
    from memit_pl.modeling.tail import _select_cache

    lengths = attention_mask.sum(1)
    same = (input_ids == input_ids[:1]).all(0) & (attention_mask == 1).all(0)
    common = int(same.long().cumprod(0).sum()) if same.numel() else 0
    start = min(common, int(at.min()))  # the key column itself runs with the rows
    width = int(lengths.max())
    if start == 0:
        with trace(model, [name], inputs=True, outputs=True, stop=True) as tr:
            model(input_ids=input_ids[:, :width], attention_mask=attention_mask[:, :width], use_cache=False)
        rows = torch.arange(len(at), device=tr[name].input.device)
        return tr[name].input[rows, at.to(rows.device)], tr[name].output[rows, at.to(rows.device)]
    cache = DynamicCache(config=model.config)
    arg = cache_kwarg(model)
    with trace(model, [name], stop=True):  # layers 0..l of the shared columns: their keys and values
        model(input_ids=input_ids[:1, :start], attention_mask=attention_mask[:1, :start], use_cache=True, **{arg: cache})
    cache = _select_cache(cache, torch.zeros(len(at), dtype=torch.long, device=input_ids.device))
    pos = torch.arange(start, width, device=input_ids.device).expand(len(at), -1)
    with trace(model, [name], inputs=True, outputs=True, stop=True) as tr:
        model(input_ids=input_ids[:, start:width], attention_mask=attention_mask[:, :width], position_ids=pos,
              use_cache=True, **{arg: cache})
    rows = torch.arange(len(at), device=tr[name].input.device)
    cols = (at - start).to(rows.device)
    return tr[name].input[rows, cols], tr[name].output[rows, cols]


def _edit_means(batch: KeyBatch, per_row: Tensor) -> Tensor:
    """[n_rows, d] -> [n_edits, d]: the mean within each context-prefix group, then over the groups."""
    n, n_groups = batch.n_edits, int(batch.group_of_row.max()) + 1
    cell = (batch.edit_of_row * n_groups + batch.group_of_row).to(per_row.device)
    sums = torch.zeros(n * n_groups, per_row.shape[1], device=per_row.device).index_add(0, cell, per_row)
    counts = torch.zeros(n * n_groups, device=per_row.device).index_add(0, cell, torch.ones(len(cell), device=per_row.device))
    return (sums / counts.clamp(min=1).unsqueeze(1)).view(n, n_groups, -1).mean(1).cpu()


class ApplyModule(L.LightningModule):
    """Predict step: keys at ``self.layer`` and h^L for a batch of edits."""

    def __init__(self, model: nn.Module, target_layer: int, share_prefixes: bool = False):
        super().__init__()
        self.model = model
        self.spec = get_spec(model)
        self.target_layer = target_layer
        self.share_prefixes = share_prefixes
        self.layer: int | None = None
        self.applied: set[int] = set()

    def transfer_batch_to_device(self, batch: KeyBatch, device, dataloader_idx: int) -> KeyBatch:
        return batch.to(device)

    def predict_step(self, batch: KeyBatch, batch_idx: int) -> dict:
        """keys, h^L and, with a norm after the MLP, W k ("m")."""
        out = keys_and_h(self.model, self.spec, batch, self.layer, self.target_layer,
                         mlp_out=self.spec.mlp_post_norm is not None, share_prefixes=self.share_prefixes)
        return {"case_ids": batch.case_ids, **dict(zip(("keys", "h", "m"), out))}


def _gather(trainer: L.Trainer | None, outputs: list[dict]) -> dict[str, tuple[Tensor, Tensor, Tensor | None]]:
    """case id -> (key, h, W k or None), from every rank (a distributed sampler may repeat cases)."""
    local = [(c, o["keys"][i], o["h"][i], o["m"][i] if "m" in o else None)
             for o in outputs for i, c in enumerate(o["case_ids"])]
    if trainer is not None and trainer.world_size > 1 and torch.distributed.is_initialized():
        everyone: list = [None] * trainer.world_size
        torch.distributed.all_gather_object(everyone, local)
        local = [x for part in everyone for x in part]
    return {c: (k, h, m) for c, k, h, m in local}


class LayerUpdate(Callback):
    """At the end of a layer's pass: gather keys and h^L, solve Eqn. 14, write Δ_l (in place, on
    every rank) and save the layer's factors (rank 0) so an interrupted run resumes from them."""

    def __init__(self, case_ids: list[str], z: Tensor, covs: dict[int, Tensor], lam: float, out_dir: Path,
                 key: str, prev_keys: dict[int, Tensor] | None = None, solver=None):
        self.case_ids, self.z, self.covs, self.lam = case_ids, z, covs, lam
        self.solver = solver or solve_update
        self.cast_error: dict[int, float] = {}
        """Per layer: ‖cast(W + Δ) − W − Δ‖ / ‖Δ‖, how much of Δ the weights' dtype rounded away."""
        self.out_dir, self.key, self.prev_keys = out_dir, key, prev_keys or {}
        self.layers_left = 1
        self.outputs: list[dict] = []
        self.started = time.perf_counter()
        """When the current layer's pass began: the layer file records its seconds (a resumed run's total)."""

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self.outputs = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.outputs.append(outputs)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        self.finish(trainer, pl_module)

    def finish(self, trainer: L.Trainer | None, module: ApplyModule) -> None:
        """Gather, solve, write Δ_l into the weight, save the layer's factors."""
        layer = module.layer
        keys, h, m = self.collect(trainer, layer)
        keys, resid = layer_targets(module.spec, module.model, layer, keys, h, m, self.z, self.layers_left)
        weight = module.spec.out_weight(module.model, layer)
        with runtime.full_precision(weight.device):
            a, b = self.solver(keys.to(weight.device), resid.to(weight.device), self.covs[layer].to(weight.device),
                               self.lam, self.prev_keys.get(layer))
            self.cast_error[layer] = add_to_weight(module.spec, module.model, layer, a @ b.T)
        module.applied.add(layer)
        resid_norm = (self.z - h).norm(dim=-1)
        if trainer is None or trainer.is_global_zero:
            io.save_tensors(layer_file(self.out_dir, layer), {"A": a, "B": b, "keys": keys, "resid_norm": resid_norm},
                            {"key": self.key, "layer": layer, "case_ids": self.case_ids,
                             "seconds": round(time.perf_counter() - self.started, 3)})
        if trainer is not None:
            trainer.strategy.barrier()
        rank_zero_info(f"layer {layer}: ‖Δ‖={float((a @ b.T).norm()):.4f}, mean ‖z−h^L‖={float(resid_norm.mean()):.4f}")

    def collect(self, trainer: L.Trainer | None, layer: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """(keys [n, d_key], h^L [n, d_model], W k [n, d_model] or None) in the order of ``case_ids``."""
        got = _gather(trainer, self.outputs)
        missing = [c for c in self.case_ids if c not in got]
        if missing:
            raise RuntimeError(f"layer {layer}: no keys for {len(missing)} cases, e.g. {missing[:3]}")
        keys = torch.stack([got[c][0] for c in self.case_ids])
        h = torch.stack([got[c][1] for c in self.case_ids])
        m = torch.stack([got[c][2] for c in self.case_ids]) if got[self.case_ids[0]][2] is not None else None
        return keys, h, m


def layer_targets(spec: ModelSpec, model: nn.Module, layer: int, keys: Tensor, h: Tensor, m: Tensor | None,
                  z: Tensor, layers_left: int) -> tuple[Tensor, Tensor]:
    """(keys, residuals) the solve of one layer fits: R_l = (z − h^L) / (L − l + 1) (Eqn. 20).

    With a norm after the MLP the stream gets norm(W k): the residual is mapped through the norm onto W k,
    and each edit weighed by 1 / rms(W k), as the statistics weigh each corpus key (both terms of Eqn. 14
    then in the stream's units)."""
    resid = spread_residual(z.to(h.dtype), h, layers_left)
    if spec.mlp_post_norm is None:
        return keys, resid
    norm = spec.module(model, "mlp_post_norm", layer)
    dev = next(norm.parameters()).device
    resid = through_post_norm(norm, m.to(dev), resid.to(dev)).cpu()
    scale = 1.0 / output_rms(m).unsqueeze(-1)
    return keys * scale, resid * scale


POST_NORM_NAMES = ("post_feedforward_layernorm", "post_mlp_layernorm", "post_mlp_norm")


def _check_post_norm(model: nn.Module, spec: ModelSpec) -> None:
    """A block with a norm after its MLP (as Gemma 2/3, OLMo 2) whose spec does not name it would get
    targets it cannot reach (the update overshoots): refuse before any work."""
    if spec.mlp_post_norm is not None:
        return
    block = spec.module(model, "block", 0)
    found = [name for name, _ in block.named_children() if name in POST_NORM_NAMES]
    if found:
        raise ValueError(
            f"{spec.family}: block 0 has {found[0]!r}, a norm between the MLP and the residual stream, but its "
            f"ModelSpec has no mlp_post_norm; register the spec with mlp_post_norm='{spec.block}.{found[0]}'"
        )


def layer_file(out_dir: Path, layer: int) -> Path:
    return Path(out_dir) / LAYERS_DIR / f"layer{layer}.safetensors"


def _solver_name(solver) -> str | None:
    if solver is None or solver is solve_update:
        return None
    return getattr(solver, "name", None) or repr(solver)


def run_key(store: ZStore, memit: MemitConfig, cov_ids: dict[int, str], prev: list[str], case_ids: list[str],
            post_norm: str | None = None, solver: str | None = None) -> str:
    """What a layer's update depends on (for resuming from saved layer files)."""
    data = {"z": store.metadata.get("key"), "layers": memit.layers, "lam": memit.mom2_update_weight,
            "covs": cov_ids, "prev": prev, "cases": case_ids}
    if post_norm is not None:
        data["post_norm"] = post_norm
    if solver is not None:
        data["solver"] = solver
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def apply_memit(
    model: nn.Module,
    tokenizer,
    requests: Sequence[EditRequest],
    store: ZStore,
    covs: dict[int, Tensor],
    memit: MemitConfig,
    out_dir: str | Path,
    *,
    trainer: TrainerConfig | None = None,
    prev_keys: dict[int, Tensor] | None = None,
    cov_ids: dict[int, str] | None = None,
    prev_ids: list[str] | None = None,
    solver=None,
) -> EditDelta:
    """Edit ``model`` in place, layer by layer (ascending); return the delta (Δ_l = A_l B_lᵀ).

    ``solver``: the update rule of one layer, ``(keys, resid, cov, λ, prev_keys) -> (A, B)``; default
    :func:`memit_pl.functional.solve.solve_update` (Eqn. 14). A different solver keys its saved layers apart.

    Layers whose factors are already saved in ``out_dir`` for the same inputs are re-applied, not recomputed.
    """
    out_dir = Path(out_dir)
    spec = get_spec(model)
    case_ids = [r.case_id for r in requests]
    z = store.z_for(case_ids).float()
    if store.layer != memit.target_layer:
        raise ValueError(f"the z store was made for layer {store.layer}, but max(memit.layers) = {memit.target_layer}")
    _check_post_norm(model, spec)
    key = run_key(store, memit, cov_ids or {}, prev_ids or [], case_ids, spec.mlp_post_norm, _solver_name(solver))
    groups = prefix_groups(store.metadata["memit"]["context_templates"])
    loader = DataLoader(list(requests), batch_size=memit.z_batch_size, shuffle=False,
                        collate_fn=KeyCollate(tokenizer, store.metadata["prefixes"], groups))
    module = ApplyModule(model, memit.target_layer, share_prefixes=memit.update_prefix_cache)
    update = LayerUpdate(case_ids, z, covs, memit.mom2_update_weight, out_dir, key, prev_keys, solver)
    plain = spread_over_devices(model)
    factors: dict[int, tuple[Tensor, Tensor]] = {}
    seconds: dict[int, float | None] = {}
    reused: list[int] = []
    for i, layer in enumerate(memit.layers):
        module.layer = layer
        update.layers_left = len(memit.layers) - i
        saved = _load_layer(out_dir, layer, key)
        if saved is not None:
            reused.append(layer)
            rank_zero_info(f"layer {layer}: reusing {layer_file(out_dir, layer)}")
        else:
            update.started = time.perf_counter()
            if plain:  # a model spread over devices by accelerate stays where it is: no Trainer
                with runtime.plain_precision(model, trainer):
                    update.outputs = [module.predict_step(b, j) for j, b in runtime.plain_batches(model, loader)]
                update.finish(None, module)
            else:
                runtime.predict(trainer, module, callbacks=[update], dataloaders=loader, inference_mode=False)
            saved = _load_layer(out_dir, layer, key)
        if saved is None:
            raise RuntimeError(f"layer {layer}: the update was not written to {layer_file(out_dir, layer)}")
        if layer not in module.applied:  # computed in another process (spawned workers) or resumed
            update.cast_error[layer] = add_to_weight(spec, model, layer, saved[0] @ saved[1].T)
            module.applied.add(layer)
        factors[layer], seconds[layer] = saved[:2], saved[2]
    worst = max(update.cast_error.values(), default=0.0)
    if worst > 1e-2:
        log.warning("the weights' dtype (%s) rounds away %.1f%% of Δ (worst layer); edit float32 weights to keep it",
                    spec.out_weight(model, memit.layers[0]).dtype, 100 * worst)
    return EditDelta(factors, {"family": spec.family, "layers": list(memit.layers), "case_ids": case_ids,
                               "target_layer": memit.target_layer, "lambda": memit.mom2_update_weight,
                               "cast_error": {str(k): v for k, v in sorted(update.cast_error.items())},
                               "layer_seconds": {str(k): v for k, v in seconds.items()},
                               "reused_layers": reused})


def _load_layer(out_dir: Path, layer: int, key: str) -> tuple[Tensor, Tensor, float | None] | None:
    """(A, B, the seconds its pass and solve took) of a saved layer with this run key, else None."""
    path = layer_file(out_dir, layer)
    if not path.exists():
        return None
    tensors, meta = io.load_tensors(path)
    if meta.get("key") != key:
        return None
    return tensors["A"], tensors["B"], meta.get("seconds")


def saved_keys(run_dir: str | Path) -> dict[int, Tensor]:
    """Keys [n, d_key] per layer saved by an earlier run (for sequential rounds)."""
    out = {}
    for path in sorted((Path(run_dir) / LAYERS_DIR).glob("layer*.safetensors")):
        tensors, meta = io.load_tensors(path)
        out[int(meta["layer"])] = tensors["keys"]
    if not out:
        raise FileNotFoundError(f"{run_dir} holds no saved layer keys ({LAYERS_DIR}/layer*.safetensors)")
    return out


@torch.no_grad()
def residual_norms(model: nn.Module, tokenizer, requests: Sequence[EditRequest], store: ZStore, memit: MemitConfig) -> Tensor:
    """‖z_i − h_i^L‖ on the model as it is now, [n_edits]."""
    spec = get_spec(model)
    groups = prefix_groups(store.metadata["memit"]["context_templates"])
    collate = KeyCollate(tokenizer, store.metadata["prefixes"][:1], groups[:1])
    out = []
    for i in range(0, len(requests), memit.z_batch_size):
        chunk = list(requests[i : i + memit.z_batch_size])
        batch = collate(chunk).to(input_device(model))
        _, h = keys_and_h(model, spec, batch, memit.target_layer, memit.target_layer)
        out.append((store.z_for([r.case_id for r in chunk]).float() - h).norm(dim=-1))
    return torch.cat(out)
