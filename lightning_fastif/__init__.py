"""FastIF influence functions for PyTorch Lightning."""

from lightning_fastif.functional import (
    CGSolver,
    ExactSolver,
    LiSSADivergenceError,
    LiSSASolver,
    TopInfluences,
    influence_scores,
    select_parameters,
    top_influences,
)
from lightning_fastif.influence import InfluenceComputer, compute_influences

__all__ = [
    "CGSolver",
    "ExactSolver",
    "InfluenceComputer",
    "LiSSADivergenceError",
    "LiSSASolver",
    "TopInfluences",
    "compute_influences",
    "influence_scores",
    "select_parameters",
    "top_influences",
]
