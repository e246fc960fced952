"""Inverse-Hessian-vector product (ihvp) solvers behind one interface: exact, conjugate gradient and LiSSA.

Each solver returns ``(H + damping * I)^-1 v`` for the Hessian ``H`` of the mean training loss plus the L2
term, except LiSSA, whose recursion (Agarwal et al. 2017, as used by Koh and Liang 2017 and FastIF) has the
fixed point ``(H + damping * scale * I)^-1 v``: see :class:`LiSSASolver`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lightning_fastif.functional.data import TrainingSet
from lightning_fastif.functional.gradients import FunctionalLoss, mean_over_batches

StepCallback = Callable[[int, int, float], None]
"""Called after each LiSSA step with ``(step, total_steps, norm of the current estimate)``."""


class LiSSADivergenceError(RuntimeError):
    """Raised when the LiSSA recursion produces NaN or inf or its norm grows geometrically."""


class IHVPSolver(ABC):
    """Computes inverse-Hessian-vector products for a loss over a training set."""

    @abstractmethod
    def solve(self, loss: FunctionalLoss, train: TrainingSet, vectors: Tensor) -> Tensor:
        """Return the ihvp of each row of ``vectors`` (shape ``[Q, P]``), shape ``[Q, P]``."""


def _check_damping(damping: float) -> None:
    if not (damping >= 0 and math.isfinite(damping)):
        raise ValueError(f"`damping` must be a finite number >= 0, but got {damping}.")


def _check_batch_size(batch_size: int) -> None:
    if batch_size <= 0:
        raise ValueError(f"`batch_size` must be a positive integer, but got {batch_size}.")


@dataclass(frozen=True)
class ExactSolver(IHVPSolver):
    """Builds the explicit Hessian and solves ``(H + damping * I) x = v``.

    Only for small parameter counts: the Hessian has ``P * P`` entries.

    Args:
        damping: Added to the Hessian's diagonal.
        batch_size: Examples per batch when the Hessian is accumulated over the training set.
        max_parameters: Largest ``P`` accepted; above it use the "lissa" or "cg" solver.
    """

    damping: float = 0.0
    batch_size: int = 256
    max_parameters: int = 5000

    def __post_init__(self) -> None:
        _check_damping(self.damping)
        _check_batch_size(self.batch_size)

    def hessian(self, loss: FunctionalLoss, train: TrainingSet) -> Tensor:
        """Return the damped Hessian ``[P, P]`` of the mean training loss plus the L2 term."""
        numel = loss.selection.numel
        if numel > self.max_parameters:
            raise ValueError(
                f"The exact solver builds a {numel} x {numel} Hessian, above `max_parameters={self.max_parameters}`. "
                "Use solver='lissa' or solver='cg', select fewer parameters, or raise `max_parameters`."
            )
        hessian = mean_over_batches((loss.hessian(batch), size) for batch, size in train.full_pass(self.batch_size))
        hessian = 0.5 * (hessian + hessian.T)
        eye = torch.eye(numel, dtype=hessian.dtype, device=hessian.device)
        return hessian + (2 * loss.weight_decay + self.damping) * eye

    def solve(self, loss: FunctionalLoss, train: TrainingSet, vectors: Tensor) -> Tensor:
        hessian = self.hessian(loss, train)
        eigenvalues = torch.linalg.eigvalsh(hessian)
        magnitude = eigenvalues.abs()
        tolerance = magnitude.max() * hessian.shape[0] * torch.finfo(hessian.dtype).eps
        if magnitude.min() <= tolerance:
            raise ValueError(
                f"The Hessian is singular (smallest |eigenvalue| {float(magnitude.min()):.3g} with "
                f"damping={self.damping}), so it has no inverse. Add damping, for example damping=1e-3."
            )
        return torch.linalg.solve(hessian, vectors.to(hessian.dtype).T).T


@dataclass(frozen=True)
class CGSolver(IHVPSolver):
    """Conjugate gradient on ``(H + damping * I) x = v`` with Hessian-vector products over the whole training set.

    CG assumes a positive definite system: on a non-convex loss add enough damping.

    Args:
        damping: Added to the Hessian's diagonal.
        batch_size: Examples per batch in each full pass.
        max_iterations: Upper bound on CG iterations; defaults to ``P``.
        tolerance: Stop when the residual norm falls below ``tolerance * ||v||``.
    """

    damping: float = 0.0
    batch_size: int = 256
    max_iterations: int | None = None
    tolerance: float = 1e-10

    def __post_init__(self) -> None:
        _check_damping(self.damping)
        _check_batch_size(self.batch_size)

    def hvp(self, loss: FunctionalLoss, train: TrainingSet, vector: Tensor) -> Tensor:
        product = mean_over_batches((loss.hvp(batch, vector), size) for batch, size in train.full_pass(self.batch_size))
        return product + self.damping * vector

    def solve(self, loss: FunctionalLoss, train: TrainingSet, vectors: Tensor) -> Tensor:
        return torch.stack([self._solve_one(loss, train, v) for v in vectors])

    def _solve_one(self, loss: FunctionalLoss, train: TrainingSet, v: Tensor) -> Tensor:
        x = torch.zeros_like(v)
        residual = v.clone()
        direction = residual.clone()
        rs_old = residual @ residual
        limit = self.max_iterations or v.numel()
        threshold = self.tolerance * torch.linalg.vector_norm(v)
        for _ in range(limit):
            if torch.sqrt(rs_old) <= threshold:
                break
            h_direction = self.hvp(loss, train, direction)
            curvature = direction @ h_direction
            if curvature <= 0:
                raise ValueError(
                    f"Conjugate gradient met non-positive curvature ({float(curvature):.3g}): the damped Hessian "
                    f"is not positive definite at damping={self.damping}. Add damping or use solver='lissa'."
                )
            alpha = rs_old / curvature
            x = x + alpha * direction
            residual = residual - alpha * h_direction
            rs_new = residual @ residual
            direction = residual + (rs_new / rs_old) * direction
            rs_old = rs_new
        return x


@dataclass(frozen=True)
class LiSSASolver(IHVPSolver):
    """LiSSA: a stochastic Neumann series for the ihvp.

    Each repeat runs ``depth`` steps of ``h <- v + (1 - damping) * h - H_b h / scale`` with ``H_b`` the Hessian
    of a random training batch of ``batch_size`` examples, and returns ``h / scale``. The fixed point is
    ``(H + damping * scale * I)^-1 v``, so compare it with the exact solver at ``damping * scale``. The
    recursion converges when ``scale`` exceeds the largest eigenvalue of ``H``. Repeat ``r`` draws its
    batches from a generator seeded with ``seed + r``, and the result is the mean over repeats.

    Args:
        damping: Shrinks the estimate each step; the effective damping of the solve is ``damping * scale``.
        scale: Divides the Hessian; must exceed its largest eigenvalue.
        depth: Recursion steps per repeat.
        repeats: Independent estimates averaged.
        batch_size: Training examples per Hessian-vector product.
        seed: Base seed of the batch sampling.
        repeat_offset: Index of the first repeat, so workers can each run a share of the repeats.
        progress: Show a tqdm progress bar over all steps.
        step_callback: Called after each step with ``(step, total_steps, norm)``.
        divergence_factor: Raise once ``||h||`` exceeds ``divergence_factor * (step + 1) * ||v||``, a bound
            that a convergent recursion never reaches.
    """

    damping: float = 5e-3
    scale: float = 1e4
    depth: int = 1000
    repeats: int = 1
    batch_size: int = 1
    seed: int = 0
    repeat_offset: int = 0
    progress: bool = False
    step_callback: StepCallback | None = None
    divergence_factor: float = 10.0

    def __post_init__(self) -> None:
        _check_damping(self.damping)
        _check_batch_size(self.batch_size)
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"`scale` must be a finite number > 0, but got {self.scale}.")
        if self.depth <= 0:
            raise ValueError(f"`depth` must be a positive integer, but got {self.depth}.")
        if self.repeats <= 0:
            raise ValueError(f"`repeats` must be a positive integer, but got {self.repeats}.")

    def solve(self, loss: FunctionalLoss, train: TrainingSet, vectors: Tensor) -> Tensor:
        return self.solve_sum(loss, train, vectors) / self.repeats

    def solve_sum(self, loss: FunctionalLoss, train: TrainingSet, vectors: Tensor) -> Tensor:
        """Return the sum (not the mean) of this solver's repeats, for workers that all-reduce their shares."""
        total = torch.zeros_like(vectors)
        bar = tqdm(total=self.repeats * self.depth, desc="LiSSA", disable=not self.progress, leave=False)
        try:
            for repeat in range(self.repeats):
                total += self._one_repeat(loss, train, vectors, repeat, bar)
        finally:
            bar.close()
        return total

    def _one_repeat(self, loss: FunctionalLoss, train: TrainingSet, vectors: Tensor, repeat: int, bar: tqdm) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed + self.repeat_offset + repeat)
        batches = train.random_batches(self.batch_size, generator)
        estimate = vectors.clone()
        v_norm = float(torch.linalg.vector_norm(vectors))
        for step in range(self.depth):
            batch = next(batches)
            products = loss.hvps(batch, estimate)
            estimate = vectors + (1 - self.damping) * estimate - products / self.scale
            norm = float(torch.linalg.vector_norm(estimate))
            self._check_divergence(norm, v_norm, step)
            bar.update(1)
            if self.step_callback is not None:
                self.step_callback(repeat * self.depth + step + 1, self.repeats * self.depth, norm)
        return estimate / self.scale

    def _check_divergence(self, norm: float, v_norm: float, step: int) -> None:
        if not math.isfinite(norm) or norm > self.divergence_factor * (step + 1) * max(v_norm, 1e-30):
            raise LiSSADivergenceError(
                f"LiSSA diverged at step {step + 1}: the estimate's norm is {norm:.3g} for a vector of norm "
                f"{v_norm:.3g}. Raise `scale` (now {self.scale:g}) above the largest Hessian eigenvalue, "
                "or raise `damping`."
            )


SOLVERS: dict[str, type[IHVPSolver]] = {"exact": ExactSolver, "cg": CGSolver, "lissa": LiSSASolver}


def make_solver(name: str, **options: object) -> IHVPSolver:
    """Build a solver by name ("exact", "cg" or "lissa") from keyword options."""
    if name not in SOLVERS:
        raise ValueError(f"Unknown solver {name!r}. Choose one of {sorted(SOLVERS)}.")
    cls = SOLVERS[name]
    fields = set(cls.__dataclass_fields__)  # type: ignore[attr-defined]
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(f"Solver {name!r} takes no option(s) {unknown}. Its options are {sorted(fields)}.")
    return cls(**options)  # type: ignore[arg-type]
