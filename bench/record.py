"""The one result schema of the reproducible benchmarks (``bench/*.py``), and its safe writer.

    rec = record("z", figures, config={"memit": asdict(cfg)}, args=args)
    write(args.out, rec)

A record is::

    {"benchmark": "z",
     "command": "python -m bench.z --n 100 ...",     # what reproduces it, from the repository root
     "git_commit": "<sha>[-dirty]",                  # HEAD; -dirty when tracked code differs from it
     "packages": {"torch": ..., "transformers": ..., "lightning": ..., "torchmetrics": ...,
                  "datasets": ..., "accelerate": ..., "memit-pl": ...},
     "device": {"cpu": "<model name>", "threads": <torch threads>, "cuda": "<GPU name>" | None},
     "compute_dtype": "float32",
     "config": {"args": {<every option, defaults included>}, ...},
     "figures": {...},
     "date": "YYYY-MM-DD",
     ...the figures again at the top level (the keys the benchmark has always written)}

Paths are scrubbed: under the repository they become repository-relative, under the shared data
folder next to it ``../shared/...``, under the memit-pl cache (``$MEMIT_PL_CACHE``, else
``~/.cache/memit_pl``) ``<cache>/...``. :func:`write` refuses a record that still names an absolute
path under the home directory, the temporary folder or the top-level folders ``tmp``, ``work`` and
``root``: a result file must not depend on one machine.
:func:`preflight` makes the same check on the command line before a benchmark spends its minutes.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MACHINE_ROOTS = ("tmp", "work", "root")  # top-level folders a record must not name (plus home and tempdir)
PACKAGES = ("torch", "transformers", "lightning", "torchmetrics", "datasets", "accelerate", "memit-pl")
SCHEMA = ("benchmark", "command", "git_commit", "packages", "device", "compute_dtype", "config", "figures", "date")


class MachinePathError(ValueError):
    """A record names a path that exists on one machine only."""


def cache_dir() -> Path:
    # the same rule as memit_pl.modeling.loading.default_cache_dir, without importing the model stack
    if os.environ.get("MEMIT_PL_CACHE"):
        return Path(os.environ["MEMIT_PL_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "memit_pl"


def _replacements() -> list[tuple[str, str]]:
    """(absolute prefix, what it becomes), longest prefix first."""
    pairs: dict[str, str] = {"~/.cache/memit_pl": "<cache>"}
    for cache in {cache_dir(), cache_dir().resolve()}:
        pairs[str(cache)] = "<cache>"
    for shared in {ROOT.parent / "shared", ROOT.parent.resolve() / "shared"}:
        pairs[str(shared)] = "../shared"
    pairs[str(ROOT)] = ""
    return sorted(pairs.items(), key=lambda kv: len(kv[0]), reverse=True)


_END = r"(/|(?=[\s'\",:;=)\]}]|$))"  # a prefix counts only as a whole path component


def scrub_text(text: str) -> str:
    """``text`` with the known machine prefixes replaced (see the module docstring)."""
    for prefix, target in _replacements():
        def repl(m: re.Match, target: str = target) -> str:
            if m.group(1) == "/":
                return f"{target}/" if target else ""
            return target or "."

        text = re.sub(r"(?<![\w.~<>/-])" + re.escape(prefix) + _END, repl, text)
    return text


def scrub(value: Any) -> Any:
    """``value`` (JSON-like: dicts, lists, strings, paths, numbers) with every string scrubbed."""
    if isinstance(value, dict):
        return {scrub(k): scrub(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(v) for v in value]
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        return scrub_text(value)
    return value


def _forbidden() -> re.Pattern:
    roots = {"/" + d for d in MACHINE_ROOTS} | {tempfile.gettempdir()}
    if str(Path.home()) != "/":
        roots.add(str(Path.home()))
    alt = "|".join(re.escape(r) for r in sorted(roots, key=len, reverse=True))
    return re.compile(r"(?<![\w.~<>/-])(" + alt + r")" + _END)


def machine_paths(value: Any, where: str = "record") -> list[str]:
    """``where: string`` for every string in ``value`` that names a forbidden absolute path."""
    pattern, found = _forbidden(), []
    if isinstance(value, dict):
        for k, v in value.items():
            found += machine_paths(k, f"{where} key")
            found += machine_paths(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found += machine_paths(v, f"{where}[{i}]")
    elif isinstance(value, (str, Path)) and pattern.search(str(value)):
        found.append(f"{where}: {value}")
    return found


def command(module: str, argv: list[str] | None = None) -> str:
    """The command line that reproduces a run, from the repository root, scrubbed."""
    argv = sys.argv[1:] if argv is None else argv
    return scrub_text(" ".join(["python", "-m", module, *(shlex.quote(a) for a in argv)]))


def preflight(module: str, args: argparse.Namespace, argv: list[str] | None = None) -> None:
    """Raise :class:`MachinePathError` now (not after the benchmark) if the record would be refused."""
    bad = machine_paths(command(module, argv), "command") + machine_paths(scrub(vars(args)), "args")
    if bad:
        raise MachinePathError(_refusal(bad))


RESULT_SUFFIXES = (".json", ".md", ".png")
"""Files under ``bench/`` with these suffixes are results, not code: a benchmark that has already written a row
(its own output file, or a bank's) is still the code of HEAD."""


def git_commit(root: Path = ROOT) -> str | None:
    """HEAD of the repository, ``-dirty`` appended when tracked files other than the benchmarks' result files
    (:data:`RESULT_SUFFIXES` under ``bench/``) differ from it (None without git)."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return None
    paths = [line[3:].split(" -> ")[-1].strip('"') for line in changed if line.strip()]
    code = [p for p in paths if not (p.startswith("bench/") and p.endswith(RESULT_SUFFIXES))]
    return head + ("-dirty" if code else "")


def packages() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "cuda": cuda}


def measured() -> dict[str, Any]:
    """Where and from what code one row was measured: ``{"device", "git_commit", "date"}``, for a file whose
    rows come from several runs (the record's own fields name the last run only)."""
    return {"device": device(), "git_commit": git_commit(), "date": datetime.date.today().isoformat()}


def record(name: str, figures: dict[str, Any], *, config: dict[str, Any], args: argparse.Namespace | None = None,
           argv: list[str] | None = None, compute_dtype: str = "float32", module: str | None = None) -> dict[str, Any]:
    """The record of one run of benchmark ``name`` (module ``bench.<name>``): the schema fields, then
    ``figures`` once under "figures" and once more at the top level. ``args`` (the parsed options) go
    into ``config["args"]``; ``argv`` (default ``sys.argv[1:]``) makes the command."""
    clash = sorted(set(figures) & set(SCHEMA))
    if clash:
        raise ValueError(f"figure names {clash} are schema fields; rename them")
    cfg = dict(config)
    if args is not None:
        cfg = {"args": vars(args), **cfg}
    here = measured()
    rec = {
        "benchmark": name,
        "command": command(module or f"bench.{name}", argv),
        "git_commit": here["git_commit"],
        "packages": packages(),
        "device": here["device"],
        "compute_dtype": compute_dtype,
        "config": cfg,
        "figures": figures,
        "date": here["date"],
    }
    return scrub({**rec, **figures})


def _refusal(bad: list[str]) -> str:
    return ("machine paths in the record (use paths under the repository, ../shared or the memit-pl cache):\n  "
            + "\n  ".join(bad))


def write(path: str | Path, rec: dict[str, Any]) -> None:
    """Write ``rec`` as JSON atomically; raise :class:`MachinePathError` (writing nothing) if it still
    names an absolute path under the home directory, the temporary folder or one of :data:`MACHINE_ROOTS`."""
    bad = machine_paths(rec)
    if bad:
        raise MachinePathError(_refusal(bad))
    from memit_pl.io import write_json

    write_json(path, rec)
