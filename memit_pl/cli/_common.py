"""Glue shared by the subcommands: the parser with every config section, and model loading."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memit_pl import io
from memit_pl.config import add_sections, sections, to_yaml


def make_parser(description: str):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(description=description, default_meta=False)
    add_sections(parser)
    return parser


def parse(parser, argv: list[str]) -> tuple[Any, dict[str, Any]]:
    cfg = parser.parse_args(argv)
    return cfg, sections(cfg)


def load(model_cfg, padding_side: str = "right", memit_cfg=None):
    """The model and tokenizer of the ``model`` section; with ``memit_cfg``, its layers are checked against
    the model (a one-line error, not a traceback deep in a stage)."""
    from memit_pl.modeling.loading import load_model

    model, tok = load_model(
        model_cfg.name,
        dtype=model_cfg.dtype,
        device=model_cfg.device,
        device_map=model_cfg.device_map,
        cache_dir=model_cfg.cache_dir,
        padding_side=padding_side,
    )
    if memit_cfg is not None:
        from memit_pl.modeling.spec import check_layers

        check_layers(model, memit_cfg.layers)
    return model, tok


def add_selection_arguments(parser) -> None:
    """``--limit``, ``--drop_conflicts`` and ``--drop_empty``: which records of the edits file a command uses."""
    parser.add_argument("--limit", type=int | None, default=None, help="use only the first N edits")
    parser.add_argument("--drop_conflicts", type=bool, default=False,
                        help="drop requests that conflict with an earlier one (same subject and prompt) instead of "
                             "failing, as the paper does before its scaling runs")
    parser.add_argument("--drop_empty", type=bool, default=False,
                        help="drop requests whose new object is empty instead of failing (two records of MEND's "
                             "zsRE training split)")


def given_values(cfg, memit) -> list[float] | None:
    """The grid of ``sweep``/``tune``: ``--values``, else ``--lambdas`` (MEMIT's λ: a one-line error for
    another method), else None."""
    from memit_pl.config import ConfigError

    if cfg.lambdas is not None and memit.method != "memit":
        raise ConfigError(f"--lambdas is MEMIT's λ; for memit.method {memit.method} give --values")
    given = cfg["values"]  # not cfg.values: the namespace's own values() method
    return given if given is not None else cfg.lambdas


def make_editor(secs: dict[str, Any], model, tok, work_dir: str | Path | None = None, z_dir: str | Path | None = None):
    """The :class:`memit_pl.MEMIT` of a command: the loaded model and every parsed config section."""
    from memit_pl.config import Config
    from memit_pl.editor import MEMIT

    return MEMIT(model, tok, Config(**secs), work_dir=work_dir, cache_dir=secs["model"].cache_dir, z_dir=z_dir)


def save_config(out_dir: str | Path, command: str, secs: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Write the resolved config of a run next to its outputs (``config.yaml``)."""
    path = Path(out_dir) / "config.yaml"
    io.write_text(path, to_yaml({"command": command, **secs, **(extra or {})}))
    return path
