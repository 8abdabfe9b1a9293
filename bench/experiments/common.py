"""Shared set-up of the benchmarks that re-measure SmolLM2 on counterfact_known_dev.json with a given z
store (``ge_spill.py``, ``cov_samples.py``, ``upper_windows.py`` on `memit-pl tune`'s seed-0 split,
``lam584.py`` on all cases): arguments, the model, the cases and an Editor that reuses the z store, with
the tune runs' evaluation settings (GE on, 2 prompts per case, 50 tokens)."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memit_pl.config import EvalConfig, MemitConfig, StatsConfig, TrainerConfig  # noqa: E402
from memit_pl.edits import EditRequest, load_edits  # noqa: E402
from memit_pl.models import load_model  # noqa: E402
from memit_pl.sweep import Editor  # noqa: E402
from memit_pl.tune import split  # noqa: E402


def parser(doc: str, name: str) -> argparse.ArgumentParser:
    """--z_dir, --edits, --config, --work and --out (bench/results/<name>.json)."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--z_dir", required=True, help="z store to reuse (e.g. the 584-edit `edit` run's z/)")
    ap.add_argument("--edits", default=str(ROOT.parent / "shared/data/counterfact_known_dev.json"))
    ap.add_argument("--config", default=str(ROOT / "configs/smollm2-135m.yaml"))
    ap.add_argument("--work", default=f"runs/{name}")
    ap.add_argument("--out", default=str(ROOT / f"bench/results/{name}.json"))
    return ap


def load(args: argparse.Namespace, n_samples: int | None = None) -> tuple[MemitConfig, Editor, list[EditRequest]]:
    """(the config's memit section, an Editor, all cases of ``--edits``); ``n_samples`` overrides the
    config's statistics sample count."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    c = yaml.safe_load(Path(args.config).read_text())
    stats = StatsConfig(**c["stats"])
    if n_samples is not None:
        stats = replace(stats, n_samples=n_samples)
    model, tok = load_model(c["model"]["name"], device="cpu")
    requests = load_edits(args.edits, tokenizer=tok)
    editor = Editor(model, tok, stats, Path(args.work), trainer=TrainerConfig(enable_progress_bar=False),
                    eval_cfg=EvalConfig(batch_size=256, generation_length=50, max_generation_prompts=2),
                    z_dir=args.z_dir)
    return MemitConfig(**c["memit"]), editor, requests


def setup(args: argparse.Namespace, n_samples: int | None = None) -> tuple[MemitConfig, Editor, list[EditRequest], list[EditRequest]]:
    """(the config's memit section, an Editor, tuning half, held-back half): :func:`load`, then
    `memit-pl tune`'s seed-0 split."""
    memit, editor, requests = load(args, n_samples)
    tune_part, held = split(requests, 0.5, 0)
    return memit, editor, tune_part, held
