"""memit-pl: mass-edit the factual memory of a causal language model with MEMIT (Meng et al., ICLR 2023).

>>> from memit_pl import MEMIT, EditRequest
>>> editor = MEMIT.from_pretrained("smollm2-135m")                      # doctest: +SKIP
>>> delta = editor.edit([EditRequest.of("{} plays the sport of", "Michael Jordan", "baseball")])  # doctest: +SKIP

Heavy modules (torch, transformers, Lightning) load on first use of a name, not on ``import memit_pl``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_EXPORTS = {
    "MEMIT": "memit_pl.editor",
    "Solver": "memit_pl.editor",
    "EditDelta": "memit_pl.delta",
    "apply_delta": "memit_pl.delta",
    "load_delta": "memit_pl.delta",
    "EditRequest": "memit_pl.data.edits",
    "EditFileError": "memit_pl.data.edits",
    "load_edits": "memit_pl.data.edits",
    "Config": "memit_pl.config",
    "ConfigError": "memit_pl.config",
    "MemitConfig": "memit_pl.config",
    "ModelConfig": "memit_pl.config",
    "StatsConfig": "memit_pl.config",
    "EvalConfig": "memit_pl.config",
    "TrainerConfig": "memit_pl.config",
    "load_model": "memit_pl.modeling.loading",
}

__all__ = [
    "Config",
    "ConfigError",
    "EditDelta",
    "EditFileError",
    "EditRequest",
    "EvalConfig",
    "MEMIT",
    "MemitConfig",
    "ModelConfig",
    "Solver",
    "StatsConfig",
    "TrainerConfig",
    "apply_delta",
    "load_delta",
    "load_edits",
    "load_model",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from memit_pl.config import (
        Config,
        ConfigError,
        EvalConfig,
        MemitConfig,
        ModelConfig,
        StatsConfig,
        TrainerConfig,
    )
    from memit_pl.data.edits import EditFileError, EditRequest, load_edits
    from memit_pl.delta import EditDelta, apply_delta, load_delta
    from memit_pl.editor import MEMIT, Solver
    from memit_pl.modeling.loading import load_model


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'memit_pl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
