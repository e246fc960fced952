"""A tiny randomly initialised BERT sequence classifier and token batches for it."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification

VOCAB_SIZE = 100


def tiny_bert(num_labels: int = 3, seed: int = 0, hidden_size: int = 32) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        num_labels=num_labels,
        attn_implementation="eager",
    )
    return BertForSequenceClassification(config)


def token_items(count: int, length: int = 12, num_labels: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random token examples with some padding, as a tokenizer would give them."""
    gen = torch.Generator().manual_seed(seed)
    items = []
    for i in range(count):
        ids = torch.randint(1, VOCAB_SIZE, (length,), generator=gen)
        mask = torch.ones(length, dtype=torch.long)
        pad = int(torch.randint(0, length // 2, (1,), generator=gen))
        if pad:
            ids[-pad:] = 0
            mask[-pad:] = 0
        label = torch.randint(0, num_labels, (), generator=gen)
        items.append({"input_ids": ids, "attention_mask": mask, "labels": label, "index": torch.tensor(i)})
    return items
