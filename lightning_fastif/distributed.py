"""FastIF's parallel variant: LiSSA repeats and candidate scoring split across the ranks of a process group.

Everything here uses the default process group that Lightning or torchrun already set up; no ports are
opened and no processes are started. Without an initialised group every function runs the whole work
in the calling process.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def is_distributed() -> bool:
    """Return whether a default process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """Return ``(rank, world_size)``, ``(0, 1)`` without a process group."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def share(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """Return the ``(start, stop)`` of rank ``rank``'s contiguous share of ``total`` items.

    The first ``total % world_size`` ranks get one item more, so shares differ by at most one.
    """
    base, extra = divmod(total, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class PendingSum:
    """A tensor that is being summed over the ranks, so that the caller can work while the sum travels.

    ``result()`` waits for the sum and returns it divided by ``divisor``. Without a process group, or
    with ``sum_over_ranks=False`` for a value that every rank computed whole, nothing is sent and the
    tensor is the result.

    Args:
        tensor: This rank's part, which is summed in place.
        divisor: What the sum is divided by, for example the number of LiSSA repeats for a mean.
        sum_over_ranks: Whether to sum ``tensor`` over the ranks.
    """

    def __init__(self, tensor: Tensor, divisor: float = 1.0, *, sum_over_ranks: bool = True) -> None:
        self.shape = tensor.shape
        self._tensor = tensor
        self._divisor = divisor
        self._work = None
        if sum_over_ranks and is_distributed():
            self._work = dist.all_reduce(tensor, op=dist.ReduceOp.SUM, async_op=True)
        self._result: Tensor | None = None

    @property
    def in_flight(self) -> bool:
        """Whether the sum was sent to other ranks and :meth:`result` has not yet collected it."""
        return self._work is not None and self._result is None

    def result(self) -> Tensor:
        """Wait for the sum over the ranks and return it divided by ``divisor``."""
        if self._result is None:
            if self._work is not None:
                self._work.wait()
            self._result = self._tensor if self._divisor == 1 else self._tensor / self._divisor
        return self._result


def all_gather_columns(local: Tensor, sizes: list[int]) -> Tensor:
    """Concatenate each rank's ``[Q, n_rank]`` block along dim 1, in rank order.

    Args:
        local: This rank's block, shape ``[Q, sizes[rank]]``.
        sizes: Column count of every rank's block.
    """
    if not is_distributed():
        return local
    width = max(sizes)
    padded = torch.zeros(local.shape[0], width, dtype=local.dtype, device=local.device)
    padded[:, : local.shape[1]] = local
    blocks = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(blocks, padded)
    return torch.cat([block[:, :size] for block, size in zip(blocks, sizes, strict=True)], dim=1)


def all_gather_equal(local: Tensor) -> list[Tensor]:
    """Collect a tensor of the same shape and dtype from every rank, in rank order."""
    if not is_distributed():
        return [local]
    blocks = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(blocks, local.contiguous())
    return blocks


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Send a picklable value from rank ``src`` to every rank and return it."""
    if not is_distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_objects(value: Any) -> list[Any]:
    """Collect a picklable value from every rank, in rank order."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy the parameters and buffers of rank ``src``'s ``module`` into every rank's, in place."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            dist.broadcast(tensor.data, src=src)
