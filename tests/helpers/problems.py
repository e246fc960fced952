"""Small convex problems in float64 with closed-form Hessians, used as oracles."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset


@dataclass
class Problem:
    model: nn.Module
    dataset: TensorDataset
    x: Tensor
    y: Tensor
    weight_decay: float

    def loss_fn(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        raise NotImplementedError


class RidgeProblem(Problem):
    def loss_fn(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return 0.5 * ((model(x).squeeze(-1) - y) ** 2).mean()

    def hessian(self) -> Tensor:
        n, d = self.x.shape
        return self.x.T @ self.x / n + 2 * self.weight_decay * torch.eye(d, dtype=torch.float64)


class LogisticProblem(Problem):
    def loss_fn(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.binary_cross_entropy_with_logits(model(x).squeeze(-1), y)

    def hessian(self) -> Tensor:
        n, d = self.x.shape
        with torch.no_grad():
            p = torch.sigmoid(self.model(self.x).squeeze(-1))
        weights = p * (1 - p)
        return (self.x.T * weights) @ self.x / n + 2 * self.weight_decay * torch.eye(d, dtype=torch.float64)


def linear_model(features: int) -> nn.Module:
    return nn.Linear(features, 1, bias=False).double()


def ridge_problem(n: int = 100, d: int = 10, weight_decay: float = 0.01, seed: int = 0) -> RidgeProblem:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(d, generator=gen, dtype=torch.float64) + 0.1 * torch.randn(
        n, generator=gen, dtype=torch.float64
    )
    model = linear_model(d)
    with torch.no_grad():
        # The exact minimiser of 0.5 * mean squared error + weight_decay * ||w||^2.
        w = torch.linalg.solve(x.T @ x / n + 2 * weight_decay * torch.eye(d, dtype=torch.float64), x.T @ y / n)
        model.weight.copy_(w.unsqueeze(0))
    return RidgeProblem(model, TensorDataset(x, y), x, y, weight_decay)


def fit_logistic(
    x: Tensor, y: Tensor, weight_decay: float, sample_weights: Tensor | None = None, init: Tensor | None = None
) -> Tensor:
    """Minimise ``sum_i w_i * bce_i / n + weight_decay * ||theta||^2`` by Newton's method to machine precision."""
    n, d = x.shape
    w = torch.ones(n, dtype=torch.float64) if sample_weights is None else sample_weights
    theta = torch.zeros(d, dtype=torch.float64) if init is None else init.clone()
    for _ in range(50):
        p = torch.sigmoid(x @ theta)
        gradient = x.T @ (w * (p - y)) / n + 2 * weight_decay * theta
        hessian = (x.T * (w * p * (1 - p))) @ x / n + 2 * weight_decay * torch.eye(d, dtype=torch.float64)
        step = torch.linalg.solve(hessian, gradient)
        theta = theta - step
        if step.abs().max() < 1e-14:
            break
    return theta


def logistic_problem(n: int = 100, d: int = 10, weight_decay: float = 0.01, seed: int = 0) -> LogisticProblem:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    logits = x @ torch.randn(d, generator=gen, dtype=torch.float64)
    y = (torch.rand(n, generator=gen, dtype=torch.float64) < torch.sigmoid(logits)).double()
    model = linear_model(d)
    with torch.no_grad():
        model.weight.copy_(fit_logistic(x, y, weight_decay).unsqueeze(0))
    return LogisticProblem(model, TensorDataset(x, y), x, y, weight_decay)
