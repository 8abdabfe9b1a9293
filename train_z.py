#!/usr/bin/env python
"""Optimise MEMIT's target vectors z for all edits at once: `python train_z.py --config configs/X.yaml --edits F --out DIR`.

The same as `memit-pl z`; see `--help`.
"""

from memit_pl.cli.main import main

if __name__ == "__main__":
    import sys

    raise SystemExit(main(["z", *sys.argv[1:]]))
