"""Benchmark FastIF against the original influence functions on MiniLM and the bundled MNLI data.

Both methods explain the same HANS queries that the model gets wrong, with the same model, the same
parameter selection (last two encoder layers, pooler and classifier) and the same training set:

* the original influence functions (Koh and Liang 2017) score every training example, with an ihvp
  ``s_test`` from LiSSA on batches of 128 training examples;
* FastIF (Guo et al. 2021) scores only the ``k`` nearest neighbors of the query in a faiss index of
  classifier-input features, with LiSSA on single training examples.

Both use LiSSA's ``damping`` 5e-3 and ``scale`` 1e4 (the library defaults). At full scale both run
LiSSA for 1,000 steps, which for the original costs hours on a small CPU. So each method runs LiSSA at a
reduced depth (``--original-depth``, ``--fastif-depth``), and the full-scale times are extrapolated
from the measured time per LiSSA step. Everything else is measured at full scale: the kNN index build
and search, the query gradients and the scoring of all training examples (original) and of the ``k``
candidates (FastIF). The score correlations use the reduced-depth scores.

Measurement is interleaved so that machine noise hits both methods: per query the two ihvp solves
alternate which runs first, and the original's scoring pass over the training set runs in one slice per
query, alternating with FastIF's candidate scoring. The original's scoring pass scores all queries at
once, because its per-example gradients do not depend on the query. A per-query run of the original
repeats that pass, so the pass's total time is the original's scoring time of each query.

The FastIF stages are the calls ``FastIF.explain`` makes (``query_features`` and ``candidates``, then
``computer.ihvp(computer.query_gradients(...))``, then ``computer.scores``), timed one by one with
``time.perf_counter``.

It prints two markdown tables and writes them, with the command and the machine, to the section
"FastIF against the original influence functions" of ``docs/benchmarks.md``, replacing only that
section.

Usage::

    python benchmarks/fastif_vs_original.py
    python benchmarks/fastif_vs_original.py --checkpoint none --train-size 500 --k 100 \\
        --original-depth 2 --fastif-depth 5 --num-queries 2 --no-docs
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from reporting import load_average, machine_description, read_status_kib, replace_section  # noqa: E402
from scipy import stats  # noqa: E402
from torch import Tensor  # noqa: E402

from lightning_fastif.fastif import FastIF, FastIFConfig  # noqa: E402
from lightning_fastif.functional.params import influence_mode  # noqa: E402
from lightning_fastif.functional.solvers import LiSSASolver  # noqa: E402
from lightning_fastif.influence import SCORE_METHODS, InfluenceComputer  # noqa: E402
from lightning_fastif.nli import (  # noqa: E402
    HANS_LABELS,
    NLIClassifier,
    NLIDataset,
    balanced_hans_sample,
    collate_nli,
    load_tokenizer,
    read_nli_jsonl,
    to_hans_predictions,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DOCS = REPO_ROOT / "docs" / "benchmarks.md"
DEFAULT_CHECKPOINT = "runs/mnli_hans/checkpoints/minilm-mnli.ckpt"
SECTION_TITLE = "FastIF against the original influence functions"
MODEL_NAME = "all-MiniLM-L6-v2"

# The data of examples/mnli_hans/config.yaml: 6,000 MNLI training rows and 3,000 HANS rows (100 per subcase).
TRAIN_PATH = "mnli/train.jsonl.gz"
HANS_PATH = "hans/evaluation.jsonl.gz"
DATA_SEED = 0
HANS_SIZE = 3000
MAX_LENGTH = 128

# LiSSA at full scale: both methods run 1,000 steps (FastIF's MNLI setting and the library default), the
# original on batches of 128 training examples and FastIF on single examples.
FULL_DEPTH = 1000
ORIGINAL_BATCH_SIZE = 128
FASTIF_BATCH_SIZE = 1

TOP = 10
PREDICTION_BATCH_SIZE = 64

# The FastIF paper reports about 80x faster influence at a Spearman correlation of at least 0.8 with the
# original method on MNLI (Guo et al., "FastIF: Scalable Influence Functions for Efficient Model
# Interpretation and Debugging", EMNLP 2021).
TARGET_SPEEDUP = 80.0
TARGET_SPEARMAN = 0.8
# Above this cosine with its query gradient, an s_test is close to a multiple of that gradient.
SAME_DIRECTION_COSINE = 0.99

MIB = 1024 * 1024


# ---------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint",
        default=DEFAULT_CHECKPOINT,
        help=f"NLIClassifier checkpoint to explain, or 'none' for MiniLM with an untrained head. "
        f"Default: {DEFAULT_CHECKPOINT}.",
    )
    parser.add_argument(
        "--train-size", type=int, default=6000, help="MNLI training rows, the candidates. Default: 6000."
    )
    parser.add_argument("--k", type=int, default=1000, help="FastIF's nearest neighbors per query. Default: 1000.")
    parser.add_argument("--num-queries", type=int, default=3, help="HANS errors explained. Default: 3.")
    parser.add_argument(
        "--original-depth",
        type=int,
        default=5,
        help=f"LiSSA steps of the original method (batches of {ORIGINAL_BATCH_SIZE}); its time at depth "
        f"{FULL_DEPTH} is extrapolated. Default: 5.",
    )
    parser.add_argument(
        "--fastif-depth",
        type=int,
        default=100,
        help=f"LiSSA steps of FastIF (single examples); its time at depth {FULL_DEPTH} is extrapolated "
        f"unless this is {FULL_DEPTH}. Default: 100.",
    )
    parser.add_argument("--damping", type=float, default=5e-3, help="LiSSA damping of both methods. Default: 5e-3.")
    parser.add_argument("--scale", type=float, default=1e4, help="LiSSA scale of both methods. Default: 1e4.")
    parser.add_argument(
        "--gradient-batch-size",
        type=int,
        default=16,
        help="Training examples per batch of per-example gradients while scoring, both methods. Default: 16.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of LiSSA's batch sampling. Default: 0.")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads of both methods. One is the default because on a shared 2-core machine, with "
        "two threads, a single-example LiSSA step took from 0.2 s to 3.6 s depending on the load. Default: 1.",
    )
    parser.add_argument(
        "--docs",
        type=Path,
        default=DEFAULT_DOCS,
        help="Markdown file whose benchmark section is replaced. Default: docs/benchmarks.md.",
    )
    parser.add_argument(
        "--score-method",
        choices=SCORE_METHODS,
        default="auto",
        help="How FastIF scores its candidates; 'auto' uses forward-mode JVP for one query. The original always "
        "scores all training examples with per-example gradients, once for all queries. Default: auto.",
    )
    parser.add_argument("--no-docs", action="store_true", help="Print the tables without writing --docs.")
    args = parser.parse_args(argv)
    validate_args(parser, args)
    return args


def validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("train_size", "k", "num_queries", "original_depth", "fastif_depth", "gradient_batch_size", "threads"):
        value = getattr(args, name)
        if value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, but got {value}.")
    if args.k > args.train_size:
        parser.error(f"--k {args.k} is larger than --train-size {args.train_size}. Pass a k of at most the train size.")
    if args.num_queries > args.train_size:
        parser.error(f"--num-queries {args.num_queries} is larger than --train-size {args.train_size}.")
    for name in ("original_depth", "fastif_depth"):
        if getattr(args, name) > FULL_DEPTH:
            parser.error(f"--{name.replace('_', '-')} must be at most {FULL_DEPTH}, but got {getattr(args, name)}.")
    if args.checkpoint != "none" and not Path(args.checkpoint).is_file():
        parser.error(
            f"--checkpoint {args.checkpoint!r} not found. Train it with "
            "`python -m lightning_fastif fit --config examples/mnli_hans/config.yaml`, or pass --checkpoint none."
        )


# ---------------------------------------------------------------------------------------------------
# Model, data and queries
# ---------------------------------------------------------------------------------------------------


def load_module(checkpoint: str) -> NLIClassifier:
    """Load the classifier in eval mode; ``"none"`` gives MiniLM with a classification head drawn from seed 0."""
    if checkpoint == "none":
        torch.manual_seed(0)
        module = NLIClassifier(model_name_or_path=MODEL_NAME)
    else:
        module = NLIClassifier.load_from_checkpoint(checkpoint, map_location="cpu")
    return module.eval()


def tokenizer_of(module: NLIClassifier) -> Any:
    if module.tokenizer is not None:
        return module.tokenizer
    return load_tokenizer(module.hparams.get("tokenizer_name_or_path") or module.hparams["model_name_or_path"])


def build_datasets(tokenizer: Any, train_size: int) -> tuple[NLIDataset, NLIDataset]:
    """Rebuild the training and HANS sets of ``NLIDataModule`` with the settings of the MNLI/HANS example."""
    train_rows = read_nli_jsonl(TRAIN_PATH, limit=train_size, seed=DATA_SEED)
    hans_rows = balanced_hans_sample(read_nli_jsonl(HANS_PATH), HANS_SIZE, seed=DATA_SEED)
    train = NLIDataset(train_rows, tokenizer, max_length=MAX_LENGTH)
    hans = NLIDataset(hans_rows, tokenizer, max_length=MAX_LENGTH)
    return train, hans


@dataclass(frozen=True)
class Query:
    """A HANS example the model gets wrong.

    Attributes:
        index: Position in the HANS dataset.
        heuristic: HANS heuristic, such as ``"lexical_overlap"``.
        gold: Gold HANS label.
        predicted: Predicted HANS label.
    """

    index: int
    heuristic: str
    gold: str
    predicted: str


def hans_errors(module: NLIClassifier, hans: NLIDataset, positions: Sequence[int]) -> list[Query]:
    """Return the misclassified examples among ``positions`` of ``hans``, in the given order."""
    batch = collate_nli([hans[i] for i in positions])
    predictions = to_hans_predictions(module.influence_predictions(batch))
    errors = []
    for position, gold, predicted in zip(positions, batch["hans_labels"].tolist(), predictions.tolist(), strict=True):
        if gold != predicted:
            row = hans.rows[position]
            errors.append(Query(position, row["heuristic"], HANS_LABELS[gold], HANS_LABELS[predicted]))
    return errors


def select_queries(module: NLIClassifier, hans: NLIDataset, count: int) -> list[Query]:
    """Pick ``count`` HANS errors, taking the heuristics in turn and each heuristic's rows in dataset order.

    Raises:
        RuntimeError: If the model gets fewer than ``count`` HANS examples wrong.
    """
    by_heuristic: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(hans.rows):
        by_heuristic[row["heuristic"]].append(i)
    found: dict[str, list[Query]] = {name: [] for name in by_heuristic}
    scanned = dict.fromkeys(by_heuristic, 0)
    selected: list[Query] = []
    while len(selected) < count:
        progressed = False
        for name, positions in by_heuristic.items():
            if len(selected) == count:
                break
            while not found[name] and scanned[name] < len(positions):
                chunk = positions[scanned[name] : scanned[name] + PREDICTION_BATCH_SIZE]
                scanned[name] += len(chunk)
                found[name].extend(hans_errors(module, hans, chunk))
            if found[name]:
                selected.append(found[name].pop(0))
                progressed = True
        if not progressed:
            raise RuntimeError(
                f"The model gets only {len(selected)} of {len(hans)} HANS examples wrong, fewer than "
                f"--num-queries {count}. Pass a smaller --num-queries."
            )
    return selected


# ---------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------


@dataclass
class Stage:
    """One timed stage of one method.

    Attributes:
        seconds: Wall-clock seconds from ``time.perf_counter``.
        peak_rss_mib: Peak resident set size of the process during the stage (``VmHWM`` after a reset).
        rss_rise_mib: How far that peak rose above the RSS at the start of the stage.
    """

    seconds: float = 0.0
    peak_rss_mib: float = 0.0
    rss_rise_mib: float = 0.0


@contextmanager
def measure(stage: Stage) -> Iterator[None]:
    """Time the block and record the process's peak RSS during it (Linux ``/proc``) into ``stage``."""
    before = read_status_kib("VmRSS")
    # Writing "5" resets the peak RSS (VmHWM) to the current RSS, as proc(5) documents for clear_refs.
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")
    start = time.perf_counter()
    yield
    stage.seconds = time.perf_counter() - start
    peak = read_status_kib("VmHWM")
    stage.peak_rss_mib = peak / 1024
    stage.rss_rise_mib = (peak - before) / 1024


@dataclass
class Solve:
    """A timed ``s_test``: the query gradient and then LiSSA.

    Attributes:
        stage: Time and memory of the whole solve.
        step_seconds: Seconds of each LiSSA step, from the step callback's timestamps.
        s_test: The ihvp, shape ``[1, P]``.
        query_gradient: The query gradient, shape ``[1, P]``.
    """

    stage: Stage
    step_seconds: list[float]
    s_test: Tensor
    query_gradient: Tensor

    @property
    def depth(self) -> int:
        return len(self.step_seconds)

    @property
    def seconds_per_step(self) -> float:
        return sum(self.step_seconds) / self.depth

    @property
    def overhead_seconds(self) -> float:
        """Seconds outside the LiSSA steps: the query gradient and the solver's setup."""
        return self.stage.seconds - sum(self.step_seconds)

    def seconds_at_depth(self, depth: int) -> float:
        """Return the measured time, or its extrapolation ``overhead + mean step time * depth``."""
        if depth == self.depth:
            return self.stage.seconds
        return self.overhead_seconds + self.seconds_per_step * depth


def timed_solve(computer: InfluenceComputer, solver: LiSSASolver, query_batch: Any) -> Solve:
    """Compute ``s_test`` of one query with ``solver``, timing the whole solve and each LiSSA step."""
    stamps: list[float] = []
    computer.solver = dataclasses.replace(
        solver, step_callback=lambda step, total, norm: stamps.append(time.perf_counter())
    )
    stage = Stage()
    with measure(stage):
        query_gradient = computer.query_gradients(query_batch)
        lissa_start = time.perf_counter()
        s_test = computer.ihvp(query_gradient)
    steps = np.diff([lissa_start, *stamps]).tolist()
    return Solve(stage, steps, s_test, query_gradient)


@dataclass
class QueryRun:
    """Everything measured for one query.

    Attributes:
        query: The HANS example.
        knn: FastIF's kNN stage: query features and the index search.
        candidates: FastIF's candidate train indices, nearest first, shape ``[k]``.
        fastif_solve: FastIF's ``s_test``.
        original_solve: The original method's ``s_test``.
        fastif_scoring: FastIF's scoring of its ``k`` candidates.
        fastif_scores: FastIF's scores of its candidates, shape ``[k]``.
        original_scores: The original method's scores of every training example, shape ``[N]``.
    """

    query: Query
    knn: Stage = field(default_factory=Stage)
    candidates: Tensor | None = None
    fastif_solve: Solve | None = None
    original_solve: Solve | None = None
    fastif_scoring: Stage = field(default_factory=Stage)
    fastif_scores: Tensor | None = None
    original_scores: Tensor | None = None


@dataclass
class Benchmark:
    """The two methods on one model and training set.

    Attributes:
        fastif: FastIF with its kNN index and per-example LiSSA.
        original: The original influence functions over every training example.
        fastif_solver: FastIF's reduced-depth LiSSA.
        original_solver: The original's reduced-depth LiSSA.
        hans: The HANS dataset the queries come from.
    """

    fastif: FastIF
    original: InfluenceComputer
    fastif_solver: LiSSASolver
    original_solver: LiSSASolver
    hans: NLIDataset

    def query_batch(self, query: Query) -> Any:
        return collate_nli([self.hans[query.index]])

    def run_knn(self, run: QueryRun) -> None:
        with measure(run.knn):
            run.candidates = self.fastif.candidates(self.fastif.query_features(self.query_batch(run.query)))

    def run_fastif_solve(self, run: QueryRun) -> None:
        run.fastif_solve = timed_solve(self.fastif.computer, self.fastif_solver, self.query_batch(run.query))

    def run_original_solve(self, run: QueryRun) -> None:
        run.original_solve = timed_solve(self.original, self.original_solver, self.query_batch(run.query))

    def run_fastif_scoring(self, run: QueryRun) -> None:
        if run.fastif_solve is None or run.candidates is None:
            raise RuntimeError("FastIF's scoring ran before its kNN search and s_test.")
        with measure(run.fastif_scoring):
            run.fastif_scores = self.fastif.computer.scores(run.fastif_solve.s_test, run.candidates.tolist())[0]


def build_benchmark(module: NLIClassifier, train: NLIDataset, hans: NLIDataset, args: argparse.Namespace) -> Benchmark:
    parameters = module.influence_parameters()

    def loss_fn(model: Any, batch: Any) -> Tensor:
        return model.influence_loss(batch)

    config = FastIFConfig(
        k=args.k,
        damping=args.damping,
        scale=args.scale,
        depth=args.fastif_depth,
        batch_size=FASTIF_BATCH_SIZE,
        seed=args.seed,
        gradient_batch_size=args.gradient_batch_size,
        score_method=args.score_method,
    )
    fastif = FastIF(
        module, loss_fn, module.influence_features, train, collate_fn=collate_nli, parameters=parameters, config=config
    )
    original_solver = LiSSASolver(
        damping=args.damping,
        scale=args.scale,
        depth=args.original_depth,
        batch_size=ORIGINAL_BATCH_SIZE,
        seed=args.seed,
    )
    original = InfluenceComputer(
        module,
        loss_fn,
        train,
        solver=original_solver,
        parameters=parameters,
        collate_fn=collate_nli,
        gradient_batch_size=args.gradient_batch_size,
    )
    return Benchmark(fastif, original, config.solver(), original_solver, hans)


def warm_up(bench: Benchmark, query: Query) -> float:
    """Run each kind of computation once, untimed, so that one-time setup costs land in no stage.

    The first Hessian-vector products of a process take several times longer than later ones.
    """
    start = time.perf_counter()
    computer = bench.original
    batch = bench.query_batch(query)
    vector = computer.query_gradients(batch)[0]
    with influence_mode(bench.fastif.model):
        for positions in ([0], [1], list(range(min(ORIGINAL_BATCH_SIZE, len(computer.train))))):
            computer.loss.hvp(computer.train.batch(positions), vector)
    computer.scores(vector.unsqueeze(0), list(range(min(computer.gradient_batch_size, len(computer.train)))))
    bench.fastif.query_features(batch)
    return time.perf_counter() - start


def run_benchmark(bench: Benchmark, queries: Sequence[Query]) -> tuple[Stage, list[QueryRun], Stage]:
    """Run both methods on every query, interleaved.

    Returns:
        The kNN index build, the per-query results and the original's whole scoring pass.
    """
    index_build = Stage()
    with measure(index_build):
        bench.fastif.refresh_index()
    print(f"kNN index build: {index_build.seconds:.1f} s", flush=True)

    runs = [QueryRun(query) for query in queries]
    for i, run in enumerate(runs):
        bench.run_knn(run)
        solves = [bench.run_fastif_solve, bench.run_original_solve]
        for solve in solves if i % 2 == 0 else solves[::-1]:
            solve(run)
        fastif_seconds, original_seconds = run.fastif_solve.stage.seconds, run.original_solve.stage.seconds
        print(
            f"query {i + 1}/{len(runs)}: kNN {run.knn.seconds:.2f} s, "
            f"s_test FastIF {fastif_seconds:.1f} s, original {original_seconds:.1f} s",
            flush=True,
        )

    original_pass = score_interleaved(bench, runs)
    return index_build, runs, original_pass


def score_interleaved(bench: Benchmark, runs: list[QueryRun]) -> Stage:
    """Score FastIF's candidates per query, alternating with slices of the original's scoring pass.

    The original's pass scores every training example against all queries' ``s_test`` at once, in one
    slice of the training set per query. Its stage is the sum of the slices' times and their largest peak.
    """
    s_tests = torch.cat([run.original_solve.s_test for run in runs])  # [Q, P]
    slices = np.array_split(np.arange(len(bench.original.train)), len(runs))
    original_pass = Stage()
    chunks: list[Tensor] = []

    def score_slice(positions: np.ndarray) -> None:
        stage = Stage()
        with measure(stage):
            chunks.append(bench.original.scores(s_tests, positions.tolist()))
        original_pass.seconds += stage.seconds
        original_pass.peak_rss_mib = max(original_pass.peak_rss_mib, stage.peak_rss_mib)
        original_pass.rss_rise_mib = max(original_pass.rss_rise_mib, stage.rss_rise_mib)
        print(f"original scoring: {len(positions)} examples in {stage.seconds:.1f} s", flush=True)

    for i, (run, positions) in enumerate(zip(runs, slices, strict=True)):
        steps: list[Callable[[], None]] = [partial(bench.run_fastif_scoring, run), partial(score_slice, positions)]
        for step in steps if i % 2 == 0 else steps[::-1]:
            step()
        print(f"query {i + 1}/{len(runs)}: FastIF scoring {run.fastif_scoring.seconds:.1f} s", flush=True)

    scores = torch.cat(chunks, dim=1)  # [Q, N]
    for run, row in zip(runs, scores, strict=True):
        run.original_scores = row
    return original_pass


# ---------------------------------------------------------------------------------------------------
# Agreement and speed-up
# ---------------------------------------------------------------------------------------------------


def cosine(a: Tensor, b: Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def top_recall(original_scores: Tensor, candidates: Tensor, *, harmful: bool) -> float:
    """Return the share of the original's ``TOP`` most helpful (negative) or harmful scores among the candidates."""
    top = torch.topk(original_scores, TOP, largest=harmful).indices
    return float(torch.isin(top, candidates).double().mean())


@dataclass
class Agreement:
    """How FastIF's scores on its candidates agree with the original's scores of the same examples."""

    pearson: float
    spearman: float
    recall_helpful: float
    recall_harmful: float
    s_test_cosine: float
    fastif_gradient_cosine: float
    original_gradient_cosine: float


def agreement(run: QueryRun) -> Agreement:
    original_on_candidates = run.original_scores[run.candidates].double().numpy()
    fastif = run.fastif_scores.double().numpy()
    return Agreement(
        pearson=float(stats.pearsonr(fastif, original_on_candidates).statistic),
        spearman=float(stats.spearmanr(fastif, original_on_candidates).statistic),
        recall_helpful=top_recall(run.original_scores, run.candidates, harmful=False),
        recall_harmful=top_recall(run.original_scores, run.candidates, harmful=True),
        s_test_cosine=cosine(run.fastif_solve.s_test, run.original_solve.s_test),
        fastif_gradient_cosine=cosine(run.fastif_solve.s_test, run.fastif_solve.query_gradient),
        original_gradient_cosine=cosine(run.original_solve.s_test, run.original_solve.query_gradient),
    )


@dataclass
class Totals:
    """Per-query seconds of both methods, measured at the reduced depths and extrapolated to full depth."""

    fastif_measured: float
    original_measured: float
    fastif_full: float
    original_full: float
    fastif_full_with_build: float

    @property
    def speedup_measured(self) -> float:
        return self.original_measured / self.fastif_measured

    @property
    def speedup_full(self) -> float:
        return self.original_full / self.fastif_full

    @property
    def speedup_full_with_build(self) -> float:
        return self.original_full / self.fastif_full_with_build


def totals(run: QueryRun, index_build: Stage, original_pass: Stage) -> Totals:
    fastif_rest = run.knn.seconds + run.fastif_scoring.seconds
    fastif_full = fastif_rest + run.fastif_solve.seconds_at_depth(FULL_DEPTH)
    return Totals(
        fastif_measured=fastif_rest + run.fastif_solve.stage.seconds,
        original_measured=run.original_solve.stage.seconds + original_pass.seconds,
        fastif_full=fastif_full,
        original_full=run.original_solve.seconds_at_depth(FULL_DEPTH) + original_pass.seconds,
        fastif_full_with_build=fastif_full + index_build.seconds,
    )


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def query_label(i: int, run: QueryRun) -> str:
    query = run.query
    return f"{i + 1}: HANS #{query.index}, {query.heuristic}, gold {query.gold}, predicted {query.predicted}"


def peak_of(*stages: Stage) -> str:
    return f"{max(stage.peak_rss_mib for stage in stages):,.0f} (+{max(stage.rss_rise_mib for stage in stages):,.0f})"


def timing_table(runs: Sequence[QueryRun], index_build: Stage, original_pass: Stage, args: argparse.Namespace) -> str:
    columns = [
        "query",
        "method",
        "kNN search (s)",
        "s_test measured (s)",
        "LiSSA s/step",
        f"s_test at depth {FULL_DEPTH} (s)",
        "scoring (s)",
        "total measured (s)",
        f"total at depth {FULL_DEPTH} (s)",
        "peak RSS, MiB (rise)",
    ]
    rows = []
    for i, run in enumerate(runs):
        total = totals(run, index_build, original_pass)
        fastif, original = run.fastif_solve, run.original_solve
        rows.append(
            [
                query_label(i, run),
                f"FastIF (k={args.k}, depth {fastif.depth}, batch {FASTIF_BATCH_SIZE})",
                f"{run.knn.seconds:.3f}",
                f"{fastif.stage.seconds:.1f}",
                f"{fastif.seconds_per_step:.3f}",
                extrapolated(fastif.seconds_at_depth(FULL_DEPTH), fastif.depth),
                f"{run.fastif_scoring.seconds:.1f} ({len(run.candidates):,} examples)",
                f"{total.fastif_measured:.1f}",
                extrapolated(total.fastif_full, fastif.depth),
                peak_of(run.knn, fastif.stage, run.fastif_scoring),
            ]
        )
        rows.append(
            [
                "",
                f"original (all, depth {original.depth}, batch {ORIGINAL_BATCH_SIZE})",
                "-",
                f"{original.stage.seconds:.1f}",
                f"{original.seconds_per_step:.2f}",
                extrapolated(original.seconds_at_depth(FULL_DEPTH), original.depth),
                f"{original_pass.seconds:.1f} ({len(run.original_scores):,} examples)",
                f"{total.original_measured:.1f}",
                extrapolated(total.original_full, original.depth),
                peak_of(original.stage, original_pass),
            ]
        )
    return markdown_table(columns, rows)


def extrapolated(seconds: float, depth: int) -> str:
    if depth == FULL_DEPTH:
        return f"{seconds:,.1f}"
    return f"{seconds:,.1f} (extrapolated)"


def agreement_table(runs: Sequence[QueryRun], index_build: Stage, original_pass: Stage) -> str:
    columns = [
        "query",
        "speed-up measured (reduced depths)",
        f"speed-up at depth {FULL_DEPTH} (extrapolated)",
        "same, index build charged to the query",
        "Pearson",
        "Spearman",
        f"recall top-{TOP} helpful",
        f"recall top-{TOP} harmful",
        "cos(s_test FastIF, original)",
        "cos(s_test, query gradient) FastIF / original",
    ]
    rows = []
    for i, run in enumerate(runs):
        total = totals(run, index_build, original_pass)
        agree = agreement(run)
        rows.append(
            [
                query_label(i, run),
                f"{total.speedup_measured:.1f}x",
                f"{total.speedup_full:.1f}x",
                f"{total.speedup_full_with_build:.1f}x",
                f"{agree.pearson:.3f}",
                f"{agree.spearman:.3f}",
                f"{agree.recall_helpful:.1f}",
                f"{agree.recall_harmful:.1f}",
                f"{agree.s_test_cosine:.4f}",
                f"{agree.fastif_gradient_cosine:.4f} / {agree.original_gradient_cosine:.4f}",
            ]
        )
    return markdown_table(columns, rows)


def verdict(runs: Sequence[QueryRun], index_build: Stage, original_pass: Stage) -> str:
    """Return a sentence on whether the median speed-up and median Spearman meet the FastIF paper's target."""
    speedup = statistics.median(totals(run, index_build, original_pass).speedup_full for run in runs)
    spearman = statistics.median(agreement(run).spearman for run in runs)
    met = speedup >= TARGET_SPEEDUP and spearman >= TARGET_SPEARMAN
    parts = []
    if speedup < TARGET_SPEEDUP:
        parts.append(f"the speed-up is below {TARGET_SPEEDUP:.0f}x")
    if spearman < TARGET_SPEARMAN:
        parts.append(f"the Spearman correlation is below {TARGET_SPEARMAN}")
    outcome = "met" if met else "not met: " + " and ".join(parts)
    sentence = (
        f"Target (FastIF paper): at least {TARGET_SPEEDUP:.0f}x faster at a Spearman correlation of at least "
        f"{TARGET_SPEARMAN}. Here the median over {len(runs)} queries is {speedup:.1f}x at depth {FULL_DEPTH} "
        f"(extrapolated) and Spearman {spearman:.3f} (at the reduced depths), so the target is {outcome}."
    )
    measured = statistics.median(totals(run, index_build, original_pass).speedup_measured for run in runs)
    with_build = statistics.median(totals(run, index_build, original_pass).speedup_full_with_build for run in runs)
    caveats = [
        f" The speed-up measured at the reduced depths is {measured:.1f}x, and {with_build:.1f}x at depth "
        f"{FULL_DEPTH} with the index build charged to each query."
    ]
    gradient_cosine = min(min(a.fastif_gradient_cosine, a.original_gradient_cosine) for a in map(agreement, runs))
    if gradient_cosine >= SAME_DIRECTION_COSINE:
        caveats.append(
            f" Both reduced-depth `s_test` have a cosine of at least {gradient_cosine:.4f} with their query "
            f"gradient, so the Spearman figure does not show that the two methods agree at depth {FULL_DEPTH}."
        )
    return sentence + "".join(caveats)


@dataclass
class Report:
    """What the docs section shows besides the tables."""

    argv: list[str]
    model: str
    num_train: int
    num_params: int
    queries: int
    loads: tuple[str, str]
    warm_up_seconds: float
    wall_seconds: float
    index_build: Stage


def format_section(report: Report, args: argparse.Namespace, tables: tuple[str, str], verdict_line: str) -> str:
    command = shlex.join(["python", "benchmarks/fastif_vs_original.py", *report.argv])
    build = report.index_build
    return f"""## {SECTION_TITLE}

The original influence functions (every training example a candidate, LiSSA on batches of
{ORIGINAL_BATCH_SIZE} training examples) against FastIF (the k = {args.k} nearest neighbors of the query in
a flat L2 faiss index of classifier-input features, LiSSA on single training examples, candidates scored
with `score_method={args.score_method!r}`), on {report.model}. Both use LiSSA damping {args.damping:g}
and scale {args.scale:g}, differentiate the last 2 encoder layers, the pooler and the classifier
(P = {report.num_params:,} parameters), and score {report.num_train:,} MNLI training examples
(`read_nli_jsonl("{TRAIN_PATH}", limit={args.train_size}, seed={DATA_SEED})`, {MAX_LENGTH} tokens at most).
The queries are {report.queries} HANS examples (from `balanced_hans_sample(..., {HANS_SIZE}, seed={DATA_SEED})`)
that the model gets wrong, taking the three heuristics in turn.

- Command: `{command}`
- Machine: {machine_description()}
- Load: 1-minute load average {report.loads[0]} at the start and {report.loads[1]} at the end of the run.
  A load above the number of cores means other processes shared them, which slows both methods.
- Wall time: {report.wall_seconds / 60:.1f} minutes, of which {report.warm_up_seconds:.0f} s of untimed
  warm-up.
- Measured (`time.perf_counter`, one run): the kNN index build over the training set, once
  ({build.seconds:.1f} s, peak RSS {build.peak_rss_mib:,.0f} MiB); per query the kNN search, each method's
  `s_test` (query gradient and LiSSA) at its reduced depth with the time of every LiSSA step, and FastIF's
  scoring of its k candidates; and the original's scoring of all {report.num_train:,} training examples,
  which ran once for all queries in one slice per query because its per-example gradients do not depend
  on the query. That pass's time is the original's scoring time of every query.
- Reduced depths: the original ran LiSSA for {args.original_depth} steps and FastIF for {args.fastif_depth}.
- Extrapolated (marked in the table): `s_test` at depth {FULL_DEPTH} is the measured time outside the
  LiSSA steps plus the mean measured time per step times {FULL_DEPTH}. The totals at depth {FULL_DEPTH}
  add the measured kNN search and scoring times. The speed-up is the original's total over FastIF's; the
  kNN index is built once per model, so the main speed-up leaves its build out and the next column
  charges it to the query.
- Interleaving: per query the two `s_test` solves alternate which runs first, and FastIF's candidate
  scoring alternates with the slices of the original's scoring pass.
- Peak RSS: the process's peak resident set size during a method's stages (`VmHWM` after a reset
  through `/proc/self/clear_refs`), with its rise above the RSS at the start of the stage in brackets.
  Both methods share the process, the model and the data, so the peak includes them.
- Agreement: Pearson and Spearman between FastIF's scores of its k candidates and the original's scores
  of the same examples, both at the reduced depths. Recall is the share of the original's top {TOP}
  helpful (most negative) and top {TOP} harmful examples over the whole training set that are among the
  k candidates. The last column compares each `s_test` with its query gradient: at a cosine near 1 the
  reduced-depth `s_test` is nearly a multiple of the query gradient, so the correlations test the kNN
  and scoring path more than how the two LiSSA estimates agree at depth {FULL_DEPTH}.

{tables[0]}

{tables[1]}

{verdict_line}
"""


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_at_start = load_average()

    module = load_module(args.checkpoint)
    train, hans = build_datasets(tokenizer_of(module), args.train_size)
    queries = select_queries(module, hans, args.num_queries)
    bench = build_benchmark(module, train, hans, args)
    num_params = bench.original.selection.numel
    print(f"{len(train):,} training examples, {len(queries)} queries, P = {num_params:,}", flush=True)

    warm_up_seconds = warm_up(bench, queries[0])
    print(f"warm-up: {warm_up_seconds:.1f} s (untimed)", flush=True)
    index_build, runs, original_pass = run_benchmark(bench, queries)

    tables = (timing_table(runs, index_build, original_pass, args), agreement_table(runs, index_build, original_pass))
    verdict_line = verdict(runs, index_build, original_pass)
    print()
    print(tables[0])
    print()
    print(tables[1])
    print()
    print(verdict_line)
    model = "MiniLM with an untrained classification head" if args.checkpoint == "none" else f"`{args.checkpoint}`"
    report = Report(
        argv=argv,
        model=f"all-MiniLM-L6-v2 ({model})",
        num_train=len(train),
        num_params=num_params,
        queries=len(queries),
        loads=(load_at_start, load_average()),
        warm_up_seconds=warm_up_seconds,
        wall_seconds=time.perf_counter() - started,
        index_build=index_build,
    )
    loads = report.loads
    print(f"\nTotal {report.wall_seconds:.0f} s, 1-minute load average {loads[0]} at start, {loads[1]} at end")
    if not args.no_docs:
        replace_section(args.docs, SECTION_TITLE, format_section(report, args, tables, verdict_line))
        print(f"Wrote the section {SECTION_TITLE!r} of {args.docs}")


if __name__ == "__main__":
    main()
