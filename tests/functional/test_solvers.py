"""The ihvp solvers against closed-form Hessians of ridge and logistic regression (float64)."""

import pytest
import torch

from lightning_fastif import CGSolver, ExactSolver, LiSSADivergenceError, LiSSASolver
from lightning_fastif.functional import FunctionalLoss, TrainingSet, select_parameters
from lightning_fastif.functional.gradients import BATCHED_HVPS_MAX_PARAMETERS
from tests.helpers.problems import logistic_problem, ridge_problem

EXACT_RTOL = 1e-8
CG_RTOL = 1e-6
LISSA_RTOL = 0.02


def relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(estimate - reference) / torch.linalg.vector_norm(reference))


def setup(problem):
    loss = FunctionalLoss(
        problem.model, problem.loss_fn, select_parameters(problem.model), weight_decay=problem.weight_decay
    )
    train = TrainingSet(problem.dataset)
    vector = torch.randn(1, problem.x.shape[1], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return loss, train, vector


@pytest.mark.parametrize("make_problem", [ridge_problem, logistic_problem], ids=["ridge", "logistic"])
def test_exact_matches_inverse(make_problem):
    problem = make_problem()
    loss, train, vector = setup(problem)
    reference = torch.linalg.solve(problem.hessian(), vector[0])
    estimate = ExactSolver().solve(loss, train, vector)[0]
    assert relative_error(estimate, reference) < EXACT_RTOL


@pytest.mark.parametrize("make_problem", [ridge_problem, logistic_problem], ids=["ridge", "logistic"])
def test_cg_matches_inverse(make_problem):
    problem = make_problem()
    loss, train, vector = setup(problem)
    reference = torch.linalg.solve(problem.hessian(), vector[0])
    estimate = CGSolver(batch_size=50).solve(loss, train, vector)[0]
    assert relative_error(estimate, reference) < CG_RTOL


@pytest.mark.parametrize("make_problem", [ridge_problem, logistic_problem], ids=["ridge", "logistic"])
def test_lissa_close_to_inverse(make_problem):
    # LiSSA's fixed point is (H + damping * scale * I)^-1 v; damping=1e-4 with scale=5 shifts H by 5e-4.
    problem = make_problem()
    loss, train, vector = setup(problem)
    damping, scale = 1e-4, 5.0
    shifted = problem.hessian() + damping * scale * torch.eye(problem.x.shape[1], dtype=torch.float64)
    reference = torch.linalg.solve(shifted, vector[0])
    solver = LiSSASolver(damping=damping, scale=scale, depth=300, repeats=4, batch_size=50, seed=0)
    estimate = solver.solve(loss, train, vector)[0]
    assert relative_error(estimate, reference) < LISSA_RTOL


def test_lissa_exact_fixed_point_full_batch():
    problem = ridge_problem()
    loss, train, vector = setup(problem)
    shifted = problem.hessian() + 1e-3 * 10 * torch.eye(problem.x.shape[1], dtype=torch.float64)
    reference = torch.linalg.solve(shifted, vector[0])
    estimate = LiSSASolver(damping=1e-3, scale=10.0, depth=3000, batch_size=100).solve(loss, train, vector)[0]
    assert relative_error(estimate, reference) < 1e-8


def test_lissa_repeats_equal_mean_of_seeded_runs():
    problem = logistic_problem()
    loss, train, vector = setup(problem)
    options = dict(damping=1e-3, scale=5.0, depth=20, batch_size=5)
    combined = LiSSASolver(repeats=4, seed=7, **options).solve(loss, train, vector)
    singles = [LiSSASolver(repeats=1, seed=7 + r, **options).solve(loss, train, vector) for r in range(4)]
    torch.testing.assert_close(combined, torch.stack(singles).mean(0), rtol=1e-12, atol=0)


def test_lissa_is_reproducible_under_seed():
    problem = logistic_problem()
    loss, train, vector = setup(problem)
    first = LiSSASolver(depth=30, scale=5.0, batch_size=3, seed=3).solve(loss, train, vector)
    second = LiSSASolver(depth=30, scale=5.0, batch_size=3, seed=3).solve(loss, train, vector)
    other = LiSSASolver(depth=30, scale=5.0, batch_size=3, seed=4).solve(loss, train, vector)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_lissa_step_callback_reports_each_step():
    problem = ridge_problem()
    loss, train, vector = setup(problem)
    calls = []
    LiSSASolver(depth=5, repeats=2, scale=10.0, step_callback=lambda *args: calls.append(args)).solve(
        loss, train, vector
    )
    assert [step for step, _, _ in calls] == list(range(1, 11))
    assert all(total == 10 for _, total, _ in calls)


def test_lissa_divergence_says_raise_scale():
    problem = ridge_problem(weight_decay=0.0)
    loss, train, vector = setup(problem)
    # The largest eigenvalue of X^T X / n is about 2 here, so scale=0.1 makes the recursion blow up.
    with pytest.raises(LiSSADivergenceError, match=r"diverged at step \d+.*Raise `scale` \(now 0.1\)"):
        LiSSASolver(damping=0.0, scale=0.1, depth=200, batch_size=100).solve(loss, train, vector)


def test_exact_singular_hessian_says_add_damping():
    problem = ridge_problem(n=5, d=10, weight_decay=0.0)  # rank 5 < 10 features: singular.
    loss, train, vector = setup(problem)
    with pytest.raises(ValueError, match=r"singular.*damping=0\.0.*Add damping"):
        ExactSolver(damping=0.0).solve(loss, train, vector)
    ExactSolver(damping=1e-3).solve(loss, train, vector)


def test_exact_parameter_limit_says_use_lissa():
    problem = ridge_problem()
    loss, train, vector = setup(problem)
    with pytest.raises(ValueError, match=r"10 x 10 Hessian, above `max_parameters=5`.*solver='lissa'"):
        ExactSolver(max_parameters=5).solve(loss, train, vector)


@pytest.mark.parametrize(
    ("solver", "options", "pattern"),
    [
        (ExactSolver, {"damping": -1.0}, r"`damping` must be a finite number >= 0, but got -1.0"),
        (CGSolver, {"damping": -0.5}, r"`damping` must be a finite number >= 0, but got -0.5"),
        (LiSSASolver, {"damping": -1e-3}, r"`damping` must be a finite number >= 0, but got -0.001"),
        (LiSSASolver, {"scale": 0.0}, r"`scale` must be a finite number > 0, but got 0.0"),
        (LiSSASolver, {"scale": -2.0}, r"`scale` must be a finite number > 0, but got -2.0"),
        (LiSSASolver, {"depth": 0}, r"`depth` must be a positive integer, but got 0"),
        (LiSSASolver, {"repeats": 0}, r"`repeats` must be a positive integer, but got 0"),
        (LiSSASolver, {"batch_size": 0}, r"`batch_size` must be a positive integer, but got 0"),
    ],
)
def test_solver_options_rejected(solver, options, pattern):
    with pytest.raises(ValueError, match=pattern):
        solver(**options)


def test_hvps_rows_equal_single_hvp():
    problem = logistic_problem()
    loss, train, _ = setup(problem)
    vectors = torch.randn(3, problem.x.shape[1], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    batch = train.batch(range(20))
    products = loss.hvps(batch, vectors)
    # One batched second backward pass for all rows rounds differently from a pass per row.
    for row, vector in enumerate(vectors):
        torch.testing.assert_close(products[row], loss.hvp(batch, vector), rtol=1e-12, atol=1e-15)


class _Cube(torch.autograd.Function):
    """``x ** 3`` whose backward reads a Python number, which a batched backward pass cannot do."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return _CubeGradient.apply(grad_output, x)


class _CubeGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad_output, x):
        ctx.save_for_backward(grad_output, x)
        return 3 * grad_output * x**2

    @staticmethod
    def backward(ctx, h):
        grad_output, x = ctx.saved_tensors
        if float(h.abs().sum()) == 0.0:
            return None, None
        return 3 * h * x**2, 6 * h * grad_output * x


def test_hvps_fall_back_to_one_pass_per_row(caplog):
    # loss = sum(w ** 3) over a batch of ones, so H = diag(6 w); the custom backward defeats is_grads_batched.
    model = torch.nn.Linear(4, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -1.0, 2.0, 0.25]], dtype=torch.float64))

    def cube_loss(module, batch):
        return (_Cube.apply(module.weight) * batch[0].mean()).sum()

    loss = FunctionalLoss(model, cube_loss, select_parameters(model))
    batch = [torch.ones(3, 1, dtype=torch.float64)]
    vectors = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with caplog.at_level("INFO", logger="lightning_fastif.functional.gradients"):
        products = loss.hvps(batch, vectors)
    assert "each row gets its own pass" in caplog.text
    expected = vectors * (6 * model.weight.detach()[0])
    torch.testing.assert_close(products, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(loss.hvps(batch, vectors), expected, rtol=1e-12, atol=0)


def record_grad_calls(monkeypatch):
    """Return a list that gets, for each ``torch.autograd.grad`` call, whether it was batched over rows."""
    batched_calls = []
    original = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        batched_calls.append(kwargs.get("is_grads_batched", False))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    return batched_calls


def test_hvps_batch_the_second_pass(monkeypatch):
    problem = logistic_problem()
    loss, train, _ = setup(problem)
    batched_calls = record_grad_calls(monkeypatch)
    loss.hvps(train.batch(range(20)), torch.ones(4, problem.x.shape[1], dtype=torch.float64))
    # One first-order pass and one batched second pass, not one second pass per row.
    assert batched_calls == [False, True]


def test_hvps_large_model_pass_per_row(monkeypatch):
    # 201 * 200 = 40,200 parameters, above BATCHED_HVPS_MAX_PARAMETERS, so each row gets its own pass.
    model = torch.nn.Linear(200, 201, bias=False).double()
    loss = FunctionalLoss(
        model, lambda module, batch: (module(batch[0]) ** 2).mean(), select_parameters(model), weight_decay=0.0
    )
    assert loss.selection.numel > BATCHED_HVPS_MAX_PARAMETERS
    batched_calls = record_grad_calls(monkeypatch)
    batch = [torch.randn(8, 200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)]
    loss.hvps(batch, torch.ones(3, loss.selection.numel, dtype=torch.float64))
    assert batched_calls == [False, False, False, False]


def test_unflatten_batched_rejects_wrong_width():
    selection = select_parameters(torch.nn.Linear(3, 2))
    pieces = selection.unflatten_batched(torch.zeros(4, selection.numel))
    assert [tuple(piece.shape) for piece in pieces] == [(4, 2, 3), (4, 2)]
    with pytest.raises(ValueError, match=r"Expected rows of shape \(B, 8\), but got \(4, 7\)"):
        selection.unflatten_batched(torch.zeros(4, 7))


def test_lissa_rows_equal_single_solves():
    problem = logistic_problem()
    loss, train, _ = setup(problem)
    vectors = torch.randn(3, problem.x.shape[1], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    solver = LiSSASolver(damping=1e-4, scale=5.0, depth=50, repeats=2, batch_size=10, seed=0)
    together = solver.solve(loss, train, vectors)
    for row, vector in enumerate(vectors):
        torch.testing.assert_close(
            together[row], solver.solve(loss, train, vector.unsqueeze(0))[0], rtol=1e-10, atol=1e-14
        )
