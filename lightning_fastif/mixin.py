"""FastIFMixin: the hooks a LightningModule overrides to tell the callbacks how to run influence."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from lightning_fastif.hf import fastif_parameter_patterns, model_inputs, sequence_classification_loss
from lightning_fastif.knn import classifier_input_features


class FastIFMixin:
    """Influence hooks for a ``LightningModule``, with defaults for a wrapped HF sequence classifier.

    The defaults expect the HF ``AutoModelForSequenceClassification`` at ``self.model``, an optional
    tokenizer at ``self.tokenizer``, and tokenised dict batches with ``input_ids``, ``attention_mask``,
    optionally ``token_type_ids``, and ``labels``. Override any hook for another model or batch layout.

    Example:
        >>> import pytorch_lightning as pl
        >>> class Classifier(FastIFMixin, pl.LightningModule):
        ...     def __init__(self, model):
        ...         super().__init__()
        ...         self.model = model
    """

    influence_num_layers: int = 2
    """Encoder layers (counted from the top) that the default parameter selection differentiates."""

    def influence_backbone(self) -> nn.Module:
        """Return the HF model the default hooks run; by default ``self.model``."""
        backbone = getattr(self, "model", None)
        if not isinstance(backbone, nn.Module):
            raise AttributeError(
                f"{type(self).__name__} has no `model` submodule, which the default FastIF hooks use. "
                "Set `self.model` to the HF classifier or override `influence_backbone`."
            )
        return backbone

    def influence_parameters(self) -> list[str] | None:
        """Return name patterns of the parameters to differentiate, or None for every trainable parameter.

        The default is FastIF's BERT choice: the last ``influence_num_layers`` encoder layers, the pooler and
        the classifier. Models without ``config.num_hidden_layers`` use every trainable parameter.
        """
        backbone = self.influence_backbone()
        if getattr(getattr(backbone, "config", None), "num_hidden_layers", None) is None:
            return None
        return fastif_parameter_patterns(backbone, self.influence_num_layers)

    def influence_loss(self, batch: Any) -> Tensor:
        """Return the mean loss of a batch that influence differentiates; by default cross-entropy."""
        return sequence_classification_loss(self.influence_backbone(), batch)

    def influence_features(self, batch: Any) -> Tensor:
        """Return kNN features ``[B, D]``; by default the input of the classification head."""
        return classifier_input_features(self.influence_backbone(), batch)

    def influence_predictions(self, batch: Any) -> Tensor:
        """Return predicted label ids ``[B]`` of a batch."""
        backbone = self.influence_backbone()
        dtype = next(backbone.parameters()).dtype
        with torch.no_grad():
            return backbone(**model_inputs(batch, dtype)).logits.argmax(dim=-1)

    def influence_errors(self, batch: Any, predictions: Tensor) -> Tensor:
        """Return a bool mask ``[B]`` of misclassified examples, the default influence queries."""
        return predictions != batch["labels"].to(predictions.device)

    def influence_text(self, dataset: Any, index: int) -> str:
        """Return readable text of a dataset example for result tables."""
        if hasattr(dataset, "text"):
            return str(dataset.text(index))
        tokenizer = getattr(self, "tokenizer", None)
        item = dataset[index]
        if tokenizer is not None and isinstance(item, dict) and "input_ids" in item:
            return str(tokenizer.decode(item["input_ids"], skip_special_tokens=True))
        return f"example {index}"

    def influence_label(self, dataset: Any, index: int) -> str:
        """Return the readable gold label of a dataset example."""
        if hasattr(dataset, "label_name"):
            return str(dataset.label_name(index))
        item = dataset[index]
        label = item.get("labels") if isinstance(item, dict) else None
        return str(int(label)) if label is not None else ""

    def influence_label_name(self, label_id: int) -> str:
        """Return the name of a predicted label id, from ``config.id2label`` when the backbone has one."""
        config = getattr(self.influence_backbone(), "config", None)
        names = getattr(config, "id2label", None) or {}
        return str(names.get(int(label_id), label_id))


def mixin_influence_loss(model: nn.Module, batch: Any) -> Tensor:
    """Return ``model.influence_loss(batch)``, the ``loss_fn`` that the callbacks give FastIF for a mixin module."""
    return cast(FastIFMixin, model).influence_loss(batch)
