"""FastIF influence functions for PyTorch Lightning."""

from lightning_fastif.callbacks import InfluenceCallback
from lightning_fastif.fastif import FastIF, FastIFConfig, QueryInfluence
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
from lightning_fastif.mixin import FastIFMixin

__all__ = [
    "CGSolver",
    "ExactSolver",
    "FastIF",
    "FastIFConfig",
    "FastIFMixin",
    "InfluenceCallback",
    "InfluenceComputer",
    "LiSSADivergenceError",
    "LiSSASolver",
    "QueryInfluence",
    "TopInfluences",
    "compute_influences",
    "influence_scores",
    "select_parameters",
    "top_influences",
]
