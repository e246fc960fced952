"""Time the scoring of several queries' kNN candidates: a forward-mode pass per query against one union pass.

``InfluenceComputer.row_scores`` scores each ``s_test`` row on its own candidates. With ``score_method="jvp"``
every row gets forward-mode passes over its own candidates, so a candidate shared by several queries is
scored once per query. With ``score_method="gradient"`` all rows are scored together over the union of the
candidate lists: one per-example gradient per candidate and one matrix product. Under ``"auto"`` the union
pass runs on models with at most ``SHARED_SCORING_MAX_PARAMETERS`` differentiated parameters.

This script times both ways on a logistic regression (20 parameters, float64) and on 2-hidden-layer tanh
MLPs (32 inputs, 3 classes, float32), with 5,000 random training examples and one torch thread. Each query's
candidates are its ``--k`` nearest training inputs. Each way runs twice per setting, alternating, and the
table gives the faster run.

Usage::

    python benchmarks/shared_scoring.py
"""

from __future__ import annotations

import argparse
import time

import torch
from batched_solve_rows import logistic, mlp
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lightning_fastif import InfluenceComputer


def time_scoring(name: str, model: nn.Module, data: TensorDataset, loss_fn: object, args: argparse.Namespace) -> None:
    inputs = data.tensors[0]
    for queries in args.queries:
        # Queries are training inputs with noise, and their candidates are their nearest training inputs.
        query_inputs = inputs[:queries] + 0.1 * torch.randn_like(inputs[:queries])
        candidates = [row.topk(args.k, largest=False).indices.tolist() for row in torch.cdist(query_inputs, inputs)]
        union = len(set().union(*candidates))
        computer = InfluenceComputer(model, loss_fn, data, solver="exact", gradient_batch_size=args.gradient_batch_size)
        ihvps = torch.randn(queries, computer.selection.numel, dtype=inputs.dtype) * 1e-2
        seconds: dict[str, list[float]] = {"jvp": [], "gradient": []}
        scores: dict[str, list[Tensor]] = {}
        for method in ("jvp", "gradient", "gradient", "jvp"):
            computer.score_method = method
            start = time.perf_counter()
            scores[method], _ = computer.row_scores(ihvps, candidates)
            seconds[method].append(time.perf_counter() - start)
        per_row, together = min(seconds["jvp"]), min(seconds["gradient"])
        difference = max(
            float((a - b).abs().max() / b.abs().max()) for a, b in zip(scores["gradient"], scores["jvp"], strict=True)
        )
        print(
            f"| {name} | {computer.selection.numel:,} | {queries} | {queries * args.k:,} | {union:,} "
            f"| {per_row * 1e3:.1f} | {together * 1e3:.1f} | {together / per_row:.2f} | {difference:.1e} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-train", type=int, default=5000, help="training examples")
    parser.add_argument("--k", type=int, default=100, help="candidates per query")
    parser.add_argument("--queries", type=int, nargs="+", default=[10, 100], help="query counts")
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256], help="MLP hidden widths")
    parser.add_argument("--gradient-batch-size", type=int, default=32, help="candidates per scoring call")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"{args.num_train} training examples, k={args.k}, {args.gradient_batch_size} candidates per call.\n")
    print(
        "| model | parameters | queries | candidates | union | per row (jvp) ms | union (gradient) ms "
        "| union / per row | max relative difference |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    time_scoring("logistic", *logistic(args.num_train), args)
    for width in args.widths:
        time_scoring(f"MLP, width {width}", *mlp(width, args.num_train), args)


if __name__ == "__main__":
    main()
