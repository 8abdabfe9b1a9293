#!/usr/bin/env python
"""Apply the ascending-layer MEMIT update from a z store: `python apply_edits.py --config configs/X.yaml --edits F --z DIR --out DIR`.

The same as `memit-pl apply`; see `--help`.
"""

from memit_pl.cli.main import main

if __name__ == "__main__":
    import sys

    raise SystemExit(main(["apply", *sys.argv[1:]]))
