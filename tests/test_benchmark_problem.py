"""The LOO ground truth of the peers benchmark (``benchmarks/peers/problem.py``), against Newton refits."""

import importlib.util
import sys
from pathlib import Path

import torch

from tests.helpers.problems import fit_logistic

PROBLEM_FILE = Path(__file__).resolve().parents[1] / "benchmarks" / "peers" / "problem.py"


def load_benchmark_problem():
    spec = importlib.util.spec_from_file_location("benchmark_problem", PROBLEM_FILE)
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the module runs.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_leave_one_out_fits_match_newton():
    problem = load_benchmark_problem()
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(60, 8, generator=generator, dtype=torch.float64)
    y = (
        torch.rand(60, generator=generator, dtype=torch.float64)
        < torch.sigmoid(x @ torch.randn(8, generator=generator, dtype=torch.float64))
    ).double()
    theta = problem.fit_logistic(x, y, 0.01)
    refits = list(problem.leave_one_out_fits(x, y, 0.01, theta))
    assert len(refits) == 60
    largest_move = 0.0
    for i, refit in enumerate(refits):
        keep = torch.ones(60, dtype=torch.float64)
        keep[i] = 0.0
        newton = fit_logistic(x, y, 0.01, keep, init=theta)
        torch.testing.assert_close(refit, newton, rtol=0, atol=1e-12)
        largest_move = max(largest_move, (newton - theta).abs().max().item())
    # Leaving an example out must move the fit, or the comparison above would pass with theta itself.
    assert largest_move > 1e-3


def test_problem_loo_change_matches_newton():
    problem = load_benchmark_problem()
    logistic = problem.make_problem(num_train=40, features=5, num_queries=3, weight_decay=0.01, seed=1)
    for i in (0, 17, 39):
        keep = torch.ones(40, dtype=torch.float64)
        keep[i] = 0.0
        newton = fit_logistic(logistic.x_train, logistic.y_train, 0.01, keep, init=logistic.theta)
        expected = problem.query_losses(newton, logistic.x_query, logistic.y_query) - problem.query_losses(
            logistic.theta, logistic.x_query, logistic.y_query
        )
        torch.testing.assert_close(logistic.loo_change[:, i], expected, rtol=0, atol=1e-12)
