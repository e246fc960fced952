"""Time one LiSSA step on MiniLM against the number of query rows that share the solve.

``FastIF.explain`` solves up to ``FastIF.rows_per_solve()`` queries in one LiSSA run. This script measures
the seconds per step of ``InfluenceComputer.ihvp`` for 1, 2, 4 and 8 rows on the MiniLM problem of
``benchmarks/peers.py --setting minilm`` (fresh seeded head, 64 tokens per pair, FastIF's parameters,
LiSSA batch size 1), on one torch thread. Each row count runs twice, in the order 1, 2, 4, 8, 8, 4, 2, 1.

Usage::

    python benchmarks/shared_solve_rows.py --depth 15
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
from run_ours import minilm_setting  # noqa: E402

from lightning_fastif import InfluenceComputer, LiSSASolver  # noqa: E402

ROWS = (1, 2, 4, 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=15, help="LiSSA steps per timed solve")
    parser.add_argument("--num-train", type=int, default=200, help="training pairs that LiSSA samples from")
    args = parser.parse_args()
    torch.set_num_threads(1)
    setting = minilm_setting(dict(seed=0, num_train=args.num_train, queries=max(ROWS), max_length=64))
    solver = LiSSASolver(depth=args.depth, repeats=1, batch_size=1, damping=5e-3, scale=1e4)
    computer = InfluenceComputer(
        setting.model, setting.loss_fn, setting.train, solver=solver, parameters=setting.parameters
    )
    gradients = computer.query_gradients(setting.queries, mode="each")
    seconds: dict[int, list[float]] = {rows: [] for rows in ROWS}
    for rows in (*ROWS, *reversed(ROWS)):
        start = time.perf_counter()
        computer.ihvp(gradients[:rows])
        seconds[rows].append((time.perf_counter() - start) / args.depth)
    print("| rows | s / step (mean of 2) | s / step / row |")
    print("|---:|---:|---:|")
    for rows, values in seconds.items():
        per_step = statistics.mean(values)
        print(f"| {rows} | {per_step:.3f} | {per_step / rows:.3f} |")


if __name__ == "__main__":
    main()
