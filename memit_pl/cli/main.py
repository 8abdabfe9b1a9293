"""The ``memit-pl`` console script: one subcommand per stage, each with its own YAML-aware parser."""

from __future__ import annotations

import importlib
import logging
import sys

from memit_pl.data.edits import EditFileError

# name -> (module with ``main(argv)``, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("memit_pl.cli.demo", "edit the demo facts on the default model and show before/after"),
    "predict": ("memit_pl.cli.predict", "top next-token predictions of a model for an edits file's prompts"),
    "stats": ("memit_pl.cli.stats", "compute (or reuse) the key second-moment statistics"),
    "z": ("memit_pl.cli.z", "optimise the target vectors z for all edits (train_z.py)"),
    "apply": ("memit_pl.cli.apply", "apply the closed-form update from a z store (apply_edits.py)"),
    "edit": ("memit_pl.cli.edit", "statistics -> z -> apply -> efficacy check, in one run"),
    "apply-delta": ("memit_pl.cli.delta", "apply a saved edit delta to a model"),
    "revert": ("memit_pl.cli.revert", "remove a saved edit delta from a model"),
    "evaluate": ("memit_pl.cli.evaluate", "CounterFact / zsRE metrics before and after an edit"),
    "sweep": ("memit_pl.cli.sweep", "the scaling experiment: metrics against the number of edits"),
    "trace": ("memit_pl.cli.trace", "causal tracing: find the critical MLP layers"),
    "tune": ("memit_pl.cli.tune", "choose λ and the edited layers by measurement"),
    "spread": ("memit_pl.cli.spread", "does a change at each edited layer reach the target layer unchanged?"),
}


def _usage() -> str:
    lines = ["usage: memit-pl COMMAND [--config FILE] [options]", "", "commands:"]
    lines += [f"  {name:<12} {desc}" for name, (_, desc) in COMMANDS.items()]
    lines += ["", "`memit-pl COMMAND --help` lists a command's options."]
    return "\n".join(lines)


_CHATTER = ("GPU available", "TPU available", "HPU available", "💡 Tip", "You are using a CUDA device",
            "Using bfloat16 Automatic Mixed Precision", "Using 16bit Automatic Mixed Precision")


def quiet_lightning() -> None:
    """Lightning logs through its own handler: stop its records printing twice and drop its start-up chatter."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).propagate = False
    rz = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    rz.addFilter(lambda record: not str(record.getMessage()).startswith(_CHATTER))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(_usage() + "\n")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        sys.stderr.write(f"memit-pl: unknown command {name!r}\n\n{_usage()}\n")
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    quiet_lightning()
    module = importlib.import_module(COMMANDS[name][0])
    from memit_pl.config import ConfigError  # imports torch: not needed for --help

    try:
        return int(module.main(rest) or 0)
    except (EditFileError, FileNotFoundError, ConfigError, ImportError) as exc:  # bad input: one line, no traceback
        if isinstance(exc, ImportError) and "pip install" not in str(exc):
            raise  # a broken installation, not a missing optional extra: keep the traceback
        msg = " ".join(str(exc).split()) or type(exc).__name__
        sys.stderr.write(f"memit-pl {name}: error: {msg}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
