"""Peak resident memory of two stages on SmolLM2-135M, each case in a fresh process (1 thread):

    python -m bench.experiments.e2026_12_03_memory.run eval old|new N FILE   # evaluation of the first N records
    python -m bench.experiments.e2026_12_03_memory.run z N FILE BATCH         # z of the longest batch (2 steps)

``eval old`` scores with the full-logits layout (``target_logits`` + ``target_token_stats``), ``eval new``
with ``target_scores``; both print the zsRE/CounterFact metrics so their equality can be read off. ``z`` runs
the BATCH edits with the most live tokens among the first N (``by_live_length``) for two z steps: the peak
is at the first step, where every edit is still active. Peaks: ``StageMeter`` sampling every 10 ms.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from memit_pl.config import Config, EvalConfig, TrainerConfig  # noqa: E402
from memit_pl.data.edits import load_edits  # noqa: E402
from memit_pl.stages.meter import StageMeter, rss_mb  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    meter = StageMeter(interval=0.01)
    what, rest = sys.argv[1], sys.argv[2:]
    if what == "eval":
        from memit_pl.metrics.functional import target_token_stats
        from memit_pl.modeling.loading import load_model
        from memit_pl.stages import evaluate as ev

        mode, n, data = rest[0], int(rest[1]), rest[2]
        if mode == "old":
            def old(model, batch):
                logits = ev.target_logits(model, batch)
                lp, ok, mask = target_token_stats(logits, batch["target_ids"])
                return lp, ok, mask, logits.argmax(-1).masked_fill(~mask, -1)
            ev.target_scores = old
        model, tok = load_model("smollm2-135m", device="cpu")
        reqs = load_edits(data, tokenizer=tok, limit=n, drop_empty=True, drop_conflicting=True)
        base = rss_mb()
        with meter("eval"):
            m = ev.evaluate_requests(model, tok, reqs, EvalConfig(max_generation_prompts=0))["metrics"]
        print(mode, Path(data).name, n,
              f"base {base:.0f} MB peak {meter.peak_rss_mb['eval']:.0f} MB {meter.timings['eval_s']:.0f}s",
              {k: round(m[k], 4) for k in ("acc_rewrite", "acc_paraphrase", "acc_neighborhood", "ES", "PS")})
    elif what == "z":
        from memit_pl.editor import MEMIT
        from memit_pl.stages.zbatch import by_live_length, live_length

        n, data, bs = int(rest[0]), rest[1], int(rest[2])
        cfg = Config.from_file(ROOT / "configs/smollm2-135m.yaml")
        cfg = replace(cfg, trainer=TrainerConfig(enable_progress_bar=False),
                      memit=replace(cfg.memit, v_num_grad_steps=2, z_batch_size=bs))
        ed = MEMIT.from_pretrained(cfg.model.name, config=cfg, work_dir=f"/tmp/zmem-{time.time_ns()}")
        reqs = load_edits(data, tokenizer=ed.tokenizer, limit=n, drop_empty=True, drop_conflicting=True)
        reqs = by_live_length(ed.tokenizer, reqs)[-bs:]
        base = rss_mb()
        with meter("z"):
            ed.zs(reqs)
        print(Path(data).name, "bs", bs, "max live", max(live_length(ed.tokenizer, r) for r in reqs),
              f"base {base:.0f} MB peak {meter.peak_rss_mb['z']:.0f} MB, {meter.timings['z_s']:.0f}s")
    else:
        raise SystemExit(f"unknown case {what!r}: eval or z")


if __name__ == "__main__":
    main()
