"""Tests of lightning_fastif.nli.data: reading, datasets, collation, HANS labels and losses, the data module."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from lightning_fastif.nli.data import (
    BUNDLED_DATA_DIR,
    HANS_NON_ENTAILMENT_TARGET,
    IGNORE_HANS_LABEL,
    MNLI_LABEL_TO_ID,
    NLIDataModule,
    NLIDataset,
    NLIFileDataset,
    balanced_hans_sample,
    collate_nli,
    hans_nll_loss,
    nli_errors,
    nli_loss,
    read_nli_jsonl,
    resolve_data_path,
    sample_rows,
    split_rows,
    to_hans_predictions,
)
from tests.nli.conftest import HANS_ROWS, MNLI_ROWS, write_jsonl

LOSS_TOLERANCE = 1e-6


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------


def test_read_plain_and_gzip_match(tmp_path: Path) -> None:
    plain = write_jsonl(tmp_path / "rows.jsonl", HANS_ROWS)
    compressed = write_jsonl(tmp_path / "rows.jsonl.gz", HANS_ROWS, compress=True)
    assert read_nli_jsonl(plain) == HANS_ROWS
    assert read_nli_jsonl(compressed) == HANS_ROWS


def test_read_detects_gzip_by_content(tmp_path: Path) -> None:
    misnamed = write_jsonl(tmp_path / "rows.txt", MNLI_ROWS, compress=True)
    assert read_nli_jsonl(misnamed) == MNLI_ROWS


def test_read_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text("\n" + json.dumps(MNLI_ROWS[0]) + "\n\n" + json.dumps(MNLI_ROWS[1]) + "\n", encoding="utf-8")
    assert read_nli_jsonl(path) == MNLI_ROWS[:2]


def test_read_limit_without_seed_takes_first_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", HANS_ROWS)
    assert read_nli_jsonl(path, limit=3) == HANS_ROWS[:3]
    assert read_nli_jsonl(path, limit=100) == HANS_ROWS


def test_read_seeded_sample(tmp_path: Path) -> None:
    rows = [{"premise": f"p{i}", "hypothesis": "h", "label": "neutral"} for i in range(200)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    first = read_nli_jsonl(path, limit=20, seed=1)
    again = read_nli_jsonl(path, limit=20, seed=1)
    other = read_nli_jsonl(path, limit=20, seed=2)
    positions = [int(row["premise"][1:]) for row in first]
    assert len(first) == 20
    assert first == again
    assert first != other
    assert positions == sorted(positions), "a sample keeps file order"
    assert positions != list(range(20)), "a seeded sample is random, not the first rows"


def test_read_missing_file_names_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"'.*no_such\.jsonl' not found \(tried .*no_such\.jsonl\.gz"):
        read_nli_jsonl(tmp_path / "no_such.jsonl")


def test_read_invalid_json_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(MNLI_ROWS[0]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 2: invalid JSON"):
        read_nli_jsonl(path)


def test_read_missing_field_raises(tmp_path: Path) -> None:
    broken = {"premise": "the cat sat .", "label": "entailment"}
    path = write_jsonl(tmp_path / "broken.jsonl.gz", [MNLI_ROWS[0], MNLI_ROWS[1], broken], compress=True)
    with pytest.raises(ValueError, match=r"broken\.jsonl\.gz, line 3: missing field 'hypothesis'"):
        read_nli_jsonl(path)


@pytest.mark.parametrize(
    ("row", "pattern"),
    [
        ({"premise": "p", "hypothesis": "h", "label": "maybe"}, r"line 1: invalid label 'maybe'. Expected one of"),
        ({"premise": "p", "hypothesis": "h", "label": 0}, r"line 1: field 'label' must be a string, but got 0"),
        ({"premise": None, "hypothesis": "h", "label": "neutral"}, r"line 1: field 'premise' must be a string"),
        (["p", "h", "neutral"], r"line 1: expected a JSON object .* but got list"),
    ],
)
def test_read_invalid_row_raises(tmp_path: Path, row: object, pattern: str) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=pattern):
        read_nli_jsonl(path)


def test_read_empty_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty\.jsonl contains no rows"):
        read_nli_jsonl(path)


@pytest.mark.parametrize("limit", [0, -3, 2.5, True])
def test_read_invalid_limit_raises(tmp_path: Path, limit: object) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", MNLI_ROWS)
    with pytest.raises(ValueError, match=rf"`limit` must be a positive integer or None, but got {limit!r}"):
        read_nli_jsonl(path, limit=limit)  # type: ignore[arg-type]


def test_resolve_prefers_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    local = write_jsonl(tmp_path / "hans" / "evaluation.jsonl.gz", HANS_ROWS, compress=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_data_path("hans/evaluation.jsonl.gz") == local


def test_resolve_falls_back_to_bundled_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_data_path("anli/dev_r1.jsonl.gz") == BUNDLED_DATA_DIR / "anli" / "dev_r1.jsonl.gz"
    assert resolve_data_path("anli/dev_r1.jsonl") == BUNDLED_DATA_DIR / "anli" / "dev_r1.jsonl.gz"


BUNDLED_FILES = {
    "mnli/train.jsonl.gz": (22189, {"entailment": 7302, "neutral": 7635, "contradiction": 7252}),
    "mnli/validation_matched.jsonl.gz": (9815, {"entailment": 3479, "neutral": 3123, "contradiction": 3213}),
    "mnli/validation_mismatched.jsonl.gz": (9830, {"entailment": 3461, "neutral": 3129, "contradiction": 3240}),
    "hans/evaluation.jsonl.gz": (30000, {"entailment": 15000, "non-entailment": 15000}),
    "hans/train.jsonl.gz": (30000, {"entailment": 15000, "non-entailment": 15000}),
    "anli/dev_r1.jsonl.gz": (1000, {"entailment": 334, "neutral": 333, "contradiction": 333}),
    "anli/dev_r2.jsonl.gz": (1000, {"entailment": 334, "neutral": 333, "contradiction": 333}),
    "anli/dev_r3.jsonl.gz": (1198, {"entailment": 402, "neutral": 400, "contradiction": 396}),
}


@pytest.mark.parametrize("name", sorted(BUNDLED_FILES))
def test_bundled_file_counts(name: str) -> None:
    rows = read_nli_jsonl(BUNDLED_DATA_DIR / name)
    size, labels = BUNDLED_FILES[name]
    assert len(rows) == size
    assert Counter(row["label"] for row in rows) == labels


def test_bundled_hans_has_30_subcases() -> None:
    rows = read_nli_jsonl(BUNDLED_DATA_DIR / "hans" / "evaluation.jsonl.gz")
    per_subcase = Counter(row["subcase"] for row in rows)
    assert len(per_subcase) == 30
    assert set(per_subcase.values()) == {1000}
    assert {row["heuristic"] for row in rows} == {"lexical_overlap", "subsequence", "constituent"}


# ---------------------------------------------------------------------------------------------------
# HANS labels and losses
# ---------------------------------------------------------------------------------------------------


def test_to_hans_predictions_merges_non_entailment() -> None:
    predictions = torch.tensor([0, 1, 2, 0, 2])
    assert to_hans_predictions(predictions).tolist() == [0, 1, 1, 0, 1]
    assert to_hans_predictions(predictions).dtype == torch.int64


def test_hans_nll_loss_hand_computed() -> None:
    # Probabilities 1/6, 2/6, 3/6 for the first row and 1/3 each for the second.
    logits = torch.tensor([[0.0, math.log(2.0), math.log(3.0)], [1.0, 1.0, 1.0]])
    hans_labels = torch.tensor([1, 0])
    expected = torch.tensor([-math.log(5 / 6), -math.log(1 / 3)])

    losses = hans_nll_loss(logits, hans_labels, reduction="none")
    torch.testing.assert_close(losses, expected, atol=LOSS_TOLERANCE, rtol=0)
    torch.testing.assert_close(hans_nll_loss(logits, hans_labels), expected.mean(), atol=LOSS_TOLERANCE, rtol=0)
    torch.testing.assert_close(
        hans_nll_loss(logits, hans_labels, reduction="sum"), expected.sum(), atol=LOSS_TOLERANCE, rtol=0
    )


def test_hans_nll_loss_entailment_is_cross_entropy() -> None:
    logits = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    zeros = torch.zeros(5, dtype=torch.long)
    torch.testing.assert_close(hans_nll_loss(logits, zeros), F.cross_entropy(logits, zeros))


def test_hans_nll_loss_finite_gradient() -> None:
    logits = torch.tensor([[80.0, -80.0, -80.0]], requires_grad=True)
    loss = hans_nll_loss(logits, torch.tensor([1]))
    loss.backward()
    assert math.isfinite(float(loss.detach()))
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize(
    ("logits", "labels", "pattern"),
    [
        (torch.zeros(2, 3), torch.tensor([0, 2]), r"must be 0 \(entailment\) or 1 \(non-entailment\), but got \[2\]"),
        (torch.zeros(2, 2), torch.tensor([0, 1]), r"need 3-way logits .* but got 2 classes"),
        (torch.zeros(2, 3), torch.tensor([0, 1, 1]), r"`hans_labels` must have shape \(2,\)"),
        (torch.zeros(3), torch.tensor([0, 1, 1]), r"`logits` must have shape \(N, num_classes\), but got \(3,\)"),
    ],
)
def test_hans_nll_loss_invalid_input_raises(logits: torch.Tensor, labels: torch.Tensor, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        hans_nll_loss(logits, labels)


def test_hans_nll_loss_invalid_reduction_raises() -> None:
    with pytest.raises(ValueError, match=r"`reduction` must be 'mean', 'sum' or 'none', but got 'max'"):
        hans_nll_loss(torch.zeros(1, 3), torch.tensor([0]), reduction="max")


def test_nli_loss_mixes_cross_entropy_and_hans() -> None:
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([1, 2, 0, HANS_NON_ENTAILMENT_TARGET])
    hans_labels = torch.tensor([IGNORE_HANS_LABEL, IGNORE_HANS_LABEL, 0, 1])

    losses = nli_loss(logits, labels, hans_labels, reduction="none")
    cross_entropy = F.cross_entropy(logits, labels, reduction="none")
    torch.testing.assert_close(losses[:3], cross_entropy[:3])
    torch.testing.assert_close(losses[3], hans_nll_loss(logits[3:], hans_labels[3:]))
    torch.testing.assert_close(nli_loss(logits, labels), cross_entropy.mean())


def test_nli_errors_score_hans_two_way() -> None:
    predictions = torch.tensor([1, 2, 0, 1, 0, 2])
    labels = torch.tensor([1, 1, HANS_NON_ENTAILMENT_TARGET, HANS_NON_ENTAILMENT_TARGET, 0, 0])
    hans_labels = torch.tensor([IGNORE_HANS_LABEL, IGNORE_HANS_LABEL, 1, 1, 0, 0])
    assert nli_errors(predictions, labels).tolist() == [False, True, True, True, False, True]
    assert nli_errors(predictions, labels, hans_labels).tolist() == [False, True, True, False, False, True]


# ---------------------------------------------------------------------------------------------------
# Dataset and collation
# ---------------------------------------------------------------------------------------------------


def test_dataset_items_collate(tokenizer: object) -> None:
    dataset = NLIDataset(MNLI_ROWS, tokenizer, max_length=24)
    batch = default_collate([dataset[i] for i in range(len(dataset))])
    assert len(dataset) == len(MNLI_ROWS)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels", "index"}
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert batch[key].shape == (len(MNLI_ROWS), 24)
        assert batch[key].dtype == torch.int64
    assert batch["labels"].tolist() == [MNLI_LABEL_TO_ID[row["label"]] for row in MNLI_ROWS]
    assert batch["index"].tolist() == list(range(len(MNLI_ROWS)))
    assert dataset.is_hans is False


def test_dataset_tokens_match_tokenizer(tokenizer: object) -> None:
    dataset = NLIDataset(MNLI_ROWS, tokenizer, max_length=24)
    row = MNLI_ROWS[1]
    expected = tokenizer(row["premise"], row["hypothesis"])["input_ids"]  # type: ignore[operator]
    item = dataset[1]
    length = int(item["attention_mask"].sum())
    assert item["input_ids"][:length].tolist() == expected
    assert item["input_ids"][length:].eq(tokenizer.pad_token_id).all()  # type: ignore[attr-defined]


def test_dataset_truncates_to_max_length(tokenizer: object) -> None:
    long_row = {"premise": "the cat sat " * 20, "hypothesis": "the dog ran " * 20, "label": "neutral"}
    item = NLIDataset([long_row], tokenizer, max_length=16)[0]
    assert item["input_ids"].shape == (16,)
    assert int(item["attention_mask"].sum()) == 16


def test_dataset_hans_labels(tokenizer: object) -> None:
    dataset = NLIDataset(HANS_ROWS, tokenizer, max_length=24)
    first = dataset[0]
    entailment = dataset[2]
    assert dataset.is_hans is True
    assert first["hans_labels"].item() == 1
    assert first["labels"].item() == HANS_NON_ENTAILMENT_TARGET
    assert entailment["hans_labels"].item() == 0
    assert entailment["labels"].item() == 0
    assert dataset.rows[0]["heuristic"] == "lexical_overlap"
    assert dataset.rows[0]["subcase"] == "ln_swap"
    assert dataset.label_name(0) == "non-entailment"
    assert dataset.text(0) == "the doctor saw the lawyer . [SEP] the lawyer saw the doctor ."


def test_dataset_mixed_rows_ignore_hans_label(tokenizer: object) -> None:
    dataset = NLIDataset(MNLI_ROWS[:2] + HANS_ROWS[:1], tokenizer, max_length=24)
    batch = default_collate([dataset[i] for i in range(3)])
    assert batch["hans_labels"].tolist() == [IGNORE_HANS_LABEL, IGNORE_HANS_LABEL, 1]
    assert batch["labels"].tolist() == [0, 1, HANS_NON_ENTAILMENT_TARGET]


def test_dataset_keeps_copies_of_rows(tokenizer: object) -> None:
    rows = [dict(MNLI_ROWS[0])]
    dataset = NLIDataset(rows, tokenizer, max_length=24)
    rows[0]["label"] = "neutral"
    assert dataset.label_name(0) == "entailment"


def test_dataset_invalid_input_raises(tokenizer: object) -> None:
    with pytest.raises(ValueError, match=r"`rows` is empty"):
        NLIDataset([], tokenizer)
    with pytest.raises(ValueError, match=r"row 1: missing field 'label'"):
        NLIDataset([MNLI_ROWS[0], {"premise": "p", "hypothesis": "h"}], tokenizer)
    with pytest.raises(ValueError, match=r"`max_length` must be a positive integer, but got 0"):
        NLIDataset(MNLI_ROWS, tokenizer, max_length=0)


def test_collate_nli_trims_to_longest(tokenizer: object) -> None:
    dataset = NLIDataset(MNLI_ROWS, tokenizer, max_length=32)
    items = [dataset[i] for i in (0, 2, 3)]
    full = default_collate(items)
    trimmed = collate_nli(items)
    longest = int(full["attention_mask"].sum(dim=1).max())
    assert longest < 32
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert trimmed[key].shape == (3, longest)
        assert torch.equal(trimmed[key], full[key][:, :longest])
    assert torch.equal(trimmed["labels"], full["labels"])
    assert torch.equal(trimmed["index"], full["index"])


def test_collate_nli_trims_left_padding() -> None:
    mask = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]])
    items = [{"input_ids": (mask[i] * 7).long(), "attention_mask": mask[i], "labels": torch.tensor(i)} for i in (0, 1)]
    batch = collate_nli(items)
    assert batch["attention_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]
    assert batch["input_ids"].tolist() == [[0, 7, 7], [7, 7, 7]]
    assert batch["labels"].tolist() == [0, 1]


# ---------------------------------------------------------------------------------------------------
# Balanced HANS sample
# ---------------------------------------------------------------------------------------------------


def _hans_like_rows(per_subcase: dict[str, int]) -> list[dict[str, str]]:
    return [
        {"premise": f"{name} {i}", "hypothesis": "h", "label": "entailment", "subcase": name}
        for name, count in per_subcase.items()
        for i in range(count)
    ]


def test_balanced_sample_spreads_evenly() -> None:
    rows = _hans_like_rows({f"s{i}": 10 for i in range(30)})
    sample = balanced_hans_sample(rows, 65, seed=0)
    counts = Counter(row["subcase"] for row in sample)
    assert len(sample) == 65
    assert sorted(counts.values()) == [2] * 25 + [3] * 5
    positions = [rows.index(row) for row in sample]
    assert positions == sorted(positions)


def test_balanced_sample_refills_from_larger_subcases() -> None:
    rows = _hans_like_rows({"small": 1, "big1": 10, "big2": 10})
    counts = Counter(row["subcase"] for row in balanced_hans_sample(rows, 9, seed=3))
    assert counts == {"small": 1, "big1": 4, "big2": 4}


def test_balanced_sample_is_seeded() -> None:
    rows = _hans_like_rows({"a": 50, "b": 50})
    assert balanced_hans_sample(rows, 10, seed=5) == balanced_hans_sample(rows, 10, seed=5)
    assert balanced_hans_sample(rows, 10, seed=5) != balanced_hans_sample(rows, 10, seed=6)


def test_balanced_sample_invalid_input_raises() -> None:
    rows = _hans_like_rows({"a": 2})
    with pytest.raises(ValueError, match=r"Cannot draw 3 HANS rows from 2"):
        balanced_hans_sample(rows, 3, seed=0)
    with pytest.raises(ValueError, match=r"`size` must be a positive integer, but got 0"):
        balanced_hans_sample(rows, 0, seed=0)
    with pytest.raises(ValueError, match=r"HANS row 0 has no 'subcase' field"):
        balanced_hans_sample(MNLI_ROWS, 2, seed=0)


# ---------------------------------------------------------------------------------------------------
# Data module
# ---------------------------------------------------------------------------------------------------


def _data_module(tokenizer_dir: Path, files: dict[str, Path], **overrides: object) -> NLIDataModule:
    arguments: dict[str, object] = {
        "model_name_or_path": str(tokenizer_dir),
        "train_path": str(files["train"]),
        "mnli_val_path": str(files["mnli_val"]),
        "hans_val_path": str(files["hans_val"]),
        "max_length": 24,
        "batch_size": 4,
        "eval_batch_size": 5,
    }
    arguments.update(overrides)
    return NLIDataModule(**arguments)  # type: ignore[arg-type]


def test_data_module_builds_loaders(tokenizer_dir: Path, nli_files: dict[str, Path]) -> None:
    module = _data_module(tokenizer_dir, nli_files)
    module.setup("fit")
    train_batch = next(iter(module.train_dataloader()))
    loaders = module.val_dataloader()
    hans_batch = next(iter(loaders[1]))

    assert module.val_names == ["mnli", "hans"]
    assert len(module.train_dataset) == 2 * len(MNLI_ROWS)
    assert [len(dataset) for dataset in module.val_datasets] == [len(MNLI_ROWS), len(HANS_ROWS)]
    assert len(loaders) == 2
    assert train_batch["input_ids"].shape[0] == 4
    assert train_batch["input_ids"].shape[1] == int(train_batch["attention_mask"].sum(dim=1).max())
    assert "hans_labels" not in train_batch
    assert hans_batch["hans_labels"].tolist() == [1, 1, 0, 0, 1]
    assert hans_batch["index"].tolist() == [0, 1, 2, 3, 4]


def test_data_module_shuffle_is_seeded(tokenizer_dir: Path, nli_files: dict[str, Path]) -> None:
    def first_epoch_order(seed: int) -> list[int]:
        module = _data_module(tokenizer_dir, nli_files, seed=seed)
        module.setup("fit")
        return torch.cat([batch["index"] for batch in module.train_dataloader()]).tolist()

    assert sorted(first_epoch_order(0)) == list(range(2 * len(MNLI_ROWS)))
    assert first_epoch_order(0) == first_epoch_order(0)
    assert first_epoch_order(0) != first_epoch_order(1)


def test_data_module_subsamples(tokenizer_dir: Path, nli_files: dict[str, Path]) -> None:
    module = _data_module(tokenizer_dir, nli_files, train_size=5, mnli_val_size=3, hans_val_size=6)
    module.setup("fit")
    hans_rows = module.val_datasets[1].rows
    assert len(module.train_dataset) == 5
    assert len(module.val_datasets[0]) == 3
    assert Counter(row["subcase"] for row in hans_rows) == Counter({row["subcase"]: 1 for row in HANS_ROWS})


def test_data_module_without_hans(tokenizer_dir: Path, nli_files: dict[str, Path]) -> None:
    module = _data_module(tokenizer_dir, nli_files, hans_val_path=None)
    module.setup("validate")
    assert module.val_names == ["mnli"]
    assert len(module.val_dataloader()) == 1
    assert module.train_dataset is None


def test_data_module_relative_paths(
    tokenizer_dir: Path, nli_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(nli_files["train"].parent)
    module = _data_module(tokenizer_dir, nli_files, train_path="mnli_train.jsonl", mnli_val_path="mnli_val.jsonl")
    module.setup("fit")
    assert len(module.train_dataset) == 2 * len(MNLI_ROWS)
    assert len(module.val_datasets[0]) == len(MNLI_ROWS)


@pytest.mark.parametrize(
    ("argument", "value", "pattern"),
    [
        ("batch_size", 0, r"`batch_size` must be a positive integer, but got 0"),
        ("eval_batch_size", -1, r"`eval_batch_size` must be a positive integer, but got -1"),
        ("max_length", 1.5, r"`max_length` must be a positive integer, but got 1.5"),
        ("hans_val_size", 0, r"`hans_val_size` must be a positive integer, but got 0"),
        ("num_workers", -1, r"`num_workers` must be a non-negative integer, but got -1"),
    ],
)
def test_data_module_invalid_argument_raises(
    tokenizer_dir: Path, nli_files: dict[str, Path], argument: str, value: object, pattern: str
) -> None:
    with pytest.raises(ValueError, match=pattern):
        _data_module(tokenizer_dir, nli_files, **{argument: value})


def test_data_module_loader_before_setup_raises(tokenizer_dir: Path, nli_files: dict[str, Path]) -> None:
    module = _data_module(tokenizer_dir, nli_files)
    with pytest.raises(RuntimeError, match=r"called before `setup\('fit'\)`"):
        module.train_dataloader()


# NLIFileDataset: a dataset named by path, for configs.


def test_file_dataset_keeps_heuristic(tokenizer_dir: Path, nli_files: dict[str, Path]) -> None:
    dataset = NLIFileDataset(str(nli_files["hans_val"]), str(tokenizer_dir), heuristic="subsequence")
    expected = [row for row in HANS_ROWS if row["heuristic"] == "subsequence"]
    assert dataset.rows == expected
    assert dataset.is_hans
    assert dataset[0]["hans_labels"].item() == 1


def test_file_dataset_split_parts_disjoint(tokenizer_dir: Path, nli_files: dict[str, Path]) -> None:
    def part(name: str) -> list[str]:
        dataset = NLIFileDataset(
            str(nli_files["hans_val"]), str(tokenizer_dir), split_fraction=0.25, split_part=name, split_seed=3
        )
        return [row["premise"] for row in dataset.rows]

    first, second = part("first"), part("second")
    assert len(first) == round(0.25 * len(HANS_ROWS))
    assert not set(first) & set(second)
    assert sorted(first + second) == sorted(row["premise"] for row in HANS_ROWS)
    assert part("first") == first


def test_file_dataset_samples(tokenizer_dir: Path, nli_files: dict[str, Path]) -> None:
    path = str(nli_files["hans_val"])
    random_rows = NLIFileDataset(path, str(tokenizer_dir), size=5, seed=1).rows
    assert len(random_rows) == 5
    assert random_rows == NLIFileDataset(path, str(tokenizer_dir), size=5, seed=1).rows
    spread = NLIFileDataset(path, str(tokenizer_dir), size=6, sample="hans_subcases", seed=1).rows
    assert Counter(row["subcase"] for row in spread) == Counter({row["subcase"]: 1 for row in HANS_ROWS})


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"heuristic": "negation"}, r"has no row of heuristic 'negation'. Its heuristics are \['constituent', "),
        ({"split_fraction": 1.0}, r"`split_fraction` must be in \(0, 1\) or None, but got 1.0"),
        ({"split_fraction": 0.01}, r"The first part of split_fraction=0.01 of 12 rows is empty"),
        ({"split_part": "third"}, "`split_part` must be 'first' or 'second', but got 'third'"),
        ({"sample": "stratified"}, "`sample` must be 'random' or 'hans_subcases', but got 'stratified'"),
        ({"size": 0}, "`size` must be a positive integer, but got 0"),
    ],
)
def test_file_dataset_invalid_input_raises(
    tokenizer_dir: Path, nli_files: dict[str, Path], overrides: dict[str, object], pattern: str
) -> None:
    with pytest.raises(ValueError, match=pattern):
        NLIFileDataset(str(nli_files["hans_val"]), str(tokenizer_dir), **overrides)  # type: ignore[arg-type]


def test_split_rows_parts_disjoint() -> None:
    first, second = split_rows(HANS_ROWS, 0.25, seed=3)
    assert len(first) == 3
    assert len(second) == len(HANS_ROWS) - 3
    assert sorted(row["premise"] for row in first + second) == sorted(row["premise"] for row in HANS_ROWS)
    assert [HANS_ROWS.index(row) for row in first] == sorted(HANS_ROWS.index(row) for row in first)
    assert split_rows(HANS_ROWS, 0.25, seed=3) == (first, second)
    assert split_rows(HANS_ROWS, 0.25, seed=4) != (first, second)


def test_sample_rows_seeded_in_order() -> None:
    sample = sample_rows(MNLI_ROWS, 4, seed=2)
    positions = [MNLI_ROWS.index(row) for row in sample]
    assert len(sample) == 4
    assert positions == sorted(positions)
    assert sample_rows(MNLI_ROWS, 4, seed=2) == sample
    assert sample_rows(MNLI_ROWS, 10, seed=2) == MNLI_ROWS
    assert sample_rows(MNLI_ROWS, 10, seed=2)[0] is not MNLI_ROWS[0]
