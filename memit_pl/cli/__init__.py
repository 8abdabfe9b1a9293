"""The ``memit-pl`` console script (:func:`main`) and one module per subcommand."""

from memit_pl.cli.main import COMMANDS, main, quiet_lightning

__all__ = ["COMMANDS", "main", "quiet_lightning"]
