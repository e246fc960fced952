"""Two gloo CPU processes give the same scores as one process running the same LiSSA repeats."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_fastif import InfluenceComputer, LiSSASolver, compute_influences
from lightning_fastif.distributed import share
from lightning_fastif.functional import select_parameters
from lightning_fastif.influence import SHARED_SCORING_MAX_PARAMETERS
from lightning_fastif.results import read_jsonl
from tests.helpers.problems import logistic_problem
from tests.helpers.tiny_bert import tiny_bert

RTOL = 1e-6
OPTIONS = dict(solver="lissa", damping=1e-3, scale=5.0, depth=40, repeats=4, batch_size=7, seed=3)


def scores_in_one_process(repeats=4, mode="mean"):
    problem = logistic_problem(n=50)
    query = (problem.x[:3], problem.y[:3])
    options = {**OPTIONS, "repeats": repeats}
    if mode == "mean":
        return compute_influences(problem.model, problem.loss_fn, problem.dataset, query, **options)
    return InfluenceComputer(problem.model, problem.loss_fn, problem.dataset, **options).compute(query, mode=mode)


def worker(rank: int, world_size: int, store_path: str, out_dir: str, repeats: int = 4, mode: str = "mean") -> None:
    # A file store for the rendezvous, so the test reserves no port. gloo itself connects over loopback.
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    work = {"repeats": [], "rows": [], "scored": 0}
    one_repeat = LiSSASolver._one_repeat
    score_positions = InfluenceComputer._score_positions

    def record_repeat(self, loss, train, vectors, repeat, bar):
        work["repeats"].append(self.repeat_offset + repeat)
        work["rows"].append(len(vectors))
        return one_repeat(self, loss, train, vectors, repeat, bar)

    def record_scoring(self, ihvps, positions, *, progress):
        work["scored"] += len(positions)
        return score_positions(self, ihvps, positions, progress=progress)

    LiSSASolver._one_repeat = record_repeat
    InfluenceComputer._score_positions = record_scoring
    try:
        torch.set_num_threads(1)
        scores = scores_in_one_process(repeats, mode)
        torch.save({"scores": scores, **work}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one(tmp_path):
    mp.spawn(worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    first, second = (torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2))
    expected = scores_in_one_process()
    torch.testing.assert_close(first["scores"], expected, rtol=RTOL, atol=0)
    torch.testing.assert_close(second["scores"], expected, rtol=RTOL, atol=0)
    # Each rank ran half of the repeats and scored half of the 50 training examples.
    assert first["repeats"] == [0, 1]
    assert second["repeats"] == [2, 3]
    assert first["scored"] == 25
    assert second["scored"] == 25


def test_one_repeat_splits_queries(tmp_path):
    # With one repeat there are no repeats to share, so each rank solves its share of the 3 query rows.
    mp.spawn(worker, args=(2, str(tmp_path / "store"), str(tmp_path), 1, "each"), nprocs=2, join=True)
    first, second = (torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2))
    expected = scores_in_one_process(repeats=1, mode="each")
    assert expected.shape == (3, 50)
    torch.testing.assert_close(first["scores"], expected, rtol=RTOL, atol=0)
    torch.testing.assert_close(second["scores"], expected, rtol=RTOL, atol=0)
    assert first["repeats"] == [0]
    assert first["rows"] == [2]
    assert second["repeats"] == [0]
    assert second["rows"] == [1]


def deterministic_scores(solver):
    problem = logistic_problem(n=50)
    computer = InfluenceComputer(problem.model, problem.loss_fn, problem.dataset, solver=solver, damping=1e-3)
    return computer.compute((problem.x[:3], problem.y[:3]), mode="each")


def deterministic_worker(rank: int, world_size: int, store_path: str, out_dir: str, solver: str) -> None:
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        torch.save(deterministic_scores(solver), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_deterministic_solvers_match_one_process(tmp_path, solver):
    # Every rank runs the whole exact or CG solve, so its s_test must not be summed over the ranks.
    args = (2, str(tmp_path / "store"), str(tmp_path), solver)
    mp.spawn(deterministic_worker, args=args, nprocs=2, join=True)
    expected = deterministic_scores(solver)
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"rank{rank}.pt"), expected, rtol=RTOL, atol=0)


def test_share_covers_every_item_once():
    for total in (0, 1, 5, 8):
        for world_size in (1, 2, 3):
            shares = [share(total, rank, world_size) for rank in range(world_size)]
            assert [i for start, stop in shares for i in range(start, stop)] == list(range(total))
            sizes = [stop - start for start, stop in shares]
            assert max(sizes) - min(sizes) <= 1


def run_validate(out_dir, devices):
    script = Path(__file__).with_name("ddp_validate.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(script), str(out_dir), str(devices)], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return read_jsonl(out_dir / "step_0.jsonl")


def test_ddp_callback_matches_one_process(tmp_path):
    single = run_validate(tmp_path / "one", 1)
    double = run_validate(tmp_path / "two", 2)
    assert len(single) > 0
    assert [(r["query_index"], r["train_index"], r["kind"]) for r in double] == [
        (r["query_index"], r["train_index"], r["kind"]) for r in single
    ]
    for one, two in zip(single, double, strict=True):
        assert math.isclose(one["score"], two["score"], rel_tol=RTOL), (one, two)
    one_work = json.loads((tmp_path / "one" / "work_rank0.json").read_text())
    two_work = [json.loads((tmp_path / "two" / f"work_rank{rank}.json").read_text()) for rank in range(2)]
    # Each of the two ranks ran half of every query's LiSSA repeats, scored half of the candidates (one
    # more on one rank when their count is odd) and computed the kNN features of half of the training set.
    for work in two_work:
        assert work["repeats"] * 2 == one_work["repeats"]
        assert work["scored"] in (one_work["scored"] // 2, (one_work["scored"] + 1) // 2)
        assert work["feature_rows"] * 2 == one_work["feature_rows"]
    assert sum(work["scored"] for work in two_work) == one_work["scored"]
    assert one_work["feature_rows"] > 0


def run_repair(weights, out_dir, devices):
    script = Path(__file__).with_name("ddp_repair.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(script), str(weights), str(out_dir), str(devices)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return read_jsonl(out_dir / "repair.jsonl")


def test_ddp_repair_matches_one_process(tmp_path):
    from tests.callbacks.test_repair import fit_model, make_task

    weights = tmp_path / "weights.pt"
    torch.save(fit_model(make_task().train).state_dict(), weights)
    single = run_repair(weights, tmp_path / "one", 1)
    double = run_repair(weights, tmp_path / "two", 2)

    # Two strategies, each with the start record and 2 steps, written once (by rank zero).
    assert len(single) == 6
    assert len(double) == len(single)
    for one, two in zip(single, double, strict=True):
        assert (two["strategy"], two["step"]) == (one["strategy"], one["step"])
        assert two["anchor_indices"] == one["anchor_indices"]
        assert two["example_indices"] == one["example_indices"]
        for metric in ("target_acc", "holdout_acc", "source_acc"):
            assert two[metric] == one[metric], (metric, one, two)
        for a, b in zip(one["example_scores"], two["example_scores"], strict=True):
            assert math.isclose(a, b, rel_tol=RTOL), (one, two)
    assert any(record["example_scores"] for record in single)

    final_one = torch.load(tmp_path / "one" / "final.pt")
    final_two = torch.load(tmp_path / "two" / "final.pt")
    for name, tensor in final_one.items():
        torch.testing.assert_close(final_two[name], tensor, rtol=RTOL, atol=1e-7)

    one_work = json.loads((tmp_path / "one" / "work_rank0.json").read_text())
    assert one_work["repeats"] > 0
    for rank in range(2):
        work = json.loads((tmp_path / "two" / f"work_rank{rank}.json").read_text())
        assert work["repeats"] * 2 == one_work["repeats"]
        assert work["scored"] * 2 == one_work["scored"]


def test_lissa_grid_prefers_repeats(monkeypatch):
    problem = logistic_problem(n=20)
    computer = InfluenceComputer(problem.model, problem.loss_fn, problem.dataset, **OPTIONS)
    assert computer.lissa_grid(3) == (1, 1)  # Without a process group, one process does all the work.
    # (world size, repeats, queries) -> (repeat groups, query groups)
    cases = {
        (2, 4, 3): (2, 1),
        (2, 1, 3): (1, 2),
        (2, 1, 1): (1, 1),
        (4, 2, 8): (2, 2),
        (4, 3, 8): (2, 2),
        (4, 1, 3): (1, 3),
        (3, 2, 5): (1, 3),
    }
    for (world_size, repeats, queries), grid in cases.items():
        monkeypatch.setattr("lightning_fastif.influence.rank_and_world", lambda w=world_size: (0, w))
        computer.solver = LiSSASolver(repeats=repeats)
        assert computer.lissa_grid(queries) == grid, (world_size, repeats, queries)


def explain_five_queries():
    from torch.utils.data import default_collate

    from lightning_fastif.fastif import FastIF, FastIFConfig
    from lightning_fastif.hf import sequence_classification_loss
    from lightning_fastif.knn import classifier_input_features
    from tests.helpers.tiny_bert import tiny_bert, token_items

    model = tiny_bert().double()
    config = FastIFConfig(k=8, damping=1e-3, scale=100.0, depth=20, repeats=1, batch_size=4, seed=0)
    fastif = FastIF(
        model,
        sequence_classification_loss,
        lambda batch: classifier_input_features(model, batch),
        token_items(24),
        parameters=[r"encoder\.layer\.1\.", r"pooler\.", r"classifier\."],
        config=config,
    )
    results = fastif.explain(default_collate(token_items(5, seed=1)), mode="each")
    return torch.stack([r.candidate_indices for r in results]), torch.stack([r.scores for r in results])


def fastif_worker(rank: int, world_size: int, store_path: str, out_dir: str) -> None:
    import lightning_fastif.fastif

    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    import lightning_fastif.influence

    rows, gathers = [], []
    one_repeat = LiSSASolver._one_repeat
    gather = lightning_fastif.influence.all_gather_columns

    def record_repeat(self, loss, train, vectors, repeat, bar):
        rows.append(len(vectors))
        return one_repeat(self, loss, train, vectors, repeat, bar)

    def record_gather(local, sizes):
        gathers.append(sum(sizes))
        return gather(local, sizes)

    LiSSASolver._one_repeat = record_repeat
    lightning_fastif.influence.all_gather_columns = record_gather
    lightning_fastif.fastif.SHARED_SOLVE_QUERIES = 2
    lightning_fastif.fastif.BATCHED_SOLVE_QUERIES = 2
    try:
        torch.set_num_threads(1)
        candidates, scores = explain_five_queries()
        saved = {"candidates": candidates, "scores": scores, "rows": rows, "gathers": gathers}
        torch.save(saved, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_fastif_explain_splits_queries(tmp_path):
    # One repeat, 5 queries, at most 2 rows per rank's solve: chunks of 4 and 1 queries. The first chunk's
    # rows are split 2 and 2; the last query is solved by rank zero alone.
    mp.spawn(fastif_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    first, second = (torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2))
    candidates, scores = explain_five_queries()
    for result in (first, second):
        assert torch.equal(result["candidates"], candidates)
        torch.testing.assert_close(result["scores"], scores, rtol=RTOL, atol=0)
    assert first["rows"] == [2, 1]
    assert second["rows"] == [2]
    # One exchange of scores per chunk, carrying all of its queries' k=8 candidates: 4 x 8, then 1 x 8.
    # The tiny BERT's selected parameters are above the limit for scoring the union of the candidates.
    selection = select_parameters(tiny_bert(), [r"encoder\.layer\.1\.", r"pooler\.", r"classifier\."])
    assert selection.numel > SHARED_SCORING_MAX_PARAMETERS
    assert first["gathers"] == second["gathers"] == [32, 8]


CANDIDATE_LISTS = [[4, 9, 1, 30, 22], [7, 7], [], [0, 1, 2, 3, 5, 6, 8]]


def scores_per_row(candidate_lists=CANDIDATE_LISTS):
    problem = logistic_problem(n=50)
    computer = InfluenceComputer(problem.model, problem.loss_fn, problem.dataset, **OPTIONS)
    ihvps = computer.ihvp(computer.query_gradients((problem.x[:4], problem.y[:4]), mode="each"))
    rows, seconds = computer.row_scores(ihvps, candidate_lists)
    assert len(seconds) == len(rows) and all(value >= 0 for value in seconds)
    return ihvps, rows


def row_scores_worker(
    rank: int, world_size: int, store_path: str, out_dir: str, candidate_lists=CANDIDATE_LISTS
) -> None:
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    import lightning_fastif.influence

    gathers = []
    gather = lightning_fastif.influence.all_gather_columns

    def record_gather(local, sizes):
        gathers.append(sizes)
        return gather(local, sizes)

    lightning_fastif.influence.all_gather_columns = record_gather
    try:
        torch.set_num_threads(1)
        _, rows = scores_per_row(candidate_lists)
        torch.save({"rows": rows, "gathers": gathers}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_row_scores_match_scores_per_row(tmp_path):
    # Lists of unequal length, one of them empty, one with a repeated candidate, two sharing candidate 1.
    # Two processes and one give what `scores` gives row by row, up to rounding, because the rows are
    # scored together.
    mp.spawn(row_scores_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ihvps, rows = scores_per_row()
    problem = logistic_problem(n=50)
    computer = InfluenceComputer(problem.model, problem.loss_fn, problem.dataset, **OPTIONS)
    saved = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for row, positions in enumerate(CANDIDATE_LISTS):
        expected = computer.scores(ihvps[row : row + 1], positions)[0]
        assert rows[row].shape == (len(positions),)
        torch.testing.assert_close(rows[row], expected, rtol=1e-12, atol=0)
        for result in saved:
            torch.testing.assert_close(result["rows"][row], expected, rtol=RTOL, atol=0)
    # The 12 distinct candidates are split 6 and 6 in sorted order: [0, 1, 2, 3, 4, 5] and [6, 7, 8, 9,
    # 22, 30]. One exchange carries the 14 requested scores, each from the rank that owns its candidate.
    assert computer._scores_union(len(CANDIDATE_LISTS))
    for result in saved:
        assert result["gathers"] == [[7, 7]]


@pytest.mark.parametrize("candidate_lists", [[[3], [3], [], [3]], [[], [], [], []]])
def test_row_scores_union_below_ranks(tmp_path, candidate_lists):
    # One distinct candidate, or none, for two ranks. A rank with an empty share still joins the exchange.
    args = (2, str(tmp_path / "store"), str(tmp_path), candidate_lists)
    mp.spawn(row_scores_worker, args=args, nprocs=2, join=True)
    _, rows = scores_per_row(candidate_lists)
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        for row, positions in enumerate(candidate_lists):
            assert saved["rows"][row].shape == (len(positions),)
            torch.testing.assert_close(saved["rows"][row], rows[row], rtol=RTOL, atol=0)


def record_overlap_events() -> list[tuple[str, object]]:
    """Patch per-example gradients and ``PendingSum.result`` in this process to log their calls in order.

    Returns the list that receives ``("gradients", rows)`` and ``("sum", in_flight)`` entries.
    """
    from lightning_fastif.distributed import PendingSum
    from lightning_fastif.functional.gradients import FunctionalLoss

    events = []
    per_example_gradients = FunctionalLoss.per_example_gradients
    result = PendingSum.result

    def record_gradients(self, batch, **options):
        gradients = per_example_gradients(self, batch, **options)
        events.append(("gradients", len(gradients)))
        return gradients

    def record_result(self):
        events.append(("sum", self.in_flight))
        return result(self)

    FunctionalLoss.per_example_gradients = record_gradients
    PendingSum.result = record_result
    return events


def overlap_worker(rank: int, world_size: int, store_path: str, out_dir: str, overlap_elements: int) -> None:
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    import lightning_fastif.influence

    events = record_overlap_events()
    lightning_fastif.influence.OVERLAP_GRADIENT_ELEMENTS = overlap_elements
    try:
        torch.set_num_threads(1)
        problem = logistic_problem(n=50)
        computer = InfluenceComputer(problem.model, problem.loss_fn, problem.dataset, **OPTIONS)
        query_gradients = computer.query_gradients((problem.x[:4], problem.y[:4]), mode="each")
        events.clear()
        pending = computer.start_ihvp(query_gradients)
        rows, _ = computer.row_scores(pending, CANDIDATE_LISTS)
        torch.save({"rows": rows, "events": events}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("overlap_elements", [2**24, 0])
def test_union_gradients_overlap_the_sum(tmp_path, overlap_elements):
    # Each rank's 6 distinct candidates of CANDIDATE_LISTS fit under the limit, so their gradients (one batch
    # of 6) come before the wait for the LiSSA sums, which are still in flight. With a limit of 0 elements
    # the rank waits first. The scores are those of one process either way.
    args = (2, str(tmp_path / "store"), str(tmp_path), overlap_elements)
    mp.spawn(overlap_worker, args=args, nprocs=2, join=True)
    _, expected = scores_per_row()
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        if overlap_elements:
            assert saved["events"] == [("gradients", 6), ("sum", True)]
        else:
            assert saved["events"] == [("sum", True), ("gradients", 6)]
        for row, positions in enumerate(CANDIDATE_LISTS):
            assert saved["rows"][row].shape == (len(positions),)
            torch.testing.assert_close(saved["rows"][row], expected[row], rtol=RTOL, atol=0)


def explain_first_four(model, loss_fn, dataset, config):
    """Return the candidates ``[4, k]`` and scores ``[4, k]`` of FastIF for the dataset's first 4 rows as queries."""
    from lightning_fastif.fastif import FastIF

    fastif = FastIF(model, loss_fn, lambda batch: batch[0], dataset, config=config)
    results = fastif.explain(dataset[:4], mode="each")
    return torch.stack([r.candidate_indices for r in results]), torch.stack([r.scores for r in results])


def explain_logistic_queries():
    from lightning_fastif.fastif import FastIFConfig

    problem = logistic_problem(n=50)
    config = FastIFConfig(k=8, damping=1e-3, scale=5.0, depth=40, repeats=2, batch_size=7, seed=3)
    return explain_first_four(problem.model, problem.loss_fn, problem.dataset, config)


def explain_overlap_worker(rank: int, world_size: int, store_path: str, out_dir: str, explain) -> None:
    """Run ``explain()`` on one rank of a gloo group and save its candidates, scores and overlap events."""
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    events = record_overlap_events()
    try:
        torch.set_num_threads(1)
        candidates, scores = explain()
        torch.save({"candidates": candidates, "scores": scores, "events": events}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_fastif_scores_before_the_sum(tmp_path):
    # FastIF on a 10-parameter model scores the union of the 4 queries' candidates. Each rank computes the
    # 4 query gradients, runs one of the 2 repeats, and computes its candidates' gradients before it waits
    # for the sum of the repeats, which is still in flight.
    args = (2, str(tmp_path / "store"), str(tmp_path), explain_logistic_queries)
    mp.spawn(explain_overlap_worker, args=args, nprocs=2, join=True)
    candidates, scores = explain_logistic_queries()
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(saved["candidates"], candidates)
        torch.testing.assert_close(saved["scores"], scores, rtol=RTOL, atol=0)
        events = saved["events"]
        assert events[0] == ("gradients", 4)
        assert events.count(("sum", True)) == 1
        wait = events.index(("sum", True))
        assert wait == len(events) - 1
        assert wait >= 2
        assert all(kind == "gradients" for kind, _ in events[1:wait])


class MixedDtypeModel(torch.nn.Module):
    """A float32 hidden layer under a float64 output layer, with seeded weights."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.hidden = torch.nn.Linear(4, 3)
        self.output = torch.nn.Linear(3, 2).double()
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(torch.tanh(self.hidden(x.float())).double())


def mixed_dtype_loss(model, batch):
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


def explain_mixed_dtype_queries():
    from lightning_fastif.fastif import FastIFConfig

    generator = torch.Generator().manual_seed(2)
    x = torch.randn(40, 4, generator=generator)
    y = torch.randint(0, 2, (40,), generator=generator)
    dataset = torch.utils.data.TensorDataset(x, y)
    config = FastIFConfig(k=8, damping=1e-2, scale=5.0, depth=40, repeats=2, batch_size=7, seed=3)
    return explain_first_four(MixedDtypeModel(), mixed_dtype_loss, dataset, config)


def test_mixed_dtype_model_matches_one_process(tmp_path):
    # float32 and float64 parameters on the overlap path: each rank's candidate gradients come before
    # the wait for the LiSSA sum, and the scores are those of one process.
    args = (2, str(tmp_path / "store"), str(tmp_path), explain_mixed_dtype_queries)
    mp.spawn(explain_overlap_worker, args=args, nprocs=2, join=True)
    candidates, scores = explain_mixed_dtype_queries()
    assert torch.isfinite(scores).all()
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.equal(saved["candidates"], candidates)
        assert saved["scores"].dtype == scores.dtype
        torch.testing.assert_close(saved["scores"], scores, rtol=RTOL, atol=0)
        events = saved["events"]
        wait = events.index(("sum", True))
        assert wait == len(events) - 1
        assert wait >= 2
        assert all(kind == "gradients" for kind, _ in events[1:wait])


def test_row_scores_rejects_mismatched_rows():
    problem = logistic_problem(n=10)
    computer = InfluenceComputer(problem.model, problem.loss_fn, problem.dataset, solver="exact")
    with pytest.raises(ValueError, match=r"one row per candidate list, \[3, P\], got \(2, 3\)"):
        computer.row_scores(torch.zeros(2, 3), [[0], [1], [2]])
