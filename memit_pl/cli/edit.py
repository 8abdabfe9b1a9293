"""``memit-pl edit``: statistics -> z -> apply -> efficacy check, in one run."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from memit_pl.cli._common import add_selection_arguments, load, make_editor, make_parser, parse, save_config
from memit_pl.data.edits import EditRequest, load_edits


def probe_prompts(requests: Sequence[EditRequest]) -> list[tuple[str, str, str]]:
    """(rewrite prompt, first paraphrase, first neighbourhood prompt) per request ("" when absent)."""
    return [(r.text, r.paraphrases[0] if r.paraphrases else "", r.neighborhood[0] if r.neighborhood else "")
            for r in requests]


TABLE_ROWS = 20
"""Edits shown in the before -> after table (its top-1 predictions on 10,000 edits' prompts would take an hour
on a CPU; ``top1_new_before``/``after`` in summary.json count every edit)."""


def predictions(model, tok, requests: Sequence[EditRequest]) -> list[list[str]]:
    """Top-1 next token for each probe prompt of each request."""
    from memit_pl.modeling.predict import top_predictions

    flat = [p for trio in probe_prompts(requests) for p in trio if p]
    preds = dict(zip(flat, (p[0] for p in top_predictions(model, tok, flat, k=1))))
    return [[preds.get(p, "") if p else "" for p in trio] for trio in probe_prompts(requests)]


def table(requests: Sequence[EditRequest], before: list[list[str]], after: list[list[str]]) -> str:
    """A before -> after table of the top prediction on the rewrite, paraphrase and unrelated prompts."""
    head = f"{'rewrite prompt':<48} {'new':<11} {'rewrite':<24} {'paraphrase':<24} {'unrelated':<24}"
    lines = [head, "-" * len(head)]
    for r, b, a in zip(requests, before, after):
        cells = [f"{x[:10]} -> {y[:10]}" if (x or y) else "" for x, y in zip(b, a)]
        lines.append(f"{r.text[:48]:<48} {r.target_new[:11]:<11} {cells[0]:<24} {cells[1]:<24} {cells[2]:<24}")
    return "\n".join(lines)


def run(cfg, secs, command: str) -> int:
    from memit_pl.stages.pipeline import run_edit

    requests = load_edits(cfg.edits, limit=cfg.limit, drop_conflicting=cfg.drop_conflicts,
                          drop_empty=cfg.drop_empty)  # bad input fails here
    model, tok = load(secs["model"], memit_cfg=secs["memit"])
    editor = make_editor(secs, model, tok, work_dir=cfg.out)  # run_edit / edit_in_rounds check the requests
    out = Path(cfg.out)
    extra = {"edits": str(cfg.edits), "limit": cfg.limit, "previous": cfg.previous}
    path = save_config(out, command, secs, extra)
    if cfg.round_size:
        return run_rounds(cfg, secs, editor, requests, out)
    shown = requests[:TABLE_ROWS]  # the table is for reading; the efficacy check below covers every edit
    before = predictions(model, tok, shown)
    summary = run_edit(editor, requests, out, previous=cfg.previous, save_model=cfg.save_model,
                       config_dump={"path": str(path), **extra})
    after = predictions(model, tok, shown)
    names = {"stats_s": "statistics", "z_s": "z", "apply_s": "apply", "ft_s": "fine-tuning", "save_s": "save"}
    stages = " s, ".join(f"{names[k]} {v:.1f}" for k, v in summary["timings"].items() if k in names)
    peaks = ", ".join(f"{names[k + '_s']} {v / 1024:.1f}" for k, v in summary.get("peak_rss_mb", {}).items()
                      if k + "_s" in names)
    more = f"\n(the first {len(shown)} of {len(requests)} edits)" if len(shown) < len(requests) else ""
    sys.stdout.write(
        table(shown, before, after) + more
        + f"\n\n{len(requests)} edits in one batch, layers {summary['layers']}: new object is the top-1 "
        f"prediction for {100 * summary['top1_new_before']:.0f}% -> {100 * summary['top1_new_after']:.0f}% "
        f"of the rewrite prompts\nstages: {stages} s; peak resident memory: {peaks} GB; outputs in {out}\n"
    )
    return 0


def run_rounds(cfg, secs, editor, requests: Sequence[EditRequest], out: Path) -> int:
    """Lifelong editing: rounds of ``--round_size`` on the same model, all edits so far evaluated every
    ``--evaluate_every`` rounds; ``rounds.json`` (updated after each evaluation), ``rounds.md``, ``rounds.png``."""
    from memit_pl import io
    from memit_pl.experiments.sweep import COLUMNS, EASYEDIT_COLUMNS, markdown, plot_rows

    method = secs["memit"].method
    rows: list[dict] = []
    meta = {"model": secs["model"].name, "edits_file": str(cfg.edits), "method": method, "round_size": cfg.round_size,
            "layers": secs["memit"].layers, "compute_dtype": editor.compute_dtype,
            "keep_previous_keys": cfg.keep_previous_keys}

    def save(r: dict) -> None:
        rows.append({"method": method, **r})
        io.write_json(out / "rounds.json", {**meta, "rows": rows})

    first = editor.edit_in_rounds(requests, cfg.round_size, evaluate_every=cfg.evaluate_every,
                                  keep_previous_keys=cfg.keep_previous_keys, on_row=save)
    rows.insert(0, {"method": method, **first[0]})
    io.write_json(out / "rounds.json", {**meta, "rows": rows})
    keys = ("round", "edits_so_far", *COLUMNS, *EASYEDIT_COLUMNS, "seconds")
    io.write_text(out / "rounds.md", markdown(rows, keys) + "\n")
    plot_rows(rows, "edits_so_far", out / "rounds.png", f"{secs['model'].name}: {method} in rounds of {cfg.round_size}",
              log_x=False)
    if cfg.save_model:
        editor.save_pretrained(out / "model")
    sys.stdout.write((out / "rounds.md").read_text())
    return 0


def add_arguments(parser, out_default: str | None = None) -> None:
    parser.add_argument("--edits", required=out_default is None, default=None, help="edits file (CounterFact JSON, zsRE JSON or JSONL)")
    parser.add_argument("--out", required=out_default is None, default=out_default, help="run directory")
    add_selection_arguments(parser)
    parser.add_argument("--previous", type=list[str], default=[], help="earlier run directories whose edits to keep")
    parser.add_argument("--save_model", type=bool, default=True, help="write the edited model with save_pretrained")
    parser.add_argument("--round_size", type=int | None, default=None,
                        help="edit in rounds of this many on the same model (lifelong editing), evaluating all edits so far")
    parser.add_argument("--evaluate_every", type=int, default=1, help="with --round_size: evaluate every K rounds (and after the last)")
    parser.add_argument("--keep_previous_keys", type=bool, default=True,
                        help="with --round_size: earlier rounds' keys join each round's preserved term; false edits "
                             "each round against the statistics alone (MEMIT in sequence as AlphaEdit's paper runs it)")


def main(argv: list[str]) -> int:
    parser = make_parser(__doc__)
    add_arguments(parser)
    cfg, secs = parse(parser, argv)
    return run(cfg, secs, "edit")
