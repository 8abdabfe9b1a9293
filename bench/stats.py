"""Benchmark of the statistics stage: one pass for all layers (ours) against the reference's approach.

The reference (kmeng01/rome ``layer_stats``, used by MEMIT) makes one corpus pass per layer, each
stopped right after that layer (``Trace(..., stop=True)``), and adds ``feats.T @ feats`` of the
non-padding keys to a running float32 sum. Both methods read the same chunks of WikiText-2
(validation split) here, and their matrices are compared. Runs are interleaved; medians reported.

    .venv/bin/python -m bench.stats --n-chunks 256

Writes bench/results/stats.json (the schema of bench/record.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import record  # noqa: E402
from memit_pl.config import StatsConfig, TrainerConfig  # noqa: E402
from memit_pl.data.corpus import CorpusDataModule  # noqa: E402
from memit_pl.modeling import hooks  # noqa: E402
from memit_pl.modeling.loading import load_model  # noqa: E402
from memit_pl.modeling.spec import get_spec  # noqa: E402
from memit_pl.stages import runtime  # noqa: E402
from memit_pl.stages.stats import layer_covariances  # noqa: E402


def reference_stats(model, batches, layers, dtype=torch.float32) -> dict[int, torch.Tensor]:
    """The reference's approach: one pass per layer over the same batches, each stopped after its layer."""
    spec = get_spec(model)
    out = {}
    for layer in layers:
        name = spec.name("mlp_out", layer)
        mom2, count = None, 0
        for batch in batches:
            with torch.no_grad(), hooks.trace(model, [name], inputs=True, outputs=False, stop=True) as tr:
                hooks.forward(model, batch["input_ids"], batch["attention_mask"])
            feats = tr[name].input[batch["attention_mask"].bool()].to(dtype)  # flatten_masked_batch
            if mom2 is None:
                mom2 = feats.new_zeros(feats.shape[1], feats.shape[1])
            mom2 += feats.t().mm(feats)
            count += feats.shape[0]
        out[layer] = mom2 / count
    return out


def ours_stats(model, tok, layers, cfg: StatsConfig, compute: str = "float32") -> dict[int, torch.Tensor]:
    """The package's stage, from the corpus file to the cache files (a fresh cache each time), its passes in
    the ``compute`` dtype (Σ k kᵀ is accumulated in ``cfg.dtype`` either way)."""
    precision = None if compute == "float32" else runtime.lightning_precision(compute)
    with tempfile.TemporaryDirectory() as d:
        trainer = TrainerConfig(accelerator="cpu", devices=1, enable_progress_bar=False, precision=precision)
        return layer_covariances(model, tok, layers, cfg, cache_dir=d, trainer=trainer)


def timed(fn, *args):
    t = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - t, result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data",
        type=Path,
        default=ROOT.parent / "shared" / "data" / "wikitext-2-raw",
        help="folder with wiki.valid.raw (default: ../shared/data/wikitext-2-raw from the repo root)",
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", type=int, nargs="+", default=[3, 4, 5, 6, 7])
    p.add_argument("--n-chunks", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compute", default="auto", help="compute dtype of a third run of ours (auto, bfloat16, float32)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "stats.json")
    args = p.parse_args(argv)
    record.preflight("bench.stats", args, argv)
    compute = runtime.resolve_compute_dtype(args.compute, "cpu")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    corpus = args.data / "wiki.valid.raw"
    if not corpus.exists():
        p.error(f"{corpus} not found (--data)")
    model, tok = load_model(args.model, device="cpu")
    cfg = StatsConfig(
        corpus=str(corpus),
        n_samples=args.n_chunks,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        dtype="float32",
    )
    batches = list(
        CorpusDataModule(
            tok, cfg.corpus, cfg.n_samples, cfg.seq_len, cfg.batch_size, cfg.seed
        ).predict_dataloader()
    )  # the very chunks our stage reads, for the reference loop
    tokens = int(sum(int(b["attention_mask"].sum()) for b in batches))

    warm = StatsConfig(**{**cfg.__dict__, "n_samples": args.batch_size})
    ours_stats(model, tok, args.layers, warm)
    ours_stats(model, tok, args.layers, warm, compute)
    reference_stats(model, batches[:1], args.layers)

    ours_t, base_t, comp_t = [], [], []
    for r in range(args.repeats):
        order = ("ours", "compute", "base") if r % 2 == 0 else ("base", "compute", "ours")
        for which in order:
            if which == "ours":
                t, ours = timed(ours_stats, model, tok, args.layers, cfg)
                ours_t.append(t)
            elif which == "compute":
                t, comp = timed(ours_stats, model, tok, args.layers, cfg, compute)
                comp_t.append(t)
            else:
                t, base = timed(reference_stats, model, batches, args.layers)
                base_t.append(t)
            print(f"repeat {r}: {which} {t:.1f}s", file=sys.stderr, flush=True)

    rel = max(
        float((ours[layer] - base[layer]).abs().max() / base[layer].abs().max()) for layer in args.layers
    )
    ours_s, base_s = statistics.median(ours_t), statistics.median(base_t)
    comp_s = statistics.median(comp_t)
    rel_comp = max(float((comp[layer] - ours[layer]).norm() / ours[layer].norm()) for layer in args.layers)
    result = {
        "fp32_s": round(ours_s, 2),
        "compute_s": round(comp_s, 2),
        "compute_runs_s": [round(t, 2) for t in comp_t],
        "ratio_compute_vs_fp32": round(ours_s / comp_s, 2),
        "max_rel_cov_diff_compute_vs_fp32": rel_comp,
        "ours_s": round(ours_s, 2),
        "baseline_s": round(base_s, 2),
        "ratio": round(base_s / ours_s, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "ours_tokens_per_s": round(tokens / ours_s, 1),
        "baseline_tokens_per_s": round(tokens / base_s, 1),
        "ours_runs_s": [round(t, 2) for t in ours_t],
        "baseline_runs_s": [round(t, 2) for t in base_t],
        "max_rel_diff": rel,
        "model": args.model,
        "layers": args.layers,
        "n_chunks": len([c for b in batches for c in b["input_ids"]]),
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "tokens": tokens,
        "corpus": f"{corpus.name} (WikiText-2 validation), seeded chunk order, seed {cfg.seed}",
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        "notes": "ours = layer_covariances end to end (tokenising, Lightning stage, cache writes); "
        "baseline = per-layer passes over pre-tokenised batches; ratio = baseline_s / ours_s",
    }
    rec = record.record("stats", result, args=args, argv=argv, config={"stats": dataclasses.asdict(cfg)},
                        compute_dtype=compute)
    record.write(args.out, rec)
    print(json.dumps(rec, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
