"""Huge pages for PyTorch's CPU allocator (``THP_MEM_ALLOC_ENABLE=1``) against the default, side by side in
one run: batched z optimisation of the same edits in fresh processes, alternately without and with it.

    .venv/bin/python -m bench.alloc [--config configs/gemma3-270m.yaml] [--n 64] [--repeats 3]

glibc hands every large freed block back to the kernel (mmap/munmap above its mmap threshold, which stops
growing at 32 MiB), so each z step faults the big activations and logits in again, 4 KiB at a time. With
``THP_MEM_ALLOC_ENABLE=1`` PyTorch aligns allocations of 2 MiB and more to 2 MiB and asks for transparent
huge pages (``madvise(MADV_HUGEPAGE)``, which the kernel honours when
``/sys/kernel/mm/transparent_hugepage/enabled`` is ``always`` or ``madvise``): a fault then maps 2 MiB.
The variable is read once, at the first allocation, so each arm is its own process. Each child times
every z batch of the first ``--n`` edits (the first batch, which also warms up, is left out of the median)
and counts its minor page faults and kernel seconds; the parent alternates the arms ``--repeats`` times
and writes medians and their ratio to bench/results/alloc.json (the schema of bench/record.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import record  # noqa: E402

VAR = "THP_MEM_ALLOC_ENABLE"


def child(args: argparse.Namespace) -> dict:
    """One arm in this process: z of the first n edits, batch by batch (torch imported only here)."""
    import torch

    from memit_pl.config import Config
    from memit_pl.data.edits import load_edits
    from memit_pl.modeling.loading import load_model
    from memit_pl.modeling.spec import get_spec
    from memit_pl.stages.context import context_prefixes
    from memit_pl.stages.zbatch import build_z_batch, by_live_length
    from memit_pl.stages.zopt import optimize_z

    torch.manual_seed(0)
    cfg = Config.from_file(args.config)
    model, tok = load_model(cfg.model.name, device="cpu")
    spec = get_spec(model)
    m = cfg.memit
    requests = by_live_length(tok, load_edits(args.edits, tokenizer=tok, limit=args.n, drop_conflicting=True))
    prefixes = context_prefixes(model, tok, m.context_templates, m.context_seeds, m.seed)
    seconds, losses = [], []
    before = resource.getrusage(resource.RUSAGE_SELF)
    for i in range(0, len(requests), m.z_batch_size):
        chunk = requests[i : i + m.z_batch_size]
        t = time.perf_counter()
        res = optimize_z(model, spec, build_z_batch(tok, chunk, prefixes, m.essence_prompt), m)
        seconds.append((time.perf_counter() - t) / len(chunk))
        losses += res.loss.tolist()
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"s_per_edit": seconds, "mean_loss": statistics.fmean(losses),
            "minor_faults": after.ru_minflt - before.ru_minflt, "sys_s": after.ru_stime - before.ru_stime,
            "user_s": after.ru_utime - before.ru_utime, "n_edits": len(requests)}


def run_median(res: dict) -> float:
    """A child's median seconds per edit over its batches after the first (the first also warms up)."""
    return statistics.median(res["s_per_edit"][1:] or res["s_per_edit"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--edits", default=str(ROOT.parent / "shared/data/counterfact/counterfact-train.json"))
    ap.add_argument("--config", default=str(ROOT / "configs/gemma3-270m.yaml"))
    ap.add_argument("--n", type=int, default=64, help="edits per arm (the first n cases, conflicts dropped)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each arm, alternating")
    ap.add_argument("--child", choices=("0", "1"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "bench/results/alloc.json"))
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args)))
        return
    record.preflight("bench.alloc", args)
    thp_mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    runs: dict[str, list[dict]] = {"0": [], "1": []}
    for rep in range(args.repeats):
        for arm in ("0", "1"):
            env = {k: v for k, v in os.environ.items() if k != VAR} | ({VAR: "1"} if arm == "1" else {})
            cmd = [sys.executable, "-m", "bench.alloc", "--child", arm, "--config", args.config, "--edits", args.edits,
                   "--n", str(args.n)]
            out = subprocess.run(cmd, env=env, cwd=ROOT, check=True, capture_output=True, text=True).stdout
            res = json.loads(out.strip().splitlines()[-1])
            runs[arm].append(res)
            print(f"repeat {rep + 1}, {VAR}={arm}: {run_median(res):.3f} "
                  f"s/edit, {res['minor_faults']:,} minor faults, {res['sys_s']:.1f} s in the kernel", flush=True)

    def summary(rs: list[dict]) -> dict:
        per_run = [run_median(r) for r in rs]
        return {"s_per_edit_median": round(statistics.median(per_run), 4), "s_per_edit_runs": [round(x, 4) for x in per_run],
                "minor_faults_median": int(statistics.median(r["minor_faults"] for r in rs)),
                "sys_s_median": round(statistics.median(r["sys_s"] for r in rs), 1),
                "user_s_median": round(statistics.median(r["user_s"] for r in rs), 1),
                "mean_loss": round(rs[0]["mean_loss"], 5)}

    off, on = summary(runs["0"]), summary(runs["1"])
    figures = {"default": off, "thp": on, "ratio_default_vs_thp": round(off["s_per_edit_median"] / on["s_per_edit_median"], 3),
               "same_losses": all(abs(a["mean_loss"] - b["mean_loss"]) < 1e-6 for a, b in zip(runs["0"], runs["1"])),
               "n_edits": runs["0"][0]["n_edits"],
               "transparent_hugepage": thp_mode.read_text().strip() if thp_mode.exists() else None}
    import yaml

    config = yaml.safe_load(Path(args.config).read_text())
    rec = record.record("alloc", figures, args=args, config={"model": config.get("model"), "memit": config.get("memit")})
    record.write(args.out, rec)
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
