"""InfluenceCallback in a real Trainer: W&B offline files, JSON Lines, untouched training, bad input."""

import csv
import logging
import math

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, WandbLogger
from torch.utils.data import DataLoader, IterableDataset

from lightning_fastif.callbacks.influence import InfluenceCallback
from lightning_fastif.hf import sequence_classification_loss
from lightning_fastif.results import TABLE_COLUMNS, read_jsonl
from tests.helpers.lightning import TinyClassifier, TokenDataModule
from tests.helpers.wandb_files import history_rows, offline_run_dir, tables

TOP_K = 3
FAST = dict(k=20, top_k=TOP_K, depth=10, scale=100.0, lissa_batch_size=4, max_queries=3, progress=False)


def trainer(tmp_path, callbacks, logger, max_epochs=2):
    return pl.Trainer(
        default_root_dir=tmp_path,
        max_epochs=max_epochs,
        limit_train_batches=3,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        deterministic=True,
    )


@pytest.fixture
def wandb_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    yield
    import wandb

    wandb.finish()


def test_wandb_table_and_jsonl_hold_same_scores(tmp_path, wandb_offline):
    pl.seed_everything(0)
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="fastif-test")
    callback = InfluenceCallback(**FAST)
    trainer(tmp_path, [callback], logger).fit(TinyClassifier(), TokenDataModule())
    import wandb

    wandb.finish()
    run_dir = offline_run_dir(tmp_path)
    logged = tables(run_dir, "influence/top_examples")
    assert len(logged) == 2  # one table per validation run
    table = logged[-1]
    assert table["columns"] == TABLE_COLUMNS
    queries = {row[0] for row in table["data"]}
    assert len(queries) >= 1
    for query in queries:
        rows = [row for row in table["data"] if row[0] == query]
        assert len(rows) == 2 * TOP_K
        assert [row[9] for row in rows] == ["helpful"] * TOP_K + ["harmful"] * TOP_K

    file_rows = read_jsonl(callback.last_output)
    assert callback.last_output.parent == tmp_path / "influence"
    assert [(r["query_index"], r["train_index"], r["kind"]) for r in file_rows] == [
        (row[0], row[4], row[9]) for row in table["data"]
    ]
    for file_row, table_row in zip(file_rows, table["data"], strict=True):
        assert math.isclose(file_row["score"], table_row[7], rel_tol=1e-12)
        assert file_row["train_text"] == table_row[5]

    history = [row for row in history_rows(run_dir) if "influence/time/total" in row]
    assert len(history) == 2
    assert history[-1]["influence/scores/_type"] == "histogram"
    assert sum(history[-1]["influence/scores/values"]) == sum(len(r.scores) for r in callback.last_results)
    for stage in ("index", "knn", "ihvp", "scores", "total"):
        assert history[-1][f"influence/time/{stage}"] >= 0


def training_metrics(path):
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    return [
        (row["step"], row.get("train_loss"), row.get("val_loss/dataloader_idx_0"))
        for row in rows
        if row.get("train_loss") or row.get("val_loss/dataloader_idx_0")
    ]


def test_training_unchanged_by_callback(tmp_path):
    def fit(callbacks, folder):
        pl.seed_everything(0)
        model = TinyClassifier()
        logger = CSVLogger(tmp_path / folder)
        trainer(tmp_path / folder, callbacks, logger, max_epochs=3).fit(model, TokenDataModule())
        return model, training_metrics(tmp_path / folder / "lightning_logs" / "version_0" / "metrics.csv")

    plain_model, plain_metrics = fit([], "plain")
    callback = InfluenceCallback(**FAST)
    with_model, with_metrics = fit([callback], "with")
    assert callback.last_results, "the callback computed no influence"
    assert len(plain_metrics) >= 9
    assert with_metrics == plain_metrics
    for (name, p), (_, q) in zip(plain_model.named_parameters(), with_model.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_state_restored_after_run(tmp_path):
    pl.seed_everything(0)
    model = TinyClassifier()
    data = TokenDataModule()
    callback = InfluenceCallback(**FAST)
    fit_trainer = trainer(tmp_path, [callback], logger=False, max_epochs=1)
    fit_trainer.fit(model, data)
    model.model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    model.train()
    model.model.bert.encoder.layer[0].eval()
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    grads = {}
    for name, p in model.named_parameters():
        p.grad = torch.full_like(p, 0.5) if p.requires_grad else None
        grads[name] = p.grad
    rng = torch.get_rng_state()
    callback._errors = [0, 1]
    callback.on_validation_end(fit_trainer, model)
    assert callback.last_results
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    for name, p in model.named_parameters():
        assert p.grad is grads[name] or torch.equal(p.grad, grads[name]), name
    assert torch.equal(torch.get_rng_state(), rng)


def test_no_logger_writes_file_and_warns(tmp_path):
    pl.seed_everything(0)
    callback = InfluenceCallback(**FAST)
    with pytest.warns(UserWarning, match="no WandbLogger, so influence tables are only written to"):
        trainer(tmp_path, [callback], logger=False, max_epochs=1).fit(TinyClassifier(), TokenDataModule())
    rows = read_jsonl(callback.last_output)
    assert len(rows) == 2 * TOP_K * len(callback.last_results)
    assert set(rows[0]) == set(TABLE_COLUMNS) | {"global_step", "epoch"}


def test_csv_logger_gets_stage_times_and_warning(tmp_path):
    pl.seed_everything(0)
    callback = InfluenceCallback(**FAST)
    logger = CSVLogger(tmp_path, name="csv")
    with pytest.warns(UserWarning, match="no WandbLogger") as warnings:
        trainer(tmp_path, [callback], logger=logger, max_epochs=2).fit(TinyClassifier(), TokenDataModule())
    assert sum("no WandbLogger" in str(w.message) for w in warnings) == 1
    with open(tmp_path / "csv" / "version_0" / "metrics.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("influence/time/total")]
    assert len(rows) == 2  # one influence run per validation run
    for row in rows:
        assert float(row["influence/time/total"]) > 0
        assert float(row["influence/num_queries"]) == len(callback.last_results)
    assert read_jsonl(callback.last_output)


def test_jvp_scoring_matches_gradient_in_trainer(tmp_path):
    def fit(score_method, folder):
        pl.seed_everything(0)
        callback = InfluenceCallback(**FAST, score_method=score_method)
        trainer(tmp_path / folder, [callback], logger=False, max_epochs=1).fit(TinyClassifier(), TokenDataModule())
        return callback.last_results

    by_gradient = fit("gradient", "gradient")
    by_jvp = fit("jvp", "jvp")
    assert by_gradient
    for expected, result in zip(by_gradient, by_jvp, strict=True):
        assert torch.equal(result.candidate_indices, expected.candidate_indices)
        torch.testing.assert_close(result.scores, expected.scores, rtol=1e-4, atol=1e-6)


def test_explicit_query_indices(tmp_path):
    pl.seed_everything(0)
    callback = InfluenceCallback(**{**FAST, "query_indices": [4, 7]})
    trainer(tmp_path, [callback], logger=False, max_epochs=1).fit(TinyClassifier(), TokenDataModule())
    assert [int(r.query_indices[0]) for r in callback.last_results] == [4, 7]


def test_no_misclassified_example_is_info(tmp_path, caplog):
    pl.seed_everything(0)
    callback = InfluenceCallback(**FAST)
    fit_trainer = trainer(tmp_path, [callback], logger=False, max_epochs=1)
    fit_trainer.fit(TinyClassifier(), TokenDataModule())
    callback._errors = []
    callback.last_results = []
    with caplog.at_level(logging.INFO):
        callback.on_validation_end(fit_trainer, fit_trainer.lightning_module)
    assert "no misclassified validation example" in caplog.text
    assert callback.last_results == []


class StreamOfItems(IterableDataset):
    def __init__(self, items):
        self.items = items

    def __iter__(self):
        return iter(self.items)


class StreamDataModule(TokenDataModule):
    def __init__(self):
        super().__init__()
        self.stream = StreamOfItems(self.train_dataset.items)
        del self.train_dataset

    def train_dataloader(self):
        return DataLoader(self.stream, batch_size=8)


def test_iterable_training_data_rejected(tmp_path):
    pl.seed_everything(0)
    callback = InfluenceCallback(**FAST)
    with pytest.raises(TypeError, match=r"StreamOfItems cannot be mapped back to dataset indices"):
        trainer(tmp_path, [callback], logger=False, max_epochs=1).fit(TinyClassifier(), StreamDataModule())


def test_k_above_training_set_rejected_in_trainer(tmp_path):
    callback = InfluenceCallback(**{**FAST, "k": 500})
    with pytest.raises(ValueError, match=r"`k=500` is larger than the training set \(48 examples\)"):
        trainer(tmp_path, [callback], logger=False, max_epochs=1).fit(TinyClassifier(), TokenDataModule())


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"k": 0}, r"`k` must be a positive integer or None .*but got 0"),
        ({"every_n_val_runs": 0}, r"`every_n_val_runs` must be a positive integer, but got 0"),
        ({"max_queries": -1}, r"`max_queries` must be a positive integer, but got -1"),
        ({"query_indices": []}, r"`query_indices` is an empty list"),
        ({"scale": 0.0}, r"`scale` must be a finite number > 0, but got 0.0"),
        ({"score_method": "hvp"}, r"`score_method` must be 'auto', 'gradient' or 'jvp', but got 'hvp'"),
    ],
)
def test_bad_options_rejected(options, pattern):
    with pytest.raises(ValueError, match=pattern):
        InfluenceCallback(**options)


def test_module_without_mixin_rejected(tmp_path):
    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.inner = TinyClassifier()

        def training_step(self, batch, batch_idx):
            return sequence_classification_loss(self.inner.model, batch)

        def validation_step(self, batch, batch_idx):
            return None

        def configure_optimizers(self):
            return self.inner.configure_optimizers()

    with pytest.raises(TypeError, match=r"needs a LightningModule that implements FastIFMixin, but got Plain"):
        trainer(tmp_path, [InfluenceCallback(**FAST)], logger=False, max_epochs=1).fit(Plain(), TokenDataModule())
