"""memit_pl/stages/meter.py: each stage's seconds and the process's peak resident memory while it ran."""

import mmap
import sys
import time

import pytest

from memit_pl.stages.meter import StageMeter, peak_so_far_mb, rss_mb

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="samples /proc/self/statm")


def resident_block(mb: int) -> mmap.mmap:
    """``mb`` MB of fresh pages, touched: resident whatever the allocator already holds (a bytearray may
    reuse freed memory that is resident anyway), returned to the system by ``close()``."""
    block = mmap.mmap(-1, mb * 2**20)
    for i in range(0, len(block), mmap.PAGESIZE):
        block[i] = 1
    return block


def test_a_peak_held_briefly_inside_a_stage_is_caught_and_freed_memory_is_not_counted_later():
    meter = StageMeter(interval=0.01)
    base = rss_mb()
    with meter("big"):
        block = resident_block(400)
        time.sleep(0.2)
        block.close()
    with meter("small"):
        time.sleep(0.1)
    assert meter.peak_rss_mb["big"] > base + 350
    assert meter.peak_rss_mb["small"] < base + 150  # what "big" held is gone again
    assert meter.peak_rss_mb["big"] <= peak_so_far_mb() + 1
    assert meter.timings["big_s"] >= 0.2 and meter.timings["small_s"] >= 0.1
    assert meter.memory()["rss_source"] == "sampled"


def test_a_stage_measured_twice_adds_its_seconds_and_keeps_the_larger_peak():
    meter = StageMeter(interval=0.01)
    with meter("z"):
        block = resident_block(200)
        time.sleep(0.1)
        block.close()
    first = meter.peak_rss_mb["z"]
    with meter("z"):
        time.sleep(0.05)
    assert "z" in meter and "apply" not in meter
    assert meter.peak_rss_mb["z"] == first
    assert meter.timings["z_s"] >= 0.15


def test_an_exception_still_records_the_stage():
    meter = StageMeter()
    with pytest.raises(RuntimeError), meter("apply"):
        raise RuntimeError("boom")
    assert "apply" in meter
