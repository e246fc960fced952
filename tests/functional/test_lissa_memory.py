"""LiSSA keeps memory flat in depth: no graph is carried from one step to the next."""

import subprocess
import sys
from pathlib import Path

MAX_PEAK_GROWTH = 0.10
PROBE = Path(__file__).with_name("lissa_memory_probe.py")


def peak_rss_kib(depth: int) -> int:
    root = Path(__file__).resolve().parents[2]
    output = subprocess.run(
        [sys.executable, str(PROBE), str(depth)], capture_output=True, text=True, check=True, cwd=root
    ).stdout
    return int(output.strip().splitlines()[-1])


def test_lissa_peak_memory_flat_in_depth():
    shallow = peak_rss_kib(10)
    deep = peak_rss_kib(1000)
    assert deep <= shallow * (1 + MAX_PEAK_GROWTH), f"peak RSS {deep} KiB at depth 1000, {shallow} KiB at depth 10"
