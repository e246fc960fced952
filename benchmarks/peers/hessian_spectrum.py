"""Print the eigenvalue range of a saved logistic problem's Hessian and the top eigenvalues of batch Hessians.

Each LiSSA step multiplies by ``1 - eigenvalue / scale`` along the eigenvectors of its batch Hessian. So
the recursion diverges when a batch's top eigenvalue exceeds twice the scale, and it converges more slowly
the larger the scale is against the smallest eigenvalue of the damped Hessian. This script prints both
for a ``problem.pt`` that ``benchmarks/peers.py`` saved. A batch Hessian is that of the mean loss of
examples drawn uniformly with replacement, without the L2 term.

Usage: python benchmarks/peers/hessian_spectrum.py runs/peers/logistic_d1000/problem.pt --batch-sizes 16 64
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from problem import load_problem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("problem", type=Path, help="problem.pt of a logistic run of benchmarks/peers.py")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64], help="examples per batch Hessian")
    parser.add_argument("--samples", type=int, default=50, help="batches drawn per batch size")
    parser.add_argument("--seed", type=int, default=0, help="seed of the batch draws")
    args = parser.parse_args()
    if not args.problem.is_file():
        parser.error(
            f"{args.problem} is not a file. Run benchmarks/peers.py with --out-dir first; it saves problem.pt."
        )

    problem = load_problem(args.problem)
    x, theta = problem.x_train, problem.theta
    probabilities = torch.sigmoid(x @ theta)
    curvature = probabilities * (1 - probabilities)
    num_train, features = x.shape
    damping = 2 * problem.weight_decay
    hessian = (x.T * curvature) @ x / num_train + damping * torch.eye(features, dtype=x.dtype)
    eigenvalues = torch.linalg.eigvalsh(hessian)
    print(f"N={num_train}, D={features}, weight decay {problem.weight_decay}")
    print(f"Hessian with the L2 term: eigenvalues from {eigenvalues[0].item():.4g} to {eigenvalues[-1].item():.4g}")

    generator = torch.Generator().manual_seed(args.seed)
    for batch_size in args.batch_sizes:
        tops = []
        for _ in range(args.samples):
            rows = torch.randint(0, num_train, (batch_size,), generator=generator)
            batch_hessian = (x[rows].T * curvature[rows]) @ x[rows] / batch_size
            tops.append(torch.linalg.eigvalsh(batch_hessian)[-1].item())
        print(
            f"batch size {batch_size}: top eigenvalue of {args.samples} batch Hessians, max {max(tops):.4g}, "
            f"median {statistics.median(tops):.4g}"
        )


if __name__ == "__main__":
    main()
