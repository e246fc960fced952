"""InfluenceCallback: FastIF influences of validation errors, logged to W&B and written to JSON Lines."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset, default_collate

from lightning_fastif.distributed import all_gather_objects
from lightning_fastif.fastif import FastIF, FastIFConfig, QueryInfluence
from lightning_fastif.functional.batches import move_batch
from lightning_fastif.influence import ScoreMethod
from lightning_fastif.mixin import FastIFMixin, mixin_influence_loss
from lightning_fastif.results import influence_rows, log_wandb, stage_timings, write_jsonl

log = logging.getLogger(__name__)


class InfluenceCallback(pl.Callback):
    """Compute FastIF influences at validation time and log the top helpful and harmful training examples.

    Every ``every_n_val_runs`` validation runs, the callback takes the queries (by default the misclassified
    examples of one validation dataloader, up to ``max_queries``; or ``query_indices``), refreshes the kNN
    index over the training set from the current weights, and computes LiSSA influence scores of the ``k``
    nearest training examples. For each query it logs the ``top_k`` most helpful (most negative score) and
    most harmful (most positive score) training examples as a W&B table, with a histogram of scores and
    the time of each stage, and writes the same rows to ``<log_dir>/influence/step_<global_step>.jsonl``.

    The LightningModule must implement :class:`FastIFMixin`. Training is left as it was: train/eval
    modes, ``requires_grad`` flags, random state, optimizer state and accumulated gradients. The defaults
    are FastIF's MNLI settings: k=1000, LiSSA batch size 1, depth 1000, damping 5e-3, scale 1e4.

    Args:
        every_n_val_runs: Run on every n-th validation run (sanity checks do not count).
        query_dataloader_idx: Index of the validation dataloader whose examples are the queries.
        max_queries: Largest number of misclassified examples used as queries per run.
        query_indices: Explicit dataset indices of query examples; replaces the misclassified ones.
        query_mode: "each" makes every query its own influence query; "mean" makes one query of their mean
            loss, with kNN on their mean feature.
        k: Nearest training examples scored per query; None scores the whole training set.
        top_k: Helpful and harmful examples logged per query.
        damping: LiSSA damping.
        scale: LiSSA scale; must exceed the largest Hessian eigenvalue.
        depth: LiSSA recursion steps.
        repeats: LiSSA repeats averaged.
        lissa_batch_size: Training examples per LiSSA Hessian-vector product.
        seed: LiSSA sampling seed.
        weight_decay: L2 coefficient of the training objective; enters the Hessian.
        weight_decay_in_gradients: Also add the L2 gradient to query and training gradients.
        metric: kNN distance, "l2" or "cosine".
        index_type: faiss index type, "flat", "ivf" or "hnsw".
        feature_batch_size: Batch size of the kNN feature pass over the training set.
        gradient_batch_size: Candidates per batch of per-example gradients.
        score_method: "gradient" (per-example gradients and a matrix product), "jvp" (a forward-mode
            directional derivative along ``s_test`` per candidate) or "auto" ("jvp" for one ``s_test``,
            with a fallback to "gradient"); all give the same scores.
        train_dataset: Candidate training set; defaults to the datamodule's ``train_dataset`` or the
            training dataloader's dataset.
        output_dir: Folder of the JSON Lines files; defaults to ``<trainer.log_dir>/influence``.
        progress: Show progress bars over the kNN feature pass, the queries, the LiSSA steps and the
            candidate scoring.
    """

    def __init__(
        self,
        *,
        every_n_val_runs: int = 1,
        query_dataloader_idx: int = 0,
        max_queries: int = 10,
        query_indices: list[int] | None = None,
        query_mode: Literal["each", "mean"] = "each",
        k: int | None = 1000,
        top_k: int = 10,
        damping: float = 5e-3,
        scale: float = 1e4,
        depth: int = 1000,
        repeats: int = 1,
        lissa_batch_size: int = 1,
        seed: int = 0,
        weight_decay: float = 0.0,
        weight_decay_in_gradients: bool = False,
        metric: Literal["l2", "cosine"] = "l2",
        index_type: Literal["flat", "ivf", "hnsw"] = "flat",
        feature_batch_size: int = 64,
        gradient_batch_size: int = 16,
        score_method: ScoreMethod = "auto",
        train_dataset: Dataset | None = None,
        output_dir: str | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if every_n_val_runs <= 0:
            raise ValueError(f"`every_n_val_runs` must be a positive integer, but got {every_n_val_runs}.")
        if max_queries <= 0:
            raise ValueError(f"`max_queries` must be a positive integer, but got {max_queries}.")
        if query_dataloader_idx < 0:
            raise ValueError(f"`query_dataloader_idx` must be >= 0, but got {query_dataloader_idx}.")
        if query_mode not in ("each", "mean"):
            raise ValueError(f"`query_mode` must be 'each' or 'mean', but got {query_mode!r}.")
        if query_indices is not None and not query_indices:
            raise ValueError("`query_indices` is an empty list. Pass None to use the misclassified examples.")
        self.config = FastIFConfig(
            k=k,
            top_k=top_k,
            damping=damping,
            scale=scale,
            depth=depth,
            repeats=repeats,
            batch_size=lissa_batch_size,
            seed=seed,
            weight_decay=weight_decay,
            weight_decay_in_gradients=weight_decay_in_gradients,
            metric=metric,
            index_type=index_type,
            feature_batch_size=feature_batch_size,
            gradient_batch_size=gradient_batch_size,
            score_method=score_method,
        )
        self.every_n_val_runs = every_n_val_runs
        self.query_dataloader_idx = query_dataloader_idx
        self.max_queries = max_queries
        self.query_indices = list(query_indices) if query_indices is not None else None
        self.query_mode = query_mode
        self.train_dataset = train_dataset
        self.output_dir = output_dir
        self.progress = progress
        self.val_runs = 0
        self.last_results: list[QueryInfluence] = []
        self.last_output: Path | None = None
        self._fastif: FastIF | None = None
        self._errors: list[int] = []
        self._predictions: dict[int, int] = {}
        self._warned_no_wandb = False

    # Collecting queries during validation.

    def _due(self, trainer: pl.Trainer) -> bool:
        return not trainer.sanity_checking and (self.val_runs + 1) % self.every_n_val_runs == 0

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._errors = []
        self._predictions = {}

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if dataloader_idx != self.query_dataloader_idx or not self._due(trainer):
            return
        module = _require_mixin(pl_module)
        if isinstance(outputs, dict) and isinstance(outputs.get("preds"), Tensor):
            predictions = outputs["preds"].detach()
        else:
            predictions = module.influence_predictions(batch)
        indices = _batch_indices(batch)
        for index, predicted in zip(indices.tolist(), predictions.tolist(), strict=True):
            self._predictions[int(index)] = int(predicted)
        if self.query_indices is None:
            errors = module.influence_errors(batch, predictions).cpu()
            self._errors.extend(int(i) for i in indices[errors].tolist())

    # The influence run.

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.val_runs += 1
        if self.val_runs % self.every_n_val_runs != 0:
            return
        self._gather_validation_outputs()
        queries = self.query_indices if self.query_indices is not None else self._errors[: self.max_queries]
        if not queries:
            rank_zero_info("InfluenceCallback: no misclassified validation example, so no influence to compute.")
            return
        module = _require_mixin(pl_module)
        with _preserved_training_state(pl_module), torch.inference_mode(False), torch.enable_grad():
            self.run(trainer, module, queries)

    def _gather_validation_outputs(self) -> None:
        """Merge the errors and predictions that each rank saw on its shard of the validation data."""
        gathered = all_gather_objects((self._errors, self._predictions))
        # Sorted and deduplicated: DistributedSampler repeats examples to even out the shards.
        self._errors = sorted({index for errors, _ in gathered for index in errors})
        self._predictions = {index: label for _, predictions in gathered for index, label in predictions.items()}

    def run(self, trainer: pl.Trainer, pl_module: FastIFMixin, queries: list[int]) -> list[QueryInfluence]:
        """Compute and log the influences of the given query examples (dataset indices).

        Under a distributed strategy every rank must call this with the same queries: each runs its share
        of the LiSSA repeats and of the candidates, and rank zero writes and logs the results.
        """
        start = time.perf_counter()
        query_dataset = self._query_dataset(trainer)
        fastif = self._get_fastif(trainer, pl_module)
        collate = _dataloader_collate(_val_dataloaders(trainer)[self.query_dataloader_idx])
        device = fastif.computer.device
        query_batch = move_batch(collate([query_dataset[i] for i in queries]), device)

        index_start = time.perf_counter()
        if self.config.k is not None:
            fastif.refresh_index(progress=self.progress)
        index_seconds = time.perf_counter() - index_start
        results = fastif.explain(query_batch, mode=self.query_mode, query_indices=queries, progress=self.progress)
        self.last_results = results
        timings = {"index": index_seconds, **stage_timings(results)}
        timings["total"] = time.perf_counter() - start
        self._report(trainer, pl_module, results, query_dataset, fastif.train_dataset, timings)
        return results

    def _report(
        self,
        trainer: pl.Trainer,
        module: FastIFMixin,
        results: list[QueryInfluence],
        query_dataset: Any,
        train_dataset: Any,
        timings: dict[str, float],
    ) -> None:
        if not trainer.is_global_zero:
            return
        rows = influence_rows(
            results,
            query_text=lambda i: module.influence_text(query_dataset, i),
            query_label=lambda i: module.influence_label(query_dataset, i),
            prediction=lambda i: module.influence_label_name(self._predictions[i]) if i in self._predictions else "",
            train_text=lambda i: module.influence_text(train_dataset, i),
            train_label=lambda i: module.influence_label(train_dataset, i),
        )
        for row in rows:
            row.update({"global_step": trainer.global_step, "epoch": trainer.current_epoch})
        path = write_jsonl(self._output_dir(trainer) / f"step_{trainer.global_step}.jsonl", rows)
        self.last_output = path
        metrics = {f"influence/time/{stage}": seconds for stage, seconds in timings.items()}
        metrics["influence/num_queries"] = float(len(results))
        scores = [float(s) for result in results for s in result.scores.tolist()]
        wandb_loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        for logger in trainer.loggers:
            if not isinstance(logger, WandbLogger):
                logger.log_metrics(metrics, step=trainer.global_step)
        for logger in wandb_loggers:
            log_wandb(
                logger.experiment,
                rows,
                scores,
                {**metrics, "trainer/global_step": trainer.global_step},
                key="influence",
            )
        if not wandb_loggers and not self._warned_no_wandb:
            rank_zero_warn(f"InfluenceCallback: no WandbLogger, so influence tables are only written to {path.parent}.")
            self._warned_no_wandb = True
        rank_zero_info(_summary(rows, timings, path))

    # Resolving datasets.

    def _get_fastif(self, trainer: pl.Trainer, module: FastIFMixin) -> FastIF:
        if self._fastif is None:
            train_dataset, collate = self._train_dataset(trainer)
            self._fastif = FastIF(
                module,  # type: ignore[arg-type]
                mixin_influence_loss,
                module.influence_features,
                train_dataset,
                collate_fn=collate,
                parameters=module.influence_parameters(),
                config=self.config,
                index_path=self._output_dir(trainer) / "knn.index",
            )
        return self._fastif

    def _train_dataset(self, trainer: pl.Trainer) -> tuple[Dataset, Any]:
        datamodule = getattr(trainer, "datamodule", None)
        loader = trainer.train_dataloader
        dataset = self.train_dataset
        if dataset is None and datamodule is not None:
            dataset = getattr(datamodule, "train_dataset", None)
        if dataset is None and loader is not None:
            dataset = getattr(loader, "dataset", None)
        if dataset is None:
            raise RuntimeError(
                "InfluenceCallback found no training dataset. Give the datamodule a `train_dataset` attribute, "
                "or pass `train_dataset=` to the callback."
            )
        _check_map_style(dataset)
        collate = _dataloader_collate(loader) if loader is not None else default_collate
        return dataset, collate

    def _query_dataset(self, trainer: pl.Trainer) -> Dataset:
        loaders = _val_dataloaders(trainer)
        if self.query_dataloader_idx >= len(loaders):
            raise ValueError(
                f"`query_dataloader_idx={self.query_dataloader_idx}` but there are {len(loaders)} validation "
                "dataloaders."
            )
        dataset = loaders[self.query_dataloader_idx].dataset
        _check_map_style(dataset)
        return dataset

    def _output_dir(self, trainer: pl.Trainer) -> Path:
        if self.output_dir is not None:
            return Path(self.output_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / "influence"


def _require_mixin(pl_module: pl.LightningModule) -> FastIFMixin:
    if not isinstance(pl_module, FastIFMixin):
        raise TypeError(
            f"InfluenceCallback needs a LightningModule that implements FastIFMixin, but got "
            f"{type(pl_module).__name__}. Add FastIFMixin to its base classes."
        )
    return pl_module


def _check_map_style(dataset: Any) -> None:
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise TypeError(
            f"The {type(dataset).__name__} cannot be mapped back to dataset indices: influence needs a map-style "
            "Dataset with __len__ and __getitem__. Wrap the data in a map-style Dataset or pass `train_dataset=`."
        )
    if len(dataset) == 0:
        raise ValueError("The training dataset is empty: influence needs at least one training example.")
    for position in (0, len(dataset) - 1):
        item = dataset[position]
        if isinstance(item, dict) and "index" in item and int(item["index"]) != position:
            raise ValueError(
                f"Item {position} of the {type(dataset).__name__} has index {int(item['index'])}: the `index` key "
                "must be the item's position in the dataset, so scores can be mapped back to examples."
            )


def _batch_indices(batch: Any) -> Tensor:
    if isinstance(batch, dict) and "index" in batch:
        return batch["index"].detach().cpu().reshape(-1)
    raise ValueError(
        "Validation batches have no `index` key, so misclassified examples cannot be mapped back to dataset "
        "indices. Add each item's dataset position as `index`, or pass `query_indices=`."
    )


def _val_dataloaders(trainer: pl.Trainer) -> list[Any]:
    loaders = trainer.val_dataloaders
    if loaders is None:
        raise RuntimeError("InfluenceCallback runs at validation time, but the trainer has no validation dataloader.")
    return list(loaders) if isinstance(loaders, list | tuple) else [loaders]


def _dataloader_collate(loader: Any) -> Any:
    collate = getattr(loader, "collate_fn", None)
    return collate if collate is not None else default_collate


class _preserved_training_state:
    """Snapshot and restore random state and accumulated gradients around an influence run."""

    def __init__(self, module: pl.LightningModule) -> None:
        self.module = module

    def __enter__(self) -> None:
        self.torch_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self.numpy_state = np.random.get_state()
        self.python_state = random.getstate()
        self.grads = {name: None if p.grad is None else p.grad.clone() for name, p in self.module.named_parameters()}

    def __exit__(self, *exc: object) -> None:
        torch.set_rng_state(self.torch_state)
        if self.cuda_state is not None:
            torch.cuda.set_rng_state_all(self.cuda_state)
        np.random.set_state(self.numpy_state)
        random.setstate(self.python_state)
        for name, p in self.module.named_parameters():
            p.grad = self.grads[name]


def _summary(rows: list[dict[str, Any]], timings: dict[str, float], path: Path) -> str:
    lines = [f"FastIF influences written to {path} ({timings['total']:.1f} s in total)."]
    first = [row for row in rows if row["query_index"] == rows[0]["query_index"]] if rows else []
    if first:
        lines.append(f"Query {first[0]['query_index']} [{first[0]['query_label']}]: {first[0]['query_text'][:100]}")
        for kind in ("helpful", "harmful"):
            best = next(row for row in first if row["kind"] == kind)
            lines.append(f"  most {kind}: score {best['score']:.3g} [{best['train_label']}] {best['train_text'][:90]}")
    return "\n".join(lines)
