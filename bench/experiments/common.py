"""Shared set-up of the frozen one-off experiments that re-measure SmolLM2 on counterfact_known_dev.json
with a given z store (``ge_spill``, ``cov_samples``, ``upper_windows``, ``nullspace`` on `memit-pl tune`'s
seed-0 split; ``lam584``, ``nsu584``, ``ns_loss`` on all cases): arguments, the model, the cases and a
:class:`memit_pl.editor.MEMIT` editor that reuses the z store, with the tune runs' evaluation settings
(GE on, 2 prompts per case, 50 tokens). Formerly ``bench/tune_split.py``; the experiments import it as ``bench.experiments.common``.

Outputs default to ``runs/<name>/`` (git-ignored), so that re-running an experiment never overwrites the
frozen result kept next to its script.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from memit_pl.config import Config, EvalConfig, MemitConfig, TrainerConfig  # noqa: E402
from memit_pl.data.edits import EditRequest, load_edits  # noqa: E402
from memit_pl.editor import MEMIT  # noqa: E402
from memit_pl.experiments.tune import split  # noqa: E402
from memit_pl.modeling.loading import load_model  # noqa: E402


def command(script: str) -> str:
    """``python -m bench.experiments.<folder>.<script> ARGS`` for the script file ``script`` (its ``__file__``)."""
    module = ".".join(Path(script).resolve().relative_to(ROOT).with_suffix("").parts)
    return " ".join(["python", "-m", module, *(shlex.quote(a) for a in sys.argv[1:])])


def parser(doc: str, name: str) -> argparse.ArgumentParser:
    """--z_dir, --edits, --config, --work (runs/<name>) and --out (runs/<name>/<name>.json)."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--z_dir", required=True, help="z store to reuse (e.g. the 584-edit `edit` run's z/)")
    ap.add_argument("--edits", default=str(ROOT.parent / "shared/data/counterfact_known_dev.json"))
    ap.add_argument("--config", default=str(ROOT / "configs/smollm2-135m.yaml"))
    ap.add_argument("--work", default=f"runs/{name}")
    ap.add_argument("--out", default=f"runs/{name}/{name}.json")
    return ap


def load(args: argparse.Namespace, n_samples: int | None = None) -> tuple[MemitConfig, MEMIT, list[EditRequest]]:
    """(the config's memit section, an editor, all cases of ``--edits``); ``n_samples`` overrides the
    config's statistics sample count. The editor has the config's model, memit and stats sections, the
    tune runs' evaluation settings and no progress bar; its z store is ``--z_dir`` for that store's own
    target layer, else ``--work``/z-L<L>."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cfg = Config.from_file(args.config)
    stats = cfg.stats if n_samples is None else replace(cfg.stats, n_samples=n_samples)
    cfg = replace(cfg, stats=stats, trainer=TrainerConfig(enable_progress_bar=False),
                  eval=EvalConfig(batch_size=256, generation_length=50, max_generation_prompts=2))
    model, tok = load_model(cfg.model.name, device="cpu")
    requests = load_edits(args.edits, tokenizer=tok)
    editor = MEMIT(model, tok, cfg, work_dir=Path(args.work), z_dir=args.z_dir)
    return cfg.memit, editor, requests


def without_generation(editor: MEMIT) -> None:
    """Turn Generation Entropy off in ``editor``'s evaluations (the scripts that do not report it)."""
    editor.config = replace(editor.config, eval=EvalConfig(batch_size=256, generation_length=0,
                                                           max_generation_prompts=0))


def setup(args: argparse.Namespace, n_samples: int | None = None) -> tuple[MemitConfig, MEMIT, list[EditRequest], list[EditRequest]]:
    """(the config's memit section, an editor, tuning half, held-back half): :func:`load`, then
    `memit-pl tune`'s seed-0 split."""
    memit, editor, requests = load(args, n_samples)
    tune_part, held = split(requests, 0.5, 0)
    return memit, editor, tune_part, held


def save(path: str | Path, result: dict) -> None:
    """Write ``result`` as JSON to ``path`` atomically (its folder created)."""
    from memit_pl.io import write_json

    write_json(path, result)
