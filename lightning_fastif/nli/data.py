"""NLI data for the examples: label maps, the HANS loss, JSON Lines reading, datasets and a data module.

MNLI and ANLI use three labels (``entailment=0``, ``neutral=1``, ``contradiction=2``). HANS uses two
(``entailment`` and ``non-entailment``), kept in their own id space (``entailment=0``,
``non-entailment=1``). A 3-way model is scored on HANS by counting ``neutral`` and ``contradiction``
as ``non-entailment``.
"""

from __future__ import annotations

import gzip
import json
import logging
import random
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

log = logging.getLogger(__name__)

MNLI_LABELS: tuple[str, ...] = ("entailment", "neutral", "contradiction")
MNLI_LABEL_TO_ID: dict[str, int] = {name: i for i, name in enumerate(MNLI_LABELS)}
HANS_LABELS: tuple[str, ...] = ("entailment", "non-entailment")
HANS_LABEL_TO_ID: dict[str, int] = {name: i for i, name in enumerate(HANS_LABELS)}
ENTAILMENT_ID = MNLI_LABEL_TO_ID["entailment"]

# The 3-way `labels` value of a HANS non-entailment row. Such a row has no 3-way gold label, and the
# exact loss for it is `hans_nll_loss`, read from `hans_labels`. A plain cross-entropy on `labels`
# then still pushes the model away from entailment, where an ignore index would silently give it a
# zero loss and a zero gradient.
HANS_NON_ENTAILMENT_TARGET = MNLI_LABEL_TO_ID["contradiction"]

# `hans_labels` of a non-HANS row in a dataset that mixes HANS and 3-way rows.
IGNORE_HANS_LABEL = -100

REQUIRED_FIELDS: tuple[str, ...] = ("premise", "hypothesis", "label")
KNOWN_LABELS: tuple[str, ...] = MNLI_LABELS + ("non-entailment",)
SEQUENCE_KEYS: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")

# Bundled data sets: lightning_fastif/nli/data.py -> repository root -> examples/data.
BUNDLED_DATA_DIR = Path(__file__).resolve().parents[2] / "examples" / "data"


# ---------------------------------------------------------------------------------------------------
# Labels and losses
# ---------------------------------------------------------------------------------------------------


def to_hans_predictions(predictions: Tensor) -> Tensor:
    """Map 3-way MNLI predictions to HANS label ids.

    Args:
        predictions: Class ids of shape ``(N,)`` with ``entailment=0``, ``neutral=1``, ``contradiction=2``.

    Returns:
        HANS ids of shape ``(N,)``, int64: ``entailment=0``, and ``non-entailment=1`` for both
        ``neutral`` and ``contradiction``.

    >>> to_hans_predictions(torch.tensor([0, 1, 2])).tolist()
    [0, 1, 1]
    """
    return (predictions != ENTAILMENT_ID).long()


def hans_nll_loss(logits: Tensor, hans_labels: Tensor, reduction: str = "mean") -> Tensor:
    """Compute the negative log-likelihood of HANS labels under a 3-way NLI classifier.

    The 3-way distribution is collapsed onto HANS's two labels, so the loss of an entailment example is
    ``-log p_entailment`` (the usual cross-entropy) and that of a non-entailment example is
    ``-log(p_neutral + p_contradiction)``. This is the exact log-likelihood of the HANS label and
    matches how HANS scores a 3-way model, which counts both neutral and contradiction as correct for
    non-entailment. Choosing ``contradiction`` as the target instead would penalise a confident
    ``neutral``, which HANS counts as correct.

    Args:
        logits: Scores of shape ``(N, 3)`` in MNLI order.
        hans_labels: HANS ids of shape ``(N,)``: ``entailment=0``, ``non-entailment=1``.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-example losses of shape ``(N,)``).

    Returns:
        The reduced loss, or a tensor of shape ``(N,)`` for ``reduction="none"``.

    Raises:
        ValueError: If the shapes, the label values or ``reduction`` are invalid.
    """
    _check_logits(logits, hans_labels, name="hans_labels")
    if logits.shape[1] != len(MNLI_LABELS):
        raise ValueError(
            f"HANS losses need 3-way logits in MNLI order {MNLI_LABELS}, but got {logits.shape[1]} classes."
        )
    invalid = (hans_labels != 0) & (hans_labels != 1)
    if bool(invalid.any()):
        bad = sorted({int(v) for v in hans_labels[invalid].tolist()})
        raise ValueError(f"`hans_labels` must be 0 (entailment) or 1 (non-entailment), but got {bad}.")

    log_probs = F.log_softmax(logits, dim=-1)  # (N, 3)
    log_p_entailment = log_probs[:, ENTAILMENT_ID]
    log_p_non_entailment = torch.logsumexp(log_probs[:, ENTAILMENT_ID + 1 :], dim=-1)
    losses = -torch.where(hans_labels == HANS_LABEL_TO_ID["entailment"], log_p_entailment, log_p_non_entailment)
    return _reduce(losses, reduction)


def nli_loss(logits: Tensor, labels: Tensor, hans_labels: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Compute the NLI loss of a batch that may contain HANS rows.

    Rows whose ``hans_labels`` is 0 or 1 get :func:`hans_nll_loss`. The others (``hans_labels`` absent
    or ``IGNORE_HANS_LABEL``) get the cross-entropy on the 3-way ``labels``. For a HANS entailment row
    the two losses are the same.

    Args:
        logits: Scores of shape ``(N, C)``.
        labels: 3-way class ids of shape ``(N,)``.
        hans_labels: Optional HANS ids of shape ``(N,)``, ``IGNORE_HANS_LABEL`` for non-HANS rows.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        The reduced loss, or per-example losses of shape ``(N,)`` for ``reduction="none"``.
    """
    _check_logits(logits, labels, name="labels")
    losses = F.cross_entropy(logits, labels, reduction="none")  # (N,)
    if hans_labels is not None:
        is_hans = hans_labels != IGNORE_HANS_LABEL
        if bool(is_hans.any()):
            hans_losses = hans_nll_loss(logits[is_hans], hans_labels[is_hans], reduction="none")
            losses = losses.masked_scatter(is_hans, hans_losses)
    return _reduce(losses, reduction)


def nli_errors(predictions: Tensor, labels: Tensor, hans_labels: Tensor | None = None) -> Tensor:
    """Mark misclassified examples, scoring HANS rows on HANS's two labels.

    A HANS non-entailment row counts as correct for a ``neutral`` or a ``contradiction`` prediction,
    which a plain ``predictions != labels`` would miss.

    Args:
        predictions: Predicted 3-way class ids of shape ``(N,)``.
        labels: 3-way gold ids of shape ``(N,)``.
        hans_labels: Optional HANS ids of shape ``(N,)``, ``IGNORE_HANS_LABEL`` for non-HANS rows.

    Returns:
        A bool tensor of shape ``(N,)``, True where the prediction is wrong.

    >>> nli_errors(torch.tensor([1, 1, 0]), torch.tensor([2, 2, 0]), torch.tensor([1, -100, 1])).tolist()
    [False, True, True]
    """
    errors = predictions != labels
    if hans_labels is None:
        return errors
    is_hans = hans_labels != IGNORE_HANS_LABEL
    hans_errors = to_hans_predictions(predictions) != hans_labels
    return torch.where(is_hans, hans_errors, errors)


def _check_logits(logits: Tensor, labels: Tensor, *, name: str) -> None:
    if logits.dim() != 2:
        raise ValueError(f"`logits` must have shape (N, num_classes), but got {tuple(logits.shape)}.")
    if labels.shape != logits.shape[:1]:
        raise ValueError(
            f"`{name}` must have shape ({logits.shape[0]},) to match `logits` {tuple(logits.shape)}, "
            f"but got {tuple(labels.shape)}."
        )


def _reduce(losses: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    if reduction == "none":
        return losses
    raise ValueError(f"`reduction` must be 'mean', 'sum' or 'none', but got {reduction!r}.")


def is_hans_row(row: Mapping[str, Any]) -> bool:
    """Return whether a row uses HANS's two labels: it has a ``heuristic`` or the label ``non-entailment``."""
    return "heuristic" in row or row.get("label") == "non-entailment"


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------


def resolve_data_path(path: str | Path) -> Path:
    """Find a data file given as an absolute path or relative to the current directory or ``examples/data``.

    A relative path is tried against the current directory first and then against the repository's
    ``examples/data`` folder, so configs work from any directory. For a name ending in ``.jsonl``, the
    gzip-compressed ``.jsonl.gz`` next to it is tried too.

    Raises:
        FileNotFoundError: If no candidate exists. The message lists every path tried.
    """
    path = Path(path).expanduser()
    bases = [Path.cwd()] if path.is_absolute() else [Path.cwd(), BUNDLED_DATA_DIR]
    names = [path]
    if path.suffix == ".jsonl":
        names.append(path.with_name(path.name + ".gz"))
    candidates = [base / name for base in bases for name in names]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"NLI data file {str(path)!r} not found (tried {tried}). "
        f"Pass an existing .jsonl or .jsonl.gz path, or a path relative to {BUNDLED_DATA_DIR}."
    )


def read_nli_jsonl(path: str | Path, limit: int | None = None, seed: int | None = None) -> list[dict[str, Any]]:
    """Read NLI examples from a JSON Lines file, plain or gzip-compressed.

    Every line must be a JSON object with string fields ``premise``, ``hypothesis`` and ``label``
    (one of ``entailment``, ``neutral``, ``contradiction``, ``non-entailment``). Other fields are kept.
    Blank lines are skipped. The path is found with :func:`resolve_data_path`.

    Args:
        path: A ``.jsonl`` or ``.jsonl.gz`` file. Compression is detected from the file's content.
        limit: Keep at most this many rows. Without ``seed`` these are the first ``limit`` rows; with it,
            a uniform random sample. Either way the rows stay in file order. A limit at or above the
            number of rows keeps them all.
        seed: Seed of the random sample. Only used with ``limit``.

    Returns:
        The rows as dicts.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If ``limit`` is not positive, the file is empty, or a line is not valid JSON or lacks a
            field. The message names the file, the line number and the field.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"`limit` must be a positive integer or None, but got {limit!r}.")
    resolved = resolve_data_path(path)
    with _open_text(resolved) as handle:
        rows = list(_parse_lines(handle, resolved))
    if not rows:
        raise ValueError(f"NLI data file {resolved} contains no rows.")
    if limit is None or limit >= len(rows):
        return rows
    if seed is None:
        return rows[:limit]
    keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in keep]


def _open_text(path: Path) -> IO[str]:
    with path.open("rb") as raw:
        is_gzip = raw.read(2) == b"\x1f\x8b"
    if is_gzip:
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open("r", encoding="utf-8")


def _parse_lines(handle: IO[str], path: Path) -> Iterator[dict[str, Any]]:
    for line_number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {line_number}: invalid JSON ({err.msg}).") from err
        validate_row(row, where=f"{path}, line {line_number}")
        yield row


def validate_row(row: Any, *, where: str) -> None:
    """Raise ``ValueError`` unless ``row`` is a dict with string ``premise``, ``hypothesis`` and a known label.

    Args:
        row: The parsed example.
        where: Location for the message, such as ``"train.jsonl, line 3"``.
    """
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object with {list(REQUIRED_FIELDS)}, but got {type(row).__name__}.")
    for field in REQUIRED_FIELDS:
        if field not in row:
            raise ValueError(
                f"{where}: missing field {field!r}. Every row needs {list(REQUIRED_FIELDS)}, "
                f"and this one has {sorted(row)}."
            )
        if not isinstance(row[field], str):
            raise ValueError(f"{where}: field {field!r} must be a string, but got {row[field]!r}.")
    if row["label"] not in KNOWN_LABELS:
        raise ValueError(f"{where}: invalid label {row['label']!r}. Expected one of {list(KNOWN_LABELS)}.")


def balanced_hans_sample(rows: Sequence[Mapping[str, Any]], size: int, seed: int) -> list[dict[str, Any]]:
    """Draw ``size`` HANS rows spread as evenly as possible over their subcases.

    Each subcase gets ``size // n_subcases`` rows, and ``size % n_subcases`` randomly chosen subcases get
    one more. A subcase with fewer rows than its share gives all it has, and the rest is spread over the
    other subcases. Each HANS subcase has a single gold label, so the sample is balanced over labels when
    the subcases are. The rows stay in their input order.

    Raises:
        ValueError: If ``size`` is not positive, exceeds ``len(rows)``, or a row has no ``subcase``.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"`size` must be a positive integer, but got {size!r}.")
    if size > len(rows):
        raise ValueError(f"Cannot draw {size} HANS rows from {len(rows)}. Pass a size of at most {len(rows)}.")
    by_subcase: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        if "subcase" not in row:
            raise ValueError(f"HANS row {i} has no 'subcase' field, so it cannot be sampled by subcase: {dict(row)}.")
        by_subcase[row["subcase"]].append(i)

    generator = random.Random(seed)
    quotas = _spread_quotas({name: len(members) for name, members in by_subcase.items()}, size, generator)
    keep: list[int] = []
    for name, members in by_subcase.items():
        keep.extend(generator.sample(members, quotas[name]))
    return [dict(rows[i]) for i in sorted(keep)]


def sample_rows(rows: Sequence[Mapping[str, Any]], size: int, seed: int) -> list[dict[str, Any]]:
    """Return copies of ``size`` rows drawn at random (seeded), in their input order.

    With no more than ``size`` rows, all of them are returned.
    """
    if size >= len(rows):
        return [dict(row) for row in rows]
    keep = sorted(random.Random(seed).sample(range(len(rows)), size))
    return [dict(rows[i]) for i in keep]


def split_rows(
    rows: Sequence[Mapping[str, Any]], first_fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split copies of the rows at random (seeded) into two disjoint parts, each in input order.

    The rows are shuffled with ``seed`` and the first ``round(first_fraction * len(rows))`` of the shuffle
    form the first part, so the same fraction and seed always give the same parts.
    """
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    cut = round(first_fraction * len(rows))
    first, second = sorted(order[:cut]), sorted(order[cut:])
    return [dict(rows[i]) for i in first], [dict(rows[i]) for i in second]


def _spread_quotas(available: dict[str, int], size: int, generator: random.Random) -> dict[str, int]:
    quotas = dict.fromkeys(available, 0)
    remaining = size
    while remaining > 0:
        open_groups = [name for name in available if quotas[name] < available[name]]
        share, extra = divmod(remaining, len(open_groups))
        lucky = set(generator.sample(open_groups, extra))
        for name in open_groups:
            requested = share + (1 if name in lucky else 0)
            granted = min(requested, available[name] - quotas[name])
            quotas[name] += granted
            remaining -= granted
    return quotas


# ---------------------------------------------------------------------------------------------------
# Dataset and collation
# ---------------------------------------------------------------------------------------------------


class NLIDataset(Dataset):
    """Premise/hypothesis pairs tokenised once into fixed-length tensors.

    Each item is a dict of tensors that collates with ``default_collate`` or :func:`collate_nli`:

    - ``input_ids``, ``attention_mask`` and, when the tokenizer returns them, ``token_type_ids``:
      int64, shape ``(max_length,)``, padded on the tokenizer's padding side and truncated.
    - ``labels``: int64 scalar, the 3-way id. A HANS ``non-entailment`` row has no 3-way gold label and
      gets ``HANS_NON_ENTAILMENT_TARGET`` (``contradiction``); its exact loss is :func:`hans_nll_loss`.
    - ``index``: int64 scalar, the item's position in the dataset.
    - ``hans_labels``: int64 scalar, only when the dataset contains HANS rows: ``entailment=0``,
      ``non-entailment=1``, and ``IGNORE_HANS_LABEL`` for 3-way rows mixed in.

    Args:
        rows: Examples as read by :func:`read_nli_jsonl`. The dataset keeps copies.
        tokenizer: A Hugging Face tokenizer that accepts text pairs.
        max_length: Length every sequence is padded and truncated to.

    Raises:
        ValueError: If ``rows`` is empty, a row is invalid or ``max_length`` is not positive.
    """

    def __init__(self, rows: Sequence[Mapping[str, Any]], tokenizer: Any, max_length: int = 128) -> None:
        if len(rows) == 0:
            raise ValueError("`rows` is empty: an NLIDataset needs at least one example.")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"`max_length` must be a positive integer, but got {max_length!r}.")
        for i, row in enumerate(rows):
            validate_row(row, where=f"row {i}")
        self._rows = [dict(row) for row in rows]
        self.max_length = max_length
        self.is_hans = any(is_hans_row(row) for row in self._rows)
        self._tensors = self._tokenize(tokenizer)

    def _tokenize(self, tokenizer: Any) -> dict[str, Tensor]:
        encoded = tokenizer(
            [row["premise"] for row in self._rows],
            [row["hypothesis"] for row in self._rows],
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        tensors = {key: encoded[key].long() for key in SEQUENCE_KEYS if key in encoded}
        tensors["labels"] = torch.tensor([_three_way_label(row) for row in self._rows], dtype=torch.long)
        tensors["index"] = torch.arange(len(self._rows), dtype=torch.long)
        if self.is_hans:
            tensors["hans_labels"] = torch.tensor([_hans_label(row) for row in self._rows], dtype=torch.long)
        return tensors

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {key: values[index] for key, values in self._tensors.items()}

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The raw examples, in dataset order (HANS rows keep ``heuristic`` and ``subcase``)."""
        return self._rows

    def text(self, index: int) -> str:
        """Return the example as ``"premise [SEP] hypothesis"``."""
        row = self._rows[index]
        return f"{row['premise']} [SEP] {row['hypothesis']}"

    def label_name(self, index: int) -> str:
        """Return the gold label as written in the data, such as ``"neutral"`` or ``"non-entailment"``."""
        return self._rows[index]["label"]


class NLIFileDataset(NLIDataset):
    """An :class:`NLIDataset` read from a JSON Lines file, so that a YAML config can name one by its path.

    A LightningCLI config passes it wherever a dataset is expected, for example a repair pool that the
    model never saw, or a target set of one HANS heuristic::

        pool_dataset:
          class_path: lightning_fastif.nli.NLIFileDataset
          init_args: {path: hans/train.jsonl.gz, size: 300, sample: hans_subcases}

    The rows are read with :func:`read_nli_jsonl`, filtered to ``heuristic``, split by ``split_fraction`` and
    then sampled down to ``size``, in that order.

    Args:
        path: A ``.jsonl`` or ``.jsonl.gz`` file, found with :func:`resolve_data_path`.
        model_name_or_path: Tokenizer to load with ``lightning_fastif.nli.model.load_tokenizer``.
        size: Rows to keep, or None for all.
        sample: "random" draws ``size`` rows uniformly; "hans_subcases" spreads them evenly over the HANS
            subcases with :func:`balanced_hans_sample`. Both keep the file order.
        seed: Seed of the sample.
        heuristic: Keep only HANS rows of this heuristic, such as ``lexical_overlap``.
        split_fraction: Shuffle the rows with ``split_seed`` and keep the first ``split_fraction`` of
            them (``split_part="first"``) or the rest (``"second"``). Two datasets with the same fraction
            and seed and different parts share no row, so one file can give a pool and a held-out target.
        split_part: "first" or "second".
        split_seed: Seed of the split's shuffle.
        max_length: Length every sequence is padded and truncated to, in tokens.

    Raises:
        ValueError: If a setting is out of range, or no row is left after the heuristic or the split.
    """

    def __init__(
        self,
        path: str,
        model_name_or_path: str = "all-MiniLM-L6-v2",
        size: int | None = None,
        sample: Literal["random", "hans_subcases"] = "random",
        seed: int = 0,
        heuristic: str | None = None,
        split_fraction: float | None = None,
        split_part: Literal["first", "second"] = "first",
        split_seed: int = 0,
        max_length: int = 128,
    ) -> None:
        if size is not None:
            _check_positive("size", size)
        if sample not in ("random", "hans_subcases"):
            raise ValueError(f"`sample` must be 'random' or 'hans_subcases', but got {sample!r}.")
        if split_part not in ("first", "second"):
            raise ValueError(f"`split_part` must be 'first' or 'second', but got {split_part!r}.")
        if split_fraction is not None and not 0.0 < split_fraction < 1.0:
            raise ValueError(f"`split_fraction` must be in (0, 1) or None, but got {split_fraction!r}.")
        rows = read_nli_jsonl(path)
        if heuristic is not None:
            found = sorted({str(row["heuristic"]) for row in rows if "heuristic" in row})
            rows = [row for row in rows if row.get("heuristic") == heuristic]
            if not rows:
                raise ValueError(f"{path} has no row of heuristic {heuristic!r}. Its heuristics are {found}.")
        if split_fraction is not None:
            first, second = split_rows(rows, split_fraction, split_seed)
            total = len(rows)
            rows = first if split_part == "first" else second
            if not rows:
                raise ValueError(
                    f"The {split_part} part of split_fraction={split_fraction} of {total} rows is empty. "
                    "Choose a fraction that leaves rows in both parts."
                )
        if size is not None and size < len(rows):
            if sample == "hans_subcases":
                rows = balanced_hans_sample(rows, size, seed=seed)
            else:
                rows = sample_rows(rows, size, seed)
        from lightning_fastif.nli.model import load_tokenizer

        super().__init__(rows, load_tokenizer(model_name_or_path), max_length=max_length)


def _three_way_label(row: Mapping[str, Any]) -> int:
    if row["label"] == "non-entailment":
        return HANS_NON_ENTAILMENT_TARGET
    return MNLI_LABEL_TO_ID[row["label"]]


def _hans_label(row: Mapping[str, Any]) -> int:
    if not is_hans_row(row):
        return IGNORE_HANS_LABEL
    if row["label"] not in HANS_LABEL_TO_ID:
        raise ValueError(f"HANS row has label {row['label']!r}, but HANS labels are {list(HANS_LABELS)}: {dict(row)}.")
    return HANS_LABEL_TO_ID[row["label"]]


def collate_nli(items: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Collate items with ``default_collate`` and drop the padding columns shared by the whole batch.

    Every tensor of shape ``(B, L)`` that matches ``attention_mask`` is cut to the columns between the
    first and the last that any example attends to, so the longest example in the batch sets the length.
    This works for right and left padding.

    Returns:
        The batch with sequence tensors of shape ``(B, L')``, ``L' <= L``.
    """
    batch = default_collate(list(items))
    mask = batch.get("attention_mask")
    if mask is None:
        return batch
    used = mask.bool().any(dim=0).nonzero().flatten()
    if used.numel() == 0:
        return batch
    start, stop = int(used[0]), int(used[-1]) + 1
    for key, value in batch.items():
        if isinstance(value, Tensor) and value.shape == mask.shape:
            batch[key] = value[:, start:stop]
    return batch


# ---------------------------------------------------------------------------------------------------
# Lightning data module
# ---------------------------------------------------------------------------------------------------


class NLIDataModule(pl.LightningDataModule):
    """MNLI training data with MNLI and HANS validation sets.

    Relative paths are found with :func:`resolve_data_path`: the current directory first, then the
    repository's ``examples/data`` folder.

    Args:
        model_name_or_path: Tokenizer to load with ``lightning_fastif.nli.model.load_tokenizer``.
        train_path: Training rows (MNLI by default; HANS or ANLI files work too).
        train_size: Random subsample of the training rows (seeded by ``seed``), or None for all.
        mnli_val_path: 3-way validation rows, reported as ``mnli``.
        mnli_val_size: Random subsample of the MNLI validation rows, or None for all.
        hans_val_path: HANS validation rows, reported as ``hans``. None leaves HANS out.
        hans_val_size: Number of HANS rows, drawn evenly over the 30 subcases, or None for all.
        max_length: Length every sequence is padded and truncated to, in tokens.
        batch_size: Training batch size.
        eval_batch_size: Validation batch size.
        seed: Seed of the subsamples and of the training shuffle.
        num_workers: ``DataLoader`` worker processes.

    Attributes:
        train_dataset: The training :class:`NLIDataset`, set by ``setup``.
        val_datasets: The validation datasets in ``val_names`` order, set by ``setup``.
        val_names: Names of the validation sets: ``["mnli", "hans"]``, or ``["mnli"]`` without HANS.
    """

    def __init__(
        self,
        model_name_or_path: str = "all-MiniLM-L6-v2",
        train_path: str = "mnli/train.jsonl.gz",
        train_size: int | None = None,
        mnli_val_path: str = "mnli/validation_matched.jsonl.gz",
        mnli_val_size: int | None = None,
        hans_val_path: str | None = "hans/evaluation.jsonl.gz",
        hans_val_size: int | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        _check_positive("max_length", max_length)
        _check_positive("batch_size", batch_size)
        _check_positive("eval_batch_size", eval_batch_size)
        sizes = {"train_size": train_size, "mnli_val_size": mnli_val_size, "hans_val_size": hans_val_size}
        for name, size in sizes.items():
            if size is not None:
                _check_positive(name, size)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"`num_workers` must be a non-negative integer, but got {num_workers!r}.")
        self.save_hyperparameters()
        self.val_names: list[str] = ["mnli", "hans"] if hans_val_path is not None else ["mnli"]
        self.tokenizer: Any = None
        self.train_dataset: NLIDataset | None = None
        self.val_datasets: list[NLIDataset] = []

    def setup(self, stage: str | None = None) -> None:
        """Read, subsample and tokenise the data sets. Later calls reuse them."""
        if self.tokenizer is None:
            from lightning_fastif.nli.model import load_tokenizer

            self.tokenizer = load_tokenizer(self.hparams["model_name_or_path"])
        hp = self.hparams
        if self.train_dataset is None and stage in (None, "fit"):
            rows = read_nli_jsonl(hp["train_path"], limit=hp["train_size"], seed=hp["seed"])
            self.train_dataset = NLIDataset(rows, self.tokenizer, max_length=hp["max_length"])
        if not self.val_datasets and stage in (None, "fit", "validate"):
            self.val_datasets = [self._build_val_dataset(name) for name in self.val_names]
        log.info(
            "NLI data: %s training rows, validation %s.",
            None if self.train_dataset is None else len(self.train_dataset),
            {name: len(ds) for name, ds in zip(self.val_names, self.val_datasets, strict=True)},
        )

    def _build_val_dataset(self, name: str) -> NLIDataset:
        hp = self.hparams
        if name == "mnli":
            rows = read_nli_jsonl(hp["mnli_val_path"], limit=hp["mnli_val_size"], seed=hp["seed"])
        else:
            rows = read_nli_jsonl(hp["hans_val_path"])
            if hp["hans_val_size"] is not None and hp["hans_val_size"] < len(rows):
                rows = balanced_hans_sample(rows, hp["hans_val_size"], seed=hp["seed"])
        return NLIDataset(rows, self.tokenizer, max_length=hp["max_length"])

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise RuntimeError("`NLIDataModule.train_dataloader` was called before `setup('fit')`.")
        generator = torch.Generator().manual_seed(self.hparams["seed"])
        return DataLoader(
            self.train_dataset,
            batch_size=self.hparams["batch_size"],
            shuffle=True,
            generator=generator,
            collate_fn=collate_nli,
            num_workers=self.hparams["num_workers"],
        )

    def val_dataloader(self) -> list[DataLoader]:
        if not self.val_datasets:
            raise RuntimeError(
                "`NLIDataModule.val_dataloader` was called before `setup('fit')` or `setup('validate')`."
            )
        return [
            DataLoader(
                dataset,
                batch_size=self.hparams["eval_batch_size"],
                shuffle=False,
                collate_fn=collate_nli,
                num_workers=self.hparams["num_workers"],
            )
            for dataset in self.val_datasets
        ]


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, but got {value!r}.")
