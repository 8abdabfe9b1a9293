"""``memit-pl spread``: does a change written at layer l reach the target layer unchanged (MEMIT's
spreading assumption), for each layer of each candidate window?"""

from __future__ import annotations

import sys
from pathlib import Path

from memit_pl import io
from memit_pl.cli._common import load, make_parser, parse, save_config
from memit_pl.data.edits import load_edits, validate
from memit_pl.modeling.spec import check_layers


def main(argv: list[str]) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--edits", required=True, help="edits file: its rewrite prompts and subjects are used")
    parser.add_argument("--out", required=True, help="output directory (spread.json, spread.md)")
    parser.add_argument("--n", type=int, default=20, help="prompts (the first n edits)")
    parser.add_argument("--windows", type=list[list[int]] | None, default=None,
                        help="layer windows to check (default: the config's memit.layers)")
    parser.add_argument("--fraction", type=float | None, default=None,
                        help="‖r‖ / ‖h^L‖ (default: clamp_norm_factor / window size, the largest share one layer gets)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random changes r")
    cfg, secs = parse(parser, argv)
    from memit_pl.experiments.spread import spread_errors

    if cfg.n < 1:
        raise SystemExit("memit-pl spread: --n must be >= 1")
    requests = load_edits(cfg.edits, limit=cfg.n)
    model, tok = load(secs["model"])
    validate(requests, tok)
    memit = secs["memit"]
    windows = cfg.windows or [list(memit.layers)]
    for window in windows:
        check_layers(model, window, "--windows" if cfg.windows else "memit.layers")
    results = []
    for window in windows:
        if not window:
            raise SystemExit("memit-pl spread: --windows: an empty window")
        fraction = cfg.fraction if cfg.fraction is not None else memit.clamp_norm_factor / len(window)
        results.append({"window": list(window), **spread_errors(model, tok, requests, max(window), sorted(window),
                                                                 fraction, cfg.seed)})
    out = Path(cfg.out)
    io.write_json(out / "spread.json", {"model": secs["model"].name, "edits": str(cfg.edits), "windows": results,
                                        "command": "memit-pl spread " + " ".join(argv)})
    save_config(out, "spread", secs, {"edits": str(cfg.edits), "windows": windows, "n": cfg.n})
    lines = ["| window | L | ‖r‖/‖h^L‖ | layer l | ‖h^l‖ | ‖Δh^L − r‖/‖r‖ | ‖Δh^L‖/‖r‖ | cos(Δh^L, r) |",
             "|---|---|---|---|---|---|---|---|"]
    for res in results:
        w = f"{res['window'][0]}–{res['window'][-1]}"
        for layer, v in res["layers"].items():
            lines.append(f"| {w} | {res['target_layer']} | {res['fraction']:.3g} | {layer} | {v['h_norm']:.1f} | "
                         f"{v['rel_error']:.2f} | {v['gain']:.2f} | {v['cos']:.2f} |")
    lines.append("")
    lines.append("0 error, gain 1 and cos 1: the stream carries a change at layer l to L unchanged, as MEMIT's "
                 "spreading assumes; errors far above 1 mean the window's lower layers cannot be edited this way.")
    io.write_text(out / "spread.md", "\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + f"\nwrote {out / 'spread.json'}\n")
    return 0
