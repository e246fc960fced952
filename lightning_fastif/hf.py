"""Helpers for Hugging Face sequence classifiers fed tokenised dict batches."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")


def model_inputs(batch: dict[str, Any], dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Select the keys an HF encoder takes and turn a 2-D padding mask into a 4-D additive mask.

    HF builds the 4-D mask itself with data-dependent Python branches, which ``torch.func.vmap`` cannot
    trace; a prepared 4-D mask is passed through unchanged (transformers 5.x ``masking_utils``), so
    per-example gradients stay vectorised.
    """
    if not isinstance(batch, dict):
        raise TypeError(f"Expected a dict batch of tokenised inputs, but got {type(batch).__name__}.")
    inputs = {key: batch[key] for key in MODEL_INPUT_KEYS if key in batch}
    mask = inputs.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        inputs["attention_mask"] = (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
    return inputs


def sequence_classification_loss(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """Return the mean cross-entropy of an HF sequence classifier on a batch with a ``labels`` key."""
    if "labels" not in batch:
        raise KeyError("The batch has no 'labels' key, which the influence loss needs.")
    dtype = next(model.parameters()).dtype
    logits = model(**model_inputs(batch, dtype)).logits
    return F.cross_entropy(logits, batch["labels"])


def fastif_parameter_patterns(model: nn.Module, num_layers: int = 2) -> list[str]:
    """Return name patterns for FastIF's BERT selection: the last ``num_layers`` encoder layers, pooler, classifier.

    The patterns match names relative to ``model`` and to any module that holds it as a submodule.
    """
    config = getattr(model, "config", None)
    total = getattr(config, "num_hidden_layers", None)
    if total is None:
        raise ValueError("The model has no `config.num_hidden_layers`; pass `parameters=` name patterns instead.")
    if not 0 < num_layers <= total:
        raise ValueError(f"`num_layers` must be in [1, {total}], but got {num_layers}.")
    layers = "|".join(str(i) for i in range(total - num_layers, total))
    return [rf"encoder\.layer\.({layers})\.", r"(^|\.)pooler\.", r"(^|\.)classifier\."]
