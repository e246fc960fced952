"""Measure how much two processes gain on this machine over one, for the kind of work FastIF splits.

The ratio that ``fastif-2`` reaches against ``fastif-1`` in ``benchmarks/peers.py`` cannot fall below what
the machine allows when both of its cores are busy. This script times a fixed amount of work in one
process, and then the same work split in halves over two processes that start together, for two kinds of
work on one torch thread each:

- ``hvps``: LiSSA steps of the small benchmark model (a 20-parameter logistic regression, 64 examples,
  5 rows per step with ``FunctionalLoss.hvps``), where fixed per-call costs dominate;
- ``matmul``: products of 256 x 256 float32 matrices, where arithmetic dominates.

Each kind runs 3 times, alternating one and two processes, and the table gives the medians. Each process
times its own loop after its imports and a first call. "2 processes / 1" is the time of the slower of the
two processes over the time of one process doing all the work, so 0.5 is a perfect split.

Usage::

    python benchmarks/core_scaling.py --calls 2000
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


def _make_call(kind: str) -> Callable[[], object]:
    """Return one call of the given work, after its imports and one untimed call."""
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    if kind == "matmul":
        matrix = torch.randn(256, 256, generator=generator)
        return lambda: matrix @ matrix
    from lightning_fastif.functional import FunctionalLoss, select_parameters

    model = torch.nn.Linear(20, 1, bias=False).double()
    loss = FunctionalLoss(
        model,
        lambda module, batch: F.binary_cross_entropy_with_logits(module(batch[0]).squeeze(-1), batch[1]),
        select_parameters(model),
        weight_decay=0.01,
    )
    batch = [torch.randn(64, 20, generator=generator, dtype=torch.float64), torch.ones(64, dtype=torch.float64)]
    vectors = torch.randn(5, 20, generator=generator, dtype=torch.float64)
    loss.hvps(batch, vectors)
    return lambda: loss.hvps(batch, vectors)


def _worker(kind: str, calls: int, barrier: Any, results: Any) -> None:
    call = _make_call(kind)
    barrier.wait()  # every worker starts its timed loop at the same time
    start = time.perf_counter()
    for _ in range(calls):
        call()
    results.put(time.perf_counter() - start)


def split_seconds(kind: str, calls: int, processes: int) -> float:
    """Return the seconds of ``calls`` calls split evenly over ``processes`` processes started together."""
    context = mp.get_context("spawn")
    barrier = context.Barrier(processes)
    results = context.Queue()
    workers = [
        context.Process(target=_worker, args=(kind, calls // processes, barrier, results)) for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    # Each worker times its own loop; the slowest one bounds the split work.
    seconds = [results.get() for _ in workers]
    for worker in workers:
        worker.join()
    return max(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls of the whole work")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of one and two processes")
    args = parser.parse_args()
    print("| work | 1 process s | 2 processes s | 2 processes / 1 |")
    print("|---|---:|---:|---:|")
    for kind in ("hvps", "matmul"):
        solo_runs, pair_runs = [], []
        for _ in range(args.repeats):
            solo_runs.append(split_seconds(kind, args.calls, 1))
            pair_runs.append(split_seconds(kind, args.calls, 2))
        solo, pair = statistics.median(solo_runs), statistics.median(pair_runs)
        print(f"| {kind} | {solo:.3f} | {pair:.3f} | {pair / solo:.2f} |", flush=True)


if __name__ == "__main__":
    main()
