"""ShardedKNNIndex and FastIF's split flat index under two gloo CPU processes."""

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_fastif.distributed import share
from lightning_fastif.fastif import FastIF, FastIFConfig
from lightning_fastif.knn import KNNIndex, ShardedKNNIndex
from tests.helpers.problems import logistic_problem

# 23 rows give shares of 12 and 11, so k=23 is larger than either shard.
SEARCHES = [("l2", 5), ("l2", 23), ("cosine", 5), ("cosine", 23)]


def features_and_queries() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    features, queries = torch.randn(23, 6, generator=generator), torch.randn(4, 6, generator=generator)
    # Rows 3, 15 and 20 copy row 0, across both shares, and the first query is row 0: equally near rows.
    features[[3, 15, 20]] = features[0].clone()
    queries[0] = features[0]
    return features, queries


def search_all(make_index) -> dict:
    """Return ``(distances, ids, mean distances, mean ids)`` of every search in ``SEARCHES``."""
    _, queries = features_and_queries()
    results = {}
    for metric, k in SEARCHES:
        index = make_index(metric)
        results[f"{metric}-{k}"] = (*index.search(queries, k), *index.search_mean(queries[:3], k))
    return results


def init_gloo(rank: int, world_size: int, store_path: str) -> None:
    # A file store for the rendezvous, so the test reserves no port. gloo itself connects over loopback.
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)


def sharded_search_worker(rank: int, world_size: int, store_path: str, out_dir: str) -> None:
    init_gloo(rank, world_size, store_path)
    try:
        features, _ = features_and_queries()
        start, stop = share(len(features), rank, world_size)

        def make_index(metric):
            local = KNNIndex(features[start:stop], ids=torch.arange(start, stop), metric=metric)
            return ShardedKNNIndex(local, len(features))

        torch.save(search_all(make_index), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sharded_search_matches_whole_index(tmp_path):
    mp.spawn(sharded_search_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    features, _ = features_and_queries()
    expected = search_all(lambda metric: KNNIndex(features, metric=metric))
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        for key, tensors in expected.items():
            for got, want in zip(saved[key], tensors, strict=True):
                assert torch.equal(got, want), (rank, key)


def fastif_index_worker(rank: int, world_size: int, store_path: str, out_dir: str, index_type: str) -> None:
    init_gloo(rank, world_size, store_path)
    try:
        problem = logistic_problem(n=50)
        config = FastIFConfig(k=8, index_type=index_type)
        fastif = FastIF(
            problem.model,
            problem.loss_fn,
            lambda batch: batch[0],
            problem.dataset,
            config=config,
            index_path=Path(out_dir) / "knn.index",
        )
        index = fastif.refresh_index()
        torch.save({"kind": type(index).__name__, "size": index.size}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_fastif_saves_flat_shards(tmp_path):
    mp.spawn(fastif_index_worker, args=(2, str(tmp_path / "store"), str(tmp_path), "flat"), nprocs=2, join=True)
    for rank, (start, stop) in enumerate([(0, 25), (25, 50)]):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        assert saved["kind"] == "ShardedKNNIndex"
        assert saved["size"] == 50
        shard = KNNIndex.load(tmp_path / f"knn.rank{rank}.index")
        assert shard.ids.tolist() == list(range(start, stop))
    assert not (tmp_path / "knn.index").exists()


def test_fastif_gathers_approximate_index(tmp_path):
    args = (2, str(tmp_path / "store"), str(tmp_path), "hnsw")
    mp.spawn(fastif_index_worker, args=args, nprocs=2, join=True)
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        assert saved["kind"] == "KNNIndex"
        assert saved["size"] == 50
    whole = KNNIndex.load(tmp_path / "knn.index")
    assert whole.ids.tolist() == list(range(50))
    assert not list(tmp_path.glob("knn.rank*"))


def run_torchrun_example(*launcher: str) -> list[str]:
    """Run the torchrun example with smaller settings and return its output lines without the timings."""
    script = Path(__file__).resolve().parents[2] / "examples" / "torchrun_influences.py"
    options = ["--num-train", "600", "--depth", "100", "--k", "60"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*launcher, str(script), *options], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [line for line in result.stdout.splitlines() if "process(es)" not in line]


def test_torchrun_example_matches_one_process():
    # torchrun's standalone rendezvous listens on a free loopback port only.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    single = run_torchrun_example(sys.executable)
    double = run_torchrun_example(*torchrun)
    assert len(single) == 6
    assert single[2].startswith("query 0: most helpful candidates")
    assert double == single
