"""DataRepairCallback on a tiny task with a spurious feature, with a real Trainer and a real faiss index.

Every example has a core feature that predicts the label with about 84 % accuracy and a spurious feature
that agrees with the label in the training data. The trained MLP relies on the spurious feature and gets
the counter-examples (spurious feature flipped) wrong, so they are the target errors.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonargparse
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import yaml
from pytorch_lightning.loggers import CSVLogger, WandbLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_fastif.callbacks import DataRepairCallback
from lightning_fastif.callbacks.repair import JSONL_NAME, SUMMARY_NAME, _check_pool_labels
from lightning_fastif.fastif import FastIF
from lightning_fastif.knn import weights_fingerprint
from lightning_fastif.mixin import FastIFMixin
from tests.helpers.cli import run_fit, use_small_data, use_tiny_bert, write_rows
from tests.helpers.wandb_files import history_rows, offline_run_dir

REPAIR_YAML = Path(__file__).resolve().parents[2] / "examples" / "mnli_hans" / "repair.yaml"

NOISE_DIMS = 4
CORE_MEAN = 1.0
SPURIOUS_SCALE = 2.0
POOL_COUNTER_FRACTION = 0.05
TARGET_COUNTER_FRACTION = 0.7

# Repair settings for the 6-16-2 MLP. With these settings and data and model seeds 0-5, helpful examples
# raised the held-out target accuracy by 0.75 to 0.97 and random ones by at most 0.10. Counter-examples
# made up 0.43 to 0.83 of the helpful examples.
REPAIR_LR = 0.2
REPAIR_STEPS = 10
MIN_HELPFUL_GAIN = 0.4
MAX_RANDOM_GAIN = 0.2
MIN_HELPFUL_COUNTER_SHARE = 0.3  # 6x the pool's share of counter-examples
TRAIN_SIZE_IN_FIT = 150
FAST_LISSA = {"k": 64, "depth": 30, "scale": 100.0, "damping": 0.01, "lissa_batch_size": 8}

RECORD_KEYS = {
    "strategy",
    "step",
    "target_acc",
    "holdout_acc",
    "source_acc",
    "validation_acc",
    "update_loss",
    "anchor_indices",
    "example_indices",
    "example_scores",
    "seconds",
    "eval_seconds",
    "influence_seconds",
    "seed",
    "epoch",
    "global_step",
}


@dataclass
class SpuriousSet(Dataset):
    """Items ``{"x": [6], "labels": [], "index": []}`` and the positions whose spurious feature disagrees."""

    items: list[dict[str, Tensor]]
    counter: set[int]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return self.items[index]


def spurious_set(size: int, counter_fraction: float, seed: int) -> SpuriousSet:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (size,), generator=generator)
    sign = (2 * labels - 1).float()
    counter = torch.randperm(size, generator=generator)[: round(counter_fraction * size)]
    agree = torch.ones(size)
    agree[counter] = -1.0
    core = sign * CORE_MEAN + torch.randn(size, generator=generator)
    spurious = sign * agree * SPURIOUS_SCALE + 0.1 * torch.randn(size, generator=generator)
    noise = torch.randn(size, NOISE_DIMS, generator=generator)
    x = torch.cat([core[:, None], spurious[:, None], noise], dim=1)  # [size, 2 + NOISE_DIMS]
    items = [{"x": x[i], "labels": labels[i], "index": torch.tensor(i)} for i in range(size)]
    return SpuriousSet(items, set(counter.tolist()))


class SpuriousMLP(FastIFMixin, pl.LightningModule):
    """A 6-16-2 tanh MLP whose hidden layer is the kNN feature."""

    num_labels = 2

    def __init__(self, batch_norm: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(2 + NOISE_DIMS, 16)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(16))
        self.body = nn.Sequential(*layers, nn.Tanh())
        self.head = nn.Linear(16, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))

    def influence_backbone(self) -> nn.Module:
        return self

    def influence_loss(self, batch: dict[str, Tensor]) -> Tensor:
        return F.cross_entropy(self(batch["x"]), batch["labels"])

    def influence_features(self, batch: dict[str, Tensor]) -> Tensor:
        return self.body(batch["x"])

    def influence_predictions(self, batch: dict[str, Tensor]) -> Tensor:
        with torch.no_grad():
            return self(batch["x"]).argmax(dim=-1)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.influence_loss(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Run on one thread: for a model this small, thread hand-offs cost more than the arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Task:
    train: SpuriousSet
    pool: SpuriousSet
    target: SpuriousSet
    source: SpuriousSet


def make_task() -> Task:
    return Task(
        train=spurious_set(400, 0.0, seed=0),
        pool=spurious_set(400, POOL_COUNTER_FRACTION, seed=100),
        target=spurious_set(200, TARGET_COUNTER_FRACTION, seed=200),
        source=spurious_set(200, 0.0, seed=300),
    )


@pytest.fixture(scope="module")
def task() -> Task:
    return make_task()


def quiet_trainer(**kwargs: Any) -> pl.Trainer:
    options = {
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": False,
        "max_epochs": 10,
    }
    return pl.Trainer(**{**options, **kwargs})


def fit_model(train: Dataset, *, batch_norm: bool = False, seed: int = 0) -> SpuriousMLP:
    pl.seed_everything(seed, verbose=False)
    model = SpuriousMLP(batch_norm=batch_norm)
    quiet_trainer().fit(model, DataLoader(train, batch_size=32, shuffle=True))
    return model


@pytest.fixture(scope="module")
def trained(task: Task) -> SpuriousMLP:
    return fit_model(task.train)


@pytest.fixture
def model(trained: SpuriousMLP) -> SpuriousMLP:
    return copy.deepcopy(trained)


def repair_callback(task: Task, tmp_path: Path, **kwargs: Any) -> DataRepairCallback:
    options: dict[str, Any] = {
        "target_dataset": task.target,
        "pool_dataset": task.pool,
        "source_dataset": task.source,
        "num_steps": REPAIR_STEPS,
        "lr": REPAIR_LR,
        "policy": "restore",
        "output_dir": str(tmp_path / "repair"),
        "save_checkpoint": False,
        "progress": False,
        **FAST_LISSA,
    }
    return DataRepairCallback(**{**options, **kwargs})


def tensors_of(module: nn.Module) -> dict[str, Tensor]:
    named = {f"param:{name}": p for name, p in module.named_parameters()}
    named.update({f"buffer:{name}": b for name, b in module.named_buffers()})
    return {name: tensor.detach().clone() for name, tensor in named.items()}


def assert_same_tensors(module: nn.Module, expected: dict[str, Tensor]) -> None:
    actual = tensors_of(module)
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), f"{name} changed"


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# Repair quality.


def test_helpful_repairs_random_does_not(task: Task, model: SpuriousMLP, tmp_path: Path) -> None:
    callback = repair_callback(task, tmp_path, strategies=["helpful", "random", "anchors", "harmful"])
    result = callback.repair(quiet_trainer(), model)

    gains = {name: run.change("target_acc") for name, run in result.runs.items()}
    assert result.runs["helpful"].metric("target_acc", 0) == 0.0
    assert gains["helpful"] >= MIN_HELPFUL_GAIN, gains
    assert gains["random"] <= MAX_RANDOM_GAIN, gains
    assert gains["helpful"] - gains["random"] >= MIN_HELPFUL_GAIN - MAX_RANDOM_GAIN, gains
    assert gains["harmful"] <= MAX_RANDOM_GAIN, gains

    helpful = [i for record in result.runs["helpful"].history for i in record["example_indices"]]
    share = sum(i in task.pool.counter for i in helpful) / len(helpful)
    assert len(helpful) == REPAIR_STEPS * callback.num_examples
    assert share >= MIN_HELPFUL_COUNTER_SHARE


def test_index_rebuilt_each_step(
    task: Task, model: SpuriousMLP, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    start = weights_fingerprint(model)
    builds: list[str] = []
    train_features = FastIF._train_features

    def recording(self: FastIF, start: int, stop: int, *, progress: bool) -> Tensor:
        builds.append(weights_fingerprint(self.model))
        return train_features(self, start, stop, progress=progress)

    monkeypatch.setattr(FastIF, "_train_features", recording)
    callback = repair_callback(task, tmp_path, strategies=["helpful", "harmful"], num_steps=3)
    callback.repair(quiet_trainer(), model)
    # One kNN index per FastIF step, each over the features of the weights at that step: the first from the
    # start weights, the others from the weights after the updates so far.
    assert len(builds) == 2 * 3
    assert builds[0] == builds[3] == start
    assert len(set(builds)) == 5
    assert weights_fingerprint(model) == start  # the restore policy put the weights back


def test_repair_curves_reach_wandb(
    task: Task, model: SpuriousMLP, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    import wandb

    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="repair-test")
    callback = repair_callback(task, tmp_path, strategies=["helpful", "random"], num_steps=3)
    try:
        result = callback.repair(quiet_trainer(logger=logger), model)
    finally:
        wandb.finish()
    rows = history_rows(offline_run_dir(tmp_path))
    for strategy in ("helpful", "random"):
        for metric in ("target_acc", "holdout_acc", "source_acc"):
            key = f"repair/{strategy}/{metric}"
            logged = [row[key] for row in rows if key in row]
            assert logged == pytest.approx([record[metric] for record in result.runs[strategy].history]), key
    # The file contains the same curves.
    records = read_jsonl(result.jsonl_path)
    assert [r["holdout_acc"] for r in records if r["strategy"] == "helpful"] == [
        r["holdout_acc"] for r in result.runs["helpful"].history
    ]


def test_anchor_batches_are_errors_outside_holdout(task: Task, model: SpuriousMLP, tmp_path: Path) -> None:
    callback = repair_callback(task, tmp_path, strategies=["anchors", "random"], num_steps=3)
    result = callback.repair(quiet_trainer(), model)

    holdout = set(result.holdout_indices)
    anchors_per_run = {name: [r["anchor_indices"] for r in run.history[1:]] for name, run in result.runs.items()}
    assert anchors_per_run["anchors"] == anchors_per_run["random"]
    for anchors in anchors_per_run["anchors"]:
        assert len(anchors) == callback.anchor_batch_size
        assert set(anchors) <= set(result.anchor_candidates)
        assert not set(anchors) & holdout
    assert set(result.anchor_candidates) <= task.target.counter
    assert set(result.holdout_errors) <= holdout
    assert len(holdout) == round(callback.holdout_fraction * len(task.target))
    assert result.num_target_errors == len(result.anchor_candidates) + len(result.holdout_errors)


def test_anchors_from_all_includes_correct_examples(task: Task, model: SpuriousMLP, tmp_path: Path) -> None:
    callback = repair_callback(task, tmp_path, strategies=["anchors"], num_steps=3, anchors_from="all")
    result = callback.repair(quiet_trainer(), model)

    holdout = set(result.holdout_indices)
    assert not set(result.anchor_candidates) & holdout
    assert len(result.anchor_candidates) == len(task.target) - len(holdout)
    assert set(result.anchor_candidates) - task.target.counter  # correct examples are candidates too
    drawn = [i for record in result.runs["anchors"].history[1:] for i in record["anchor_indices"]]
    assert set(drawn) <= set(result.anchor_candidates)
    assert set(drawn) - task.target.counter


# Policies and state.


def test_restore_brings_back_exact_state(task: Task, tmp_path: Path) -> None:
    model = fit_model(task.train, batch_norm=True)
    model.train()
    model.body[1].eval()  # a mixed mode, which must come back as it was
    model.head.bias.requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = model.influence_loss({"x": torch.randn(4, 2 + NOISE_DIMS), "labels": torch.tensor([0, 1, 0, 1])})
    loss.backward()
    optimizer.step()
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    modes = {name: sub.training for name, sub in model.named_modules()}
    start = tensors_of(model)
    callback = repair_callback(
        task, tmp_path, strategies=["helpful", "anchors"], update_in_train_mode=True, save_checkpoint=True
    )
    trainer = quiet_trainer()
    rng_state = torch.get_rng_state()

    result = callback.repair(trainer, model)

    assert_same_tensors(model, start)
    assert result.kept_strategy is None
    assert {name: sub.training for name, sub in model.named_modules()} == modes
    assert not model.head.bias.requires_grad
    assert all(p.requires_grad for name, p in model.named_parameters() if name != "head.bias")
    assert {name for name, p in model.named_parameters() if p.grad is not None} == grads.keys()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.equal(p.grad, grads[name])
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert_same_optimizer_state(optimizer.state_dict(), optimizer_state)

    repaired = torch.load(result.runs["anchors"].checkpoint_path)
    assert not torch.equal(repaired["body.0.weight"], start["param:body.0.weight"])
    assert not torch.equal(repaired["body.1.running_mean"], start["buffer:body.1.running_mean"])
    assert torch.equal(repaired["head.bias"], start["param:head.bias"])  # frozen, so never updated


def assert_same_optimizer_state(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    assert actual["param_groups"] == expected["param_groups"]
    assert actual["state"].keys() == expected["state"].keys()
    for key, state in expected["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(actual["state"][key][name]), torch.as_tensor(value)), (key, name)


def test_keep_holds_first_strategy_weights(task: Task, model: SpuriousMLP, tmp_path: Path) -> None:
    callback = repair_callback(task, tmp_path, strategies=["helpful", "random"], policy="keep", save_checkpoint=True)
    result = callback.repair(quiet_trainer(), model)

    assert result.kept_strategy == "helpful"
    helpful = torch.load(result.runs["helpful"].checkpoint_path)
    random_weights = torch.load(result.runs["random"].checkpoint_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, helpful[name]), name
    assert not torch.equal(helpful["head.weight"], random_weights["head.weight"])


class HeadInfluenceMLP(SpuriousMLP):
    """A SpuriousMLP whose influence parameters are the head only."""

    def influence_parameters(self) -> list[str]:
        return [r"^head\."]


def test_influence_update_keeps_body(task: Task, tmp_path: Path) -> None:
    model = HeadInfluenceMLP()
    model.load_state_dict(fit_model(task.train).state_dict())
    start = tensors_of(model)
    callback = repair_callback(
        task, tmp_path, strategies=["helpful"], num_steps=3, policy="keep", update_parameters="influence"
    )
    callback.repair(quiet_trainer(), model)
    after = tensors_of(model)
    for name in ("param:body.0.weight", "param:body.0.bias"):
        assert torch.equal(after[name], start[name]), name
    for name in ("param:head.weight", "param:head.bias"):
        assert not torch.equal(after[name], start[name]), name


def test_all_update_changes_body(task: Task, tmp_path: Path) -> None:
    model = HeadInfluenceMLP()
    model.load_state_dict(fit_model(task.train).state_dict())
    start = tensors_of(model)
    callback = repair_callback(task, tmp_path, strategies=["helpful"], num_steps=3, policy="keep")
    assert callback.update_parameters == "all"
    callback.repair(quiet_trainer(), model)
    assert not torch.equal(tensors_of(model)["param:body.0.weight"], start["param:body.0.weight"])


def test_restore_on_source_drop(task: Task, model: SpuriousMLP, tmp_path: Path) -> None:
    start = tensors_of(model)
    strict = repair_callback(task, tmp_path, strategy="anchors", policy="restore_on_source_drop", max_source_drop=0.05)
    result = strict.repair(quiet_trainer(), model)

    drop = -result.runs["anchors"].change("source_acc")
    assert drop > 0.05
    assert result.kept_strategy is None
    assert "max_source_drop=0.05" in result.decision
    assert_same_tensors(model, start)

    lenient = repair_callback(task, tmp_path, strategy="anchors", policy="restore_on_source_drop", max_source_drop=1.0)
    assert lenient.repair(quiet_trainer(), model).kept_strategy == "anchors"
    assert not torch.equal(model.head.weight, start["param:head.weight"])


# Choosing the step on a validation split.

# With lr=REPAIR_LR, validation_fraction=VALIDATION_FRACTION and 10 steps from the module-scoped
# trained model, "helpful" reached its highest validation accuracy (0.925) at steps 5 to 9, so
# "best_validation" selects step 5. "anchors" peaked at step 3 (0.85) while its source accuracy fell
# from 1.0 to 0.87 by step 3 and to 0.245 by step 10. "random" changed no validation prediction, so
# every step ties and step 0 is selected.
VALIDATION_FRACTION = 0.2


def test_validation_split_is_disjoint(task: Task, model: SpuriousMLP, tmp_path: Path) -> None:
    plain = repair_callback(task, tmp_path, strategy="anchors", num_steps=1, anchors_from="all")
    without = plain.repair(quiet_trainer(), copy.deepcopy(model))
    callback = repair_callback(
        task, tmp_path, strategy="anchors", num_steps=1, anchors_from="all", validation_fraction=VALIDATION_FRACTION
    )
    result = callback.repair(quiet_trainer(), model)

    validation, holdout, anchors = (
        set(result.validation_indices),
        set(result.holdout_indices),
        set(result.anchor_candidates),
    )
    assert len(validation) == round(VALIDATION_FRACTION * len(task.target))
    assert not validation & holdout
    assert not validation & anchors
    assert not holdout & anchors
    assert validation | holdout | anchors == set(range(len(task.target)))
    # Adding a validation split takes its examples from the anchor split and leaves the held-out split as it was.
    assert result.holdout_indices == without.holdout_indices
    assert anchors == set(without.anchor_candidates) - validation
    drawn = [i for record in result.runs["anchors"].history[1:] for i in record["anchor_indices"]]
    assert not set(drawn) & validation


def test_zero_validation_fraction_keeps_split(task: Task, model: SpuriousMLP, tmp_path: Path) -> None:
    seed = 3
    callback = repair_callback(
        task, tmp_path, strategy="anchors", num_steps=2, anchors_from="all", validation_fraction=0.0, seed=seed
    )
    result = callback.repair(quiet_trainer(), model)

    # Without a validation split the first holdout_fraction of the seeded order is held out, and the rest
    # supplies the anchors.
    order = torch.randperm(len(task.target), generator=torch.Generator().manual_seed(seed)).tolist()
    num_holdout = round(callback.holdout_fraction * len(task.target))
    assert result.holdout_indices == sorted(order[:num_holdout])
    assert result.anchor_candidates == sorted(order[num_holdout:])
    assert result.validation_indices == []
    assert all(record["validation_acc"] is None for record in result.runs["anchors"].history)
    assert result.runs["anchors"].selected_step == 2


def test_best_validation_keeps_selected_weights(task: Task, model: SpuriousMLP, tmp_path: Path) -> None:
    start = copy.deepcopy(model)
    callback = repair_callback(
        task,
        tmp_path / "best",
        strategy="helpful",
        validation_fraction=VALIDATION_FRACTION,
        select_step="best_validation",
        policy="keep",
        save_checkpoint=True,
    )
    run = callback.repair(quiet_trainer(), model).runs["helpful"]

    accuracies = [record["validation_acc"] for record in run.history]
    selected = run.selected_step
    assert len(run.history) == REPAIR_STEPS + 1  # every step still runs
    assert selected == accuracies.index(max(accuracies))
    assert 0 < selected < REPAIR_STEPS, accuracies  # step 5 with these settings
    assert accuracies[selected + 1] == accuracies[selected], accuracies  # a tie, resolved to the earlier step
    checkpoint = torch.load(run.checkpoint_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, checkpoint[name]), name

    # The same run stopped at the selected step must end with the same weights, bit for bit.
    shorter = repair_callback(
        task,
        tmp_path / "last",
        strategy="helpful",
        validation_fraction=VALIDATION_FRACTION,
        num_steps=selected,
        select_step="last",
        policy="keep",
    )
    rerun = shorter.repair(quiet_trainer(), start).runs["helpful"]
    assert rerun.selected_step == selected
    for key in ("step", "validation_acc", "holdout_acc", "anchor_indices", "example_indices"):
        assert [r[key] for r in rerun.history] == [r[key] for r in run.history[: selected + 1]], key
    assert_same_tensors(model, tensors_of(start))


def test_best_validation_ties_select_start(task: Task, model: SpuriousMLP, tmp_path: Path) -> None:
    start = tensors_of(model)
    callback = repair_callback(
        task,
        tmp_path,
        strategy="random",
        validation_fraction=VALIDATION_FRACTION,
        select_step="best_validation",
        policy="keep",
    )
    result = callback.repair(quiet_trainer(), model)

    run = result.runs["random"]
    assert len({record["validation_acc"] for record in run.history}) == 1
    assert run.selected_step == 0
    assert result.kept_strategy == "random"
    assert_same_tensors(model, start)
    assert run.selected_change("holdout_acc") == 0.0


def test_source_drop_policy_uses_selected_step(task: Task, model: SpuriousMLP, tmp_path: Path) -> None:
    start = tensors_of(model)
    last_model = copy.deepcopy(model)
    options: dict[str, Any] = {
        "strategy": "anchors",
        "validation_fraction": VALIDATION_FRACTION,
        "policy": "restore_on_source_drop",
        "max_source_drop": 0.2,
    }
    best = repair_callback(task, tmp_path, select_step="best_validation", **options).repair(quiet_trainer(), model)
    best_run = best.runs["anchors"]
    last = repair_callback(task, tmp_path, select_step="last", **options).repair(quiet_trainer(), last_model)

    # The source accuracy fell by at most 0.2 up to the selected step (3) and by more after the last one.
    assert best_run.selected_step == 3
    assert -best_run.selected_change("source_acc") <= 0.2
    assert -best_run.change("source_acc") > 0.2
    assert best.kept_strategy == "anchors"
    assert f"fell by {-best_run.selected_change('source_acc'):.4f} <=" in best.decision
    assert not torch.equal(model.head.weight, start["param:head.weight"])
    assert last.kept_strategy is None
    assert_same_tensors(last_model, start)


def test_summary_records_validation_and_step(
    task: Task, model: SpuriousMLP, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    logger = CSVLogger(tmp_path, name="logs")
    callback = repair_callback(
        task,
        tmp_path,
        strategies=["anchors", "random"],
        validation_fraction=VALIDATION_FRACTION,
        select_step="best_validation",
    )
    with caplog.at_level(logging.INFO):
        result = callback.repair(quiet_trainer(logger=logger), model)

    records = read_jsonl(result.jsonl_path)
    assert all(set(record) == RECORD_KEYS for record in records)
    summary = json.loads((result.jsonl_path.parent / SUMMARY_NAME).read_text(encoding="utf-8"))
    assert summary["select_step"] == "best_validation"
    assert summary["num_validation"] == len(result.validation_indices) == 40
    for strategy, expected_step in (("anchors", 3), ("random", 0)):
        run = summary["runs"][strategy]
        steps = [r["validation_acc"] for r in records if r["strategy"] == strategy]
        assert len(steps) == REPAIR_STEPS + 1
        assert all(isinstance(value, float) for value in steps)
        assert run["validation_acc"]["steps"] == steps
        assert run["selected_step"] == result.runs[strategy].selected_step == expected_step
        for metric in ("target_acc", "holdout_acc", "source_acc", "validation_acc"):
            history = [r[metric] for r in records if r["strategy"] == strategy]
            assert run[metric]["selected"] == history[expected_step], metric
            assert run[metric]["after"] == history[-1], metric
            assert run[metric]["before"] == history[0], metric

    with open(Path(logger.log_dir) / "metrics.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for strategy in ("anchors", "random"):
        key = f"repair/{strategy}/validation_acc"
        logged = {int(row["step"]): float(row[key]) for row in rows if row.get(key)}
        history = result.runs[strategy].history
        assert logged == pytest.approx({r["step"]: r["validation_acc"] for r in history}), key

    assert "At the selected steps, those with the highest validation_acc" in caplog.text
    assert re.search(r"^anchors +3 ", caplog.text, flags=re.MULTILINE), caplog.text
    assert re.search(r"^random +0 ", caplog.text, flags=re.MULTILINE), caplog.text


# Running inside fit, and what it writes.


def test_fit_end_logs_and_writes_records(task: Task, tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    model = SpuriousMLP()
    callback = DataRepairCallback(
        target_dataset=task.target,
        source_dataset=task.source,
        strategies=["helpful", "random"],
        num_steps=3,
        lr=REPAIR_LR,
        policy="keep",
        progress=False,
        **FAST_LISSA,
    )
    logger = CSVLogger(tmp_path, name="logs")
    train = spurious_set(TRAIN_SIZE_IN_FIT, 0.05, seed=1)
    trainer = quiet_trainer(logger=logger, callbacks=[callback], max_epochs=10)
    trainer.fit(model, DataLoader(train, batch_size=32, shuffle=True))

    result = callback.last_result
    assert result is not None
    assert result.jsonl_path == Path(trainer.log_dir) / "repair" / JSONL_NAME
    records = read_jsonl(result.jsonl_path)
    assert [(r["strategy"], r["step"]) for r in records] == [(s, i) for s in ("helpful", "random") for i in range(4)]
    for record in records:
        assert set(record) == RECORD_KEYS
        assert record["epoch"] == trainer.current_epoch
    assert all(len(r["example_indices"]) == callback.num_examples for r in records if r["step"] > 0)
    # The default pool is the training set, smaller than every other set here.
    assert max(i for r in records for i in r["example_indices"]) < TRAIN_SIZE_IN_FIT

    summary = json.loads((result.jsonl_path.parent / SUMMARY_NAME).read_text(encoding="utf-8"))
    assert summary["kept_strategy"] == "helpful"
    assert summary["runs"]["helpful"]["target_acc"]["before"] == 0.0
    assert Path(summary["runs"]["helpful"]["checkpoint_path"]).is_file()
    for strategy in ("helpful", "random"):
        holdout = summary["runs"][strategy]["holdout_acc"]
        assert holdout["steps"] == [r["holdout_acc"] for r in records if r["strategy"] == strategy]
        assert holdout["steps"][0] == holdout["before"]
        assert holdout["steps"][-1] == holdout["after"]

    with open(Path(logger.log_dir) / "metrics.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for strategy in ("helpful", "random"):
        for metric in ("target_acc", "holdout_acc", "source_acc"):
            key = f"repair/{strategy}/{metric}"
            logged = {int(row["step"]): float(row[key]) for row in rows if row.get(key)}
            assert sorted(logged) == [0, 1, 2, 3], key
            history = result.runs[strategy].history
            assert logged == pytest.approx({r["step"]: r[metric] for r in history}), key
        assert any(row.get(f"repair/{strategy}/update_loss") for row in rows)


def test_at_epoch_runs_once(task: Task, tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    model = SpuriousMLP()
    callback = repair_callback(task, tmp_path, strategy="random", num_steps=2, at_epoch=7)
    trainer = quiet_trainer(callbacks=[callback], max_epochs=9)
    trainer.fit(model, DataLoader(task.train, batch_size=32, shuffle=True))

    records = read_jsonl(tmp_path / "repair" / JSONL_NAME)
    assert len(records) == 3
    assert {r["epoch"] for r in records} == {7}


class ValidatedSpuriousMLP(SpuriousMLP):
    """SpuriousMLP with a validation loop, so Lightning sets up its validation dataloaders."""

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.log("val_loss", self.influence_loss(batch), add_dataloader_idx=True)


def test_validation_dataloaders_supply_sets(task: Task, tmp_path: Path) -> None:
    pl.seed_everything(0, verbose=False)
    callback = DataRepairCallback(
        target_dataloader_idx=1,
        source_dataloader_idx=0,
        pool_dataset=task.pool,
        strategy="random",
        num_steps=1,
        policy="restore",
        output_dir=str(tmp_path / "repair"),
        progress=False,
    )
    trainer = quiet_trainer(callbacks=[callback], max_epochs=10)
    val_loaders = [DataLoader(task.source, batch_size=50), DataLoader(task.target, batch_size=50)]
    trainer.fit(ValidatedSpuriousMLP(), DataLoader(task.train, batch_size=32, shuffle=True), val_loaders)

    result = callback.last_result
    assert result is not None
    assert result.num_target == len(task.target)
    assert set(result.anchor_candidates) <= task.target.counter
    assert result.runs["random"].metric("source_acc", 0) == 1.0


def test_skipped_validation_loop_rejected(task: Task, tmp_path: Path) -> None:
    callback = DataRepairCallback(
        target_dataloader_idx=1,
        pool_dataset=task.pool,
        strategy="random",
        num_steps=1,
        policy="restore",
        output_dir=str(tmp_path / "repair"),
        progress=False,
    )
    trainer = quiet_trainer(callbacks=[callback], max_epochs=1)
    val_loaders = [DataLoader(task.source, batch_size=50), DataLoader(task.target, batch_size=50)]
    with pytest.raises(ValueError, match="define `validation_step`"):
        trainer.fit(SpuriousMLP(), DataLoader(task.train, batch_size=32), val_loaders)


def test_at_epoch_past_training_warns(task: Task, tmp_path: Path) -> None:
    callback = repair_callback(task, tmp_path, strategy="random", num_steps=1, at_epoch=50)
    trainer = quiet_trainer(callbacks=[callback], max_epochs=1)
    with pytest.warns(UserWarning, match="at_epoch=50"):
        trainer.fit(SpuriousMLP(), DataLoader(task.train, batch_size=32))
    assert callback.last_result is None


def test_built_from_yaml() -> None:
    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(DataRepairCallback, "repair")
    config = parser.parse_string("repair:\n  strategies: [helpful, random]\n  num_steps: 4\n  lr: 0.001\n  k: 50\n")
    callback = parser.instantiate_classes(config).repair
    assert isinstance(callback, DataRepairCallback)
    assert callback.strategies == ["helpful", "random"]
    assert callback.config.k == 50
    assert callback.config.depth == 1000  # FastIF's default


def test_step_selection_from_yaml() -> None:
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(DataRepairCallback, "repair")
    config = parser.parse_string("repair:\n  validation_fraction: 0.25\n  select_step: best_validation\n")
    callback = parser.instantiate_classes(config).repair
    assert callback.validation_fraction == 0.25
    assert callback.select_step == "best_validation"
    with pytest.raises(argparse.ArgumentError, match="Expected a typing.Literal\\['last', 'best_validation'\\]"):
        parser.parse_string("repair:\n  validation_fraction: 0.25\n  select_step: first\n")


def test_repair_yaml_parses() -> None:
    from pytorch_lightning.cli import LightningCLI

    with pytest.raises(SystemExit) as exit_info:
        LightningCLI(args=["fit", "--config", str(REPAIR_YAML), "--print_config"], run=True)
    assert exit_info.value.code == 0


def hans_rows(count: int) -> list[dict[str, Any]]:
    """HANS rows, alternately entailment and non-entailment, so a model that predicts one class errs on half."""
    rows = []
    for i in range(count):
        entailment = i % 2 == 0
        rows.append(
            {
                "premise": f"The doctor {i} saw the lawyer .",
                "hypothesis": f"The doctor {i} saw someone ." if entailment else f"The lawyer {i} saw the doctor .",
                "label": "entailment" if entailment else "non-entailment",
                "heuristic": "lexical_overlap",
                "subcase": "le_relative_clause" if entailment else "ln_subject/object_swap",
                "template": "temp1",
            }
        )
    return rows


def test_repair_yaml_runs_after_fit(tmp_path: Path) -> None:
    config = yaml.safe_load(REPAIR_YAML.read_text(encoding="utf-8"))
    use_small_data(config, tmp_path, hans_rows(40))
    use_tiny_bert(config)
    run_dir = tmp_path / "run"
    config["trainer"].update(default_root_dir=str(run_dir), limit_train_batches=2, enable_progress_bar=False)
    config["trainer"]["logger"] = {
        "class_path": "pytorch_lightning.loggers.CSVLogger",
        "init_args": {"save_dir": str(run_dir)},
    }
    (repair,) = config["trainer"]["callbacks"]
    assert repair["class_path"] == "lightning_fastif.callbacks.DataRepairCallback"
    repair_dir = run_dir / "repair"
    repair["init_args"].update(
        num_steps=2,
        anchor_batch_size=2,
        num_examples=2,
        k=20,
        depth=5,
        eval_batch_size=8,
        output_dir=str(repair_dir),
        progress=False,
        validation_fraction=0.25,
        select_step="best_validation",
    )
    result = run_fit(config, tmp_path)

    assert result.returncode == 0, result.stderr[-3000:]
    records = read_jsonl(repair_dir / JSONL_NAME)
    assert [(r["strategy"], r["step"]) for r in records] == [(s, i) for s in ("helpful", "random") for i in range(3)]
    assert all(r["source_acc"] is not None for r in records)
    assert all(len(r["example_indices"]) == 2 for r in records if r["step"] > 0)
    assert max(i for r in records for i in r["example_indices"]) < 40  # the pool is the training set
    assert all(isinstance(r["validation_acc"], float) for r in records)
    summary = json.loads((repair_dir / SUMMARY_NAME).read_text(encoding="utf-8"))
    assert summary["num_target"] == 40
    assert summary["num_validation"] == 10
    assert summary["select_step"] == "best_validation"
    for strategy in ("helpful", "random"):
        accuracies = summary["runs"][strategy]["validation_acc"]["steps"]
        assert summary["runs"][strategy]["selected_step"] == accuracies.index(max(accuracies))
    assert (repair_dir / "repaired_helpful.pt").is_file()
    assert (repair_dir / "repaired_random.pt").is_file()
    (metrics_path,) = run_dir.glob("lightning_logs/version_*/metrics.csv")
    with open(metrics_path, encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert any(row.get("repair/helpful/target_acc") for row in rows)
    assert any(row.get("repair/random/source_acc") for row in rows)
    assert any(row.get("repair/helpful/validation_acc") for row in rows)


def test_repair_yaml_pool_and_target_files(tmp_path: Path) -> None:
    # A pool the model never saw and a target split of another file, both named by path in the YAML.
    config = yaml.safe_load(REPAIR_YAML.read_text(encoding="utf-8"))
    use_small_data(config, tmp_path, hans_rows(12))
    use_tiny_bert(config)
    pool_path = write_rows(tmp_path / "hans_train.jsonl", hans_rows(60))
    target_path = write_rows(tmp_path / "hans_eval.jsonl", hans_rows(40))
    run_dir = tmp_path / "run"
    config["trainer"].update(default_root_dir=str(run_dir), limit_train_batches=2, enable_progress_bar=False)
    config["trainer"]["logger"] = False
    (repair,) = config["trainer"]["callbacks"]
    repair_dir = run_dir / "repair"

    def file_dataset(path: str, **split: object) -> dict[str, Any]:
        arguments = {"path": path, "model_name_or_path": "all-MiniLM-L6-v2", "max_length": 32, **split}
        return {"class_path": "lightning_fastif.nli.NLIFileDataset", "init_args": arguments}

    repair["init_args"].update(
        target_dataloader_idx=None,
        target_dataset=file_dataset(target_path, split_fraction=0.5, split_part="first", split_seed=0),
        pool_dataset=file_dataset(pool_path),
        strategies=["helpful", "harmful"],
        num_steps=1,
        anchor_batch_size=2,
        num_examples=10,
        k=None,
        depth=5,
        eval_batch_size=8,
        output_dir=str(repair_dir),
        progress=False,
    )
    result = run_fit(config, tmp_path)

    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((repair_dir / SUMMARY_NAME).read_text(encoding="utf-8"))
    assert summary["num_target"] == 20
    records = read_jsonl(repair_dir / JSONL_NAME)
    chosen = [i for r in records if r["step"] == 1 for i in r["example_indices"]]
    assert len(chosen) == 20
    # Positions in the 60-row pool file: the 40 training rows have no position 40 or above.
    assert max(chosen) >= 40
    assert max(chosen) < 60


# Bad input.


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strategy": "nearest"}, "Unknown strategy 'nearest'"),
        ({"strategies": ["helpful", "closest"]}, "Unknown strategy 'closest'"),
        ({"strategies": []}, "empty list"),
        ({"lr": 0.0}, "`lr` must be a positive learning rate, but got 0.0"),
        ({"lr": -0.1}, "but got -0.1"),
        ({"num_steps": 0}, "`num_steps` must be a positive integer, but got 0"),
        ({"num_steps": -3}, "but got -3"),
        ({"holdout_fraction": 1.0}, r"`holdout_fraction` must be in \(0, 1\), but got 1.0"),
        ({"policy": "sometimes"}, "Unknown policy 'sometimes'"),
        ({"optimizer": "lbfgs"}, "Unknown optimizer 'lbfgs'"),
        ({"anchors_from": "correct"}, "Unknown anchors_from 'correct'"),
        ({"update_parameters": "head"}, r"Unknown update_parameters 'head'. Choose one of \['all', 'influence'\]"),
        ({"k": 0}, "`k` must be a positive integer or None"),
        ({"select_step": "first"}, "Unknown select_step 'first'"),
        ({"validation_fraction": -0.1}, r"`validation_fraction` must be in \[0, 1\), but got -0.1"),
        (
            {"holdout_fraction": 0.5, "validation_fraction": 0.5},
            "holdout_fraction=0.5 and validation_fraction=0.5 add up to 1, which leaves no target examples for "
            "anchors. Lower one of them",
        ),
        (
            {"select_step": "best_validation"},
            "select_step='best_validation' chooses the step on a validation split, but validation_fraction=0 "
            r"makes none. Pass validation_fraction > 0",
        ),
    ],
)
def test_invalid_settings_raise(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DataRepairCallback(**kwargs)


def test_empty_target_raises(task: Task, model: SpuriousMLP, tmp_path: Path) -> None:
    callback = repair_callback(task, tmp_path, target_dataset=SpuriousSet([], set()))
    with pytest.raises(ValueError, match="target dataset is empty"):
        callback.repair(quiet_trainer(), model)


def test_empty_pool_raises(task: Task, model: SpuriousMLP, tmp_path: Path) -> None:
    callback = repair_callback(task, tmp_path, pool_dataset=SpuriousSet([], set()))
    with pytest.raises(ValueError, match="pool dataset is empty"):
        callback.repair(quiet_trainer(), model)


def test_target_without_errors_raises(task: Task, model: SpuriousMLP, tmp_path: Path) -> None:
    callback = repair_callback(task, tmp_path, target_dataset=task.source)
    with pytest.raises(ValueError, match="gets all 200 target examples right"):
        callback.repair(quiet_trainer(), model)


def test_anchors_from_all_without_anchor_errors_raises(task: Task, model: SpuriousMLP, tmp_path: Path) -> None:
    # One target error among 19 correct examples, with a seed whose split puts the error in the held-out half.
    error = next(iter(task.target.counter))
    target = [task.target[error]] + [task.source[i] for i in range(19)]
    seed = next(s for s in range(100) if 0 in torch.randperm(20, generator=torch.Generator().manual_seed(s))[:10])
    callback = repair_callback(task, tmp_path, target_dataset=target, anchors_from="all", seed=seed)
    with pytest.raises(ValueError, match="The anchor split of 10 target examples contains none of the 1 errors"):
        callback.repair(quiet_trainer(), model)


def test_splits_without_anchors_raise(task: Task, model: SpuriousMLP, tmp_path: Path) -> None:
    # Three target errors: rounding gives the held-out split 2 examples (1.5) and the validation split 1 (1.2),
    # although the fractions add up to less than 1.
    target = [task.target[i] for i in sorted(task.target.counter)[:3]]
    callback = repair_callback(
        task, tmp_path, target_dataset=target, holdout_fraction=0.5, validation_fraction=0.4, anchor_batch_size=1
    )
    with pytest.raises(
        ValueError,
        match=r"The held-out split \(2 examples, holdout_fraction=0.5\) and the validation split \(1 examples, "
        r"validation_fraction=0.4\) take all 3 target examples and leave none for anchors",
    ):
        callback.repair(quiet_trainer(), model)


def test_anchor_batch_too_large_raises(task: Task, model: SpuriousMLP, tmp_path: Path) -> None:
    expected = len(repair_callback(task, tmp_path).repair(quiet_trainer(), model).anchor_candidates)
    callback = repair_callback(task, tmp_path, anchor_batch_size=500)
    with pytest.raises(ValueError, match=f"anchor_batch_size=500 is larger than the {expected} target errors"):
        callback.repair(quiet_trainer(), model)


@pytest.mark.parametrize("bad_label", [2, -1])
def test_pool_label_outside_model_raises(task: Task, model: SpuriousMLP, tmp_path: Path, bad_label: int) -> None:
    items = [dict(item) for item in task.pool.items]
    items[7]["labels"] = torch.tensor(bad_label)
    callback = repair_callback(task, tmp_path, pool_dataset=SpuriousSet(items, set()))
    with pytest.raises(
        ValueError, match=rf"Pool example 7 has label {bad_label}, outside the model's label ids 0\.\.1"
    ):
        callback.repair(quiet_trainer(), model)


@pytest.mark.parametrize("bad_label", [torch.tensor([0, 1]), torch.tensor(0.5)])
def test_pool_label_not_class_id_raises(task: Task, model: SpuriousMLP, tmp_path: Path, bad_label: Tensor) -> None:
    items = [dict(item) for item in task.pool.items]
    items[3]["labels"] = bad_label
    callback = repair_callback(task, tmp_path, pool_dataset=SpuriousSet(items, set()))
    with pytest.raises(ValueError, match=r"Pool example 3 has label tensor\(.*\), but a class label must be one"):
        callback.repair(quiet_trainer(), model)


def test_pool_tuple_label_outside_model_raises(task: Task, model: SpuriousMLP, tmp_path: Path) -> None:
    # Tuple items are checked by their last element.
    items = [(item["x"], item["labels"]) for item in task.pool.items]
    items[5] = (items[5][0], torch.tensor(4))
    callback = repair_callback(task, tmp_path, pool_dataset=items)
    with pytest.raises(ValueError, match=r"Pool example 5 has label 4, outside the model's label ids 0\.\.1"):
        callback.repair(quiet_trainer(), model)


def test_pool_without_labels_warns(task: Task) -> None:
    items = [{"x": item["x"], "y": item["labels"]} for item in task.pool.items]
    with pytest.warns(UserWarning, match="Pool example 0 is a dict without a label that DataRepairCallback can find"):
        _check_pool_labels(items, num_labels=2)


def test_source_drop_policy_without_source_raises(task: Task, model: SpuriousMLP, tmp_path: Path) -> None:
    callback = repair_callback(task, tmp_path, source_dataset=None, policy="restore_on_source_drop")
    with pytest.raises(ValueError, match="policy='restore_on_source_drop' needs source data"):
        callback.repair(quiet_trainer(), model)


def test_module_without_mixin_raises(task: Task, tmp_path: Path) -> None:
    class Plain(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(2, 2)

    with pytest.raises(TypeError, match="Plain"):
        repair_callback(task, tmp_path).repair(quiet_trainer(), Plain())
