"""Access to the training set as full passes (exact, CG) or seeded random batches (LiSSA)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset, default_collate

from lightning_fastif.functional.batches import move_batch


class TrainingSet:
    """A map-style dataset with a collate function, read in full passes or in seeded random batches.

    Args:
        dataset: A map-style ``Dataset`` whose items collate with ``collate_fn``.
        collate_fn: Turns a list of items into a batch. Defaults to torch's ``default_collate``.
        device: Device that batches are moved to.
        dtype: Floating tensors of each batch are cast to this dtype when given.
        indices: Restrict the set to these dataset positions.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        indices: Sequence[int] | None = None,
    ) -> None:
        try:
            size = len(dataset)  # type: ignore[arg-type]
        except TypeError as err:
            raise TypeError("The training set must be a map-style Dataset with __len__.") from err
        if size == 0:
            raise ValueError("The training set is empty: influence needs at least one training example.")
        self.dataset = dataset
        self.collate_fn = collate_fn or default_collate
        self.device = torch.device(device)
        self.dtype = dtype
        self.indices = list(range(size)) if indices is None else [int(i) for i in indices]
        # The first position when the indices are consecutive, increasing and inside the dataset, so that
        # full passes over a TensorDataset can slice its tensors. None for any other order, and for
        # negative positions, which index from the end.
        self._first_of_range: int | None = None
        if indices is None or (isinstance(indices, range) and indices.step == 1):
            if self.indices and 0 <= self.indices[0] and self.indices[-1] < size:
                self._first_of_range = self.indices[0]
        if not self.indices:
            raise ValueError("The list of training indices is empty: influence needs at least one training example.")

    def __len__(self) -> int:
        return len(self.indices)

    def batch(self, positions: Sequence[int]) -> Any:
        """Collate the items at the given dataset positions into one batch on the target device.

        A plain ``TensorDataset`` with the default collate function is indexed with all positions at once,
        which gives the list that ``default_collate`` builds from its items, without a Python call per item.
        """
        if self._indexes_tensors:
            index = torch.as_tensor(list(positions), dtype=torch.long)
            collated: Any = [tensor[index] for tensor in self.dataset.tensors]  # type: ignore[attr-defined]
        else:
            collated = self.collate_fn([self.dataset[i] for i in positions])
        return move_batch(collated, self.device, self.dtype)

    @property
    def _indexes_tensors(self) -> bool:
        return (
            type(self.dataset) is TensorDataset and self.collate_fn is default_collate and len(self.dataset.tensors) > 0
        )

    def full_pass(self, batch_size: int) -> Iterator[tuple[Any, int]]:
        """Yield ``(batch, size)`` over every example once, in order.

        Over consecutive positions of a plain ``TensorDataset`` the batches are copies of slices of its
        tensors, where :meth:`batch` builds an index for each batch. Either way a loss or features
        function that edits its batch in place leaves the dataset as it was.
        """
        slices = self._first_of_range is not None and self._indexes_tensors
        for start in range(0, len(self.indices), batch_size):
            size = min(batch_size, len(self.indices) - start)
            if slices:
                first = self._first_of_range + start  # type: ignore[operator]
                yield self._copied_slices(first, first + size), size
            else:
                yield self.batch(self.indices[start : start + size]), size

    def _copied_slices(self, start: int, stop: int) -> list[torch.Tensor]:
        """Return rows ``start:stop`` of each tensor of the TensorDataset, moved, cast and never a view."""
        rows = []
        for tensor in self.dataset.tensors:  # type: ignore[attr-defined]
            view = tensor[start:stop]
            moved = move_batch(view, self.device, self.dtype)
            rows.append(view.clone() if moved is view else moved)
        return rows

    def random_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Any]:
        """Yield batches drawn without replacement within an epoch and reshuffled each epoch, forever."""
        size = min(batch_size, len(self.indices))
        while True:
            order = torch.randperm(len(self.indices), generator=generator).tolist()
            for start in range(0, len(order) - size + 1, size):
                yield self.batch([self.indices[j] for j in order[start : start + size]])
