"""A tiny BERT classifier LightningModule with FastIFMixin, and token datasets for it."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_fastif.hf import sequence_classification_loss
from lightning_fastif.mixin import FastIFMixin
from tests.helpers.tiny_bert import tiny_bert, token_items


class TokenDataset(Dataset):
    def __init__(self, count: int, seed: int, length: int = 12) -> None:
        self.items = token_items(count, length=length, seed=seed)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]

    def text(self, index: int) -> str:
        return " ".join(str(t) for t in self.items[index]["input_ids"].tolist() if t)


class TinyClassifier(FastIFMixin, pl.LightningModule):
    def __init__(self, seed: int = 0, lr: float = 1e-3) -> None:
        super().__init__()
        self.model = tiny_bert(seed=seed)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        loss = sequence_classification_loss(self.model, batch)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        loss = sequence_classification_loss(self.model, batch)
        self.log("val_loss", loss, add_dataloader_idx=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class TokenDataModule(pl.LightningDataModule):
    def __init__(self, train_size: int = 48, val_size: int = 16, batch_size: int = 8) -> None:
        super().__init__()
        self.train_dataset = TokenDataset(train_size, seed=0)
        self.val_dataset = TokenDataset(val_size, seed=1)
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_dataset, batch_size=self.batch_size)
