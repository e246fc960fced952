"""Influence scores and the sign convention used everywhere in lightning_fastif.

A score is the predicted change of the query loss when a training example is up-weighted,

    score(z, z') = -grad L(z')^T H^-1 grad L(z),

so a **negative** score means the training example is **helpful** (up-weighting it lowers the query loss)
and a **positive** score means it is **harmful**. This is the convention of Koh and Liang (2017) and FastIF.
Removing example ``z`` from ``n`` training examples changes the query loss by about ``-score / n``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def influence_scores(train_gradients: Tensor, ihvps: Tensor, *, num_train: int | None = None) -> Tensor:
    """Score training examples against queries.

    Args:
        train_gradients: Per-example training gradients, shape ``[N, P]``.
        ihvps: Inverse-Hessian-vector products of the query gradients (``s_test``), shape ``[Q, P]``.
        num_train: When given, divide scores by it, so a score is the change from up-weighting one example
            by ``1 / num_train`` in the mean loss.

    Returns:
        Scores of shape ``[Q, N]``.
    """
    scores = -(ihvps.to(train_gradients.dtype) @ train_gradients.T)
    if num_train is not None:
        scores = scores / num_train
    return scores


@dataclass(frozen=True)
class TopInfluences:
    """The most helpful and most harmful training examples for one query.

    Attributes:
        helpful_indices: Training indices of the most negative scores, most helpful first, shape ``[k]``.
        helpful_scores: Their scores (negative is helpful), shape ``[k]``.
        harmful_indices: Training indices of the most positive scores, most harmful first, shape ``[k]``.
        harmful_scores: Their scores, shape ``[k]``.
    """

    helpful_indices: Tensor
    helpful_scores: Tensor
    harmful_indices: Tensor
    harmful_scores: Tensor


def top_influences(scores: Tensor, k: int, indices: Tensor | None = None) -> TopInfluences:
    """Pick the ``k`` most helpful and ``k`` most harmful training examples of one query.

    Args:
        scores: Scores of one query, shape ``[N]``.
        k: How many of each to return; capped at ``N``.
        indices: Training indices of the scored examples, shape ``[N]``; defaults to ``arange(N)``.
    """
    if scores.dim() != 1:
        raise ValueError(f"Expected scores of one query with shape [N], but got {tuple(scores.shape)}.")
    if k <= 0:
        raise ValueError(f"`k` must be a positive integer, but got {k}.")
    if indices is None:
        indices = torch.arange(scores.numel(), device=scores.device)
    count = min(k, scores.numel())
    helpful = torch.topk(scores, count, largest=False)
    harmful = torch.topk(scores, count, largest=True)
    return TopInfluences(
        helpful_indices=indices[helpful.indices],
        helpful_scores=helpful.values,
        harmful_indices=indices[harmful.indices],
        harmful_scores=harmful.values,
    )
