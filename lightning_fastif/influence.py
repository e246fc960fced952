"""The functional entry point: influence scores of training examples on a query, for any ``nn.Module``."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from lightning_fastif.distributed import PendingSum, all_gather_columns, is_distributed, rank_and_world, share
from lightning_fastif.functional.batches import LossFn, batch_size_of, move_batch
from lightning_fastif.functional.data import TrainingSet
from lightning_fastif.functional.gradients import FunctionalLoss, Vectorize
from lightning_fastif.functional.params import ParameterSpec, influence_mode, select_parameters
from lightning_fastif.functional.scores import influence_scores
from lightning_fastif.functional.solvers import IHVPSolver, LiSSASolver, make_solver

QueryMode = Literal["mean", "each"]
ScoreMethod = Literal["auto", "gradient", "jvp"]
SCORE_METHODS = ("auto", "gradient", "jvp")

log = logging.getLogger(__name__)

# Under score_method="auto", row_scores scores several rows in one pass over the union of their candidates
# when at most this many parameters are differentiated. On such models a scoring call's fixed cost
# dominates, so one gradient call per batch of shared candidates beats a forward-mode call per row and batch.
# NOTE: measured on a logistic model and tanh MLPs only (benchmarks/shared_scoring.py, docs/benchmarks.md).
# The union took 0.24 to 0.90 of the time up to 2,211 parameters, but 1.11 at 6,467 with 10 queries.
SHARED_SCORING_MAX_PARAMETERS = 4_096
# Under a process group, row_scores computes a rank's candidate gradients while the LiSSA sums of start_ihvp
# travel between the ranks, if the gradients have at most this many elements (64 MB in float32). Larger
# shares wait for the sums first and keep one batch of gradients at a time.
OVERLAP_GRADIENT_ELEMENTS = 2**24


def check_score_method(score_method: str) -> None:
    """Raise ``ValueError`` unless ``score_method`` is one of :data:`SCORE_METHODS`."""
    if score_method not in SCORE_METHODS:
        raise ValueError(f"`score_method` must be 'auto', 'gradient' or 'jvp', but got {score_method!r}.")


class InfluenceComputer:
    """Influence of training examples on queries: gradients, the ihvp ``s_test`` and scores.

    The model runs in eval mode (dropout off, batch-norm statistics frozen) during every call and its
    modes, ``requires_grad`` flags and weights are as they were afterwards.

    Args:
        model: Any ``nn.Module``.
        loss_fn: ``loss_fn(model, batch)`` returning the mean loss over ``batch`` as a scalar tensor.
        train_dataset: Map-style dataset of training examples. ``H`` is the Hessian of the mean loss over it.
        solver: An ``IHVPSolver`` or one of "exact", "cg", "lissa".
        parameters: Which parameters to differentiate; see :func:`select_parameters`.
        weight_decay: Coefficient of the ``weight_decay * ||theta||^2`` term of the training objective. It
            always enters the Hessian.
        weight_decay_in_gradients: Also add the L2 gradient to query and training gradients, as FastIF's
            reference code does. Off by default because it shifts every score towards "helpful".
        collate_fn: Collates training items; defaults to torch's ``default_collate``.
        gradient_batch_size: Training examples per batch when per-example gradients are computed.
        vectorize: "auto", "vmap" or "loop" for per-example gradients.
        score_method: "gradient" scores with per-example gradients and a matrix product; "jvp" computes
            each score as a forward-mode directional derivative along ``s_test`` (see
            :meth:`FunctionalLoss.per_example_directional_derivatives`), which avoids the ``[B, P]``
            gradients and costs one forward pass per ``s_test``. "auto" uses "jvp" for a single
            ``s_test`` (FastIF's case: one query or one anchor batch) and "gradient" for several. When
            the model has an operation without forward-mode support, "auto" logs a warning and falls
            back to "gradient".
        solver_options: Options of the named solver, for example ``damping``, ``scale``, ``depth``,
            ``repeats``, ``batch_size`` and ``seed`` for LiSSA.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        train_dataset: Dataset,
        *,
        solver: str | IHVPSolver = "lissa",
        parameters: ParameterSpec = None,
        weight_decay: float = 0.0,
        weight_decay_in_gradients: bool = False,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        gradient_batch_size: int = 32,
        vectorize: Vectorize = "auto",
        score_method: ScoreMethod = "auto",
        **solver_options: Any,
    ) -> None:
        check_score_method(score_method)
        if gradient_batch_size <= 0:
            raise ValueError(f"`gradient_batch_size` must be a positive integer, but got {gradient_batch_size}.")
        first = next(model.parameters(), None)
        if first is None:
            raise ValueError("The model has no parameters, so there is nothing to differentiate.")
        self.model = model
        self.device = first.device
        self.dtype = first.dtype
        self.selection = select_parameters(model, parameters)
        self.loss = FunctionalLoss(
            model,
            loss_fn,
            self.selection,
            weight_decay=weight_decay,
            weight_decay_in_gradients=weight_decay_in_gradients,
        )
        self.train = TrainingSet(train_dataset, collate_fn=collate_fn, device=self.device, dtype=self.dtype)
        self.solver = solver if isinstance(solver, IHVPSolver) else make_solver(solver, **solver_options)
        if isinstance(solver, IHVPSolver) and solver_options:
            raise TypeError(f"Solver options {sorted(solver_options)} were given with a solver object; set them on it.")
        self.gradient_batch_size = gradient_batch_size
        self.vectorize = vectorize
        self.score_method = score_method
        self._jvp_unsupported = False

    def query_gradients(self, query_batch: Any, *, mode: QueryMode = "mean") -> Tensor:
        """Return query gradients: ``[1, P]`` for the batch's mean loss, or ``[B, P]`` with ``mode="each"``."""
        batch_size_of(query_batch, name="query_batch")
        batch = move_batch(query_batch, self.device, self.dtype)
        with influence_mode(self.model):
            if mode == "mean":
                return self.loss.gradient(batch).unsqueeze(0)
            if mode == "each":
                return self.loss.per_example_gradients(batch, vectorize=self.vectorize, examples="query examples")
        raise ValueError(f"`mode` must be 'mean' or 'each', but got {mode!r}.")

    def ihvp(self, query_gradients: Tensor) -> Tensor:
        """Return ``s_test``, the ihvp of each query gradient, shape ``[Q, P]``.

        Under an initialised process group the LiSSA work is split over the ranks as a grid of repeat
        groups and query groups (see :meth:`lissa_grid`): each rank runs its share of the repeats (repeat
        ``r`` keeps its seed ``seed + r``) on its share of the query rows, and the sums are all-reduced.
        LiSSA treats rows independently, so the result equals one process running every repeat on every
        row. The exact and CG solvers are deterministic and run whole on every rank.
        """
        return self.start_ihvp(query_gradients).result()

    def start_ihvp(self, query_gradients: Tensor) -> PendingSum:
        """Run this rank's part of :meth:`ihvp` and start the sum over the ranks without waiting for it.

        :meth:`row_scores` takes the returned value in place of ``s_test`` and computes the candidates'
        gradients while the sum travels. ``result()`` gives what :meth:`ihvp` returns.
        """
        with influence_mode(self.model):
            if not (is_distributed() and isinstance(self.solver, LiSSASolver)):
                # Every rank ran the whole solve, so there is nothing to sum.
                return PendingSum(self.solver.solve(self.loss, self.train, query_gradients), sum_over_ranks=False)
            rank, _ = rank_and_world()
            repeat_groups, query_groups = self.lissa_grid(len(query_gradients))
            total = torch.zeros_like(query_gradients)
            if rank < repeat_groups * query_groups:
                repeat_start, repeat_stop = share(self.solver.repeats, rank // query_groups, repeat_groups)
                row_start, row_stop = share(len(query_gradients), rank % query_groups, query_groups)
                if repeat_stop > repeat_start and row_stop > row_start:
                    local = replace(
                        self.solver,
                        repeats=repeat_stop - repeat_start,
                        repeat_offset=self.solver.repeat_offset + repeat_start,
                        progress=self.solver.progress and rank == 0,
                    )
                    rows = query_gradients[row_start:row_stop]
                    total[row_start:row_stop] = local.solve_sum(self.loss, self.train, rows)
            return PendingSum(total, divisor=self.solver.repeats)

    def lissa_grid(self, num_queries: int) -> tuple[int, int]:
        """Return ``(repeat_groups, query_groups)``: how :meth:`ihvp` splits a LiSSA solve over the ranks.

        The repeats are split first. Each LiSSA step builds its batch's graph once for all query rows and
        adds one backward pass per row, or one batched pass on small models (``FunctionalLoss.hvps``), so a
        rank saves more by running fewer steps than by solving fewer rows. Ranks left over once every repeat
        group has one repeat split the query rows: with one repeat and two ranks, each rank solves half of
        the queries. Ranks outside the grid only join the all-reduce. Without a process group, or with
        another solver, the grid is ``(1, 1)``.
        """
        _, world_size = rank_and_world()
        if world_size == 1 or not isinstance(self.solver, LiSSASolver):
            return 1, 1
        repeat_groups = max(d for d in range(1, world_size + 1) if world_size % d == 0 and d <= self.solver.repeats)
        query_groups = max(1, min(world_size // repeat_groups, num_queries))
        return repeat_groups, query_groups

    def train_gradients(self, indices: Sequence[int]) -> Tensor:
        """Return per-example gradients of the given training examples, shape ``[len(indices), P]``."""
        with influence_mode(self.model):
            return self.loss.per_example_gradients(self.train.batch(list(indices)), vectorize=self.vectorize)

    def scores(
        self,
        ihvps: Tensor,
        indices: Sequence[int] | None = None,
        *,
        divide_by_train_size: bool = False,
        progress: bool = False,
    ) -> Tensor:
        """Score training examples against each ``s_test`` without keeping all their gradients in memory.

        Args:
            ihvps: ``s_test`` vectors, shape ``[Q, P]``.
            indices: Dataset positions of the candidates; defaults to the whole training set.
            divide_by_train_size: Divide every score by the training-set size.
            progress: Show a progress bar.

        Returns:
            Scores of shape ``[Q, len(indices)]``; negative is helpful, positive is harmful.
        """
        positions = self.train.indices if indices is None else [int(i) for i in indices]
        rank, world_size = rank_and_world()
        shares = [share(len(positions), r, world_size) for r in range(world_size)]
        start, stop = shares[rank]
        local = self._score_positions(ihvps, positions[start:stop], progress=progress and rank == 0)
        scores = all_gather_columns(local, [b - a for a, b in shares])
        if divide_by_train_size:
            scores = scores / len(self.train)
        return scores

    def row_scores(
        self, ihvps: Tensor | PendingSum, candidates: Sequence[Sequence[int] | Tensor], *, progress: bool = False
    ) -> tuple[list[Tensor], list[float]]:
        """Score each ``s_test`` row against its own candidates, with one exchange for all rows.

        Row ``q`` of ``ihvps`` is scored on the training positions ``candidates[q]``, as
        ``scores(ihvps[q : q + 1], candidates[q])`` would. Under a process group each rank scores its
        share of every row's candidates and a single all-gather collects them all, where a call of
        :meth:`scores` per row would exchange once per row. Where scoring uses per-example gradients (see
        :meth:`_scores_union`), all rows are scored together over the union of their candidates, which
        computes each shared candidate's gradient once. Those scores equal the row-by-row ones up to
        rounding. Given the :class:`PendingSum` of :meth:`start_ihvp`, the union's scoring computes the
        rank's candidate gradients (up to ``OVERLAP_GRADIENT_ELEMENTS`` elements) before it waits for the
        sum over the ranks; the other paths wait first.

        Args:
            ihvps: ``s_test`` vectors, shape ``[Q, P]``, or the value of :meth:`start_ihvp`.
            candidates: One list or 1-D integer tensor of dataset positions per row, ``Q`` of them.
            progress: Show progress bars over the rows and each row's candidates.

        Returns:
            Each row's scores, shape ``[len(candidates[q])]``, and each row's seconds: its own scoring
            plus an equal part of the exchange, or an equal part of the whole when the rows share a pass.
        """
        if len(ihvps.shape) != 2 or ihvps.shape[0] != len(candidates):
            raise ValueError(
                f"`ihvps` must have one row per candidate list, [{len(candidates)}, P], got {tuple(ihvps.shape)}."
            )
        if not candidates:
            if isinstance(ihvps, PendingSum):
                ihvps.result()  # Every started sum is waited for, so no rank leaves one in flight.
            return [], []
        if self._scores_union(len(candidates)):
            return self._union_row_scores(ihvps, candidates, progress=progress)
        begin = time.perf_counter()
        if isinstance(ihvps, PendingSum):
            ihvps = ihvps.result()
        waited = time.perf_counter() - begin
        rank, world_size = rank_and_world()
        local, seconds, row_sizes = [], [], []
        rows = tqdm(candidates, desc="FastIF scoring", disable=not progress or rank != 0 or len(candidates) == 1)
        for row, positions in enumerate(rows):
            positions = _position_list(positions)
            shares = [share(len(positions), r, world_size) for r in range(world_size)]
            start, stop = shares[rank]
            begin = time.perf_counter()
            row_progress = progress and rank == 0
            local.append(self._score_positions(ihvps[row : row + 1], positions[start:stop], progress=row_progress)[0])
            seconds.append(time.perf_counter() - begin)
            row_sizes.append([b - a for a, b in shares])
        begin = time.perf_counter()
        # The gathered vector contains rank 0's share of every row, then rank 1's, and so on.
        rank_sizes = [sum(sizes[r] for sizes in row_sizes) for r in range(world_size)]
        pieces = list(all_gather_columns(torch.cat(local)[None], rank_sizes)[0].split(rank_sizes))
        exchange = (time.perf_counter() - begin + waited) / len(candidates)
        results = []
        for sizes in row_sizes:
            parts = []
            for r, size in enumerate(sizes):
                parts.append(pieces[r][:size])
                pieces[r] = pieces[r][size:]
            results.append(torch.cat(parts))
        return results, [value + exchange for value in seconds]

    def _scores_union(self, num_rows: int) -> bool:
        """Return whether :meth:`row_scores` scores all rows together over the union of their candidates.

        With ``score_method="gradient"`` the union computes each shared candidate's gradient once. With
        "auto" it does so on models of at most ``SHARED_SCORING_MAX_PARAMETERS`` parameters, where it
        replaces forward-mode calls per row. With "jvp", each row keeps its own forward-mode pass.
        """
        if num_rows < 2 or self._resolve_score_method(num_rows) != "gradient":
            return False
        return self.score_method == "gradient" or self.selection.numel <= SHARED_SCORING_MAX_PARAMETERS

    def _union_row_scores(
        self, ihvps: Tensor | PendingSum, candidates: Sequence[Sequence[int] | Tensor], *, progress: bool
    ) -> tuple[list[Tensor], list[float]]:
        """Score every row on the union of the candidate lists with per-example gradients, then split it.

        Under a process group each rank scores a contiguous share of the union's columns and sends only
        the entries that some row requests, padded to the largest rank's count, where the whole
        ``[Q, len(union)]`` table would carry every row's score of every candidate. Each row's seconds are
        an equal part of the whole, the wait for a :class:`PendingSum` included.
        """
        begin = time.perf_counter()
        rows_positions = [_position_tensor(positions) for positions in candidates]
        lengths = [len(positions) for positions in rows_positions]
        flat = torch.cat(rows_positions)
        entry_rows = torch.repeat_interleave(torch.arange(len(candidates)), torch.as_tensor(lengths))
        union, columns = torch.unique(flat, return_inverse=True)  # sorted, and each entry's column
        rank, world_size = rank_and_world()
        shares = [share(len(union), r, world_size) for r in range(world_size)]
        start, stop = shares[rank]
        local = self._union_share_scores(ihvps, union[start:stop].tolist(), progress=progress and rank == 0)
        entry_rows, columns = entry_rows.to(local.device), columns.to(local.device)
        if world_size == 1:
            values = local[entry_rows, columns]
        else:
            # Each entry belongs to the rank whose share contains its column. Each rank sends its entries
            # in entry order, and the gathered pieces are put back in place.
            boundaries = torch.as_tensor([b for _, b in shares[:-1]], device=local.device)
            owners = torch.bucketize(columns, boundaries, right=True)
            mine = (owners == rank).nonzero().squeeze(1)
            sent = local[entry_rows[mine], columns[mine] - start]
            sizes = torch.bincount(owners, minlength=world_size).tolist()
            order = torch.argsort(owners, stable=True)
            values = torch.empty(len(flat), dtype=local.dtype, device=local.device)
            values[order] = all_gather_columns(sent[None], sizes)[0]
        rows = [row.clone() for row in values.split(lengths)]
        seconds = (time.perf_counter() - begin) / len(candidates)
        return rows, [seconds] * len(candidates)

    def _union_share_scores(self, ihvps: Tensor | PendingSum, positions: list[int], *, progress: bool) -> Tensor:
        """Score a rank's share of the union with per-example gradients, computed before the wait when they fit.

        While a :class:`PendingSum` is in flight, the gradients of ``positions`` do not depend on it, so
        they are computed first and the wait for the other ranks' LiSSA sums overlaps them. The scores are
        those of :meth:`_score_positions`, batch by batch.
        """
        if not isinstance(ihvps, PendingSum):
            return self._score_positions(ihvps, positions, progress=progress)
        if not ihvps.in_flight or not positions or len(positions) * self.selection.numel > OVERLAP_GRADIENT_ELEMENTS:
            return self._score_positions(ihvps.result(), positions, progress=progress)
        gradients = []
        starts = range(0, len(positions), self.gradient_batch_size)
        with influence_mode(self.model):
            for start in tqdm(starts, desc="Scoring candidates", disable=not progress, leave=False):
                batch = self.train.batch(positions[start : start + self.gradient_batch_size])
                gradients.append(self.loss.per_example_gradients(batch, vectorize=self.vectorize))
        s_tests = ihvps.result()
        # The empty first block gives the concatenation the dtype that _score_positions gives it.
        blocks = [torch.zeros(s_tests.shape[0], 0, dtype=s_tests.dtype, device=s_tests.device)]
        blocks += [influence_scores(batch_gradients, s_tests) for batch_gradients in gradients]
        return torch.cat(blocks, dim=1)

    def _score_positions(self, ihvps: Tensor, positions: list[int], *, progress: bool) -> Tensor:
        chunks = [torch.zeros(ihvps.shape[0], 0, dtype=ihvps.dtype, device=ihvps.device)]
        starts = range(0, len(positions), self.gradient_batch_size)
        with influence_mode(self.model):
            for start in tqdm(starts, desc="Scoring candidates", disable=not progress, leave=False):
                chunk = positions[start : start + self.gradient_batch_size]
                batch = self.train.batch(chunk)
                chunks.append(self._score_batch(batch, ihvps))
        return torch.cat(chunks, dim=1)

    def _score_batch(self, batch: Any, ihvps: Tensor) -> Tensor:
        if self._resolve_score_method(len(ihvps)) == "jvp":
            try:
                return -self.loss.per_example_directional_derivatives(batch, ihvps).T.to(ihvps.dtype)
            except (RuntimeError, NotImplementedError) as error:
                if self.score_method == "jvp":
                    raise RuntimeError(
                        f"Forward-mode scoring (score_method='jvp') failed: {error}. "
                        "Use score_method='gradient' for models with operations that lack forward-mode AD."
                    ) from error
                log.warning("Forward-mode scoring failed (%s); scoring with per-example gradients instead.", error)
                self._jvp_unsupported = True
        grads = self.loss.per_example_gradients(batch, vectorize=self.vectorize)
        return influence_scores(grads, ihvps)

    def _resolve_score_method(self, num_vectors: int) -> str:
        if self.score_method != "auto":
            return self.score_method
        return "jvp" if num_vectors == 1 and not self._jvp_unsupported else "gradient"

    def compute(self, query_batch: Any, indices: Sequence[int] | None = None, *, mode: QueryMode = "mean") -> Tensor:
        """Return scores ``[Q, N]`` of the candidates (default: every training example) on the queries."""
        return self.scores(self.ihvp(self.query_gradients(query_batch, mode=mode)), indices)


def _position_tensor(positions: Sequence[int] | Tensor) -> Tensor:
    """Return dataset positions as a 1-D int64 CPU tensor, without a Python loop over a tensor's items."""
    if isinstance(positions, Tensor):
        if (
            positions.dim() != 1
            or positions.is_floating_point()
            or positions.is_complex()
            or positions.dtype == torch.bool
        ):
            raise ValueError(
                f"A candidate tensor must be 1-D with an integer dtype, but got shape {tuple(positions.shape)} "
                f"and dtype {positions.dtype}. Pass one 1-D tensor or list of dataset positions per row."
            )
        return positions.detach().to(device="cpu", dtype=torch.long)
    return torch.as_tensor([int(i) for i in positions], dtype=torch.long)


def _position_list(positions: Sequence[int] | Tensor) -> list[int]:
    return _position_tensor(positions).tolist()


def compute_influences(
    model: nn.Module,
    loss_fn: LossFn,
    train_dataset: Dataset,
    query_batch: Any,
    solver: str = "lissa",
    weight_decay: float = 0.0,
    **solver_options: Any,
) -> Tensor:
    """Compute the influence of every training example on the mean loss of a query batch.

    A score is ``-grad L(query)^T H^-1 grad L(train)``: the predicted change of the query loss when the
    training example is up-weighted. Negative is helpful, positive is harmful.

    Args:
        model: Any ``nn.Module``.
        loss_fn: ``loss_fn(model, batch)`` returning the mean loss over the batch.
        train_dataset: Map-style dataset whose items collate with ``default_collate`` (or ``collate_fn``).
        query_batch: An already collated batch; its mean loss is the query.
        solver: "exact", "cg" or "lissa".
        weight_decay: Coefficient of ``||theta||^2`` in the training objective; enters the Hessian.
        solver_options: Solver options (``damping``, ``scale``, ``depth``, ``repeats``, ``batch_size``,
            ``seed``, ``progress``, ...) and the :class:`InfluenceComputer` options ``parameters``,
            ``weight_decay_in_gradients``, ``collate_fn``, ``gradient_batch_size``, ``vectorize``,
            ``score_method``, plus
            ``divide_by_train_size``.

    Returns:
        Scores of shape ``(len(train_dataset),)`` in dataset order.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from lightning_fastif import compute_influences
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Linear(3, 1)
        >>> x, y = torch.randn(20, 3), torch.randn(20, 1)
        >>> train = torch.utils.data.TensorDataset(x, y)
        >>> loss_fn = lambda m, batch: ((m(batch[0]) - batch[1]) ** 2).mean()
        >>> scores = compute_influences(model, loss_fn, train, (x[:2], y[:2]), solver="exact", damping=0.01)
        >>> scores.shape
        torch.Size([20])
    """
    computer_keys = (
        "parameters",
        "weight_decay_in_gradients",
        "collate_fn",
        "gradient_batch_size",
        "vectorize",
        "score_method",
    )
    computer_options = {key: solver_options.pop(key) for key in computer_keys if key in solver_options}
    divide = bool(solver_options.pop("divide_by_train_size", False))
    computer = InfluenceComputer(
        model, loss_fn, train_dataset, solver=solver, weight_decay=weight_decay, **computer_options, **solver_options
    )
    ihvps = computer.ihvp(computer.query_gradients(query_batch))
    return computer.scores(ihvps, divide_by_train_size=divide)[0]
