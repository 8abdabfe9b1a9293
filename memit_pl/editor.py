"""The public editor: a model, its tokenizer and a config, and everything reusable across edits of it.

>>> editor = MEMIT.from_pretrained("smollm2-135m")                      # doctest: +SKIP
>>> delta = editor.edit([EditRequest.of("{} plays the sport of", "Michael Jordan", "baseball")])  # doctest: +SKIP

The CLI commands, ``sweep``, ``tune`` and the benchmarks all go through this class. What does not change
between edits of one model is computed once: the statistics per layer (cached on disk under ``cache_dir``),
the z store per target layer (resumable when a ``work_dir`` is given).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from memit_pl.config import Config, MemitConfig
from memit_pl.data.edits import EditRequest, validate
from memit_pl.delta import EditDelta
from memit_pl.io import write_json

log = logging.getLogger(__name__)

Solver = Callable[[Tensor, Tensor, Tensor, float, "Tensor | None"], tuple[Tensor, Tensor]]
"""``(keys [n, d_key], resid [n, d_model], cov [d_key, d_key], λ, previous keys or None) -> (A, B)`` with
Δ = A Bᵀ: the update rule of one layer (default :func:`memit_pl.functional.solve.solve_update`, Eqn. 14)."""


def _resolve_config(config: Config | MemitConfig | str | Path | None, model_name: str | None) -> Config:
    if isinstance(config, Config):
        return config
    if isinstance(config, MemitConfig):
        base = (Config.for_model(model_name) if model_name else None) or Config()
        return replace(base, memit=config)
    if config is not None:
        path = Path(config)
        if path.suffix in (".yaml", ".yml") or path.is_file():
            return Config.from_file(path)
        return Config.from_name(str(config))
    found = Config.for_model(model_name) if model_name else None
    if found is None:
        log.warning("no packaged config for model %r: using the defaults (%s); pass config= to choose",
                    model_name, "memit_pl.config.MemitConfig")
        return Config()
    return found


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no parameter gradients: the z steps then build no gradients on the model's weights."""
    return model.eval().requires_grad_(False)


class MEMIT:
    """Mass-edit a causal LM with MEMIT; also the shared engine of the CLI, ``sweep`` and ``tune``.

    Args:
        model, tokenizer: any Hugging Face causal LM and its tokenizer (the model is frozen here).
        config: every section of a run (:class:`memit_pl.config.Config`); default: the packaged config made
            for the model, else the defaults.
        work_dir: where z stores and per-layer factors are kept, so an interrupted edit resumes; default a
            temporary directory removed with the editor.
        cache_dir: root of the model and statistics caches (default ``$MEMIT_PL_CACHE`` or
            ``~/.cache/memit_pl``); the statistics are cached under ``<cache_dir>/stats``.
        solver: the update rule of a layer (see :data:`Solver`); default Eqn. 14.
        z_dir: an existing z store (e.g. an earlier run's ``z/``) to reuse and extend for its target layer.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        config: Config | MemitConfig | str | Path | None = None,
        *,
        work_dir: str | Path | None = None,
        cache_dir: str | Path | None = None,
        solver: Solver | None = None,
        z_dir: str | Path | None = None,
    ):
        self.model = freeze(model)
        self.tokenizer = tokenizer
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.config = _resolve_config(config, getattr(model, "memit_name", None) or _hub_name(model))
        from memit_pl.modeling.loading import input_device
        from memit_pl.stages import runtime

        self.compute_dtype = runtime.resolve_compute_dtype(self.config.model.compute_dtype, input_device(model), model)
        """The resolved ``model.compute_dtype`` of every pass (float32, bfloat16 or float16)."""
        precision = None if self.compute_dtype == "float32" else runtime.lightning_precision(self.compute_dtype)
        self.config = replace(self.config, trainer=replace(self.config.trainer, precision=precision))
        self._tmp = None
        if work_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="memit_pl-")
            work_dir = self._tmp.name
        self.work_dir = Path(work_dir)
        self.cache_dir = cache_dir if cache_dir is not None else self.config.model.cache_dir
        self.solver = solver
        self.z_dir = None if z_dir is None else Path(z_dir)
        self.z_runs = 0
        """z optimisations started (a λ sweep starts none twice)."""
        self._covs: dict[int, Tensor] = {}
        self._cov_id = ""
        self._solvers: dict[tuple, Solver] = {}

    # --- construction ----------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        name_or_model: str | nn.Module,
        tokenizer=None,
        config: Config | MemitConfig | str | Path | None = None,
        *,
        work_dir: str | Path | None = None,
        cache_dir: str | Path | None = None,
        solver: Solver | None = None,
        **model_kwargs: Any,
    ) -> MEMIT:
        """An editor for a packaged model (``smollm2-135m``, ``gemma3-270m``), a Hugging Face id or local
        directory, or an already loaded model (then pass its ``tokenizer``).

        ``model_kwargs`` (``dtype``, ``compute_dtype``, ``device``, ``device_map``) override the config's
        ``model`` section.
        """
        if isinstance(name_or_model, nn.Module):
            if tokenizer is None:
                raise ValueError("MEMIT.from_pretrained: a loaded model needs its tokenizer (tokenizer=...)")
            return cls(name_or_model, tokenizer, config, work_dir=work_dir, cache_dir=cache_dir, solver=solver)
        from memit_pl.modeling.loading import load_model

        cfg = _resolve_config(config, str(name_or_model))
        unknown = set(model_kwargs) - {"dtype", "compute_dtype", "device", "device_map"}
        if unknown:
            raise TypeError(f"MEMIT.from_pretrained got unexpected keyword argument {sorted(unknown)[0]!r}")
        model_cfg = replace(cfg.model, name=str(name_or_model), **model_kwargs)
        if cache_dir is not None:
            model_cfg = replace(model_cfg, cache_dir=str(cache_dir))
        cfg = replace(cfg, model=model_cfg)
        model, tok = load_model(model_cfg.name, dtype=model_cfg.dtype, device=model_cfg.device,
                                device_map=model_cfg.device_map, cache_dir=model_cfg.cache_dir)
        if tokenizer is not None:
            tok = tokenizer
        return cls(model, tok, cfg, work_dir=work_dir, cache_dir=model_cfg.cache_dir, solver=solver)

    @property
    def memit(self) -> MemitConfig:
        return self.config.memit

    # --- the stages ------------------------------------------------------------------------------------

    def check(self, requests: Sequence[EditRequest], memit: MemitConfig | None = None) -> None:
        """Validate requests and layers against this model before any expensive work (one-line errors)."""
        from memit_pl.modeling.spec import check_layers

        if not requests:
            raise ValueError("no edit requests")
        validate(requests, self.tokenizer)
        check_layers(self.model, (memit or self.memit).layers)

    def covariances(self, layers: Sequence[int] | None = None) -> dict[int, Tensor]:
        """E[k kᵀ] of each layer (float32, CPU), from the statistics cache or computed once."""
        from memit_pl.stages.pipeline import covariances

        layers = list(self.memit.layers if layers is None else layers)
        missing = [layer for layer in layers if layer not in self._covs]
        if missing:
            covs, self._cov_id = covariances(self.model, self.tokenizer, MemitConfig(layers=sorted(missing)),
                                             self.config.stats, self.cache_dir, self.config.trainer)
            self._covs.update(covs)
        return {layer: self._covs[layer] for layer in layers}

    def zs(self, requests: Sequence[EditRequest], memit: MemitConfig | None = None, *,
           store_dir: str | Path | None = None, config_dump: dict | None = None):
        """The z store of target layer max(R) holding every request (optimised once; resumed from disk);
        ``store_dir`` default: ``<work_dir>/z-L<L>-<model fingerprint>``, or the editor's ``z_dir`` for its own target layer."""
        from memit_pl.stages.zmodule import compute_zs
        from memit_pl.stages.zstore import STORE_FILE, load_store

        memit = memit or self.memit
        self.z_runs += 1
        if store_dir is not None:
            return compute_zs(self.model, self.tokenizer, requests, memit, Path(store_dir), self.config.trainer,
                              config_dump)
        store_dir = self.z_store_dir(memit)
        if self.z_dir is not None:
            layer = load_store(self.z_dir).layer if (self.z_dir / STORE_FILE).exists() else None
            if layer in (None, memit.target_layer):
                store_dir = self.z_dir
        return compute_zs(self.model, self.tokenizer, requests, memit, store_dir, self.config.trainer)

    def z_store_dir(self, memit: MemitConfig | None = None) -> Path:
        """``<work_dir>/z-L<L>-<model fingerprint>``, the z store :meth:`zs` keeps for target layer ``L``: one
        store per target layer and model state (an edited or reverted model's z are not the unedited one's)."""
        return self.work_dir / z_store_name(self.model, (memit or self.memit).target_layer)

    def apply(self, requests: Sequence[EditRequest], store, memit: MemitConfig | None = None, *,
              out_dir: str | Path | None = None, prev_keys: dict[int, Tensor] | None = None,
              prev_ids: Sequence[str] = ()) -> EditDelta:
        """The ascending-layer update from a z store, in place; per-layer factors kept in ``out_dir``."""
        from memit_pl.stages.apply import apply_memit

        memit = memit or self.memit
        if memit.method == "ft":
            raise ValueError("memit.method ft fine-tunes a weight and has no z store to apply; use edit()")
        out_dir = Path(out_dir) if out_dir is not None else self.work_dir / _tag(requests, memit, prev_keys)
        memit = replace(memit, layers=memit.edited_layers)  # rome: layer L alone
        return apply_memit(self.model, self.tokenizer, requests, store, self.covariances(memit.layers), memit,
                           out_dir, trainer=self.config.trainer, prev_keys=prev_keys,
                           cov_ids={layer: self._cov_id for layer in memit.layers}, prev_ids=list(prev_ids),
                           solver=self.solver or self.method_solver(memit))

    def method_solver(self, memit: MemitConfig) -> Solver | None:
        """The solver of ``memit.method`` (None: Eqn. 14), one per setting so its projections are reused."""
        if memit.method in ("memit", "ft"):
            return None
        from memit_pl.functional.solve import AlphaEditSolver, RomeSolver

        if memit.method == "rome":
            return RomeSolver()

        key = (memit.nullspace_threshold, memit.alphaedit_l2, memit.nullspace_energy)
        if key not in self._solvers:
            self._solvers[key] = AlphaEditSolver(*key)
        return self._solvers[key]

    def edit(self, requests: Sequence[EditRequest], memit: MemitConfig | None = None, *,
             prev_keys: dict[int, Tensor] | None = None) -> EditDelta:
        """Write every request into the model in one batch (in place) and return the delta.

        ``prev_keys`` (layer -> keys of earlier rounds, as :func:`memit_pl.stages.apply.saved_keys` reads them
        from a run's layer files) join the preserved term, so a second round does not overwrite the first.
        """
        memit = memit or self.memit
        self.check(requests, memit)
        if memit.method == "ft":
            return self._finetune(requests, memit)
        self.covariances(memit.edited_layers)  # statistics first: cached, and needed by the update anyway
        store = self.zs(requests, memit)
        delta = self.apply(requests, store, memit, prev_keys=prev_keys)
        delta.metadata.update({"memit": asdict(memit), "z_mean_loss": float(store.tensors["loss"].mean()),
                               "compute_dtype": self.compute_dtype})
        return delta

    def edit_in_rounds(self, requests: Sequence[EditRequest], round_size: int, memit: MemitConfig | None = None, *,
                       evaluate_every: int = 1, keep_previous_keys: bool = True,
                       on_row: Callable[[dict], None] | None = None) -> list[dict[str, Any]]:
        """Lifelong editing: the requests in rounds of ``round_size`` on the same model, each round's keys kept
        for the preserved term of the next ones (``keep_previous_keys``), and every ``evaluate_every`` rounds
        (and after the last) an evaluation of all edits so far. Returns one row per evaluation
        (``edits_so_far``, ``round``, the paper's and EasyEdit's metrics, ``seconds`` of editing so far); the
        model stays edited. With a ``work_dir`` an interrupted run resumes: finished rounds are re-applied
        from their saved layers, not recomputed, and count the seconds they took when first computed
        (``round-seconds.json`` in the work dir).
        """
        from memit_pl.experiments.sweep import row
        from memit_pl.stages.apply import saved_keys

        memit = memit or self.memit
        if round_size < 1 or evaluate_every < 1:
            raise ValueError("round_size and evaluate_every must be >= 1")
        self.check(requests, memit)
        unedited = self.evaluate(requests)
        rows = [row(0, unedited, round=0, edits_so_far=0, seconds=0.0)]
        prev: dict[int, list[Tensor]] = {}
        seconds = 0.0
        # each round's editing seconds as first measured: a resumed run re-applies finished rounds in moments,
        # and its `seconds` still count what they cost
        timings_file = self.work_dir / "round-seconds.json"
        timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}
        n_rounds = -(-len(requests) // round_size)
        for i in range(n_rounds):
            chunk = list(requests[i * round_size : (i + 1) * round_size])
            t = time.perf_counter()
            keys = {layer: torch.cat(ks) for layer, ks in prev.items()} if prev else None
            self.edit(chunk, memit, prev_keys=keys)
            tag = _tag(chunk, memit, keys)
            if tag not in timings:
                timings[tag] = round(time.perf_counter() - t, 3)
                write_json(timings_file, timings)
            seconds += timings[tag]
            if memit.method != "ft" and keep_previous_keys:  # the only place prev fills (FT-W has no keys)
                for layer, k in saved_keys(self.work_dir / tag).items():
                    prev.setdefault(layer, []).append(k)
            done = min((i + 1) * round_size, len(requests))
            if (i + 1) % evaluate_every == 0 or i == n_rounds - 1:
                so_far = list(requests[:done])
                r = row(done, self.evaluate(so_far), unedited, round=i + 1,
                        edits_so_far=done, seconds=round(seconds, 1))
                rows.append(r)
                log.info("round %d (%d edits so far): %s", i + 1, done, r)
                if on_row is not None:
                    on_row(r)
        return rows

    def _finetune(self, requests: Sequence[EditRequest], memit: MemitConfig) -> EditDelta:
        """FT-W (:mod:`memit_pl.stages.finetune`), resumed from ``work_dir`` when the same run was done before."""
        from memit_pl.delta import DELTA_FILE, load_delta
        from memit_pl.modeling.loading import fingerprint
        from memit_pl.stages.finetune import finetune

        out = self.work_dir / f"{_tag(requests, memit)}-{fingerprint(self.model)}"
        if (out / DELTA_FILE).exists():
            return load_delta(out).apply(self.model)
        checkpoint = out / "ft-checkpoint.safetensors"  # after every step: a long run resumes there
        with self.autocast():
            delta = finetune(self.model, self.tokenizer, list(requests), memit, checkpoint=checkpoint)
        delta.metadata.update({"memit": asdict(memit), "compute_dtype": self.compute_dtype})
        delta.save(out)
        checkpoint.unlink(missing_ok=True)
        return delta

    @contextmanager
    def edited(self, requests: Sequence[EditRequest], memit: MemitConfig | None = None) -> Iterator[EditDelta]:
        """Edit inside the block; on exit the edited weights are put back exactly as they were."""
        memit = memit or self.memit
        with restored(self.model, memit.edited_layers):
            yield self.edit(requests, memit)

    def evaluate(self, requests: Sequence[EditRequest], **kwargs: Any) -> dict[str, Any]:
        """CounterFact / zsRE metrics of the model as it is now (see :func:`memit_pl.stages.evaluate.evaluate_requests`).

        Without keyword arguments the result is kept in ``<work_dir>/evals/``, keyed by the exact weights
        (:func:`memit_pl.modeling.loading.fingerprint`), the requests, the eval config and the compute
        precision: evaluating the same model state again (a resumed sweep, the unedited model of several
        benchmark rows) reads it back instead of running the passes again."""
        from memit_pl import io
        from memit_pl.config import TrainerConfig
        from memit_pl.modeling.loading import fingerprint
        from memit_pl.stages.evaluate import evaluate_requests

        path = None
        if not kwargs:
            data = json.dumps({"model": fingerprint(self.model), "requests": [r.to_dict() for r in requests],
                               "eval": asdict(self.config.eval), "precision": self.config.trainer.precision},
                              sort_keys=True, default=str)
            path = self.work_dir / "evals" / f"{hashlib.sha256(data.encode()).hexdigest()[:16]}.json"
            if path.exists():
                log.info("evaluation of %d cases read back from %s", len(requests), path)
                return json.loads(path.read_text())
        kwargs.setdefault("trainer_cfg", TrainerConfig(enable_progress_bar=False, precision=self.config.trainer.precision))
        result = evaluate_requests(self.model, self.tokenizer, requests, self.config.eval, **kwargs)
        if path is not None:  # compact: the per-case records of 10,000 cases are tens of MB
            io.write_text(path, json.dumps(result, default=str))
        return result

    def edited_evaluation(self, requests: Sequence[EditRequest], store, memit: MemitConfig, tag: str,
                          eval_requests: Sequence[EditRequest] | None = None) -> dict[str, Any]:
        """Edit with ``requests`` from a z store, evaluate (on ``eval_requests``, default the edited ones),
        restore the weights."""
        with restored(self.model, memit.edited_layers):
            if memit.method == "ft":  # no z store: fine-tune (or re-apply the saved change)
                self._finetune(requests, memit)
            else:
                self.apply(requests, store, memit, out_dir=self.work_dir / tag)
            return self.evaluate(eval_requests if eval_requests is not None else requests)

    def predict(self, prompts: str | Sequence[str], k: int = 1) -> list[str] | list[list[str]]:
        """The ``k`` most likely next tokens after a prompt (a list per prompt for a list of prompts)."""
        from memit_pl.modeling.predict import top_predictions

        single = isinstance(prompts, str)
        with self.autocast():
            out = top_predictions(self.model, self.tokenizer, [prompts] if single else list(prompts), k=k)
        return out[0] if single else out

    def autocast(self):
        """The compute dtype, for passes of the model outside the stages (a prediction, a probe)."""
        from memit_pl.modeling.loading import input_device
        from memit_pl.stages import runtime

        return runtime.autocast(input_device(self.model), self.compute_dtype)

    def save_pretrained(self, path: str | Path) -> Path:
        """The (edited) model and its tokenizer as a Hugging Face directory (safetensors)."""
        path = Path(path)
        self.model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        return path


def z_store_name(model: nn.Module, layer: int) -> str:
    """The directory name of a model's z store for target layer ``layer`` (see :meth:`MEMIT.z_store_dir`)."""
    from memit_pl.modeling.loading import fingerprint

    return f"z-L{layer}-{fingerprint(model)}"


def _hub_name(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_name_or_path", None) or None


_LATER_KEYS = ("nullspace_energy",)


def _tag(requests: Sequence[EditRequest], memit: MemitConfig, prev_keys: dict[int, Tensor] | None = None) -> str:
    prev = {str(k): [int(v.shape[0]), float(v.double().sum())] for k, v in sorted((prev_keys or {}).items())}
    settings = asdict(memit)
    for name in _LATER_KEYS:  # keys added after runs were saved: at their default they leave the name as it was
        if settings.get(name) is None:
            settings.pop(name, None)
    data = json.dumps({"cases": [r.case_id for r in requests], "memit": settings, "prev": prev}, sort_keys=True)
    return "edit-" + hashlib.sha256(data.encode()).hexdigest()[:12]


@contextmanager
def restored(model: nn.Module, layers: Sequence[int]):
    """Put the given layers' edited weights back exactly as they were when the block ends."""
    from memit_pl.modeling.spec import get_spec

    spec = get_spec(model)
    saved = {layer: spec.out_weight(model, layer).detach().clone() for layer in layers}
    try:
        yield
    finally:
        with torch.no_grad():
            for layer, w in saved.items():
                spec.out_weight(model, layer).copy_(w)
