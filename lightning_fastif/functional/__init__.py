"""The mathematics of influence functions in plain torch: no Lightning imports here."""

from lightning_fastif.functional.data import TrainingSet
from lightning_fastif.functional.gradients import FunctionalLoss
from lightning_fastif.functional.params import ParameterSelection, influence_mode, select_parameters
from lightning_fastif.functional.scores import TopInfluences, influence_scores, top_influences
from lightning_fastif.functional.solvers import (
    CGSolver,
    ExactSolver,
    IHVPSolver,
    LiSSADivergenceError,
    LiSSASolver,
    make_solver,
)

__all__ = [
    "CGSolver",
    "ExactSolver",
    "FunctionalLoss",
    "IHVPSolver",
    "LiSSADivergenceError",
    "LiSSASolver",
    "ParameterSelection",
    "TopInfluences",
    "TrainingSet",
    "influence_mode",
    "influence_scores",
    "make_solver",
    "select_parameters",
    "top_influences",
]
