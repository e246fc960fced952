"""Time ``FunctionalLoss.hvps`` with one batched second backward pass against one pass per row.

``FunctionalLoss.hvps`` batches the second backward pass over the query rows only up to
``BATCHED_HVPS_MAX_PARAMETERS`` differentiated parameters. This script measures where batching stops
paying: a 2-hidden-layer tanh MLP (32 inputs, 3 classes) of growing width, a cross-entropy loss on a
batch of 16 random examples, 4 rows, one torch thread. Each width runs both ways twice, alternating,
and the table gives the faster of the two runs of each way.

Usage::

    python benchmarks/batched_hvps.py --widths 8 64 128 192 256 512 1024
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from lightning_fastif.functional import FunctionalLoss, select_parameters


def time_hvps(width: int, rows: int, batch_size: int, calls: int) -> tuple[int, float, float]:
    """Return (parameters, batched ms per call, per-row ms per call) for one MLP width."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 3))
    loss = FunctionalLoss(
        model, lambda module, batch: F.cross_entropy(module(batch[0]), batch[1]), select_parameters(model)
    )
    batch = [torch.randn(batch_size, 32), torch.randint(0, 3, (batch_size,))]
    vectors = torch.randn(rows, loss.selection.numel)
    loss._batched_hvps = False  # hvps itself then runs one second backward pass per row at every width
    reference = loss.hvps(batch, vectors)
    seconds: dict[bool, list[float]] = {True: [], False: []}
    for batched in (True, False, True, False):
        start = time.perf_counter()
        for _ in range(calls):
            result = _batched_hvps(loss, batch, vectors) if batched else loss.hvps(batch, vectors)
        seconds[batched].append((time.perf_counter() - start) / calls * 1e3)
        torch.testing.assert_close(result, reference, rtol=1e-4, atol=1e-5)
    return loss.selection.numel, min(seconds[True]), min(seconds[False])


def _batched_hvps(loss: FunctionalLoss, batch: list, vectors: torch.Tensor) -> torch.Tensor:
    """Compute ``hvps`` the batched way at any size: one first-order pass, then one batched second pass."""
    params = tuple(t.clone().requires_grad_(True) for t in loss.params())
    grads = torch.autograd.grad(loss.loss(params, batch), params, create_graph=True)
    return loss._batched_second_backward(grads, params, vectors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 64, 128, 192, 256, 512, 1024])
    parser.add_argument("--rows", type=int, default=4, help="query rows per call")
    parser.add_argument("--batch-size", type=int, default=16, help="training examples per call")
    parser.add_argument("--calls", type=int, default=20, help="timed calls per way and run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| hidden width | parameters | batched ms | per-row ms | batched / per-row |")
    print("|---:|---:|---:|---:|---:|")
    for width in args.widths:
        parameters, batched, per_row = time_hvps(width, args.rows, args.batch_size, args.calls)
        print(f"| {width} | {parameters:,} | {batched:.2f} | {per_row:.2f} | {batched / per_row:.2f} |", flush=True)


if __name__ == "__main__":
    main()
