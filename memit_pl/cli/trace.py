"""``memit-pl trace``: causal tracing over true facts, and the MLP layers it suggests editing."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from memit_pl import io
from memit_pl.cli._common import load, make_parser, parse, save_config
from memit_pl.experiments.trace import (
    KINDS,
    ROWS,
    FactTrace,
    Tracer,
    embedding_std,
    load_facts,
    summarize,
    yaml_snippet,
)

log = logging.getLogger(__name__)

CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
LABELS = {"hidden": "single restored layer", "mlp": "MLP (window centre)", "attn": "Attn (window centre)"}


def _csv(value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise SystemExit(f"memit-pl trace: {flag}: unknown {bad}; expected a comma-separated subset of {allowed}")
    return items


def main(argv: list[str]) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--facts", required=True, help="edits file (rewrite prompt + target_true) or known_1000.json")
    parser.add_argument("--n", type=int, default=100, help="facts to trace (those the model predicts correctly)")
    parser.add_argument("--out", default="runs/trace", help="output directory")
    parser.add_argument("--samples", type=int, default=10, help="noise samples per restoration (paper: 10)")
    parser.add_argument("--noise", type=float, default=3.0, help="noise scale in units of the embeddings' std σ")
    parser.add_argument("--window", type=int, default=10, help="layers restored together for MLP/attn (paper: 10)")
    parser.add_argument("--k", type=int, default=5, help="number of consecutive layers to suggest")
    parser.add_argument("--kinds", default="hidden,mlp,attn", help="heatmaps to compute: hidden,mlp,attn")
    parser.add_argument("--sever", default="mlp,attn", help="severed comparisons at the last subject token")
    parser.add_argument("--batch_size", type=int, default=64, help="rows (restorations x samples) per forward")
    parser.add_argument("--examples", type=int, default=3, help="per-fact heatmaps to draw")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch (0: torch's default; 1 is faster on a busy CPU)")
    parser.add_argument("--time_limit", type=float, default=0.0,
                        help="minutes after which no new fact is started (0: no limit); the summary covers those done")
    cfg, secs = parse(parser, argv)
    kinds = _csv(cfg.kinds, KINDS, "--kinds")
    sever = _csv(cfg.sever, ("mlp", "attn"), "--sever")
    if cfg.n < 1 or cfg.samples < 1 or cfg.k < 1 or cfg.window < 1:
        raise SystemExit("memit-pl trace: --n, --samples, --k and --window must be >= 1")
    out = Path(cfg.out)
    if cfg.threads > 0:
        import torch

        torch.set_num_threads(cfg.threads)

    model, tok = load(secs["model"], padding_side="right")
    from memit_pl.modeling.loading import input_device
    from memit_pl.stages import runtime

    compute = runtime.resolve_compute_dtype(secs["model"].compute_dtype, input_device(model))
    facts = load_facts(cfg.facts, tokenizer=tok)
    sigma = embedding_std(model, tok, [f.subject for f in facts])
    tracer = Tracer(model, tok, cfg.noise * sigma, samples=cfg.samples, window=cfg.window,
                    batch_size=cfg.batch_size, seed=cfg.seed)
    log.info("σ = %.5f over %d subjects; noise std %.5f; %d layers", sigma, len(facts), tracer.noise_std, tracer.n_layers)
    traces: list[FactTrace] = []
    skipped, t0 = 0, time.time()
    for fact in facts:
        if len(traces) >= cfg.n:
            break
        if cfg.time_limit > 0 and time.time() - t0 > 60 * cfg.time_limit:
            log.warning("time limit of %.1f min reached after %d facts", cfg.time_limit, len(traces))
            break
        with runtime.autocast(input_device(model), compute):
            tr = tracer.trace_fact(fact, kinds=kinds, sever=sever)
        if tr is None:
            skipped += 1
            continue
        traces.append(tr)
        log.info("[%d/%d] %s -> %s: p %.3f, corrupted %.3f (%.0f s)", len(traces), cfg.n, fact.prompt,
                 fact.answer, tr.high, tr.low, time.time() - t0)
    if not traces:
        raise SystemExit(f"memit-pl trace: the model predicts none of the {len(facts)} facts correctly")
    summary = summarize(traces, k=cfg.k)
    summary.update(model=secs["model"].name, facts_file=str(cfg.facts), sigma=sigma, noise=cfg.noise,
                   noise_std=tracer.noise_std, samples=cfg.samples, window=cfg.window, k=cfg.k,
                   n_layers=tracer.n_layers, compute_dtype=compute, skipped_wrong=skipped, n_requested=cfg.n, seconds=round(time.time() - t0, 1))
    io.write_json(out / "trace.json", summary)
    io.write_json(out / "cases.json", [_case(t) for t in traces])
    save_config(out, "trace", secs, {k: v for k, v in vars(cfg).items() if k not in secs and k != "config"})
    pngs = plot_all(summary, traces[: cfg.examples], out)
    lines = [f"traced {len(traces)} facts ({skipped} skipped: top-1 not the answer), {cfg.samples} noise samples, "
             f"noise {cfg.noise}σ = {tracer.noise_std:.4f}"]
    if "suggested_layers" in summary:
        layers = summary["suggested_layers"]
        io.write_text(out / "suggested_layers.yaml", yaml_snippet(layers))
        gap = summary["gap_mlp"]["mean"]
        lines.append("layer  AIE  AIE(MLP severed)  gap")
        for i in range(tracer.n_layers):
            lines.append(f"{i:>5}  {summary['severed']['none']['mean'][i]:.4f}  {summary['severed']['mlp']['mean'][i]:.4f}"
                         f"  {gap[i]:+.4f}{'  <-' if i in layers else ''}")
        lines.append(f"suggested layers (largest plain - MLP-severed gap over {cfg.k} layers):")
        lines.append(yaml_snippet(layers).rstrip())
    lines += [f"wrote {out / 'trace.json'}"] + [f"wrote {p}" for p in pngs]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _case(t: FactTrace) -> dict:
    r = lambda x: [round(v, 5) for v in x.tolist()] if x.ndim == 1 else [r(v) for v in x]  # noqa: E731
    return {"case_id": t.fact.case_id, "subject": t.fact.subject, "prompt": t.fact.prompt, "answer": t.fact.answer,
            "tokens": t.tokens, "subject_range": list(t.subject), "high": t.high, "low": t.low,
            "scores": {k: r(v) for k, v in t.scores.items()}, "severed": {k: r(v) for k, v in t.severed.items()}}


def plot_all(summary: dict, examples: list[FactTrace], out: Path) -> list[Path]:
    """Averaged heatmaps (rows = token groups, columns = layers), the severed bar chart, examples."""
    io.pyplot()
    paths = []
    for kind, stats in summary["kinds"].items():
        paths.append(_heatmap(stats["mean"], list(ROWS), kind, summary, out / f"aie_{kind}.png"))
    if summary["severed"]:
        paths.append(_severed(summary, out / "severed.png"))
    for i, t in enumerate(examples):
        paths.append(_example(t, summary, out / f"example_{i}.png"))
    return paths


def _heatmap(mean, rows, kind, summary, path: Path) -> Path:
    import matplotlib.pyplot as plt
    import numpy as np

    data = np.array([[np.nan if v is None else v for v in row] for row in mean])
    fig, ax = plt.subplots(figsize=(7.5, 2.9), dpi=150)
    h = ax.pcolormesh(data, cmap=CMAPS[kind], vmin=min(0.0, np.nanmin(data)))
    ax.invert_yaxis()
    ax.set_yticks(np.arange(len(rows)) + 0.5, rows)
    n_layers = data.shape[1]
    step = 5 if n_layers > 12 else 1
    ax.set_xticks(np.arange(0, n_layers, step) + 0.5, range(0, n_layers, step))
    what = {"hidden": "hidden state", "mlp": f"MLP ({summary['window']}-layer window)",
            "attn": f"Attn ({summary['window']}-layer window)"}[kind]
    ax.set_title(f"{summary['model']}: average indirect effect of restoring {what} (n={summary['n_facts']})", fontsize=9)
    ax.set_xlabel(LABELS[kind] if kind == "hidden" else f"centre of {summary['window']} restored layers")
    cb = fig.colorbar(h)
    cb.set_label("AIE on p(answer)")
    fig.tight_layout()
    return _save(fig, path)


def _severed(summary: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt
    import numpy as np

    sev = summary["severed"]
    n_layers = len(sev["none"]["mean"])
    x = np.arange(n_layers)
    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=150)
    styles = [("none", "Effect of single state", "#7b5ea7"), ("attn", "Effect with Attn severed", "#d9534f"),
              ("mlp", "Effect with MLP severed", "#3c9a5f")]
    styles = [s for s in styles if s[0] in sev]
    width = 0.8 / len(styles)
    for j, (key, label, color) in enumerate(styles):
        mean = np.array(sev[key]["mean"], dtype=float)
        ci = np.array([0 if v is None else v for v in sev[key]["ci"]], dtype=float)
        ax.bar(x + (j - (len(styles) - 1) / 2) * width, mean, width, yerr=ci, label=label, color=color,
               error_kw={"elinewidth": 0.6, "capsize": 1.2})
    layers = summary.get("suggested_layers")
    if layers:
        ax.axvspan(layers[0] - 0.5, layers[-1] + 0.5, color="gold", alpha=0.25, lw=0,
                   label=f"suggested R = {layers[0]}..{layers[-1]}")
    ax.set_xticks(x[:: 5 if n_layers > 12 else 1])
    ax.set_xlabel("layer at which the single hidden state is restored (last subject token)")
    ax.set_ylabel("average indirect effect")
    ax.set_title(f"{summary['model']}: severing MLP or Attn at the last subject token "
                 f"(n={summary['n_facts']}, 95% CI)", fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return _save(fig, path)


def _example(t: FactTrace, summary: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    kinds = list(t.scores)
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.6 * len(kinds), 0.28 * len(t.tokens) + 1.4), dpi=150)
    axes = [axes] if len(kinds) == 1 else list(axes)
    labels = [repr(tok)[1:-1] + ("*" if t.subject[0] <= i < t.subject[1] else "") for i, tok in enumerate(t.tokens)]
    for ax, kind in zip(axes, kinds):
        scores = t.scores[kind].numpy()
        h = ax.pcolormesh(scores, cmap=CMAPS[kind], vmin=t.low)
        ax.invert_yaxis()
        ax.set_yticks([i + 0.5 for i in range(len(labels))], labels, fontsize=7)
        step = 5 if scores.shape[1] > 12 else 1
        ax.set_xticks([i + 0.5 for i in range(0, scores.shape[1], step)], range(0, scores.shape[1], step), fontsize=7)
        ax.set_xlabel(LABELS[kind], fontsize=8)
        cb = fig.colorbar(h, ax=ax)
        cb.ax.tick_params(labelsize=6)
        cb.ax.set_title(f"p({t.fact.answer})", fontsize=6)
    fig.suptitle(f"{t.fact.prompt} -> {t.fact.answer}  (clean p={t.high:.2f}, corrupted p={t.low:.2f})", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    return io.save_figure(fig, path, bbox_inches="tight")
