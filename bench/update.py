"""Benchmark of the update stage's forward passes: keys and h^L for every layer of the window, the reference's
one pass (every row through block L) against memit-pl's two (every row to layer l, the bare prompts on to L)
and against the shared-prefix form (``memit.update_prefix_cache``: the tokens a context prefix's rows share
run once per batch into the key/value cache, each row runs only its own; the bare prompts to L apart).

For each layer l of R, the update reads the keys k_l at layer l on each edit's prompt behind every context
prefix (1 + #prefixes rows per edit), and h^L on the bare prompt only. The reference runs all rows through
block L for both; below L, memit-pl stops the prefixed rows at layer l. The forms are interleaved layer by layer
on the same batches of the first N counterfact-train cases, with the bank's context prefixes (no z needed:
the passes do not depend on it); medians over ``--repeats``, and the largest difference of k and h^L.

    .venv/bin/python -m bench.update --n 200 --repeats 3

Writes bench/results/update.json (the schema of bench/record.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import record  # noqa: E402
from bench.zbank import bank_dir  # noqa: E402
from memit_pl.config import Config  # noqa: E402
from memit_pl.data.edits import load_edits  # noqa: E402
from memit_pl.modeling.hooks import trace  # noqa: E402
from memit_pl.modeling.loading import load_model  # noqa: E402
from memit_pl.modeling.spec import get_spec  # noqa: E402
from memit_pl.stages.apply import KeyCollate, _edit_means, keys_and_h, prefix_groups  # noqa: E402
from memit_pl.stages.zmodule import CONTEXT_FILE  # noqa: E402


@torch.no_grad()
def one_pass(model, spec, batch, layer: int, target_layer: int):
    """The reference's form: every row through block L, k at l and h^L on the bare prompt from that pass."""
    key_name, h_name = spec.name("mlp_out", layer), spec.name("block", target_layer)
    with trace(model, [key_name, h_name], inputs=True, outputs=True, stop=True) as tr:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    rows = torch.arange(batch.input_ids.shape[0])
    h = tr[h_name].output[batch.init_rows, batch.lookup[batch.init_rows]].float()
    return _edit_means(batch, tr[key_name].input[rows, batch.lookup].float()), h


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--edits", default=str(ROOT.parent / "shared/data/counterfact/counterfact-train.json"))
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--config", default=str(ROOT / "configs/smollm2-135m.yaml"))
    ap.add_argument("--out", default=str(ROOT / "bench/results/update.json"))
    args = ap.parse_args()
    record.preflight("bench.update", args)
    cfg = Config.from_file(args.config)
    model, tok = load_model(cfg.model.name, dtype="float32", device="cpu")
    spec = get_spec(model)
    requests = load_edits(args.edits, tokenizer=tok, limit=args.n, drop_conflicting=True)
    prefixes = json.loads((bank_dir(cfg.model.name) / CONTEXT_FILE).read_text())["prefixes"]
    collate = KeyCollate(tok, prefixes, prefix_groups(cfg.memit.context_templates))
    bs = cfg.memit.z_batch_size
    batches = [collate(list(requests[i:i + bs])) for i in range(0, len(requests), bs)]
    L = cfg.memit.target_layer
    fns = {"one_pass": one_pass, "two_pass": keys_and_h,
           "shared": lambda *a: keys_and_h(*a, share_prefixes=True)}
    modes = list(fns)
    times = {m: [] for m in modes}
    diff = {m: {"keys": 0.0, "h": 0.0} for m in modes[1:]}
    for rep in range(args.repeats):
        tot = dict.fromkeys(modes, 0.0)
        for layer in cfg.memit.layers:
            k = (rep + layer) % len(modes)
            order = modes[k:] + modes[:k]  # each form first, in turn
            got = {}
            for mode in order:
                t = time.perf_counter()
                got[mode] = [fns[mode](model, spec, b, layer, L) for b in batches]
                tot[mode] += time.perf_counter() - t
            for mode in modes[1:]:
                for (k1, h1), (k2, h2) in zip(got["one_pass"], got[mode]):
                    diff[mode]["keys"] = max(diff[mode]["keys"], float((k1 - k2).abs().max() / k1.abs().max()))
                    diff[mode]["h"] = max(diff[mode]["h"], float((h1 - h2).abs().max() / h1.abs().max()))
        for mode in times:
            times[mode].append(tot[mode])
        print(f"repeat {rep}: " + ", ".join(f"{m} {tot[m]:.1f} s" for m in modes), flush=True)
    med = {m: statistics.median(v) for m, v in times.items()}
    figures = {"n_edits": len(requests), "rows_per_edit": len(prefixes), "layers": cfg.memit.layers,
               "target_layer": L, "seconds": {m: [round(x, 2) for x in v] for m, v in times.items()},
               "median_s": {m: round(v, 2) for m, v in med.items()},
               "speedup": round(med["one_pass"] / med["two_pass"], 2),
               "speedup_shared_vs_two_pass": round(med["two_pass"] / med["shared"], 2),
               "speedup_shared_vs_one_pass": round(med["one_pass"] / med["shared"], 2),
               "max_rel_diff": diff["two_pass"], "max_rel_diff_shared": diff["shared"]}
    rec = record.record("update", figures, args=args, config={"model": cfg.model.name, "z_batch_size": bs})
    record.write(args.out, rec)
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
