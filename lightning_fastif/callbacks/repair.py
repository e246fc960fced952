"""DataRepairCallback: fix target errors by fine-tuning on the training examples FastIF finds helpful.

Each repair step samples an anchor batch of target errors, scores the pool's kNN candidates against the
anchors' mean loss with FastIF, and takes one optimisation step on the ``num_examples`` most helpful pool
examples (Guo et al., "FastIF: Scalable Influence Functions for Efficient Model Interpretation and
Debugging", EMNLP 2021). The baselines ("harmful", "random", "anchors") follow the same schedule.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence, Sized
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast, get_args

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import Dataset, IterableDataset, default_collate
from tqdm.auto import tqdm

from lightning_fastif.distributed import broadcast_module
from lightning_fastif.fastif import FastIF, FastIFConfig
from lightning_fastif.functional.batches import move_batch
from lightning_fastif.functional.params import influence_mode, select_parameters
from lightning_fastif.influence import ScoreMethod
from lightning_fastif.mixin import FastIFMixin, mixin_influence_loss

log = logging.getLogger(__name__)

Strategy = Literal["helpful", "harmful", "random", "anchors"]
Policy = Literal["keep", "restore_on_source_drop", "restore"]
OptimizerName = Literal["sgd", "adam", "adamw"]
AnchorsFrom = Literal["errors", "all"]
SelectStep = Literal["last", "best_validation"]
UpdateParameters = Literal["all", "influence"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
POLICIES: tuple[str, ...] = get_args(Policy)
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
ANCHORS_FROM: tuple[str, ...] = get_args(AnchorsFrom)
SELECT_STEPS: tuple[str, ...] = get_args(SelectStep)
UPDATE_PARAMETERS: tuple[str, ...] = get_args(UpdateParameters)
METRICS = ("target_acc", "holdout_acc", "source_acc", "validation_acc")
INFLUENCE_STRATEGIES = frozenset({"helpful", "harmful"})
JSONL_NAME = "repair.jsonl"
SUMMARY_NAME = "repair_summary.json"


@dataclass
class RepairRun:
    """The measurements of one strategy, from the start weights to the last step.

    Attributes:
        strategy: The strategy that chose the update examples.
        history: One record per step. Step 0 has the accuracies of the start weights.
        checkpoint_path: The saved state dict of the repaired weights (those of ``selected_step``), or None
            when not saved.
        selected_step: The step whose weights the run ended with, 0 (the start weights) to the last step.
            It is the last step with ``select_step="last"``. None stands for the last step in a run that
            :class:`DataRepairCallback` did not finish.
    """

    strategy: str
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint_path: Path | None = None
    selected_step: int | None = None

    def metric(self, name: str, step: int) -> float | None:
        """Return metric ``name`` (such as ``"target_acc"``) at ``step``, where -1 is the last step."""
        return self.history[step][name]

    def change(self, name: str) -> float | None:
        """Return the change of metric ``name`` from step 0 to the last step, None when it is not measured."""
        return self._change(name, -1)

    def selected_change(self, name: str) -> float | None:
        """Return the change of metric ``name`` from step 0 to ``selected_step``, None when it is not measured."""
        return self._change(name, self.selected_index())

    def _change(self, name: str, step: int) -> float | None:
        before, after = self.metric(name, 0), self.metric(name, step)
        return None if before is None or after is None else after - before

    def selected_index(self) -> int:
        """Return the history index of the selected step, the last record when no step was selected."""
        return len(self.history) - 1 if self.selected_step is None else self.selected_step


@dataclass
class RepairResult:
    """The outcome of one :meth:`DataRepairCallback.repair` call.

    Attributes:
        runs: The run of each strategy, in the order they ran.
        kept_strategy: The strategy whose repaired weights the module has afterwards, or None when the
            start weights were restored.
        decision: Why the weights were kept or restored.
        num_target: Examples in the target set.
        num_target_errors: Target examples the start weights get wrong.
        anchor_candidates: Target positions that anchor batches are drawn from: the anchor split's errors,
            or the whole anchor split with ``anchors_from="all"``.
        holdout_indices: Target positions of the held-out split (errors and correct examples).
        holdout_errors: Target positions of the held-out errors, on which ``target_acc`` is measured.
        jsonl_path: The JSON Lines file the step records were appended to.
        validation_indices: Target positions of the validation split, on which ``validation_acc`` is
            measured; empty when ``validation_fraction`` is 0.
        select_step: How each run's ``selected_step`` was chosen, "last" or "best_validation".
    """

    runs: dict[str, RepairRun]
    kept_strategy: str | None
    decision: str
    num_target: int
    num_target_errors: int
    anchor_candidates: list[int]
    holdout_indices: list[int]
    holdout_errors: list[int]
    jsonl_path: Path
    validation_indices: list[int] = field(default_factory=list)
    select_step: str = "last"

    def summary(self) -> dict[str, Any]:
        """Return a JSON-ready summary: sizes, the decision and each strategy's metrics per step.

        Each metric has its value "before" (step 0), "after" (the last step), at the "selected" step and
        at every step ("steps"). Each run also has its "selected_step" and "checkpoint_path".
        """
        runs: dict[str, dict[str, Any]] = {}
        for name, run in self.runs.items():
            selected_step = run.selected_index()
            first, last, selected = run.history[0], run.history[-1], run.history[selected_step]
            runs[name] = {
                key: {
                    "before": first[key],
                    "after": last[key],
                    "selected": selected[key],
                    "steps": [record[key] for record in run.history],
                }
                for key in METRICS
            }
            runs[name]["selected_step"] = selected_step
            runs[name]["checkpoint_path"] = None if run.checkpoint_path is None else str(run.checkpoint_path)
        return {
            "kept_strategy": self.kept_strategy,
            "decision": self.decision,
            "select_step": self.select_step,
            "num_target": self.num_target,
            "num_target_errors": self.num_target_errors,
            "num_anchor_candidates": len(self.anchor_candidates),
            "num_holdout": len(self.holdout_indices),
            "num_holdout_errors": len(self.holdout_errors),
            "num_validation": len(self.validation_indices),
            "runs": runs,
        }


@dataclass(frozen=True)
class _Split:
    """Target positions: the anchor candidates, the held-out split with its errors and the validation split."""

    num_target: int
    num_errors: int
    anchor_candidates: list[int]
    holdout: list[int]
    holdout_errors: list[int]
    validation: list[int]


class _BestStep:
    """The step with the highest validation accuracy so far, the earliest on ties, and a copy of its weights."""

    def __init__(self) -> None:
        self.step = -1
        self.accuracy = -math.inf
        self.weights: dict[str, Tensor] = {}

    def offer(self, module: nn.Module, step: int, accuracy: float) -> None:
        """Copy the module's weights as those of ``step`` if ``accuracy`` beats the best so far."""
        if accuracy > self.accuracy:
            self.step, self.accuracy, self.weights = step, accuracy, _snapshot(module)


@dataclass
class _Data:
    target: Dataset
    pool: Dataset
    source: Dataset | None
    collate: Callable[[list[Any]], Any]


class DataRepairCallback(pl.Callback):
    """Repair a model's errors on a target set by fine-tuning on the pool examples FastIF finds helpful.

    The callback runs after ``fit`` (or at the end of training epoch ``at_epoch``), or whenever
    :meth:`repair` is called, for example on a loaded checkpoint. A run:

    1. Predicts the target set and splits it, seeded, into an anchor part, a held-out part
       (``holdout_fraction`` of it) and, when ``validation_fraction`` is above 0, a validation part, which
       share no example. Anchor batches are drawn from the errors of the anchor part. ``target_acc`` is
       the accuracy on the held-out errors (0 before the repair) and ``holdout_acc`` the accuracy on the
       whole held-out part, so a repair that breaks correct predictions shows up too.
       ``validation_acc`` is the accuracy on the whole validation part. ``select_step="best_validation"``
       chooses the step on it, so the held-out part stays a fair measure of that choice.
    2. Runs ``num_steps`` steps for each strategy, each from the same start weights and on the same
       anchor batches. A step samples ``anchor_batch_size`` anchors, picks ``num_examples`` update
       examples and takes one step of the callback's own optimizer on their mean loss. The strategies
       pick: "helpful", the most helpful pool examples for the anchors' mean loss (FastIF with kNN on the
       mean anchor feature over an index rebuilt from the current weights); "harmful", the most harmful
       ones; "random", a uniform sample of the pool; "anchors", the anchor batch itself.
    3. After each step measures ``target_acc``, ``holdout_acc``, ``source_acc`` and ``validation_acc``
       (None without a validation part), logs them to the trainer's loggers as
       ``repair/<strategy>/<metric>`` at the step (with ``repair/step``, because a logger such as W&B may
       keep its own step), and appends a record to ``<output_dir>/repair.jsonl``. A record also has the
       update loss, the anchor and update example positions, the examples' scores and timings: ``seconds``
       to choose and update, ``eval_seconds`` to measure, and ``influence_seconds`` for FastIF's "knn",
       "ihvp" and "scores" stages.
    4. Selects each strategy's step. "last" takes the weights after the last step. "best_validation"
       sets the weights back to those of the step (0 to ``num_steps``, 0 being the start weights) with the
       highest ``validation_acc``, the earliest step on ties. For this the run keeps a copy of the best
       weights so far. The checkpoint, the policy and the weights the module keeps all use the selected step.
    5. Applies the policy to the first strategy's selected weights. "keep" keeps them, "restore" brings
       back the start weights, and "restore_on_source_drop" restores when the source accuracy at the
       selected step is more than ``max_source_drop`` below the start. The other strategies' weights are
       always discarded.

    Afterwards the module has the start weights bit for bit (every parameter and buffer) unless the
    policy kept the repaired ones. Train/eval modes, ``requires_grad`` flags, accumulated gradients and
    the random state are as before, and the trainer's optimizers are never touched. Predictions and
    errors come from the module's ``influence_predictions`` and ``influence_errors`` hooks and the update
    loss from ``influence_loss``, so the module must implement :class:`FastIFMixin`.

    Args:
        target_dataset: Map-style dataset whose errors are repaired. Defaults to the dataset of validation
            dataloader ``target_dataloader_idx``.
        target_dataloader_idx: Validation dataloader whose dataset is the target set when
            ``target_dataset`` is None.
        pool_dataset: Map-style dataset of candidate update examples. Defaults to the datamodule's
            ``train_dataset`` or the training dataloader's dataset.
        source_dataset: Map-style dataset on which the cost of the repair is measured. Defaults to the
            dataset of validation dataloader ``source_dataloader_idx``; None measures no source accuracy.
        source_dataloader_idx: Validation dataloader whose dataset is the source set when
            ``source_dataset`` is None.
        collate_fn: Collates items of every dataset. Defaults to the collate function of the training
            dataloader, else ``default_collate``.
        strategy: How update examples are chosen: "helpful", "harmful", "random" or "anchors".
        strategies: Several strategies to run from the same start weights; replaces ``strategy``. The
            policy applies to the first one.
        num_steps: Optimisation steps per strategy.
        anchor_batch_size: Target examples per anchor batch.
        anchors_from: "errors" draws anchor batches from the anchor split's errors only. "all" draws them
            from the whole anchor split, correct examples included, so the update also keeps what the
            model already gets right. On HANS, where nearly every error is non-entailment, "errors" tends
            to shift every prediction towards non-entailment.
        num_examples: Update examples per step (the anchor batch itself for "anchors").
        lr: Learning rate of the repair optimizer.
        optimizer: The repair optimizer: "sgd" (plain SGD, as FastIF), "adam" or "adamw".
        update_parameters: Which parameters the update steps change: "all" (every parameter with
            ``requires_grad``) or "influence" (those that FastIF differentiates, the module's
            ``influence_parameters()``; on a transformer the last layers and the head, as in FastIF's code).
        update_in_train_mode: Take the update steps in train mode (dropout on); eval mode otherwise.
        holdout_fraction: Share of the target set held out for measuring, in (0, 1).
        validation_fraction: Share of the target set split off for choosing the step, in [0, 1); 0 makes
            no validation part. ``holdout_fraction + validation_fraction`` must be below 1, so that anchors
            remain. With 0 the anchor and held-out parts are the same as without this option.
        select_step: Which step's weights each strategy ends with: "last", or "best_validation" (the
            highest ``validation_acc``, which needs ``validation_fraction`` above 0).
        policy: "keep", "restore_on_source_drop" or "restore".
        max_source_drop: Largest source-accuracy drop, as a fraction, that "restore_on_source_drop" keeps.
        num_labels: Number of label ids of the model, for checking the pool's ``labels``. Defaults to the
            backbone's ``config.num_labels``, the module's ``num_labels`` or its hyperparameter.
        at_epoch: Run at the end of this training epoch (0-based) instead of after ``fit``.
        seed: Seed of the target splits, the anchor batches, the "random" strategy and LiSSA's sampling.
        k: kNN candidates scored per anchor batch; None scores the whole pool. Capped at the pool size.
        damping: LiSSA damping.
        scale: LiSSA scale; must exceed the largest Hessian eigenvalue.
        depth: LiSSA recursion steps.
        repeats: LiSSA repeats averaged.
        lissa_batch_size: Pool examples per LiSSA Hessian-vector product.
        weight_decay: L2 coefficient of the training objective; enters the Hessian.
        metric: kNN distance, "l2" or "cosine".
        feature_batch_size: Batch size of the kNN feature pass over the pool.
        gradient_batch_size: Candidates per batch of per-example gradients.
        score_method: How candidates are scored, "auto", "gradient" or "jvp"; see :class:`InfluenceCallback`.
        eval_batch_size: Batch size of the accuracy passes.
        output_dir: Folder of ``repair.jsonl``, ``repair_summary.json`` and the checkpoints; defaults to
            ``<trainer.log_dir>/repair``.
        save_checkpoint: Save each strategy's repaired state dict as ``repaired_<strategy>.pt``.
        progress: Show a progress bar over the steps.

    Raises:
        ValueError: If a setting is out of range, a strategy, policy, optimizer or ``select_step`` is
            unknown, or ``select_step="best_validation"`` comes without a validation part.

    Example:
        >>> callback = DataRepairCallback(strategies=["helpful", "random"], num_steps=5, lr=1e-4)
        >>> callback.strategies
        ['helpful', 'random']
    """

    def __init__(
        self,
        *,
        target_dataset: Dataset | None = None,
        target_dataloader_idx: int | None = None,
        pool_dataset: Dataset | None = None,
        source_dataset: Dataset | None = None,
        source_dataloader_idx: int | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        strategy: Strategy = "helpful",
        strategies: list[Strategy] | None = None,
        num_steps: int = 10,
        anchor_batch_size: int = 10,
        anchors_from: AnchorsFrom = "errors",
        num_examples: int = 10,
        lr: float = 1e-4,
        optimizer: OptimizerName = "sgd",
        update_parameters: UpdateParameters = "all",
        update_in_train_mode: bool = False,
        holdout_fraction: float = 0.5,
        validation_fraction: float = 0.0,
        select_step: SelectStep = "last",
        policy: Policy = "restore_on_source_drop",
        max_source_drop: float = 0.01,
        num_labels: int | None = None,
        at_epoch: int | None = None,
        seed: int = 0,
        k: int | None = 1000,
        damping: float = 5e-3,
        scale: float = 1e4,
        depth: int = 1000,
        repeats: int = 1,
        lissa_batch_size: int = 1,
        weight_decay: float = 0.0,
        metric: Literal["l2", "cosine"] = "l2",
        feature_batch_size: int = 64,
        gradient_batch_size: int = 16,
        score_method: ScoreMethod = "auto",
        eval_batch_size: int = 64,
        output_dir: str | None = None,
        save_checkpoint: bool = True,
        progress: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (
            ("num_steps", num_steps),
            ("anchor_batch_size", anchor_batch_size),
            ("num_examples", num_examples),
            ("eval_batch_size", eval_batch_size),
        ):
            _check_positive_int(name, value)
        _check_ranges(lr, holdout_fraction, max_source_drop, at_epoch, num_labels)
        _check_validation(holdout_fraction, validation_fraction, select_step)
        _check_dataloader_indices(target_dataloader_idx, source_dataloader_idx)
        self.strategies: list[str] = _check_strategies(strategy, strategies)
        _check_choice("policy", policy, POLICIES)
        _check_choice("anchors_from", anchors_from, ANCHORS_FROM)
        _check_choice("optimizer", optimizer, OPTIMIZERS)
        _check_choice("update_parameters", update_parameters, UPDATE_PARAMETERS)

        # The config validates the LiSSA and kNN settings. top_k is the number of update examples.
        self.config = FastIFConfig(
            k=k,
            top_k=num_examples,
            damping=damping,
            scale=scale,
            depth=depth,
            repeats=repeats,
            batch_size=lissa_batch_size,
            seed=seed,
            weight_decay=weight_decay,
            metric=metric,
            feature_batch_size=feature_batch_size,
            gradient_batch_size=gradient_batch_size,
            score_method=score_method,
        )
        self.target_dataset = target_dataset
        self.target_dataloader_idx = target_dataloader_idx
        self.pool_dataset = pool_dataset
        self.source_dataset = source_dataset
        self.source_dataloader_idx = source_dataloader_idx
        self.collate_fn = collate_fn

        self.num_steps = num_steps
        self.anchor_batch_size = anchor_batch_size
        self.anchors_from = anchors_from
        self.num_examples = num_examples
        self.lr = float(lr)
        self.optimizer = optimizer
        self.update_parameters = update_parameters
        self.update_in_train_mode = update_in_train_mode

        self.holdout_fraction = holdout_fraction
        self.validation_fraction = validation_fraction
        self.select_step = select_step
        self.policy = policy
        self.max_source_drop = max_source_drop
        self.num_labels = num_labels
        self.at_epoch = at_epoch
        self.seed = seed
        self.eval_batch_size = eval_batch_size

        self.output_dir = output_dir
        self.save_checkpoint = save_checkpoint
        self.progress = progress
        self.last_result: RepairResult | None = None

    # Hooks.

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_epoch is not None and trainer.current_epoch == self.at_epoch:
            self.repair(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_epoch is None:
            self.repair(trainer, pl_module)
        elif self.last_result is None:
            rank_zero_warn(
                f"DataRepairCallback: training ended before epoch at_epoch={self.at_epoch}, so no repair ran. "
                "Lower `at_epoch`, or pass at_epoch=None to repair after fit."
            )

    # The repair.

    def repair(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> RepairResult:
        """Run every strategy from the current weights, apply the policy and report.

        Args:
            trainer: Supplies the default datasets, the loggers and the log folder. It need not have run.
            pl_module: The LightningModule to repair; it must implement :class:`FastIFMixin`.

        Returns:
            The measurements of each strategy and the policy's decision, also kept as ``last_result``.

        Raises:
            ValueError: If the target set is empty or yields too few errors, or the pool's labels do not
                fit the model.
            TypeError: If the module lacks :class:`FastIFMixin` or a dataset is not map-style.

        Under a distributed strategy every rank must call this: each runs its share of the LiSSA repeats
        and of the kNN candidates, every rank takes the same update steps, and rank zero writes the files.
        """
        module = _require_mixin(pl_module)
        data = self._resolve_data(trainer)
        if self.policy == "restore_on_source_drop" and data.source is None:
            raise ValueError(
                "policy='restore_on_source_drop' needs source data to measure the accuracy drop, but there is "
                "none. Pass `source_dataset` or `source_dataloader_idx`, or choose policy='keep' or 'restore'."
            )
        _check_pool_labels(data.pool, self._num_labels(pl_module))
        output_dir = self._output_dir(trainer)
        with _preserved_state(pl_module), torch.inference_mode(False), torch.enable_grad():
            result = self._run(trainer, module, pl_module, data, output_dir)
        self.last_result = result
        rank_zero_info(_summary_table(result, self))
        return result

    def _run(
        self,
        trainer: pl.Trainer,
        module: FastIFMixin,
        pl_module: pl.LightningModule,
        data: _Data,
        output_dir: Path,
    ) -> RepairResult:
        device = next(pl_module.parameters()).device
        split = self._split_target(module, data, device)
        fastif = self._build_fastif(module, data) if INFLUENCE_STRATEGIES & set(self.strategies) else None
        start_weights = _snapshot(pl_module)
        start_metrics = self._measure(module, data, split, device)
        writes_files = trainer.is_global_zero
        if writes_files:
            output_dir.mkdir(parents=True, exist_ok=True)
        jsonl_path = output_dir / JSONL_NAME

        runs: dict[str, RepairRun] = {}
        first_weights: dict[str, Tensor] | None = None
        for strategy in self.strategies:
            _load_snapshot(pl_module, start_weights)
            run = RepairRun(strategy)
            self._record(trainer, run, start_metrics, {}, jsonl_path, step=0)
            self._run_strategy(trainer, module, pl_module, data, split, fastif, run, jsonl_path)
            runs[strategy] = run
            if self.save_checkpoint:
                checkpoint_path = output_dir / f"repaired_{strategy}.pt"
                runs[strategy].checkpoint_path = checkpoint_path
                if writes_files:
                    torch.save(pl_module.state_dict(), checkpoint_path)
            if first_weights is None:
                first_weights = _snapshot(pl_module)

        _load_snapshot(pl_module, start_weights)
        kept, decision = self._decide(runs[self.strategies[0]])
        if kept is not None and first_weights is not None:
            _load_snapshot(pl_module, first_weights)
        result = RepairResult(
            runs=runs,
            kept_strategy=kept,
            decision=decision,
            num_target=split.num_target,
            num_target_errors=split.num_errors,
            anchor_candidates=split.anchor_candidates,
            holdout_indices=split.holdout,
            holdout_errors=split.holdout_errors,
            jsonl_path=jsonl_path,
            validation_indices=split.validation,
            select_step=self.select_step,
        )
        if writes_files:
            (output_dir / SUMMARY_NAME).write_text(json.dumps(result.summary(), indent=2) + "\n", encoding="utf-8")
        for logger in trainer.loggers:
            logger.save()
        return result

    def _run_strategy(
        self,
        trainer: pl.Trainer,
        module: FastIFMixin,
        pl_module: pl.LightningModule,
        data: _Data,
        split: _Split,
        fastif: FastIF | None,
        run: RepairRun,
        jsonl_path: Path,
    ) -> None:
        """Take ``num_steps`` steps of ``run.strategy`` from the current weights, recording each into ``run``.

        Sets ``run.selected_step`` and leaves the module with the weights of that step.
        """
        strategy = run.strategy
        device = next(pl_module.parameters()).device
        optimizer = self._make_optimizer(pl_module)
        best = _BestStep() if self.select_step == "best_validation" else None
        if best is not None:
            best.offer(pl_module, 0, run.history[0]["validation_acc"])
        anchor_generator = torch.Generator().manual_seed(self.seed)
        random_generator = torch.Generator().manual_seed(self.seed + 1)
        steps = tqdm(range(1, self.num_steps + 1), desc=f"Repair ({strategy})", disable=not self.progress)
        for step in steps:
            start = time.perf_counter()
            order = torch.randperm(len(split.anchor_candidates), generator=anchor_generator)
            anchors = [split.anchor_candidates[int(i)] for i in order[: self.anchor_batch_size]]
            anchor_batch = move_batch(data.collate([data.target[i] for i in anchors]), device)
            chosen = self._choose(strategy, step, anchors, anchor_batch, data, fastif, random_generator)
            update_batch = anchor_batch if strategy == "anchors" else self._pool_batch(data, chosen["example_indices"])
            chosen["update_loss"] = self._update(module, pl_module, optimizer, update_batch)
            chosen["anchor_indices"] = anchors
            chosen["seconds"] = time.perf_counter() - start
            start = time.perf_counter()
            metrics = self._measure(module, data, split, device)
            chosen["eval_seconds"] = time.perf_counter() - start
            self._record(trainer, run, metrics, chosen, jsonl_path, step=step)
            steps.set_postfix(target_acc=f"{metrics['target_acc']:.3f}")
            if best is not None:
                best.offer(pl_module, step, metrics["validation_acc"])
        run.selected_step = self.num_steps
        if best is not None:
            # Every rank has rank zero's weights after each step and measures the same validation split,
            # so every rank selects the same step.
            _load_snapshot(pl_module, best.weights)
            run.selected_step = best.step

    # Steps.

    def _choose(
        self,
        strategy: str,
        step: int,
        anchors: list[int],
        anchor_batch: Any,
        data: _Data,
        fastif: FastIF | None,
        generator: torch.Generator,
    ) -> dict[str, Any]:
        """Return the pool positions of the update examples (and their scores for the influence strategies)."""
        if strategy == "anchors":
            return {"example_indices": [], "example_scores": []}
        if strategy == "random":
            picked = torch.randperm(_length(data.pool), generator=generator)[: self.num_examples]
            return {"example_indices": picked.tolist(), "example_scores": []}
        if fastif is None:
            raise RuntimeError(f"Strategy {strategy!r} needs FastIF, which was not built.")
        # Each step gets its own LiSSA seed, the same for every strategy at that step.
        config = replace(self.config, seed=self.seed * 100_000 + step * self.config.repeats)
        influence = fastif.explain(anchor_batch, mode="mean", query_indices=anchors, solver=config.solver())[0]
        if strategy == "helpful":
            indices, scores = influence.top.helpful_indices, influence.top.helpful_scores
        else:
            indices, scores = influence.top.harmful_indices, influence.top.harmful_scores
        return {
            "example_indices": indices[: self.num_examples].tolist(),
            "example_scores": scores[: self.num_examples].tolist(),
            "influence_seconds": influence.timings,
        }

    def _pool_batch(self, data: _Data, indices: Sequence[int]) -> Any:
        return data.collate([data.pool[i] for i in indices])

    def _update(
        self, module: FastIFMixin, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer, batch: Any
    ) -> float:
        """Take one optimizer step on the mean ``influence_loss`` of ``batch`` and return the loss before it."""
        batch = move_batch(batch, next(pl_module.parameters()).device)
        with _module_mode(pl_module, training=self.update_in_train_mode):
            optimizer.zero_grad(set_to_none=True)
            loss = module.influence_loss(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        # Every rank took the same step on the same batch. Copying rank zero's weights keeps the ranks
        # equal where dropout in train mode or non-deterministic kernels made the steps differ.
        broadcast_module(pl_module)
        return float(loss.detach())

    def _make_optimizer(self, pl_module: pl.LightningModule) -> torch.optim.Optimizer:
        if self.update_parameters == "influence":
            names = set(select_parameters(pl_module, pl_module.influence_parameters()).names)  # type: ignore[operator]
            parameters = [p for name, p in pl_module.named_parameters() if name in names]
        else:
            parameters = [p for p in pl_module.parameters() if p.requires_grad]
        if not parameters:
            raise ValueError("The module has no parameter with requires_grad=True, so there is nothing to repair.")
        if self.optimizer == "adam":
            return torch.optim.Adam(parameters, lr=self.lr)
        if self.optimizer == "adamw":
            return torch.optim.AdamW(parameters, lr=self.lr)
        return torch.optim.SGD(parameters, lr=self.lr)

    # Measuring and reporting.

    def _split_target(self, module: FastIFMixin, data: _Data, device: torch.device) -> _Split:
        num_target = _length(data.target)
        if num_target == 0:
            raise ValueError("The target dataset is empty. Pass a `target_dataset` with the examples to repair.")
        correct = _correct(module, data.target, range(num_target), data.collate, self.eval_batch_size, device)
        num_errors = int((~correct).sum())
        if num_errors == 0:
            raise ValueError(
                f"The model gets all {num_target} target examples right, so there is no error to repair. "
                "Pass a target set on which the model makes mistakes."
            )
        # The held-out split comes first in the seeded order and the validation split next, so a validation
        # split takes its examples from the anchor split and leaves the held-out split as it is without one.
        order = torch.randperm(num_target, generator=torch.Generator().manual_seed(self.seed)).tolist()
        num_holdout = min(num_target - 1, max(1, round(self.holdout_fraction * num_target)))
        num_validation = self._num_validation(num_target, num_holdout)
        holdout = sorted(order[:num_holdout])
        validation = sorted(order[num_holdout : num_holdout + num_validation])
        anchor_part = sorted(order[num_holdout + num_validation :])
        anchor_errors = [i for i in anchor_part if not correct[i]]
        anchor_candidates = anchor_part if self.anchors_from == "all" else anchor_errors
        holdout_errors = [i for i in holdout if not correct[i]]
        lower = "holdout_fraction" if self.validation_fraction == 0 else "holdout_fraction or validation_fraction"
        if self.anchors_from == "all" and not anchor_errors:
            raise ValueError(
                f"The anchor split of {len(anchor_part)} target examples contains none of the {num_errors} errors. "
                f"Lower {self._fractions(' or ')} or pass a larger target set."
            )
        if len(anchor_candidates) < self.anchor_batch_size:
            raise ValueError(
                f"anchor_batch_size={self.anchor_batch_size} is larger than the {len(anchor_candidates)} target "
                f"{'examples' if self.anchors_from == 'all' else 'errors'} available for anchors "
                f"({num_errors} errors in {num_target} target examples, "
                f"{self._fractions(', ')}). Pass anchor_batch_size <= {len(anchor_candidates)}, "
                f"a lower {lower} or a larger target set."
            )
        if not holdout_errors:
            raise ValueError(
                f"The held-out split of {len(holdout)} target examples contains none of the {num_errors} errors, "
                f"so target accuracy cannot be measured. Raise holdout_fraction={self.holdout_fraction} or pass "
                "a larger target set."
            )
        return _Split(num_target, num_errors, anchor_candidates, holdout, holdout_errors, validation)

    def _num_validation(self, num_target: int, num_holdout: int) -> int:
        """Return the size of the validation split, at least 1 when ``validation_fraction`` is above 0.

        Raises ``ValueError`` when the held-out and validation splits leave no target example for anchors.
        """
        if self.validation_fraction == 0:
            return 0
        num_validation = max(1, round(self.validation_fraction * num_target))
        if num_holdout + num_validation > num_target - 1:
            raise ValueError(
                f"The held-out split ({num_holdout} examples, holdout_fraction={self.holdout_fraction}) and the "
                f"validation split ({num_validation} examples, validation_fraction={self.validation_fraction}) "
                f"take all {num_target} target examples and leave none for anchors. Lower holdout_fraction or "
                "validation_fraction, or pass a larger target set."
            )
        return num_validation

    def _fractions(self, separator: str) -> str:
        """Return the split settings for a message, such as ``holdout_fraction=0.5, validation_fraction=0.2``."""
        settings = [f"holdout_fraction={self.holdout_fraction}"]
        if self.validation_fraction != 0:
            settings.append(f"validation_fraction={self.validation_fraction}")
        return separator.join(settings)

    def _measure(self, module: FastIFMixin, data: _Data, split: _Split, device: torch.device) -> dict[str, Any]:
        holdout = _correct(module, data.target, split.holdout, data.collate, self.eval_batch_size, device)
        error_positions = set(split.holdout_errors)
        on_errors = torch.tensor([i in error_positions for i in split.holdout])
        metrics: dict[str, Any] = {
            "target_acc": float(holdout[on_errors].float().mean()),
            "holdout_acc": float(holdout.float().mean()),
            "source_acc": None,
            "validation_acc": None,
        }
        if split.validation:
            validation = _correct(module, data.target, split.validation, data.collate, self.eval_batch_size, device)
            metrics["validation_acc"] = float(validation.float().mean())
        if data.source is not None:
            source = _correct(
                module, data.source, range(_length(data.source)), data.collate, self.eval_batch_size, device
            )
            metrics["source_acc"] = float(source.float().mean())
        return metrics

    def _record(
        self,
        trainer: pl.Trainer,
        run: RepairRun,
        metrics: dict[str, Any],
        chosen: dict[str, Any],
        jsonl_path: Path,
        *,
        step: int,
    ) -> None:
        record = {
            "strategy": run.strategy,
            "step": step,
            **metrics,
            "update_loss": chosen.get("update_loss"),
            "anchor_indices": chosen.get("anchor_indices", []),
            "example_indices": chosen.get("example_indices", []),
            "example_scores": chosen.get("example_scores", []),
            "seconds": chosen.get("seconds", 0.0),
            "eval_seconds": chosen.get("eval_seconds", 0.0),
            "influence_seconds": chosen.get("influence_seconds", {}),
            "seed": self.seed,
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
        }
        run.history.append(record)
        if trainer.is_global_zero:
            with jsonl_path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        scalars = {f"repair/{run.strategy}/{key}": value for key, value in metrics.items() if value is not None}
        scalars["repair/step"] = step
        if record["update_loss"] is not None:
            scalars[f"repair/{run.strategy}/update_loss"] = record["update_loss"]
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)

    def _decide(self, run: RepairRun) -> tuple[str | None, str]:
        if self.policy == "keep":
            return run.strategy, "policy 'keep'"
        if self.policy == "restore":
            return None, "policy 'restore'"
        # 0.0 - change, unlike -change, never formats as "-0.0000" when nothing changed.
        drop = 0.0 - (run.selected_change("source_acc") or 0.0)
        if drop > self.max_source_drop:
            return None, f"source accuracy fell by {drop:.4f} > max_source_drop={self.max_source_drop}"
        return run.strategy, f"source accuracy fell by {drop:.4f} <= max_source_drop={self.max_source_drop}"

    # Resolving inputs.

    def _resolve_data(self, trainer: pl.Trainer) -> _Data:
        pool, pool_collate = self._pool(trainer)
        target = self.target_dataset
        if target is None and self.target_dataloader_idx is not None:
            target = _val_dataset(trainer, self.target_dataloader_idx, "target_dataloader_idx")
        if target is None:
            raise ValueError(
                "DataRepairCallback has no target set. Pass `target_dataset` (a map-style dataset of examples "
                "to repair) or `target_dataloader_idx` (a validation dataloader)."
            )
        source = self.source_dataset
        if source is None and self.source_dataloader_idx is not None:
            source = _val_dataset(trainer, self.source_dataloader_idx, "source_dataloader_idx")
        for name, dataset in (("target_dataset", target), ("pool_dataset", pool), ("source_dataset", source)):
            if dataset is not None:
                _check_map_style(name, dataset)
        if source is not None and _length(source) == 0:
            raise ValueError("The source dataset is empty. Pass a non-empty `source_dataset`, or None.")
        collate = self.collate_fn or pool_collate or default_collate
        return _Data(target=target, pool=pool, source=source, collate=collate)

    def _pool(self, trainer: pl.Trainer) -> tuple[Dataset, Callable[[list[Any]], Any] | None]:
        loader = trainer.train_dataloader
        collate = getattr(loader, "collate_fn", None) if loader is not None else None
        if self.pool_dataset is not None:
            return self.pool_dataset, collate
        dataset = getattr(getattr(trainer, "datamodule", None), "train_dataset", None)
        if dataset is None and loader is not None:
            dataset = getattr(loader, "dataset", None)
        if dataset is None:
            raise ValueError(
                "DataRepairCallback found no pool of update examples: the trainer has no training dataloader and "
                "no datamodule with a `train_dataset`. Pass `pool_dataset=`."
            )
        return dataset, collate

    def _build_fastif(self, module: FastIFMixin, data: _Data) -> FastIF:
        config = self.config
        if config.k is not None and config.k > _length(data.pool):
            rank_zero_warn(
                f"DataRepairCallback: k={config.k} is larger than the pool of {_length(data.pool)} examples, "
                "so every pool example is a kNN candidate."
            )
            config = replace(config, k=_length(data.pool))
        return FastIF(
            module,  # type: ignore[arg-type]
            mixin_influence_loss,
            module.influence_features,
            data.pool,
            collate_fn=data.collate,
            parameters=module.influence_parameters(),
            config=config,
        )

    def _num_labels(self, pl_module: pl.LightningModule) -> int | None:
        if self.num_labels is not None:
            return self.num_labels
        try:
            backbone = pl_module.influence_backbone()  # type: ignore[operator]
        except (AttributeError, TypeError):
            backbone = None
        candidates = (
            getattr(getattr(backbone, "config", None), "num_labels", None),
            getattr(pl_module, "num_labels", None),
            getattr(pl_module, "hparams", {}).get("num_labels"),
        )
        return next((int(value) for value in candidates if isinstance(value, int)), None)

    def _output_dir(self, trainer: pl.Trainer) -> Path:
        if self.output_dir is not None:
            return Path(self.output_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / "repair"


# Input checks.


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, but got {value!r}.")


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}. Choose one of {list(choices)}.")


def _check_ranges(
    lr: float, holdout_fraction: float, max_source_drop: float, at_epoch: int | None, num_labels: int | None
) -> None:
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"`lr` must be a positive learning rate, but got {lr!r}. Pass for example lr=1e-4.")
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(
            f"`holdout_fraction` must be in (0, 1), but got {holdout_fraction!r}. Pass for example 0.5, so "
            "half of the target set is held out for measuring and the other half supplies anchors."
        )
    if not max_source_drop >= 0.0:
        raise ValueError(f"`max_source_drop` must be >= 0, but got {max_source_drop!r}.")
    if at_epoch is not None and at_epoch < 0:
        raise ValueError(f"`at_epoch` must be None (run after fit) or an epoch >= 0, but got {at_epoch}.")
    if num_labels is not None and num_labels < 1:
        raise ValueError(f"`num_labels` must be a positive integer or None, but got {num_labels}.")


def _check_validation(holdout_fraction: float, validation_fraction: float, select_step: str) -> None:
    _check_choice("select_step", select_step, SELECT_STEPS)
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(
            f"`validation_fraction` must be in [0, 1), but got {validation_fraction!r}. Pass 0 for no validation "
            "split, or for example 0.2 to choose the repair step on a fifth of the target set."
        )
    if not holdout_fraction + validation_fraction < 1.0:
        raise ValueError(
            f"holdout_fraction={holdout_fraction} and validation_fraction={validation_fraction} add up to "
            f"{holdout_fraction + validation_fraction:g}, which leaves no target examples for anchors. Lower one "
            "of them so that their sum is below 1, for example holdout_fraction=0.4 and validation_fraction=0.2."
        )
    if select_step == "best_validation" and validation_fraction == 0.0:
        raise ValueError(
            "select_step='best_validation' chooses the step on a validation split, but validation_fraction=0 "
            "makes none. Pass validation_fraction > 0 (for example 0.2), or select_step='last'."
        )


def _check_dataloader_indices(target_dataloader_idx: int | None, source_dataloader_idx: int | None) -> None:
    indices = {"target_dataloader_idx": target_dataloader_idx, "source_dataloader_idx": source_dataloader_idx}
    for name, index in indices.items():
        if index is not None and index < 0:
            raise ValueError(f"`{name}` must be None or >= 0, but got {index}.")


def _check_strategies(strategy: str, strategies: Sequence[str] | None) -> list[str]:
    chosen = [strategy] if strategies is None else list(strategies)
    if not chosen:
        raise ValueError("`strategies` is an empty list. Pass None to run `strategy` alone, or list strategies.")
    for name in chosen:
        _check_choice("strategy", name, STRATEGIES)
    if len(set(chosen)) < len(chosen):
        raise ValueError(f"`strategies` lists a strategy twice: {chosen}. List each strategy once.")
    return chosen


def _require_mixin(pl_module: pl.LightningModule) -> FastIFMixin:
    if not isinstance(pl_module, FastIFMixin):
        raise TypeError(
            f"DataRepairCallback needs a LightningModule that implements FastIFMixin, but got "
            f"{type(pl_module).__name__}. Add FastIFMixin to its base classes."
        )
    return pl_module


def _length(dataset: Dataset) -> int:
    """Return the length of a dataset that passed :func:`_check_map_style`."""
    return len(cast(Sized, dataset))


def _check_map_style(name: str, dataset: Any) -> None:
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise TypeError(
            f"`{name}` is a {type(dataset).__name__}, but data repair needs a map-style Dataset with __len__ and "
            "__getitem__, so examples can be picked by index."
        )


def _check_pool_labels(pool: Dataset, num_labels: int | None) -> None:
    """Raise ``ValueError`` if a ``labels`` value of a pool item is outside ``[0, num_labels)``."""
    if _length(pool) == 0:
        raise ValueError("The pool dataset is empty. Pass a `pool_dataset` with candidate update examples.")
    if num_labels is None:
        rank_zero_warn(
            "DataRepairCallback could not find the model's number of labels, so the pool's labels are not checked. "
            "Pass `num_labels=` to check them."
        )
        return
    for position in range(len(pool)):  # type: ignore[arg-type]
        item = pool[position]
        value = _item_label(item)
        if value is None:
            rank_zero_warn(
                f"Pool example {position} is a {type(item).__name__} without a label that DataRepairCallback can "
                "find, so the pool's labels are not checked. Give items a 'labels' or 'label' entry, or make "
                "them (inputs, label) tuples."
            )
            return
        tensor = torch.as_tensor(value)
        if tensor.numel() != 1 or tensor.is_complex() or tensor.item() != int(tensor.item()):
            raise ValueError(
                f"Pool example {position} has label {value!r}, but a class label must be one integer id. "
                "Pass a pool whose items carry one class id each."
            )
        label = int(tensor.item())
        if not 0 <= label < num_labels:
            raise ValueError(
                f"Pool example {position} has label {label}, outside the model's label ids 0..{num_labels - 1}. "
                f"Map the pool's labels into the model's {num_labels} classes (HANS non-entailment, for example, "
                "to an MNLI class) or pass a pool with the model's labels."
            )


def _item_label(item: Any) -> Any:
    """Return a dataset item's label: its "labels" or "label" entry, the last element of a tuple, or None."""
    if isinstance(item, dict):
        return item.get("labels", item.get("label"))
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        return item[-1]
    return None


def _val_dataset(trainer: pl.Trainer, index: int, name: str) -> Dataset:
    loaders = trainer.val_dataloaders
    if loaders is None:
        datamodule = getattr(trainer, "datamodule", None)
        loaders = datamodule.val_dataloader() if datamodule is not None else None
    if loaders is None:
        raise ValueError(
            f"`{name}={index}` names a validation dataloader, but the trainer has none. Pass validation "
            "dataloaders to `fit` or a datamodule, and define `validation_step`: without it Lightning skips "
            "the validation loop and sets up no validation dataloader."
        )
    loaders = list(loaders) if isinstance(loaders, list | tuple) else [loaders]
    if index >= len(loaders):
        raise ValueError(f"`{name}={index}` but there are {len(loaders)} validation dataloaders.")
    return loaders[index].dataset


# Evaluation and state.


def _correct(
    module: FastIFMixin,
    dataset: Dataset,
    indices: Sequence[int],
    collate: Callable[[list[Any]], Any],
    batch_size: int,
    device: torch.device,
) -> Tensor:
    """Return whether the model gets each of the given dataset positions right, bool ``[len(indices)]``."""
    positions = list(indices)
    chunks = []
    with influence_mode(module), torch.no_grad():  # type: ignore[arg-type]
        for start in range(0, len(positions), batch_size):
            batch = move_batch(collate([dataset[i] for i in positions[start : start + batch_size]]), device)
            errors = module.influence_errors(batch, module.influence_predictions(batch))
            chunks.append(~errors.reshape(-1).bool().cpu())
    return torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.bool)


def _snapshot(module: nn.Module) -> dict[str, Tensor]:
    """Copy every parameter and buffer (persistent or not) of ``module``."""
    tensors: dict[str, Tensor] = {f"param:{name}": p for name, p in module.named_parameters()}
    tensors.update({f"buffer:{name}": b for name, b in module.named_buffers()})
    return {name: tensor.detach().clone() for name, tensor in tensors.items()}


def _load_snapshot(module: nn.Module, snapshot: dict[str, Tensor]) -> None:
    """Copy a :func:`_snapshot` back into the module's own tensors, so references to them stay valid."""
    tensors: dict[str, Tensor] = {f"param:{name}": p for name, p in module.named_parameters()}
    tensors.update({f"buffer:{name}": b for name, b in module.named_buffers()})
    with torch.no_grad():
        for name, tensor in tensors.items():
            tensor.copy_(snapshot[name])


@contextmanager
def _module_mode(module: nn.Module, *, training: bool) -> Iterator[None]:
    modes = [(sub, sub.training) for sub in module.modules()]
    module.train(training)
    try:
        yield
    finally:
        for sub, mode in modes:
            sub.training = mode


@contextmanager
def _preserved_state(module: nn.Module) -> Iterator[None]:
    """Restore modes, ``requires_grad``, gradients, random state and, on error, the weights."""
    modes = [(sub, sub.training) for sub in module.modules()]
    flags = [(p, p.requires_grad) for p in module.parameters()]
    grads = [(p, p.grad) for p in module.parameters()]
    weights = _snapshot(module)
    cuda_devices = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    numpy_state, python_state = np.random.get_state(), random.getstate()
    for p, _ in grads:
        p.grad = None
    failed = True
    try:
        with torch.random.fork_rng(devices=cuda_devices):
            yield
        failed = False
    finally:
        if failed:
            _load_snapshot(module, weights)
        np.random.set_state(numpy_state)
        random.setstate(python_state)
        for sub, mode in modes:
            sub.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)
        for p, grad in grads:
            p.grad = grad


def _format_change(before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return "-"
    return f"{before:.3f} -> {after:.3f}"


def _summary_table(result: RepairResult, callback: DataRepairCallback) -> str:
    """Lay out each strategy's accuracies before and after the last step, and at the selected step."""
    metrics = list(METRICS if result.validation_indices else METRICS[:-1])
    validation = f", validation split of {len(result.validation_indices)}" if result.validation_indices else ""
    lines = [
        f"Data repair: {callback.num_steps} steps of {callback.optimizer} (lr {callback.lr:g}), "
        f"{callback.num_examples} examples a step, anchors from {len(result.anchor_candidates)} target "
        f"{'examples' if callback.anchors_from == 'all' else 'errors'} ({result.num_target_errors} errors in all), "
        f"measured on {len(result.holdout_errors)} held-out errors{validation}.",
        "  ".join([f"{'strategy':<9}"] + [f"{key:<14}" for key in metrics]),
    ]
    for name, run in result.runs.items():
        first, last = run.history[0], run.history[-1]
        cells = [f"{_format_change(first[key], last[key]):<14}" for key in metrics]
        lines.append("  ".join([f"{name:<9}"] + cells))
    if result.select_step == "best_validation":
        lines.append(
            "At the selected steps, those with the highest validation_acc (the earliest on ties), whose weights "
            "the checkpoints and the policy use:"
        )
        lines.append("  ".join([f"{'strategy':<9}", f"{'step':<4}"] + [f"{key:<14}" for key in metrics]))
        for name, run in result.runs.items():
            step = run.selected_index()
            cells = [f"{_format_change(run.history[0][key], run.history[step][key]):<14}" for key in metrics]
            lines.append("  ".join([f"{name:<9}", f"{step:<4}"] + cells))
    kept = f"kept the {result.kept_strategy!r} weights" if result.kept_strategy else "restored the start weights"
    lines.append(f"The module {kept} ({result.decision}). Records: {result.jsonl_path}")
    return "\n".join(lines)
