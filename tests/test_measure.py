"""The benchmarks' memory figures: a page two processes share counts once in the proportional (PSS) peak and
twice in the summed-RSS peak."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from scripts import measure

# 400 MiB written by a parent that then forks: until written again, the child shares every page with it
FORKED_SHARED = """
import os, time
block = bytearray(400 * 2**20)
for i in range(0, len(block), 4096):
    block[i] = 1
pid = os.fork()
time.sleep(1.5)
if pid:
    os.waitpid(pid, 0)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PSS is read from Linux's /proc")
def test_a_page_shared_by_two_processes_counts_once_in_the_pss_peak(tmp_path: Path):
    result = measure.run([sys.executable, "-c", FORKED_SHARED], tmp_path)
    assert result.returncode == 0
    assert result.peak_rss_gib > 0.75  # parent and child each hold the 400 MiB
    assert 0.38 < result.peak_pss_gib < 0.6  # shared: counted once
