"""Seconds and peak memory of each stage of a run, for ``summary.json`` and the benchmarks.

    meter = StageMeter()
    with meter("z"):
        store = editor.zs(requests)
    meter.timings      # {"z_s": 812.4}
    meter.peak_rss_mb  # {"z": 7412.0}: the process's resident memory at its highest while the stage ran

The resident set is sampled from ``/proc/self/statm`` by a background thread (every 50 ms; what a stage
holds for less than that can be missed). Nothing global is reset, so the process's own high-water mark
(``getrusage``, ``VmHWM``) stays what it is. Where ``/proc`` is missing (macOS, Windows) the figure is the
process's peak so far instead, flagged in ``rss_source``. On CUDA, ``peak_cuda_mb`` is
``torch.cuda.max_memory_allocated`` over the stage (its peak counter is reset at the stage's start).
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_STATM = Path("/proc/self/statm")
_PAGE_MB = os.sysconf("SC_PAGE_SIZE") / 2**20 if hasattr(os, "sysconf") else 4096 / 2**20


def rss_mb() -> float | None:
    """The process's resident memory now, in MB (None without ``/proc``)."""
    try:
        return int(_STATM.read_text().split()[1]) * _PAGE_MB
    except (OSError, IndexError, ValueError):
        return None


def peak_so_far_mb() -> float:
    """The process's peak resident memory since it started (``getrusage``), in MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


class _Sampler(threading.Thread):
    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval, self.peak, self.stop = interval, rss_mb() or 0.0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            now = rss_mb()
            if now is not None:
                self.peak = max(self.peak, now)


class StageMeter:
    """Times and peak memory of named stages (see the module docstring); a stage measured twice keeps the
    sum of its seconds and the larger peak."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.timings: dict[str, float] = {}
        self.peak_rss_mb: dict[str, float] = {}
        self.peak_cuda_mb: dict[str, float] = {}
        self.rss_source = "sampled" if rss_mb() is not None else "process peak so far"

    def __contains__(self, name: str) -> bool:
        return f"{name}_s" in self.timings

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        import torch

        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sampler = _Sampler(self.interval) if self.rss_source == "sampled" else None
        if sampler is not None:
            sampler.start()
        t = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - t
            if sampler is not None:
                sampler.stop.set()
                sampler.join()
                peak = max(sampler.peak, rss_mb() or 0.0)
            else:
                peak = peak_so_far_mb()
            key = f"{name}_s"
            self.timings[key] = self.timings.get(key, 0.0) + seconds
            self.peak_rss_mb[name] = round(max(self.peak_rss_mb.get(name, 0.0), peak), 1)
            if cuda:
                cuda_peak = torch.cuda.max_memory_allocated() / 2**20
                self.peak_cuda_mb[name] = round(max(self.peak_cuda_mb.get(name, 0.0), cuda_peak), 1)

    def memory(self) -> dict:
        """What ``summary.json`` records next to ``timings``."""
        out = {"peak_rss_mb": dict(self.peak_rss_mb), "rss_source": self.rss_source}
        if self.peak_cuda_mb:
            out["peak_cuda_mb"] = dict(self.peak_cuda_mb)
        return out
