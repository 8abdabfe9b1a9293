"""``memit-pl revert``: remove a saved edit delta from an edited model and save the result."""

from __future__ import annotations

from memit_pl.cli.delta import change


def main(argv: list[str]) -> int:
    return change(argv, -1.0, __doc__)
