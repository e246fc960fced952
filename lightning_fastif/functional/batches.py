"""Helpers for batches: dicts, tuples or lists of tensors whose first dim is the example dim."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map


def batch_size_of(batch: Any, *, name: str = "batch") -> int:
    """Return the number of examples in a collated batch.

    Raises:
        TypeError: If the batch contains no tensor, a tensor with no dims, or tensors whose first dims differ.
    """
    leaves = [leaf for leaf in tree_flatten(batch)[0] if isinstance(leaf, Tensor)]
    if not leaves:
        raise TypeError(
            f"`{name}` is not a batch: it contains no tensor (got {type(batch).__name__}). "
            "Pass a collated batch, for example `torch.utils.data.default_collate([dataset[i] for i in ...])`."
        )
    if any(leaf.dim() == 0 for leaf in leaves):
        raise TypeError(
            f"`{name}` is not a batch: it contains a 0-dim tensor. Every tensor needs a leading example dim."
        )
    sizes = {leaf.shape[0] for leaf in leaves}
    if len(sizes) != 1:
        raise TypeError(f"`{name}` is not a batch: its tensors have different first dims {sorted(sizes)}.")
    size = sizes.pop()
    if size == 0:
        raise ValueError(f"`{name}` is empty: its tensors have 0 examples.")
    return size


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Return examples ``start:stop`` of a batch, leaving non-tensor leaves as they are."""
    return tree_map(lambda leaf: leaf[start:stop] if isinstance(leaf, Tensor) else leaf, batch)


def move_batch(batch: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Move every tensor of a batch to ``device``; floating tensors are cast to ``dtype`` when given."""

    def move(leaf: Any) -> Any:
        if not isinstance(leaf, Tensor):
            return leaf
        if dtype is not None and leaf.is_floating_point():
            return leaf.to(device=device, dtype=dtype)
        return leaf.to(device=device)

    return tree_map(move, batch)


def checked_loss(loss: Any, *, where: str) -> Tensor:
    """Validate that a loss function returned a finite scalar tensor."""
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"`loss_fn` must return the mean loss over the batch as a scalar tensor, but returned {shape} "
            f"{where}. Reduce it with `.mean()`."
        )
    return loss.reshape(())


def check_finite(loss: Tensor, *, where: str) -> None:
    """Raise if a loss value is NaN or infinite."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise ValueError(f"`loss_fn` returned a non-finite loss ({value}) {where}. Check the inputs and the model.")


LossFn = Callable[[torch.nn.Module, Any], Tensor]
