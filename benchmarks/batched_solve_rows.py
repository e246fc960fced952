"""Time a LiSSA solve against the number of query rows it shares, on models small enough for batched passes.

``FastIF.explain`` solves up to ``FastIF.rows_per_solve()`` queries in one LiSSA run. On models with at most
``BATCHED_HVPS_MAX_PARAMETERS`` differentiated parameters every step runs one batched second backward pass
for all rows, so a step's cost grows slowly with the rows. This script measures how slowly: it times
``InfluenceComputer.ihvp`` with 1 to 256 rows on a logistic regression (20 parameters, float64) and on
2-hidden-layer tanh MLPs (32 inputs, 3 classes, float32), on 1,000 random training examples, one torch
thread. Each row count runs twice, in rising and then falling order, and the table gives the faster run.
The last column is the time of 256 queries solved in chunks of that many rows.

Usage::

    python benchmarks/batched_solve_rows.py --depth 50
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from lightning_fastif import InfluenceComputer, LiSSASolver

ROWS = (1, 8, 32, 64, 128, 256)


def logistic(num_train: int = 1000) -> tuple[nn.Module, TensorDataset, object]:
    model = nn.Linear(20, 1, bias=False).double()
    x = torch.randn(num_train, 20, dtype=torch.float64)
    y = (torch.rand(num_train, dtype=torch.float64) < torch.sigmoid(x.sum(1))).double()

    def loss_fn(module: nn.Module, batch: list) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(module(batch[0]).squeeze(-1), batch[1])

    return model, TensorDataset(x, y), loss_fn


def mlp(width: int, num_train: int = 1000) -> tuple[nn.Module, TensorDataset, object]:
    model = nn.Sequential(nn.Linear(32, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 3))
    data = TensorDataset(torch.randn(num_train, 32), torch.randint(0, 3, (num_train,)))

    def loss_fn(module: nn.Module, batch: list) -> torch.Tensor:
        return F.cross_entropy(module(batch[0]), batch[1])

    return model, data, loss_fn


def time_rows(name: str, model: nn.Module, data: TensorDataset, loss_fn: object, args: argparse.Namespace) -> None:
    solver = LiSSASolver(depth=args.depth, repeats=1, batch_size=args.batch_size, damping=0.01, scale=100.0)
    computer = InfluenceComputer(model, loss_fn, data, solver=solver)
    vectors = torch.randn(max(ROWS), computer.selection.numel, dtype=next(model.parameters()).dtype) * 1e-2
    seconds: dict[int, list[float]] = {rows: [] for rows in ROWS}
    for rows in (*ROWS, *reversed(ROWS)):
        start = time.perf_counter()
        computer.ihvp(vectors[:rows])
        seconds[rows].append((time.perf_counter() - start) / args.depth * 1e3)
    for rows in ROWS:
        step = min(seconds[rows])
        chunks = math.ceil(max(ROWS) / rows)
        print(
            f"| {name} | {computer.selection.numel:,} | {rows} | {step:.2f} | {step / rows:.3f} "
            f"| {chunks * step * args.depth / 1e3:.3g} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=50, help="LiSSA steps per timed solve")
    parser.add_argument("--batch-size", type=int, default=16, help="training examples per LiSSA step")
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128], help="MLP hidden widths")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"LiSSA depth {args.depth}, batch size {args.batch_size}, one torch thread.\n")
    print("| model | parameters | rows | ms / step | ms / step / row | s for 256 queries in chunks of rows |")
    print("|---|---:|---:|---:|---:|---:|")
    time_rows("logistic", *logistic(), args)
    for width in args.widths:
        time_rows(f"MLP, width {width}", *mlp(width), args)


if __name__ == "__main__":
    main()
