"""The z bank: counterfact-train's target vectors under the shipped config, optimised chunk by chunk across
sessions and kept in the repository, so that the 10,000-edit benchmarks resume where the last session stopped.

    .venv/bin/python -m bench.zbank [--minutes 40] [--chunk 320] [--n 10000]
    .venv/bin/python -m bench.zbank --import-store runs/methods/n1000/z-L6-<fingerprint> --seconds 1510

z of one edit does not depend on the other edits of its batch (tests/test_zopt.py: batched equals serial), so
the chunks of the file, optimised in different runs, are the z store one 10,000-edit run would have made.
The bank (``bench/zbank/<model>/``) holds the z store's part files (``parts/chunk-AAAAA-BBBBB.safetensors``,
rows A..B-1 of the file after Eqn. 5 conflicts are dropped; each file about 0.75 MB for 320 edits), the
context prefixes they were optimised with, and ``bank.json``: per chunk the seconds it took, the commit, the
device and the compute dtype, so a benchmark built on the bank can still report what its z stage cost.

:func:`seed` copies the bank into a run's z store directory; :func:`memit_pl.stages.zmodule.compute_zs`
then optimises only what is missing. A bank made with another model, layer, objective, prefixes or compute
dtype is refused there (the store key differs).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import record  # noqa: E402

BANKS = ROOT / "bench" / "zbank"
INDEX = "bank.json"


SHORT_DTYPES = {"bfloat16": "bf16", "float16": "fp16"}


def bank_dir(model: str, layer: int | None = None, compute_dtype: str = "float32") -> Path:
    """``bench/zbank/<model>`` (the shipped config's L, float32), ``bench/zbank/<model>-L<layer>`` for a bank at
    another target layer (``smollm2-135m-L8``), ``bench/zbank/<model>-bf16`` for z optimised under bf16
    autocast (a store key of its own)."""
    if compute_dtype not in ("float32", *SHORT_DTYPES):
        raise SystemExit(f"a z bank needs a fixed compute dtype (float32, bfloat16 or float16), not {compute_dtype!r}")
    suffix = ("" if layer is None else f"-L{layer}") + ("" if compute_dtype == "float32" else f"-{SHORT_DTYPES[compute_dtype]}")
    return BANKS / (model + suffix)


def read_index(bank: Path) -> dict:
    path = bank / INDEX
    return json.loads(path.read_text()) if path.exists() else {"chunks": []}


def seed(store_dir: str | Path, bank: str | Path, parts: bool = True) -> int:
    """Copy the bank's prefixes and (``parts``) chunk files into ``store_dir`` (a z store directory); returns
    the number of chunk files copied. Chunks already merged into the store are harmless: the store skips
    repeated ids."""
    from memit_pl.stages.zmodule import CONTEXT_FILE
    from memit_pl.stages.zstore import PARTS

    bank, store_dir = Path(bank), Path(store_dir)
    if not (bank / CONTEXT_FILE).exists():
        return 0
    store_dir.mkdir(parents=True, exist_ok=True)
    if not (store_dir / CONTEXT_FILE).exists():
        shutil.copyfile(bank / CONTEXT_FILE, store_dir / CONTEXT_FILE)
    n = 0
    for part in sorted((bank / PARTS).glob("chunk-*.safetensors")) if parts else []:
        (store_dir / PARTS).mkdir(exist_ok=True)
        shutil.copyfile(part, store_dir / PARTS / part.name)
        n += 1
    return n


def add_chunk(bank: Path, store, ids: list[str], first: int, seconds: float | None, compute_dtype: str,
              timed_edits: int | None = None) -> Path:
    """Write the rows ``ids`` of a merged z store into the bank as one chunk file, and index it. ``timed_edits``:
    a chunk resumed after an interruption timed only its remaining edits; ``seconds`` is then their rate
    times the chunk's edits, and the index says how many were timed."""
    import torch

    from memit_pl import io
    from memit_pl.stages.zmodule import CONTEXT_FILE, prefixes_record
    from memit_pl.stages.zstore import FIELDS, PARTS, write_part

    index = {c: i for i, c in enumerate(store.case_ids)}
    rows = torch.tensor([index[c] for c in ids])
    name = f"chunk-{first:05d}-{first + len(ids):05d}"
    path = write_part(bank, name, ids, {f: store.tensors[f][rows].contiguous() for f in FIELDS}, store.metadata["key"])
    if not (bank / CONTEXT_FILE).exists():
        memit = store.metadata["memit"]
        io.write_json(bank / CONTEXT_FILE, prefixes_record(memit["context_templates"], memit["seed"],
                                                           memit.get("context_source", "model"),
                                                           store.metadata["prefixes"]))
    idx = read_index(bank)
    idx["chunks"] = [c for c in idx["chunks"] if c["file"] != f"{PARTS}/{name}.safetensors"]
    idx["chunks"].append({"file": f"{PARTS}/{name}.safetensors", "first": first, "n": len(ids),
                          "seconds": None if seconds is None else round(seconds, 1),
                          "s_per_edit": None if seconds is None else round(seconds / len(ids), 4),
                          "git_commit": record.git_commit(), "device": record.device(), "compute_dtype": compute_dtype,
                          "date": time.strftime("%Y-%m-%d"), "key": store.metadata["key"],
                          **({} if timed_edits is None else {"timed_edits": timed_edits})})
    idx["chunks"].sort(key=lambda c: c["first"])
    idx["n_edits"] = sum(c["n"] for c in idx["chunks"])
    timed = [c["seconds"] for c in idx["chunks"] if c["seconds"] is not None]
    idx["seconds"] = round(sum(timed), 1)
    idx["n_edits_timed"] = sum(c["n"] for c in idx["chunks"] if c["seconds"] is not None)
    io.write_json(bank / INDEX, idx)
    return path


def banked_seconds(bank: Path, n: int) -> float | None:
    """The z seconds the bank's chunks spent on the file's first ``n`` cases (a chunk that straddles ``n``
    pro rata); None when one of those chunks was banked without a clean time (``--import-store`` without
    ``--seconds``)."""
    used = [(c, max(0, min(n, c["first"] + c["n"]) - c["first"])) for c in read_index(bank)["chunks"]]
    used = [(c, k) for c, k in used if k > 0]
    if any(c["s_per_edit"] is None for c, _ in used):
        return None
    return sum(c["s_per_edit"] * k for c, k in used)


def seed_run(store_dir: str | Path, model: str, n: int, compute_dtype: str = "float32") -> float:
    """Seed a benchmark's z store from the bank of ``model`` at ``compute_dtype``; returns the banked chunks'
    seconds for the first ``n`` cases, which the benchmark adds to its own z seconds (stops when one of them
    has no clean time)."""
    bank = bank_dir(model, compute_dtype=compute_dtype)
    logging.info("z: %d chunk files seeded from %s", seed(store_dir, bank), bank.relative_to(ROOT))
    secs = banked_seconds(bank, n)
    if secs is None:
        raise SystemExit(f"{bank.relative_to(ROOT)}: a chunk of the first {n} cases has no clean time; "
                         "the z seconds would be wrong")
    return secs


def stored_ids(store_dir: Path) -> set[str]:
    """Case ids already in a z store directory (its merged file and part files: what an interrupted run left)."""
    from memit_pl import io
    from memit_pl.stages.zstore import PARTS, STORE_FILE

    store_dir = Path(store_dir)
    files = [store_dir / STORE_FILE] if (store_dir / STORE_FILE).exists() else []
    files += sorted((store_dir / PARTS).glob("*.safetensors")) if (store_dir / PARTS).exists() else []
    return {c for f in files for c in io.load_tensors(f)[1].get("case_ids", [])}


def banked_positions(bank: Path) -> set[int]:
    return {i for c in read_index(bank)["chunks"] for i in range(c["first"], c["first"] + c["n"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--edits", default=str(ROOT.parent / "shared/data/counterfact/counterfact-train.json"))
    ap.add_argument("--n", type=int, default=10_000, help="bank the first N cases (Eqn. 5 conflicts dropped)")
    ap.add_argument("--chunk", type=int, default=320, help="edits per chunk file (a multiple of z_batch_size)")
    ap.add_argument("--minutes", type=float, default=40.0, help="start no new chunk after this many minutes")
    ap.add_argument("--batch", type=int, default=None,
                    help="edits per z batch (default: the config's z_batch_size; z does not depend on it)")
    ap.add_argument("--config", default=str(ROOT / "configs/smollm2-135m.yaml"))
    ap.add_argument("--import-store", default=None,
                    help="instead: bank an existing z store directory (its rows that are the file's first cases)")
    ap.add_argument("--seconds", type=float, default=None,
                    help="with --import-store: the z seconds it took, measured alone (leave out if not)")
    ap.add_argument("--bank", default=None,
                    help="bank directory (default bench/zbank/<model>, counterfact-train's); e.g. "
                         "bench/zbank/<model>-val for counterfact-val, the tuning split")
    ap.add_argument("--work", default="runs/zbank")
    args = ap.parse_args()
    record.preflight("bench.zbank", args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    from memit_pl.config import Config, TrainerConfig
    from memit_pl.data.edits import load_edits
    from memit_pl.editor import MEMIT
    from memit_pl.stages.zstore import load_store

    cfg = Config.from_file(args.config)
    cfg = replace(cfg, trainer=TrainerConfig(enable_progress_bar=False))
    if args.batch:
        cfg = replace(cfg, memit=replace(cfg.memit, z_batch_size=args.batch))
    if args.import_store:
        bank = Path(args.bank).resolve() if args.bank else bank_dir(cfg.model.name, compute_dtype=cfg.model.compute_dtype)
        store = load_store(args.import_store)
        have = set(store.case_ids)
        requests = load_edits(args.edits, limit=args.n, drop_conflicting=True)
        first = 0
        while first < len(requests) and requests[first].case_id in have:
            first += 1
        if first == 0:
            raise SystemExit(f"{args.import_store} holds none of the file's first cases")
        ids = [r.case_id for r in requests[:first]]
        secs = args.seconds  # None: no clean time (the chunk's rows still serve; its seconds do not)
        path = add_chunk(bank, store, ids, 0, secs, cfg.model.compute_dtype)
        print(f"banked the first {first} cases as {path.relative_to(ROOT)}")
        return

    editor = MEMIT.from_pretrained(cfg.model.name, config=cfg, work_dir=args.work)
    bank = Path(args.bank).resolve() if args.bank else bank_dir(cfg.model.name, compute_dtype=editor.compute_dtype)
    requests = load_edits(args.edits, tokenizer=editor.tokenizer, limit=args.n, drop_conflicting=True)
    done = banked_positions(bank)
    start = time.perf_counter()
    first = 0
    while first < len(requests):
        if (time.perf_counter() - start) / 60 > args.minutes:
            logging.info("time budget of %.0f minutes spent; %d of %d cases banked", args.minutes,
                         len(banked_positions(bank)), len(requests))
            break
        end = min(first + args.chunk, len(requests))
        if all(i in done for i in range(first, end)):
            first = end
            continue
        if any(i in done for i in range(first, end)):  # an imported chunk of another size: bank the rest
            while first in done:
                first += 1
            end = min(first + args.chunk, len(requests))
            end = next((i for i in range(first, end) if i in done), end)
        chunk = requests[first:end]
        store_dir = Path(args.work) / f"chunk-{first:05d}"
        seed(store_dir, bank, parts=False)  # the bank's prefixes: every chunk under one store key
        resumed = len(stored_ids(store_dir) & {r.case_id for r in chunk})  # an interrupted chunk's finished batches
        t = time.perf_counter()
        store = editor.zs(chunk, store_dir=store_dir)
        secs = time.perf_counter() - t
        timed = len(chunk) - resumed
        if resumed:  # the rate of the edits timed now, for the whole chunk
            secs = secs * len(chunk) / timed if timed else None
        path = add_chunk(bank, store, [r.case_id for r in chunk], first, secs, editor.compute_dtype,
                         timed_edits=timed if resumed else None)
        logging.info("banked cases %d..%d in %.0f s (%.3f s/edit): %s", first, end - 1, secs, secs / len(chunk),
                     path.relative_to(ROOT))
        shutil.rmtree(store_dir)
        first = end


if __name__ == "__main__":
    main()
