"""Two gloo CPU processes give the same scores as one process running the same LiSSA repeats."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_fastif import InfluenceComputer, LiSSASolver, compute_influences
from lightning_fastif.distributed import share
from tests.helpers.problems import logistic_problem

RTOL = 1e-6
OPTIONS = dict(solver="lissa", damping=1e-3, scale=5.0, depth=40, repeats=4, batch_size=7, seed=3)


def scores_in_one_process():
    problem = logistic_problem(n=50)
    query = (problem.x[:3], problem.y[:3])
    return compute_influences(problem.model, problem.loss_fn, problem.dataset, query, **OPTIONS)


def worker(rank: int, world_size: int, store_path: str, out_dir: str) -> None:
    # A file store: the test opens no port.
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    work = {"repeats": [], "scored": 0}
    one_repeat = LiSSASolver._one_repeat
    score_positions = InfluenceComputer._score_positions

    def record_repeat(self, loss, train, vectors, repeat, bar):
        work["repeats"].append(self.repeat_offset + repeat)
        return one_repeat(self, loss, train, vectors, repeat, bar)

    def record_scoring(self, ihvps, positions, *, progress):
        work["scored"] += len(positions)
        return score_positions(self, ihvps, positions, progress=progress)

    LiSSASolver._one_repeat = record_repeat
    InfluenceComputer._score_positions = record_scoring
    try:
        torch.set_num_threads(1)
        scores = scores_in_one_process()
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


def test_share_covers_every_item_once():
    for total in (0, 1, 5, 8):
        for world_size in (1, 2, 3):
            shares = [share(total, rank, world_size) for rank in range(world_size)]
            assert [i for start, stop in shares for i in range(start, stop)] == list(range(total))
            sizes = [stop - start for start, stop in shares]
            assert max(sizes) - min(sizes) <= 1
