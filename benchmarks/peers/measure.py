"""Timing, peak memory and the result file of one runner process (imports only torch)."""

from __future__ import annotations

import os
import resource
import time
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
    """Named wall-clock stages, in seconds."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = 0.0
        self._name = ""

    def __call__(self, name: str) -> Stopwatch:
        self._name = name
        return self

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds[self._name] = self.seconds.get(self._name, 0.0) + time.perf_counter() - self._start


def set_threads() -> int:
    """Set torch's intra-op threads from ``BENCH_THREADS`` (default 1) and return the count."""
    threads = int(os.environ.get("BENCH_THREADS", "1"))
    torch.set_num_threads(threads)
    return threads


def write_result(path: Path, *, scores: Tensor, candidates: Tensor | None, stopwatch: Stopwatch,
                 baseline_rss_mib: float, versions: dict[str, str], notes: str = "", **extra: Any) -> None:
    """Write a runner's scores ``[Q, N]`` (our sign: negative is helpful), timings and memory.

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
            "peak_rss_mib": peak_rss_mib(),
            "baseline_rss_mib": baseline_rss_mib,
            "threads": torch.get_num_threads(),
            "versions": versions,
            "notes": notes,
            **extra,
        },
        path,
    )
