"""Influence scores without a Trainer, split over processes with torchrun.

``compute_influences`` uses the default process group when one is initialised. Each rank runs its share of
the LiSSA repeats, whose sums are all-reduced, and scores its share of the training examples, whose scores
are all-gathered. So every rank returns the scores that one process running everything returns. This script
initialises a gloo group from the environment variables that torchrun sets (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``) and scores a small logistic regression.

Run it with two processes on this machine::

    torchrun --nproc_per_node=2 --standalone examples/torchrun_influences.py

or in one process, with no process group, as ``python examples/torchrun_influences.py``. The query is
the mean loss of a batch, a single ``s_test``, so only the LiSSA repeats can be split for it: use at least
as many repeats as processes, or the extra ranks only score candidates.

Then ``FastIF`` explains 4 queries from the ``k`` training examples nearest to each, with the inputs as
kNN features. Under the process group each rank indexes and searches its share of the training set, the
ranks merge their nearest neighbors, and each rank scores its share of the candidates. Every rank must
call ``explain`` with the same queries.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from lightning_fastif import FastIF, FastIFConfig, compute_influences


def logistic_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.binary_cross_entropy_with_logits(model(x).squeeze(-1), y)


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, weight_decay: float) -> None:
    """Fit by full-batch L-BFGS. Every rank gets the same weights because every rank draws the same data."""
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=200, tolerance_grad=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = logistic_loss(model, (x, y)) + weight_decay * model.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-train", type=int, default=2000, help="training examples")
    parser.add_argument("--features", type=int, default=50, help="input features")
    parser.add_argument("--repeats", type=int, default=4, help="LiSSA repeats, split over the ranks")
    parser.add_argument("--depth", type=int, default=500, help="LiSSA steps per repeat")
    parser.add_argument("--k", type=int, default=200, help="FastIF's kNN candidates per query")
    args = parser.parse_args()

    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1

    torch.manual_seed(0)
    x = torch.randn(args.num_train, args.features, dtype=torch.float64)
    true_weights = torch.randn(args.features, dtype=torch.float64)
    y = (torch.rand(args.num_train, dtype=torch.float64) < torch.sigmoid(x @ true_weights)).double()
    model = nn.Linear(args.features, 1, bias=False).double()
    weight_decay = 0.01
    fit(model, x, y, weight_decay)
    query = (x[:1], 1 - y[:1])  # a training input with the wrong label, as a stand-in for a model error

    start = time.perf_counter()
    scores = compute_influences(
        model,
        logistic_loss,
        TensorDataset(x, y),
        query,
        solver="lissa",
        weight_decay=weight_decay,
        damping=0.0,
        scale=2.0,
        depth=args.depth,
        repeats=args.repeats,
        batch_size=32,
        seed=0,
    )
    seconds = time.perf_counter() - start
    if rank == 0:
        helpful = scores.argsort()[:5].tolist()
        print(f"{world_size} process(es): {seconds:.2f} s for {len(scores)} training examples")
        print(f"most helpful training examples (negative scores): {helpful}")
        print(f"their scores: {[round(float(scores[i]), 4) for i in helpful]}")

    config = FastIFConfig(
        k=args.k,
        damping=0.0,
        scale=2.0,
        depth=args.depth,
        repeats=args.repeats,
        batch_size=32,
        weight_decay=weight_decay,
    )
    fastif = FastIF(model, logistic_loss, lambda batch: batch[0], TensorDataset(x, y), config=config)
    start = time.perf_counter()
    results = fastif.explain((x[:4], 1 - y[:4]), mode="each")
    seconds = time.perf_counter() - start
    if rank == 0:
        print(f"FastIF, {world_size} process(es): {seconds:.2f} s for 4 queries, {args.k} candidates each")
        for query, result in enumerate(results):
            helpful = result.top.helpful_indices[:3].tolist()
            values = [round(float(score), 6) for score in result.top.helpful_scores[:3]]
            print(f"query {query}: most helpful candidates {helpful}, scores {values}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
