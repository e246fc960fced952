"""FastIF: kNN candidates from a faiss index, then LiSSA influence scores on those candidates only.

The data path of one run: query features -> kNN search -> ``k`` candidate train indices; query gradient
-> LiSSA -> ``s_test``; candidate per-example gradients -> scores ``-grads @ s_test``.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from lightning_fastif.distributed import all_gather_columns, rank_and_world, share
from lightning_fastif.functional.batches import LossFn, batch_size_of, move_batch, slice_batch
from lightning_fastif.functional.data import TrainingSet
from lightning_fastif.functional.params import ParameterSpec, influence_mode
from lightning_fastif.functional.scores import TopInfluences, top_influences
from lightning_fastif.functional.solvers import LiSSASolver
from lightning_fastif.influence import InfluenceComputer, ScoreMethod, check_score_method
from lightning_fastif.knn import KNNIndex, ShardedKNNIndex, compute_features, weights_fingerprint

log = logging.getLogger(__name__)

FeaturesFn = Callable[[Any], Tensor]
QueryMode = Literal["each", "mean"]

# Queries that share one LiSSA solve. The solve keeps several [Q, P] tensors in memory, so the cap bounds
# them at a few rows (a row of P = 22.7M float32 parameters is 91 MB) while keeping most of the saving.
SHARED_SOLVE_QUERIES = 8
# Above LARGE_MODEL_PARAMETERS differentiated parameters, a solve shares at most LARGE_MODEL_SOLVE_QUERIES rows.
# NOTE: both values come from two models only (benchmarks/shared_solve_rows.py and docs/benchmarks.md). On
# MiniLM (P = 3.7M, LiSSA batch size 1) a step cost 0.104 s per row alone, 0.094 for 2 rows and 0.117 for
# 4 or 8. On a 20-parameter model, sharing up to 8 rows (with hvps' one graph per batch) took 10 queries
# from 6.22 to 1.82 s.
LARGE_MODEL_PARAMETERS = 1_000_000
LARGE_MODEL_SOLVE_QUERIES = 2
# Row limits for models whose LiSSA steps run one batched second backward pass for all rows
# (FunctionalLoss.batches_hvps): a step there costs little more with more rows. A solve shares up to
# BATCHED_SOLVE_QUERIES rows, and at most BATCHED_SOLVE_ELEMENTS // P of them, so each [Q, P] tensor is at
# most 8 MB in float64.
# benchmarks/batched_solve_rows.py measures a step against the rows (docs/benchmarks.md): the time per row
# stopped falling at about a million row elements, 128 rows of 6,467 parameters and 64 of 21,123.
BATCHED_SOLVE_QUERIES = 256
BATCHED_SOLVE_ELEMENTS = 2**20


@dataclass(frozen=True)
class FastIFConfig:
    """Settings of a FastIF run; the defaults are FastIF's MNLI settings (Guo et al. 2021).

    Attributes:
        k: Nearest neighbors scored per query; ``None`` scores every training example.
        top_k: Helpful and harmful examples reported per query.
        damping: LiSSA damping.
        scale: LiSSA scale; must exceed the largest Hessian eigenvalue.
        depth: LiSSA recursion steps per repeat.
        repeats: LiSSA repeats averaged.
        batch_size: Training examples per LiSSA Hessian-vector product.
        seed: Base seed of LiSSA's batch sampling.
        weight_decay: Coefficient of ``||theta||^2`` in the training objective; enters the Hessian.
        weight_decay_in_gradients: Also add the L2 gradient to query and train gradients.
        metric: kNN distance, "l2" or "cosine".
        index_type: faiss index, "flat" (exact), "ivf" or "hnsw". Under a process group a flat index is split
            over the ranks (see :meth:`FastIF.refresh_index`).
        feature_batch_size: Examples per batch when train features are computed.
        gradient_batch_size: Candidates per batch when per-example gradients are computed.
        score_method: "auto", "gradient" or "jvp", how candidates are scored; see :class:`InfluenceComputer`.
    """

    k: int | None = 1000
    top_k: int = 10
    damping: float = 5e-3
    scale: float = 1e4
    depth: int = 1000
    repeats: int = 1
    batch_size: int = 1
    seed: int = 0
    weight_decay: float = 0.0
    weight_decay_in_gradients: bool = False
    metric: Literal["l2", "cosine"] = "l2"
    index_type: Literal["flat", "ivf", "hnsw"] = "flat"
    feature_batch_size: int = 64
    gradient_batch_size: int = 16
    score_method: ScoreMethod = "auto"

    def __post_init__(self) -> None:
        check_score_method(self.score_method)
        if self.k is not None and self.k <= 0:
            raise ValueError(f"`k` must be a positive integer or None (every training example), but got {self.k}.")
        if self.top_k <= 0:
            raise ValueError(f"`top_k` must be a positive integer, but got {self.top_k}.")
        for name in ("feature_batch_size", "gradient_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be a positive integer, but got {getattr(self, name)}.")
        self.solver()  # validates the LiSSA settings

    def solver(self, *, progress: bool = False, repeat_offset: int = 0, repeats: int | None = None) -> LiSSASolver:
        """Build the LiSSA solver of these settings."""
        return LiSSASolver(
            damping=self.damping,
            scale=self.scale,
            depth=self.depth,
            repeats=self.repeats if repeats is None else repeats,
            batch_size=self.batch_size,
            seed=self.seed,
            repeat_offset=repeat_offset,
            progress=progress,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class QueryInfluence:
    """The FastIF result of one query (one example, or the mean loss of an anchor batch).

    Attributes:
        query_indices: Dataset indices of the query examples, shape ``[A]`` (one entry unless anchored).
        candidate_indices: Train indices of the kNN candidates, nearest first, shape ``[k]``. With
            ``k=None``, every training index in dataset order, shape ``[N]``. An approximate index can
            find fewer than ``k`` neighbors, and then the list is shorter.
        scores: Score of each candidate, negative is helpful, shape ``[k]``.
        top: The most helpful and harmful candidates.
        timings: Seconds spent in each stage: "knn", "ihvp", "scores". The queries of one chunk of
            :meth:`FastIF.explain` share one kNN search, one LiSSA solve and, on small models, one scoring
            pass, so each of these is the chunk's seconds over its queries. Under a process group,
            "scores" also holds the wait for the other ranks' LiSSA sums.
    """

    query_indices: Tensor
    candidate_indices: Tensor
    scores: Tensor
    top: TopInfluences
    timings: dict[str, float] = field(default_factory=dict)


class FastIF:
    """kNN-pruned influence functions over a training set, with the index kept fresh.

    Args:
        model: The module whose parameters are differentiated (for Lightning, the ``LightningModule``).
        loss_fn: ``loss_fn(model, batch)`` returning the mean loss of a batch.
        features_fn: Maps a batch to features ``[B, D]`` for the kNN search.
        train_dataset: Map-style dataset of the candidate training examples.
        collate_fn: Collates items of ``train_dataset``; defaults to ``default_collate``.
        parameters: The parameters to differentiate; see :func:`select_parameters`.
        config: FastIF settings.
        index_path: When given, the index is saved there after each rebuild (see :meth:`refresh_index`).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        features_fn: FeaturesFn,
        train_dataset: Dataset,
        *,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        parameters: ParameterSpec = None,
        config: FastIFConfig | None = None,
        index_path: str | Path | None = None,
    ) -> None:
        self.model = model
        self.features_fn = features_fn
        self.config = config or FastIFConfig()
        self.index_path = Path(index_path) if index_path is not None else None
        self.computer = InfluenceComputer(
            model,
            loss_fn,
            train_dataset,
            solver=self.config.solver(),
            parameters=parameters,
            weight_decay=self.config.weight_decay,
            weight_decay_in_gradients=self.config.weight_decay_in_gradients,
            collate_fn=collate_fn,
            gradient_batch_size=self.config.gradient_batch_size,
            score_method=self.config.score_method,
        )
        self.train_dataset = train_dataset
        self.collate_fn = self.computer.train.collate_fn
        self.index: KNNIndex | ShardedKNNIndex | None = None
        k = self.config.k
        if k is not None and k > len(self.computer.train):
            raise ValueError(
                f"`k={k}` is larger than the training set ({len(self.computer.train)} examples). "
                f"Choose k <= {len(self.computer.train)}, or k=None to score every training example."
            )

    @property
    def num_train(self) -> int:
        return len(self.computer.train)

    def refresh_index(self, *, progress: bool = False) -> KNNIndex | ShardedKNNIndex:
        """Return an index over features of the current weights, rebuilding it when the weights changed.

        Under an initialised process group each rank computes the features of a contiguous share of the
        training set. A flat index stays split: each rank indexes its share, and every search merges the
        ranks' nearest neighbors (:class:`ShardedKNNIndex`). For an IVF or HNSW index the shares are
        all-gathered and every rank indexes all rows, because an approximate index over a share finds other
        neighbors. When ``index_path`` is set, rank zero saves the whole index there, except that each rank
        saves its shard of a split flat index to ``<stem>.rank<R><suffix>`` next to it. Files from runs with
        another number of processes are left as they are.
        """
        fingerprint = weights_fingerprint(self.model)
        if self.index is not None and not self.index.is_stale(fingerprint):
            return self.index
        rank, world_size = rank_and_world()
        if self.num_train < world_size:
            rank, world_size = 0, 1  # Too few examples to give every rank one: each computes them all.
        shares = [share(self.num_train, r, world_size) for r in range(world_size)]
        start, stop = shares[rank]
        features = self._train_features(start, stop, progress=progress and rank == 0)
        options = dict(metric=self.config.metric, index_type=self.config.index_type, fingerprint=fingerprint)
        if world_size > 1 and self.config.index_type == "flat":
            local = KNNIndex(features, ids=torch.arange(start, stop), **options)
            self.index = ShardedKNNIndex(local, self.num_train, device=self.computer.device)
        else:
            if world_size > 1:
                # all_gather_columns joins [D, n_rank] blocks along dim 1. The gather runs on the model's
                # device, which NCCL needs, and the index is built on the CPU.
                local = features.T.contiguous().to(self.computer.device)
                features = all_gather_columns(local, [b - a for a, b in shares]).T.contiguous().cpu()
            self.index = KNNIndex(features, ids=torch.arange(self.num_train), **options)
        if self.index_path is not None:
            if isinstance(self.index, ShardedKNNIndex):
                path = self.index_path
                self.index.save(path.with_name(f"{path.stem}.rank{rank}{path.suffix}"))
            elif rank_and_world()[0] == 0:
                self.index.save(self.index_path)
        log.info("Built a %s kNN index over %d training examples.", self.config.index_type, self.num_train)
        return self.index

    def _train_features(self, start: int, stop: int, *, progress: bool) -> Tensor:
        """Compute the kNN features ``[stop - start, D]`` of training rows ``start:stop``, in dataset order."""
        # A TrainingSet indexes a TensorDataset with a whole batch of positions at once, where a DataLoader
        # reads and collates the examples one by one.
        rows = TrainingSet(
            self.train_dataset, collate_fn=self.collate_fn, device=self.computer.device, indices=range(start, stop)
        )
        batches = _FullPass(rows, self.config.feature_batch_size)
        with influence_mode(self.model):
            features, _ = compute_features(self.features_fn, batches, progress=progress, desc="kNN train features")
        if features.shape[0] != stop - start:
            raise ValueError(
                f"The features function returned {features.shape[0]} rows for {stop - start} training examples."
            )
        return features

    def query_features(self, query_batch: Any) -> Tensor:
        """Return kNN features ``[B, D]`` of a query batch, validated like train features."""
        batch = move_batch(query_batch, self.computer.device)
        with influence_mode(self.model), torch.no_grad():
            features = self.features_fn(batch)
        size = batch_size_of(query_batch, name="query_batch")
        if not isinstance(features, Tensor) or features.dim() != 2 or features.shape[0] != size:
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(f"The features function must return [B, D] = [{size}, D] for the queries, got {shape}.")
        if not torch.isfinite(features).all():
            raise ValueError("The query features contain NaN or inf.")
        return features

    def candidates(self, features: Tensor) -> Tensor:
        """Return the kNN candidate train indices ``[k]`` of one query's features ``[A, D]`` (their mean).

        Under a process group with a flat index this is a collective operation, which every rank must
        call together (see :class:`ShardedKNNIndex`).
        """
        if self.config.k is None:
            return torch.arange(self.num_train)
        index = self.refresh_index()
        _, neighbors = index.search_mean(features, self.config.k)
        return neighbors

    def row_candidates(self, features: Tensor) -> Tensor:
        """Return the kNN candidate train indices ``[B, k]`` of each row of ``features`` ``[B, D]``.

        One faiss search serves every row, so each row gets the candidates that :meth:`candidates` gives
        for that row alone. An approximate index marks missing neighbors with -1, which
        :meth:`explain` drops. Under a process group with a flat index every rank searches its shard for
        all rows, and one exchange merges the shards' neighbors (:class:`ShardedKNNIndex`), so every rank
        must call this with the same number of rows.
        """
        if self.config.k is None:
            return torch.arange(self.num_train).repeat(features.shape[0], 1)
        _, neighbors = self.refresh_index().search(features, self.config.k)
        return neighbors

    def explain(
        self,
        query_batch: Any,
        *,
        mode: QueryMode = "each",
        query_indices: Sequence[int] | None = None,
        progress: bool = False,
        solver: LiSSASolver | None = None,
    ) -> list[QueryInfluence]:
        """Score the kNN candidates of each query and pick the most helpful and harmful.

        Under a process group every rank must call this with the same queries, because the kNN search, the
        LiSSA sum and the scores are exchanged between the ranks.

        Args:
            query_batch: A collated batch of query examples.
            mode: "each" makes every example its own query; "mean" makes one query of the batch's mean loss,
                with kNN on the mean feature (FastIF's anchor batches).
            query_indices: Dataset indices of the query examples, stored in the results.
            progress: Show progress bars over the kNN feature pass, the query chunks, the LiSSA steps and
                the candidate scoring.
            solver: LiSSA solver for this and later calls, which replaces the configured one (for example
                with another seed). Under a process group its repeats, and with fewer repeats than ranks the
                queries, are split across ranks (see :meth:`InfluenceComputer.lissa_grid`).
        """
        size = batch_size_of(query_batch, name="query_batch")
        ids = torch.as_tensor(list(query_indices) if query_indices is not None else range(size), dtype=torch.long)
        if self.config.k is not None:
            self.refresh_index(progress=progress)
        if solver is not None:
            self.computer.solver = solver
        if mode == "mean":
            return self._explain_groups(query_batch, [ids], each=False, progress=progress)
        if mode != "each":
            raise ValueError(f"`mode` must be 'each' or 'mean', but got {mode!r}.")
        # Under a process group that splits the query rows, each rank solves up to rows_per_solve rows.
        _, query_groups = self.computer.lissa_grid(size)
        chunk = self.rows_per_solve() * query_groups
        results: list[QueryInfluence] = []
        starts = range(0, size, chunk)
        for start in tqdm(starts, desc="FastIF query chunks", disable=not progress or len(starts) == 1):
            stop = min(start + chunk, size)
            rows = query_batch if (start, stop) == (0, size) else slice_batch(query_batch, start, stop)
            results += self._explain_groups(rows, list(ids[start:stop, None]), each=True, progress=progress)
        return results

    def rows_per_solve(self) -> int:
        """Return how many query rows one LiSSA solve of :meth:`explain` shares, per process.

        Models whose steps run one batched second backward pass for all rows share up to
        ``BATCHED_SOLVE_QUERIES`` rows, bounded by ``BATCHED_SOLVE_ELEMENTS`` elements per ``[Q, P]``
        tensor. Other small models share up to ``SHARED_SOLVE_QUERIES`` rows, because a step's fixed cost
        dominates. Above ``LARGE_MODEL_PARAMETERS`` parameters each row's second backward pass dominates, and
        sharing more than ``LARGE_MODEL_SOLVE_QUERIES`` rows made a step cost more per row than solving alone.
        """
        numel = self.computer.selection.numel
        if self.computer.loss.batches_hvps:
            return max(SHARED_SOLVE_QUERIES, min(BATCHED_SOLVE_QUERIES, BATCHED_SOLVE_ELEMENTS // numel))
        if numel > LARGE_MODEL_PARAMETERS:
            return min(SHARED_SOLVE_QUERIES, LARGE_MODEL_SOLVE_QUERIES)
        return SHARED_SOLVE_QUERIES

    def _explain_groups(
        self, batch: Any, query_ids: list[Tensor], *, each: bool, progress: bool
    ) -> list[QueryInfluence]:
        """Run the kNN search, one LiSSA solve for all queries together, then score all of them.

        With ``each=True`` every example of ``batch`` is a query. Their features and query gradients are
        computed in slices of ``feature_batch_size`` and ``gradient_batch_size`` examples, and one faiss
        search serves them all. With ``each=False`` the batch's mean loss is the single query, searched by
        its mean feature.

        The solve takes every query gradient as one row of ``[Q, P]``. LiSSA treats rows independently and
        draws the same seeded batches for every row, so each query's ``s_test`` equals a solve of
        that query alone. Sharing the solve draws each training batch and its first-order graph once per
        step instead of once per query. Each result's "knn" and "ihvp" timings are the seconds of the
        whole batch over Q. The caller passes at most :meth:`rows_per_solve` queries per query group of
        :meth:`InfluenceComputer.lissa_grid`, which bounds the ``[Q, P]`` tensors of each rank's solve.
        Under a process group the scores of all queries come back in one exchange
        (:meth:`InfluenceComputer.row_scores`).
        """
        start = time.perf_counter()
        if each:
            features = self._in_batches(self.query_features, batch, self.config.feature_batch_size)
            found = list(self.row_candidates(features))
        else:
            found = [self.candidates(self.query_features(batch))]
        candidates = [row[row >= 0].clone() for row in found]
        knn_seconds = (time.perf_counter() - start) / len(query_ids)

        start = time.perf_counter()
        configured = self.computer.solver
        if progress and isinstance(configured, LiSSASolver) and not configured.progress:
            # LiSSA is the longest stage, so it gets a bar too; the configured solver is put back after.
            self.computer.solver = replace(configured, progress=True)
        try:
            if each:
                gradients = functools.partial(self.computer.query_gradients, mode="each")
                query_gradients = self._in_batches(gradients, batch, self.config.gradient_batch_size)
            else:
                query_gradients = self.computer.query_gradients(batch)
            # Under a process group the sum of the ranks' LiSSA parts is still in flight, and scoring starts
            # with the candidates' gradients, which do not need it.
            s_tests = self.computer.start_ihvp(query_gradients)
        finally:
            self.computer.solver = configured
        ihvp_seconds = (time.perf_counter() - start) / len(query_ids)

        # Under a process group each rank scores its share of every query's candidates, and one exchange
        # gathers the scores of all queries.
        scores, score_seconds = self.computer.row_scores(s_tests, candidates, progress=progress)
        results = []
        for row, ids in enumerate(query_ids):
            timings = {"knn": knn_seconds, "ihvp": ihvp_seconds, "scores": score_seconds[row]}
            top = top_influences(scores[row], self.config.top_k, candidates[row])
            results.append(QueryInfluence(ids, candidates[row], scores[row].detach().cpu(), top, timings))
        return results

    @staticmethod
    def _in_batches(function: Callable[[Any], Tensor], batch: Any, batch_size: int) -> Tensor:
        """Apply ``function`` to slices of at most ``batch_size`` examples and concatenate the results."""
        size = batch_size_of(batch, name="query_batch")
        if size <= batch_size:
            return function(batch)
        return torch.cat([function(slice_batch(batch, i, i + batch_size)) for i in range(0, size, batch_size)])


class _FullPass:
    """The batches of one in-order pass over a :class:`TrainingSet`, with a length for progress bars."""

    def __init__(self, rows: TrainingSet, batch_size: int) -> None:
        self.rows = rows
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        return (batch for batch, _ in self.rows.full_pass(self.batch_size))
