"""kNN candidate selection for FastIF: model features and a faiss index over them.

FastIF (Guo et al., "FastIF: Scalable Influence Functions for Efficient Model Interpretation and
Debugging", EMNLP 2021) scores only the ``k`` train examples nearest to a query in the feature space
of the model, instead of the whole train set. The features are the input of the classification head,
which for Hugging Face BERT sequence classifiers is the pooled [CLS] output. A query is one example,
or the mean feature of an anchor batch (:meth:`KNNIndex.search_mean`).

This module is plain torch, faiss and numpy and never imports Lightning.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sized
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lightning_fastif.distributed import all_gather_equal

__all__ = [
    "KNNIndex",
    "ShardedKNNIndex",
    "classifier_input_features",
    "compute_features",
    "weights_fingerprint",
]

log = logging.getLogger(__name__)

Metric = Literal["l2", "cosine"]
IndexType = Literal["flat", "ivf", "hnsw"]

_METRICS = ("l2", "cosine")
_INDEX_TYPES = ("flat", "ivf", "hnsw")
_HEAD_NAMES = ("classifier", "score")
# Keys never forwarded to the model: `labels` would make HF models compute a loss and set
# `config.problem_type`, which changes the model object.
_DROPPED_KEYS = frozenset({"labels"})
_METADATA_VERSION = 1


# ---------------------------------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------------------------------


def classifier_input_features(model: nn.Module, inputs: Mapping[str, Any]) -> Tensor:
    """Compute the input of the classification head of a Hugging Face sequence classifier.

    The model runs in eval mode under ``torch.no_grad()``, and a forward pre-hook on the head captures
    its input. Afterwards the hook is removed and every submodule gets back its previous train/eval
    mode, also when the forward raises. The head is ``model.classifier``, or ``model.score`` for
    architectures such as GPT-2. Only the keys that are named parameters of ``model.forward`` are
    passed (``input_ids``, ``attention_mask``, ``token_type_ids``, ...), so ``labels``, ``index`` and
    other batch keys are dropped. Tensor inputs are moved to the device of the model's first parameter.

    Heads with submodules that take the whole sequence (RoBERTa and ELECTRA heads get
    ``[B, T, H]`` and read the first token) return that first token's hidden state, ``[B, H]``.

    Args:
        model: A Hugging Face ``*ForSequenceClassification`` model (not a LightningModule wrapping it).
        inputs: A batch as a mapping from names to tensors.

    Returns:
        Detached features ``[B, D]`` in the dtype of the model, where ``D`` is the head's input size.

    Raises:
        ValueError: If the model has no ``classifier`` or ``score`` module, or no key of ``inputs``
            is a parameter of ``model.forward``.
        NotImplementedError: If the head is a single layer applied to every token (token
            classification, GPT-2 style ``score``), so no per-example vector exists at its input.
        RuntimeError: If the forward pass never calls the head.
    """
    head_name, head = _find_head(model)
    model_inputs = _select_forward_inputs(model, inputs)
    captured: list[Tensor] = []

    def capture_input(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        tensors = [value for value in (*args, *kwargs.values()) if isinstance(value, Tensor)]
        if tensors:
            captured.append(tensors[0].detach())

    training_modes = {module: module.training for module in model.modules()}
    handle = head.register_forward_pre_hook(capture_input, with_kwargs=True)
    try:
        model.eval()
        with torch.no_grad():
            model(**model_inputs)
    finally:
        handle.remove()
        for module, was_training in training_modes.items():
            module.train(was_training)

    if not captured:
        raise RuntimeError(
            f"The forward pass of {type(model).__name__} never called `model.{head_name}`, so no features were "
            "captured. Pass a features function that returns [B, D] features instead."
        )
    return _pool_head_input(captured[0], head_name, head, model)


def _find_head(model: nn.Module) -> tuple[str, nn.Module]:
    for name in _HEAD_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return name, head
    raise ValueError(
        f"{type(model).__name__} has no classification head module named `classifier` or `score`. "
        "Pass a features function that maps a batch to [B, D] features instead of using classifier_input_features."
    )


def _select_forward_inputs(model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, Any]:
    parameters = inspect.signature(model.forward).parameters.values()
    accepted = {
        parameter.name
        for parameter in parameters
        if parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    accepted -= _DROPPED_KEYS
    selected = {key: value for key, value in inputs.items() if key in accepted}
    if not selected:
        raise ValueError(
            f"None of the input keys {sorted(inputs)} is a parameter of {type(model).__name__}.forward "
            f"(accepted: {sorted(accepted)}). Pass a batch with keys such as `input_ids` and `attention_mask`."
        )

    device = next((parameter.device for parameter in model.parameters()), None)
    if device is None:
        return selected
    return {key: value.to(device) if isinstance(value, Tensor) else value for key, value in selected.items()}


def _pool_head_input(head_input: Tensor, head_name: str, head: nn.Module, model: nn.Module) -> Tensor:
    if head_input.dim() == 2:
        return head_input
    has_submodules = next(head.children(), None) is not None
    if head_input.dim() == 3 and has_submodules:
        # RobertaClassificationHead and ElectraClassificationHead start with `features[:, 0, :]`.
        # NOTE: a head with submodules that pools another way gets the wrong token here, so such
        # models need a features function.
        return head_input[:, 0, :]
    raise NotImplementedError(
        f"The input of `model.{head_name}` in {type(model).__name__} has shape {tuple(head_input.shape)}, "
        "not [B, D]: the head is applied to every token, so there is no single feature vector per example. "
        "Pass a features function that pools the hidden states into [B, D] features."
    )


def compute_features(
    features_fn: Callable[[Any], Tensor],
    dataloader: Iterable[Any],
    *,
    progress: bool = False,
    desc: str = "Computing kNN features",
) -> tuple[Tensor, Tensor]:
    """Run ``features_fn`` on every batch of ``dataloader`` and stack the results.

    The dataset index of each row comes from the batch key ``index`` when the batch is a mapping that
    has it. Otherwise rows are numbered in running order, ``0 .. N - 1``, which matches the dataset
    indices only for an unshuffled loader over the whole dataset. ``features_fn`` runs under
    ``torch.no_grad()``.

    Args:
        features_fn: Maps a batch to features ``[B, D]``, for example
            ``lambda batch: classifier_input_features(model, batch)``.
        dataloader: Any iterable of batches.
        progress: Whether to show a tqdm progress bar.
        desc: Label of the progress bar.

    Returns:
        Features ``[N, D]`` as float32 on the CPU, and dataset indices ``[N]`` as int64.

    Raises:
        TypeError: If ``features_fn`` returns something other than a tensor.
        ValueError: If the loader is empty, an output is not ``[B, D]`` with the batch size ``B`` and
            the ``D`` of the first batch, an output contains NaN or inf, or some batches have the
            ``index`` key and others do not.
    """
    total = len(dataloader) if isinstance(dataloader, Sized) else None
    features: list[Tensor] = []
    indices: list[Tensor] = []
    feature_dim: int | None = None
    uses_index_key: bool | None = None
    offset = 0

    for batch_number, batch in enumerate(tqdm(dataloader, desc=desc, total=total, disable=not progress)):
        with torch.no_grad():
            output = features_fn(batch)
        batch_size = _batch_size(batch)
        _validate_batch_features(output, batch_number, batch_size, feature_dim)
        feature_dim = output.shape[1]

        batch_indices = _batch_indices(batch, batch_number, output.shape[0])
        has_index_key = batch_indices is not None
        if uses_index_key is not None and has_index_key != uses_index_key:
            raise ValueError(
                f"Batch {batch_number} {'has' if has_index_key else 'lacks'} the `index` key but earlier batches "
                f"{'lack' if has_index_key else 'have'} it. Give every batch an `index` key or none."
            )
        uses_index_key = has_index_key
        if batch_indices is None:
            batch_indices = torch.arange(offset, offset + output.shape[0], dtype=torch.int64)

        features.append(output.detach().to(device="cpu", dtype=torch.float32))
        indices.append(batch_indices)
        offset += output.shape[0]

    if not features:
        raise ValueError("The dataloader yielded no batches, so there are no features to compute.")
    return torch.cat(features), torch.cat(indices)


def _batch_size(batch: Any) -> int | None:
    """Return the first dimension of the batch's first tensor, or None when it has no tensor."""
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.dim() > 0 else None
    if isinstance(batch, Mapping):
        if "index" in batch:
            return len(batch["index"])
        values = list(batch.values())
    elif isinstance(batch, (list, tuple)):
        values = list(batch)
    else:
        return None
    for value in values:
        if isinstance(value, Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


def _validate_batch_features(output: Any, batch_number: int, batch_size: int | None, feature_dim: int | None) -> None:
    if not isinstance(output, Tensor):
        raise TypeError(
            f"features_fn returned {type(output).__name__} for batch {batch_number}, "
            "but it must return a tensor [B, D]."
        )
    expected_rows = "B" if batch_size is None else str(batch_size)
    expected_dim = "D" if feature_dim is None else str(feature_dim)
    expected = f"[{expected_rows}, {expected_dim}]"
    shape_ok = (
        output.dim() == 2
        and (batch_size is None or output.shape[0] == batch_size)
        and (feature_dim is None or output.shape[1] == feature_dim)
    )
    if not shape_ok:
        raise ValueError(
            f"features_fn returned shape {tuple(output.shape)} for batch {batch_number}, expected {expected} "
            "(batch size, feature dimension of the first batch)."
        )

    # One reduction and one device sync per batch; the counts are only needed for the message.
    if bool(torch.isfinite(output).all()):
        return
    nan_count = int(torch.isnan(output).sum())
    inf_count = int(torch.isinf(output).sum())
    raise ValueError(
        f"features_fn returned {nan_count} NaN and {inf_count} inf values for batch {batch_number} "
        f"(shape {tuple(output.shape)}). Check the model and its inputs for overflow."
    )


def _batch_indices(batch: Any, batch_number: int, rows: int) -> Tensor | None:
    if not isinstance(batch, Mapping) or "index" not in batch:
        return None
    index = torch.as_tensor(batch["index"]).reshape(-1)
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise ValueError(
            f"The `index` key of batch {batch_number} has dtype {index.dtype}, but it must be an integer tensor."
        )
    if index.numel() != rows:
        raise ValueError(
            f"The `index` key of batch {batch_number} has {index.numel()} entries but features_fn returned {rows} rows."
        )
    return index.to(device="cpu", dtype=torch.int64)


def weights_fingerprint(parameters: Iterable[Tensor] | nn.Module) -> str:
    """Hash the exact values of parameters, so a caller can tell that features are stale.

    The SHA-1 covers the dtype, shape and raw bytes of every tensor, in order, so changing any
    element by one ulp changes the result. For a module it also covers the names, and the buffers
    (for example BatchNorm running statistics), because features depend on them too. Each tensor is
    copied to the CPU, so the cost is one pass over the weights.

    Args:
        parameters: A module, or an iterable of tensors such as ``model.parameters()``.

    Returns:
        A 40-character hexadecimal digest.
    """
    digest = hashlib.sha1(usedforsecurity=False)
    if isinstance(parameters, nn.Module):
        named: Iterable[tuple[str, Tensor]] = [*parameters.named_parameters(), *parameters.named_buffers()]
    else:
        named = ((str(position), tensor) for position, tensor in enumerate(parameters))

    for name, tensor in named:
        if not isinstance(tensor, Tensor):
            raise TypeError(f"weights_fingerprint got {type(tensor).__name__} at {name!r}, but expected tensors.")
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{data.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# Index
# ---------------------------------------------------------------------------------------------------------------------


class KNNIndex:
    """A faiss index over train features that returns dataset indices of the nearest neighbors.

    Distances are Euclidean for ``metric="l2"`` (the square root of faiss's squared L2) and cosine
    distances ``1 - cos`` for ``metric="cosine"``, so smaller is always closer. Cosine search is an
    inner product search on L2-normalised copies of the features and queries. The caller's arrays are
    never modified.

    Args:
        features: Train features ``[N, D]`` (torch or numpy), converted to float32.
        ids: Dataset index of each row ``[N]``. Defaults to ``arange(N)``.
        metric: ``"l2"`` or ``"cosine"``.
        index_type: ``"flat"`` for exact search (``IndexFlatL2`` / ``IndexFlatIP``), ``"ivf"`` for an
            inverted file (``IndexIVFFlat``) or ``"hnsw"`` for a graph index (``IndexHNSWFlat``).
        nlist: Number of IVF clusters. IVF needs at least ``nlist`` rows to train.
        nprobe: Number of IVF clusters visited per query. ``nprobe == nlist`` is exact.
        hnsw_m: Number of graph neighbors per HNSW node.
        ef_search: Size of the HNSW candidate list at search time. A larger list is slower and more exact.
        use_gpu: ``None`` uses a faiss GPU index when faiss has GPU support and
            ``faiss.get_num_gpus() > 0``, ``True`` requires one and ``False`` stays on the CPU.
            HNSW always stays on the CPU.
        fingerprint: Identifies what the features were computed from, usually
            :func:`weights_fingerprint` of the model. Defaults to a hash of the features and ids,
            which does not match any weights fingerprint, so :meth:`is_stale` then returns True.

    Raises:
        ValueError: If an option is invalid, the features are not a finite ``[N, D]`` array, ``ids``
            has the wrong length, IVF has fewer than ``nlist`` rows, or ``use_gpu=True`` with HNSW.
        RuntimeError: If ``use_gpu=True`` and faiss has no GPU support or finds no GPU.

    Example:
        >>> features = torch.randn(100, 8)
        >>> index = KNNIndex(features, ids=torch.arange(1000, 1100))
        >>> distances, neighbors = index.search(features[:2], k=3)
        >>> neighbors[:, 0].tolist()
        [1000, 1001]
    """

    def __init__(
        self,
        features: Tensor | np.ndarray,
        *,
        ids: Tensor | np.ndarray | None = None,
        metric: Metric = "l2",
        index_type: IndexType = "flat",
        nlist: int = 100,
        nprobe: int = 10,
        hnsw_m: int = 32,
        ef_search: int = 128,
        use_gpu: bool | None = None,
        fingerprint: str | None = None,
    ) -> None:
        _validate_options(metric, index_type, nlist, nprobe, hnsw_m, ef_search, use_gpu)
        matrix = _as_float32_matrix(features, "features")
        _validate_train_features(matrix)
        if index_type == "ivf" and matrix.shape[0] < nlist:
            raise ValueError(
                f"An IVF index needs at least nlist={nlist} training rows, but the features have N={matrix.shape[0]} "
                "rows. Lower nlist or use index_type='flat'."
            )

        self.metric: Metric = metric
        self.index_type: IndexType = index_type
        self.options = {"nlist": nlist, "nprobe": nprobe, "hnsw_m": hnsw_m, "ef_search": ef_search}
        self.ids = _as_ids(ids, matrix.shape[0])
        self.fingerprint = fingerprint if fingerprint is not None else _features_hash(matrix, self.ids)

        if metric == "cosine":
            faiss.normalize_L2(matrix)
        cpu_index = _build_cpu_index(matrix, metric, index_type, self.options)
        self._index = _maybe_to_gpu(cpu_index, index_type, use_gpu)

    @property
    def size(self) -> int:
        """Number of indexed train rows ``N``."""
        return int(self._index.ntotal)

    @property
    def dim(self) -> int:
        """Feature dimension ``D``."""
        return int(self._index.d)

    def __repr__(self) -> str:
        return (
            f"KNNIndex(size={self.size}, dim={self.dim}, metric={self.metric!r}, index_type={self.index_type!r}, "
            f"fingerprint={self.fingerprint!r})"
        )

    def is_stale(self, fingerprint: str) -> bool:
        """Return whether ``fingerprint`` differs from the one the index was built with."""
        return fingerprint != self.fingerprint

    def search(self, queries: Tensor | np.ndarray, k: int) -> tuple[Tensor, Tensor]:
        """Find the ``k`` nearest train rows of each query.

        Args:
            queries: Query features ``[Q, D]``.
            k: Number of neighbors, ``1 <= k <= size``.

        Returns:
            Distances ``[Q, k]`` (float32, ascending, equally near rows in ascending id order) and dataset
            indices ``[Q, k]`` (int64, from ``ids``). Approximate indexes can find fewer than ``k`` neighbors
            (IVF with a small ``nprobe``), and the missing entries have index ``-1`` and distance ``inf``.

        Raises:
            ValueError: If ``k`` is out of range, the queries are not ``[Q, D]`` or are not finite.
        """
        self._validate_k(k)
        matrix = self._prepare_queries(queries)
        raw_distances, neighbor_ids = self._search_raw(matrix, k)
        # faiss 1.15 lists equally near rows by descending position for inner products. Sorting them by id
        # gives every metric, and ShardedKNNIndex's merge, the same order.
        raw_distances, neighbor_ids = merge_nearest(raw_distances, neighbor_ids, k, self.metric)
        return _to_distances(raw_distances, neighbor_ids, self.metric)

    def search_mean(self, queries: Tensor | np.ndarray, k: int) -> tuple[Tensor, Tensor]:
        """Find the ``k`` nearest train rows of the mean feature of an anchor batch.

        Args:
            queries: Features of the anchor batch ``[A, D]``, whose mean is the single query.
            k: Number of neighbors, ``1 <= k <= size``.

        Returns:
            Distances ``[k]`` and dataset indices ``[k]``, as in :meth:`search`.
        """
        matrix = _as_float32_matrix(queries, "queries")
        self._validate_queries(matrix)
        distances, neighbor_ids = self.search(_mean_query(matrix), k)
        return distances[0], neighbor_ids[0]

    def save(self, path: str | Path) -> None:
        """Write the faiss index to ``path``, the ids to ``<path>.ids.npy`` and metadata to ``<path>.json``.

        A GPU index is converted to a CPU index before writing.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        index = self._index
        if _is_gpu_index(index):
            index = faiss.index_gpu_to_cpu(index)
        faiss.write_index(index, str(path))

        ids_path = _ids_path(path)
        np.save(ids_path, self.ids, allow_pickle=False)
        metadata = {
            "version": _METADATA_VERSION,
            "metric": self.metric,
            "index_type": self.index_type,
            "options": self.options,
            "ids_file": ids_path.name,
            "fingerprint": self.fingerprint,
            "size": self.size,
            "dim": self.dim,
            "faiss_version": faiss.__version__,
        }
        _metadata_path(path).write_text(json.dumps(metadata, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, *, use_gpu: bool | None = None) -> KNNIndex:
        """Read an index written by :meth:`save`.

        Args:
            path: The index file given to :meth:`save`.
            use_gpu: As in the constructor.

        Raises:
            FileNotFoundError: If the index, ids or metadata file is missing.
            ValueError: If the files disagree with each other.
        """
        path = Path(path)
        metadata_path = _metadata_path(path)
        for required in (path, metadata_path):
            if not required.is_file():
                raise FileNotFoundError(f"KNNIndex file {required} not found. Write it with KNNIndex.save({path!s}).")
        metadata = json.loads(metadata_path.read_text())
        ids_path = path.parent / metadata["ids_file"]
        if not ids_path.is_file():
            raise FileNotFoundError(f"KNNIndex ids file {ids_path} named in {metadata_path} not found.")

        cpu_index = faiss.read_index(str(path))
        ids = np.load(ids_path, allow_pickle=False)
        if cpu_index.ntotal != metadata["size"] or cpu_index.d != metadata["dim"] or ids.shape != (cpu_index.ntotal,):
            raise ValueError(
                f"KNNIndex files under {path} disagree: the faiss index has {cpu_index.ntotal} rows of dimension "
                f"{cpu_index.d}, the metadata says {metadata['size']} x {metadata['dim']} and the ids have shape "
                f"{ids.shape}. Save the index again."
            )

        index = cls.__new__(cls)
        index.metric = metadata["metric"]
        index.index_type = metadata["index_type"]
        index.options = dict(metadata["options"])
        index.ids = ids.astype(np.int64)
        index.fingerprint = metadata["fingerprint"]
        _validate_options(index.metric, index.index_type, **index.options, use_gpu=use_gpu)
        index._index = _maybe_to_gpu(cpu_index, index.index_type, use_gpu)
        return index

    def _prepare_queries(self, queries: Tensor | np.ndarray) -> np.ndarray:
        """Return validated float32 queries, normalised for the cosine metric."""
        matrix = _as_float32_matrix(queries, "queries")
        self._validate_queries(matrix)
        if self.metric == "cosine":
            faiss.normalize_L2(matrix)
        return matrix

    def _search_raw(self, matrix: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return faiss's distances ``[Q, k]`` (squared L2 or inner products) and ids ``[Q, k]``, -1 where missing."""
        raw_distances, positions = self._index.search(matrix, k)
        neighbor_ids = np.where(positions < 0, -1, self.ids[np.clip(positions, 0, None)])
        return raw_distances, neighbor_ids.astype(np.int64)

    def _validate_k(self, k: int) -> None:
        _validate_k(k, self.size)

    def _validate_queries(self, matrix: np.ndarray) -> None:
        if matrix.shape[1] != self.dim:
            raise ValueError(
                f"The queries have dimension {matrix.shape[1]} but the index has dimension {self.dim}. Compute the "
                "queries with the same features function as the index."
            )
        nan_count = int(np.isnan(matrix).sum())
        inf_count = int(np.isinf(matrix).sum())
        if nan_count or inf_count:
            raise ValueError(f"The queries contain {nan_count} NaN and {inf_count} inf values. Pass finite features.")


class ShardedKNNIndex:
    """An exact kNN index split over the ranks of a process group.

    Each rank has a flat :class:`KNNIndex` over its share of the training rows, searches it and sends its
    ``k`` nearest to the other ranks. Every rank then keeps the ``k`` nearest of all shards, equally near
    rows in ascending id order, as :meth:`KNNIndex.search` lists them. So all ranks return the result of one
    flat index over all rows, unless faiss rounds a distance differently for a smaller index or keeps
    another of several equally near rows at the ``k``-th place. Each search is a collective operation:
    every rank must call it with the same ``k`` and the same number of queries, or the ranks wait until
    the process group's timeout.

    Args:
        local: This rank's flat index, whose ``ids`` are dataset indices.
        size: Number of rows of all shards together.
        device: Device of the tensors that the ranks exchange, which NCCL needs on the GPU.
    """

    def __init__(self, local: KNNIndex, size: int, device: torch.device | str = "cpu") -> None:
        if local.index_type != "flat":
            raise ValueError(
                f"A ShardedKNNIndex needs flat shards, got index_type={local.index_type!r}. An approximate index "
                "over a share finds other neighbors than one over all rows, so build it over all rows instead."
            )
        self.local = local
        self._size = size
        self.device = torch.device(device)

    @property
    def size(self) -> int:
        """Number of indexed train rows ``N`` over all ranks."""
        return self._size

    @property
    def dim(self) -> int:
        """Feature dimension ``D``."""
        return self.local.dim

    @property
    def metric(self) -> Metric:
        return self.local.metric

    @property
    def index_type(self) -> IndexType:
        return self.local.index_type

    @property
    def fingerprint(self) -> str:
        return self.local.fingerprint

    def __repr__(self) -> str:
        return f"ShardedKNNIndex(size={self.size}, local={self.local!r})"

    def is_stale(self, fingerprint: str) -> bool:
        """Return whether ``fingerprint`` differs from the one the shards were built with."""
        return self.local.is_stale(fingerprint)

    def search(self, queries: Tensor | np.ndarray, k: int) -> tuple[Tensor, Tensor]:
        """Find the ``k`` nearest train rows of each query over all shards; see :meth:`KNNIndex.search`."""
        _validate_k(k, self.size)
        matrix = self.local._prepare_queries(queries)
        raw_distances, neighbor_ids = self.local._search_raw(matrix, min(k, self.local.size))
        if neighbor_ids.shape[1] < k:
            # A shard smaller than k sends its whole share, padded with missing entries (id -1) to the common
            # width. merge_nearest puts missing entries last whatever their distance.
            padding = ((0, 0), (0, k - neighbor_ids.shape[1]))
            raw_distances = np.pad(raw_distances, padding, constant_values=np.inf)
            neighbor_ids = np.pad(neighbor_ids, padding, constant_values=-1)
        # One exchange carries both, because float64 represents every float32 distance and every id below 2**53 exactly.
        packed = torch.from_numpy(np.concatenate([raw_distances.astype(np.float64), neighbor_ids], axis=1))
        blocks = [block.cpu().numpy() for block in all_gather_equal(packed.to(self.device))]
        raw_distances = np.concatenate([block[:, :k] for block in blocks], axis=1).astype(np.float32)
        neighbor_ids = np.concatenate([block[:, k:] for block in blocks], axis=1).astype(np.int64)
        raw_distances, neighbor_ids = merge_nearest(raw_distances, neighbor_ids, k, self.metric)
        return _to_distances(raw_distances, neighbor_ids, self.metric)

    def search_mean(self, queries: Tensor | np.ndarray, k: int) -> tuple[Tensor, Tensor]:
        """Find the ``k`` nearest train rows of an anchor batch's mean feature; see :meth:`KNNIndex.search_mean`."""
        matrix = _as_float32_matrix(queries, "queries")
        self.local._validate_queries(matrix)
        distances, neighbor_ids = self.search(_mean_query(matrix), k)
        return distances[0], neighbor_ids[0]

    def save(self, path: str | Path) -> None:
        """Write this rank's shard with :meth:`KNNIndex.save`; :meth:`KNNIndex.load` reads it back."""
        self.local.save(path)


def merge_nearest(
    raw_distances: np.ndarray, neighbor_ids: np.ndarray, k: int, metric: Metric
) -> tuple[np.ndarray, np.ndarray]:
    """Keep the ``k`` nearest of each row of neighbor lists that several shards found.

    Args:
        raw_distances: faiss's distances ``[Q, M]``: squared L2 distances, or inner products for "cosine".
        neighbor_ids: Ids ``[Q, M]``, -1 for a missing entry.
        k: Neighbors kept per row, at most ``M``.
        metric: ``"l2"`` (smaller is nearer) or ``"cosine"`` (larger is nearer).

    Returns:
        The kept distances and ids ``[Q, k]``, nearest first, ties in ascending id order, missing entries last.
    """
    farness = raw_distances if metric == "l2" else -raw_distances
    farness = np.where(neighbor_ids < 0, np.inf, farness)
    order = np.lexsort((neighbor_ids, farness), axis=-1)[:, :k]
    return np.take_along_axis(raw_distances, order, axis=-1), np.take_along_axis(neighbor_ids, order, axis=-1)


def _to_distances(raw_distances: np.ndarray, neighbor_ids: np.ndarray, metric: Metric) -> tuple[Tensor, Tensor]:
    """Turn faiss's distances into :meth:`KNNIndex.search`'s: L2 distances, or cosine distances ``1 - cos``."""
    missing = neighbor_ids < 0
    if metric == "cosine":
        distances = 1.0 - raw_distances
    else:
        distances = np.sqrt(np.maximum(raw_distances, 0.0))
    distances = np.where(missing, np.inf, distances).astype(np.float32)
    return torch.from_numpy(distances), torch.from_numpy(neighbor_ids.astype(np.int64))


def _mean_query(matrix: np.ndarray) -> np.ndarray:
    """Return the mean ``[1, D]`` of an anchor batch's features ``[A, D]``, summed in float64."""
    if matrix.shape[0] == 0:
        raise ValueError("search_mean got an empty anchor batch of shape (0, D). Pass at least one query.")
    return matrix.mean(axis=0, dtype=np.float64, keepdims=True).astype(np.float32)


def _validate_k(k: int, size: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {type(k).__name__} ({k!r}).")
    if k <= 0:
        raise ValueError(f"k={k} is invalid: k must be at least 1 (the index size is {size}).")
    if k > size:
        raise ValueError(f"k={k} exceeds the index size {size}. Pass k <= {size} or index more train examples.")


def _validate_options(
    metric: str, index_type: str, nlist: int, nprobe: int, hnsw_m: int, ef_search: int, use_gpu: bool | None
) -> None:
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}.")
    if index_type not in _INDEX_TYPES:
        raise ValueError(f"index_type must be one of {_INDEX_TYPES}, got {index_type!r}.")
    for name, value in (("nlist", nlist), ("nprobe", nprobe), ("hnsw_m", hnsw_m), ("ef_search", ef_search)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    if index_type == "ivf" and nprobe > nlist:
        raise ValueError(f"nprobe={nprobe} exceeds nlist={nlist}. Pass nprobe <= nlist (nprobe == nlist is exact).")
    if use_gpu is not None and not isinstance(use_gpu, bool):
        raise ValueError(f"use_gpu must be True, False or None, got {use_gpu!r}.")
    if use_gpu and index_type == "hnsw":
        raise ValueError(
            "use_gpu=True is not supported with index_type='hnsw', because faiss has no GPU HNSW index. "
            "Use index_type='flat' or 'ivf', or use_gpu=None."
        )


def _as_float32_matrix(array: Tensor | np.ndarray, name: str) -> np.ndarray:
    """Return a C-contiguous float32 copy ``[rows, D]`` of a 2-D tensor or array."""
    if isinstance(array, Tensor):
        array = array.detach().to(device="cpu", dtype=torch.float32).numpy()
    matrix = np.array(array, dtype=np.float32, order="C", copy=True)
    if matrix.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D array [rows, D], got shape {matrix.shape}. Use x.reshape(1, -1) for a single row."
        )
    return matrix


def _validate_train_features(matrix: np.ndarray) -> None:
    rows, dim = matrix.shape
    if rows == 0 or dim == 0:
        raise ValueError(f"features must have at least one row and one column, got shape {matrix.shape}.")
    nan_count = int(np.isnan(matrix).sum())
    inf_count = int(np.isinf(matrix).sum())
    if nan_count or inf_count:
        raise ValueError(f"features contain {nan_count} NaN and {inf_count} inf values. Pass finite features.")


def _as_ids(ids: Tensor | np.ndarray | None, rows: int) -> np.ndarray:
    if ids is None:
        return np.arange(rows, dtype=np.int64)
    if isinstance(ids, Tensor):
        ids = ids.detach().cpu().numpy()
    array = np.asarray(ids)
    if array.shape != (rows,):
        raise ValueError(f"ids must have shape ({rows},), one per feature row, got shape {array.shape}.")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"ids must be integers, got dtype {array.dtype}.")
    return array.astype(np.int64)


def _features_hash(matrix: np.ndarray, ids: np.ndarray) -> str:
    digest = hashlib.sha1(usedforsecurity=False)
    digest.update(b"features|")
    digest.update(matrix.tobytes())
    digest.update(ids.tobytes())
    return digest.hexdigest()


def _build_cpu_index(matrix: np.ndarray, metric: str, index_type: str, options: dict[str, int]) -> Any:
    rows, dim = matrix.shape
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    index: Any
    if index_type == "flat":
        index = faiss.IndexFlatIP(dim) if metric == "cosine" else faiss.IndexFlatL2(dim)
    elif index_type == "ivf":
        quantizer = faiss.IndexFlatIP(dim) if metric == "cosine" else faiss.IndexFlatL2(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, options["nlist"], faiss_metric)
        index.train(matrix)
        index.nprobe = options["nprobe"]
    else:
        index = faiss.IndexHNSWFlat(dim, options["hnsw_m"], faiss_metric)
        index.hnsw.efSearch = options["ef_search"]
    index.add(matrix)
    log.debug("Built a faiss %s index with %d rows of dimension %d", type(index).__name__, rows, dim)
    return index


def _faiss_has_gpu() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _maybe_to_gpu(cpu_index: Any, index_type: str, use_gpu: bool | None) -> Any:
    if use_gpu is False or index_type == "hnsw":
        return cpu_index
    if not _faiss_has_gpu():
        if use_gpu:
            raise RuntimeError(
                "use_gpu=True but faiss has no GPU support or finds no GPU (faiss-cpu is installed, or no CUDA device "
                "is visible). Install a faiss GPU build or pass use_gpu=None or False."
            )
        return cpu_index
    # NOTE: this path is not covered by the tests, which run on faiss-cpu.
    resources = faiss.StandardGpuResources()
    device = torch.cuda.current_device() if torch.cuda.is_available() else 0
    gpu_index: Any = faiss.index_cpu_to_gpu(resources, device, cpu_index)
    gpu_index.referenced_resources = resources  # keep the resources alive as long as the index
    if index_type == "ivf":
        gpu_index.nprobe = cpu_index.nprobe
    return gpu_index


def _is_gpu_index(index: Any) -> bool:
    return hasattr(faiss, "GpuIndex") and isinstance(index, faiss.GpuIndex)


def _metadata_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _ids_path(path: Path) -> Path:
    return path.with_name(path.name + ".ids.npy")
