"""TrainingSet batches: the whole-index path for TensorDataset gives what default_collate gives."""

import pytest
import torch
from torch.utils.data import TensorDataset, default_collate

from lightning_fastif.functional import TrainingSet


class _Doubled(TensorDataset):
    """A TensorDataset subclass with its own items, which must go through ``__getitem__``."""

    def __getitem__(self, index):
        x, y = super().__getitem__(index)
        return 2 * x, y


def _dataset():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(12, 3, generator=generator), torch.arange(12)


def test_tensor_dataset_batch_equals_default_collate():
    x, y = _dataset()
    dataset = TensorDataset(x, y)
    positions = [7, 2, 2, 11]
    batch = TrainingSet(dataset).batch(positions)
    expected = default_collate([dataset[i] for i in positions])
    assert type(batch) is type(expected)
    for got, want in zip(batch, expected, strict=True):
        assert got.dtype == want.dtype
        assert torch.equal(got, want)


def test_tensor_dataset_batch_casts_floats_only():
    x, y = _dataset()
    batch = TrainingSet(TensorDataset(x, y), dtype=torch.float64).batch([0, 1])
    assert batch[0].dtype == torch.float64
    assert batch[1].dtype == torch.int64


def test_subclass_and_custom_collate_use_items():
    x, y = _dataset()
    batch = TrainingSet(_Doubled(x, y)).batch([3, 4])
    assert torch.equal(batch[0], 2 * x[[3, 4]])

    def collate(items):
        return {"x": torch.stack([item[0] for item in items]), "y": torch.stack([item[1] for item in items])}

    batch = TrainingSet(TensorDataset(x, y), collate_fn=collate).batch([5])
    assert set(batch) == {"x", "y"}
    assert torch.equal(batch["x"], x[[5]])


def test_tensor_dataset_batch_skips_item_calls(monkeypatch):
    x, y = _dataset()

    def no_items(self, index):
        raise AssertionError("TrainingSet read a TensorDataset item by item")

    monkeypatch.setattr(TensorDataset, "__getitem__", no_items)
    batch = TrainingSet(TensorDataset(x, y)).batch([1, 0])
    assert torch.equal(batch[0], x[[1, 0]])


def test_full_pass_reads_consecutive_rows():
    x, y = _dataset()
    dataset = TensorDataset(x, y)
    for indices in (None, range(3, 12)):
        training_set = TrainingSet(dataset, indices=indices)
        batches = list(training_set.full_pass(4))
        first = 0 if indices is None else 3
        assert [size for _, size in batches] == ([4, 4, 4] if indices is None else [4, 4, 1])
        assert torch.equal(torch.cat([batch[0] for batch, _ in batches]), x[first:])
        assert torch.equal(torch.cat([batch[1] for batch, _ in batches]), y[first:])


def test_full_pass_batches_are_copies():
    # A loss or features function that edits its batch in place must leave the dataset as it was.
    x, y = _dataset()
    original = x.clone()
    for indices in (None, range(2, 10), [5, 4, 6, 7], range(0, 12, 3)):
        for batch, _ in TrainingSet(TensorDataset(x, y), indices=indices).full_pass(3):
            batch[0].mul_(0)
        assert torch.equal(x, original), indices


def test_full_pass_copies_other_orders():
    x, y = _dataset()
    dataset = TensorDataset(x, y)
    for indices in ([5, 4, 6, 7], range(0, 12, 3), range(-3, 0), range(-2, 2)):
        batches = list(TrainingSet(dataset, indices=indices).full_pass(3))
        positions = list(indices)
        assert torch.equal(torch.cat([batch[0] for batch, _ in batches]), x[positions])
        assert torch.equal(torch.cat([batch[1] for batch, _ in batches]), y[positions])


def test_full_pass_rejects_positions_past_end():
    x, y = _dataset()
    with pytest.raises(IndexError):
        list(TrainingSet(TensorDataset(x, y), indices=range(8, 14)).full_pass(4))


def test_full_pass_casts_sliced_floats():
    x, y = _dataset()
    batch, size = next(TrainingSet(TensorDataset(x, y), dtype=torch.float64).full_pass(5))
    assert size == 5
    assert batch[0].dtype == torch.float64
    assert batch[1].dtype == torch.int64
    assert torch.equal(batch[0], x[:5].double())
