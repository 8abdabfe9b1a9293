"""Evaluation reports: ``metrics.json``, ``cases.jsonl``, ``report.md`` (the paper's Table 2 layout and a
per-relation breakdown as its Figure 6) and PNG plots, from the results of ``evaluate_requests``."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from memit_pl import io
from memit_pl.metrics.functional import harmonic_mean, unchanged_share
from memit_pl.stages.evaluate import METRICS, SCALE

TABLE2 = [("S", "Score S"), ("ES", "ES"), ("EM", "EM"), ("PS", "PS"), ("PM", "PM"), ("NS", "NS"), ("NSu", "NSu"), ("NM", "NM"),
          ("GE", "GE"), ("RS", "RS")]
ACCURACY = [("acc_rewrite", "Efficacy"), ("acc_paraphrase", "Paraphrase"), ("acc_neighborhood", "Specificity")]


def aggregate(cases: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """Metrics of a set of per-case records: each the mean of the cases' values (× SCALE), S the
    harmonic mean of ES, PS and NS; ``None`` where no case has a value."""
    out: dict[str, float | None] = {}
    for m in METRICS:
        vals = [c[m] for c in cases if c.get(m) is not None]
        out[m] = sum(vals) / len(vals) * SCALE if vals else None
    rates = [out[k] for k in ("ES", "PS", "NS")]
    out["S"] = None if any(r is None for r in rates) else float(harmonic_mean(rates))
    return out


EASYEDIT = ("reliability", "generalization", "locality")
"""EasyEdit's metric names (Wang et al. 2024): teacher-forced argmax-token accuracy of the new object on
the rewrite prompts (Reliability) and the paraphrases (Generalization), and the share of the neighbourhood
prompts' argmax tokens that the edit left unchanged (Locality); × SCALE."""


def _case_mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def easyedit_metrics(cases: Sequence[Mapping[str, Any]],
                     unedited: Sequence[Mapping[str, Any]] | None = None) -> dict[str, float | None]:
    """EasyEdit's Reliability, Generalization and Locality from per-case records of the edited model; Locality
    needs the unedited model's records of the same cases (matched by case id; None without them). Each is
    the mean over cases of the case's mean over its prompts, as EasyEdit averages."""
    before = {c["case_id"]: c for c in unedited or ()}
    per: dict[str, list[float]] = {k: [] for k in EASYEDIT}
    for c in cases:
        for key, kind in (("reliability", "rewrite"), ("generalization", "paraphrase")):
            v = _case_mean([e["token_acc"] for e in c["prompts"][kind] if e.get("token_acc") is not None])
            if v is not None:
                per[key].append(v)
        b = before.get(c["case_id"])
        if b is not None:
            pairs = [(x["argmax"], y["argmax"]) for x, y in zip(b["prompts"]["neighborhood"], c["prompts"]["neighborhood"])
                     if x.get("argmax") and y.get("argmax")]
            v = _case_mean([unchanged_share(x, y) for x, y in pairs])
            if v is not None:
                per["locality"].append(v)
    return {k: (sum(v) / len(v) * SCALE if v else None) for k, v in per.items()}


def relation_breakdown(cases: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per ``relation_id`` (``"?"`` when unknown), the number of cases and :func:`aggregate`."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for c in cases:
        groups.setdefault(str(c.get("relation_id") or "?"), []).append(c)
    return {rel: {"n": len(cs), **aggregate(cs)} for rel, cs in sorted(groups.items())}


def _fmt(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def metrics_table(runs: Mapping[str, Mapping[str, Any]]) -> str:
    """The paper's Table 2 layout: Score, Efficacy (ES, EM), Generalization (PS, PM),
    Specificity (NS, NM), Fluency (GE), Consistency (RS); one row per run."""
    rows = [[label] + [_fmt(r["metrics"].get(k)) for k, _ in TABLE2] for label, r in runs.items()]
    return markdown_table(["Editor"] + [h for _, h in TABLE2], rows)


def is_zsre(result: Mapping[str, Any]) -> bool:
    """True when every case is a zsRE case (its neighbourhood has its own answer, so it skipped NS)."""
    skipped = result.get("skipped", {}).get("NS", {})
    return any("zsRE" in why for why in skipped) and sum(skipped.values()) == result["n_cases"]


def zsre_table(runs: Mapping[str, Mapping[str, Any]]) -> str:
    """The paper's Table 1 layout for zsRE: Score (harmonic mean), Efficacy, Paraphrase, Specificity
    (top-1 token accuracies) per run."""
    rows = []
    for label, r in runs.items():
        vals = [r["metrics"].get(k) for k, _ in ACCURACY]
        score = None if any(v is None for v in vals) or min(vals) <= 0 else float(harmonic_mean(vals))
        rows.append([label, _fmt(score)] + [_fmt(v) for v in vals])
    return markdown_table(["Editor", "Score"] + [h for _, h in ACCURACY], rows)


def headline_table(runs: Mapping[str, Mapping[str, Any]]) -> str:
    """The table of the data set's own metrics: the paper's Table 1 for zsRE, its Table 2 for CounterFact."""
    return zsre_table(runs) if all(is_zsre(r) for r in runs.values()) else metrics_table(runs)


def easyedit_table(runs: Mapping[str, Mapping[str, Any]]) -> str:
    """EasyEdit's Reliability, Generalization, Locality per run; Locality against the run labelled
    ``unedited`` (100 for that run itself), None without one."""
    base = runs.get("unedited")
    rows = []
    for label, r in runs.items():
        m = easyedit_metrics(r["cases"], base["cases"] if base is not None else None)
        rows.append([label] + [_fmt(m[k]) for k in EASYEDIT])
    return markdown_table(["Editor", "Reliability", "Generalization", "Locality"], rows)


def render_report(runs: Mapping[str, Mapping[str, Any]], meta: Mapping[str, Any]) -> str:
    """``report.md``: the Table 2 layout, zsRE accuracies, the per-relation breakdown, what was skipped."""
    labels = list(runs)
    n = next(iter(runs.values()))["n_cases"]
    out = [
        f"# Evaluation of {meta.get('model', 'the model')} on {meta.get('edits_file', 'the edits file')} ({n} cases)",
        "",
        "All numbers × 100 (as the paper's tables). Score S: harmonic mean of ES, PS, NS. ES/PS: P(new) > P(true) on "
        "the rewrite / paraphrase prompts; NS: P(true) > P(new) on neighbourhood prompts (P: per-token geometric "
        "mean probability, the reference's mean NLL); EM/PM: P(new) − P(true), NM: P(true) − P(new); GE: "
        "Generation Entropy (Eqn. 27); RS: Reference Score (TF-IDF cosine).",
        "",
        "## Table 2 layout",
        "",
        metrics_table(runs),
        "",
        "## EasyEdit's metrics",
        "",
        "Teacher-forced argmax-token accuracy of the new object on the rewrite prompts (Reliability) and the "
        "paraphrases (Generalization); Locality: the share of the neighbourhood prompts' argmax tokens the "
        "edit left unchanged (against the unedited run).",
        "",
        easyedit_table(runs),
        "",
        "## Top-1 token accuracy (zsRE metrics, the paper's Table 1 layout)",
        "",
        zsre_table(runs),
        "",
        "## Per relation (as the paper's Figure 6)",
        "",
    ]
    tables = {lab: relation_breakdown(r["cases"]) for lab, r in runs.items()}
    rels = sorted({rel for t in tables.values() for rel in t})
    cols = ["S", "ES", "PS", "NS"]
    rows = []
    for rel in rels:
        first = tables[labels[0]].get(rel, {"n": 0})
        cells = [rel, str(first["n"])]
        for k in cols:
            cells.append(" → ".join(_fmt(tables[lab].get(rel, {}).get(k)) for lab in labels))
        rows.append(cells)
    out.append(f"Cells read {' → '.join(labels)}." if len(labels) > 1 else "")
    out += ["", markdown_table(["relation", "n"] + cols, rows), ""]
    skipped = next(iter(runs.values()))["skipped"]
    if skipped:
        out += ["## Not evaluated", ""]
        for m, reasons in sorted(skipped.items()):
            out.append(f"- {m}: " + "; ".join(f"{c} case(s): {why}" for why, c in sorted(reasons.items())))
        out.append("")
    return "\n".join(out)


def plot_reports(runs: Mapping[str, Mapping[str, Any]], out_dir: str | Path) -> list[Path]:
    """``metrics.png`` (S, ES, PS, NS per run), ``relations.png`` (ES/PS/NS per relation and run) and
    ``margins.png`` (histogram of each case's rewrite-prompt P(new) − P(true))."""
    plt = io.pyplot()
    out_dir = Path(out_dir)
    labels = list(runs)
    width = 0.8 / len(labels)
    paths = []

    keys = ["S", "ES", "PS", "NS", "acc_rewrite", "acc_paraphrase", "acc_neighborhood"]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for j, lab in enumerate(labels):
        vals = [runs[lab]["metrics"].get(k) for k in keys]
        ax.bar([i + j * width for i in range(len(keys))], [v if v is not None else 0 for v in vals], width, label=lab)
    ax.set_xticks([i + width * (len(labels) - 1) / 2 for i in range(len(keys))], keys)
    ax.set_ylim(0, 100)
    ax.set_ylabel("× 100")
    ax.legend()
    ax.set_title("Editing metrics")
    paths.append(_save(fig, out_dir / "metrics.png"))

    tables = {lab: relation_breakdown(runs[lab]["cases"]) for lab in labels}
    rels = sorted({rel for t in tables.values() for rel in t})
    fig, axes = plt.subplots(3, 1, figsize=(max(6, 0.45 * len(rels) + 2), 8), sharex=True)
    for ax, k in zip(axes, ("ES", "PS", "NS")):
        for j, lab in enumerate(labels):
            vals = [tables[lab].get(rel, {}).get(k) for rel in rels]
            ax.bar([i + j * width for i in range(len(rels))], [v if v is not None else 0 for v in vals], width, label=lab)
        ax.set_ylabel(k)
        ax.set_ylim(0, 100)
    axes[-1].set_xticks([i + width * (len(labels) - 1) / 2 for i in range(len(rels))], rels, rotation=60)
    axes[0].legend()
    axes[0].set_title("Per relation")
    paths.append(_save(fig, out_dir / "relations.png"))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for lab in labels:
        vals = [c["EM"] for c in runs[lab]["cases"] if c.get("EM") is not None]
        if vals:
            ax.hist(vals, bins=40, range=(-1, 1), alpha=0.6, label=lab)
    ax.set_xlabel("P(new) − P(true) on the rewrite prompt")
    ax.set_ylabel("cases")
    ax.legend()
    paths.append(_save(fig, out_dir / "margins.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    return io.save_figure(fig, path, dpi=110)


def write_reports(out_dir: str | Path, runs: Mapping[str, Mapping[str, Any]], meta: Mapping[str, Any]) -> list[Path]:
    """Write every report of one or more evaluations (``runs``: label -> ``evaluate_requests`` result)."""
    out_dir = Path(out_dir)
    data = {
        **meta,
        "n_cases": next(iter(runs.values()))["n_cases"],
        "scale": SCALE,
        "metrics": {lab: r["metrics"] for lab, r in runs.items()},
        "easyedit": {lab: easyedit_metrics(r["cases"], runs["unedited"]["cases"] if "unedited" in runs else None)
                     for lab, r in runs.items()},
        "counts": {lab: r["counts"] for lab, r in runs.items()},
        "skipped": {lab: r["skipped"] for lab, r in runs.items()},
        "seconds": {lab: r["seconds"] for lab, r in runs.items()},
        "relations": {lab: relation_breakdown(r["cases"]) for lab, r in runs.items()},
    }
    io.write_json(out_dir / "metrics.json", data)
    lines = []
    for i in range(len(next(iter(runs.values()))["cases"])):
        first = next(iter(runs.values()))["cases"][i]
        lines.append(json.dumps({"case_id": first["case_id"], **{lab: r["cases"][i] for lab, r in runs.items()}}))
    io.write_text(out_dir / "cases.jsonl", "\n".join(lines) + "\n")
    io.write_text(out_dir / "report.md", render_report(runs, meta))
    return [out_dir / "metrics.json", out_dir / "cases.jsonl", out_dir / "report.md", *plot_reports(runs, out_dir)]
