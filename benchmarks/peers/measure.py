"""Timing, peak memory and the result file of one runner process (imports only torch)."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def rss_mib() -> float:
    """Return the process's current resident set size in MiB (Linux, from ``/proc/self/status``)."""
    return _status_kib("VmRSS") / 1024


def peak_rss_mib() -> float:
    """Return the process's peak resident set size so far in MiB (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_kib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    raise KeyError(f"{field} is missing from /proc/self/status.")


class Stopwatch:
    """Named stages in wall-clock seconds and in CPU seconds of this process (all its threads).

    Stages may nest, and a repeated name adds up.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + time.process_time() - cpu_start


def set_threads() -> int:
    """Set torch's intra-op threads from ``BENCH_THREADS`` (default 1) and return the count."""
    threads = int(os.environ.get("BENCH_THREADS", "1"))
    torch.set_num_threads(threads)
    return threads


def write_result(
    path: Path,
    *,
    scores: Tensor,
    candidates: Tensor | None,
    stopwatch: Stopwatch,
    baseline_rss_mib: float,
    versions: dict[str, str],
    **extra: Any,
) -> None:
    """Write a runner's scores ``[Q, N]`` (negative is helpful), seconds and memory to ``path`` with ``torch.save``.

    Args:
        candidates: ``[Q, k]`` training indices that were scored, or ``None`` when every example was.
            Entries of ``scores`` outside the candidates are NaN.
        baseline_rss_mib: RSS after imports and data loading, before the method ran.
    """
    torch.save(
        {
            "scores": scores.detach().double().cpu(),
            "candidates": None if candidates is None else candidates.cpu(),
            "seconds": stopwatch.seconds,
            "cpu_seconds": stopwatch.cpu_seconds,
            "peak_rss_mib": peak_rss_mib(),
            "baseline_rss_mib": baseline_rss_mib,
            "threads": torch.get_num_threads(),
            "versions": versions,
            **extra,
        },
        path,
    )
