"""Run one of this package's methods on the saved problem and write its scores, timings and memory.

Methods:
    original-exact: every training example scored, ihvp from the explicit Hessian (``solver="exact"``).
    original-lissa: every training example scored, ihvp from LiSSA.
    fastif: FastIF, the ``k`` nearest training examples (faiss, on the inputs) scored, ihvp from LiSSA.

Under torchrun (``WORLD_SIZE`` > 1) the script joins a gloo process group, so ``InfluenceComputer`` splits
the LiSSA repeats and the scored candidates over the ranks. Rank 0 writes the result.

Usage: python run_ours.py METHOD PROBLEM.pt RESULT.pt '{"depth": 500, ...}'
"""

from __future__ import annotations

import json
import os
import sys
from importlib.metadata import version
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import Stopwatch, peak_rss_mib, rss_mib, set_threads, write_result  # noqa: E402
from problem import load_problem, mean_loss  # noqa: E402

from lightning_fastif.distributed import all_gather_objects  # noqa: E402
from lightning_fastif.fastif import FastIF, FastIFConfig  # noqa: E402
from lightning_fastif.influence import InfluenceComputer  # noqa: E402


def lissa_options(settings: dict) -> dict:
    return {key: settings[key] for key in ("damping", "scale", "depth", "repeats", "batch_size", "seed")}


def main() -> None:
    method, problem_path, result_path, settings_json = sys.argv[1:5]
    settings = json.loads(settings_json)
    set_threads()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    problem = load_problem(Path(problem_path))
    model = problem.model()
    train = problem.train_dataset()
    queries = (problem.x_query, problem.y_query)
    num_queries, num_train = problem.x_query.shape[0], problem.x_train.shape[0]
    baseline = rss_mib()
    stopwatch = Stopwatch()
    candidates = None
    if dist.is_initialized():
        dist.barrier()
    with stopwatch("total"):
        if method == "original-exact":
            computer = InfluenceComputer(
                model, mean_loss, train, solver="exact", weight_decay=problem.weight_decay, damping=0.0
            )
            scores = computer.compute(queries, mode="each")
        elif method == "original-lissa":
            computer = InfluenceComputer(
                model, mean_loss, train, solver="lissa", weight_decay=problem.weight_decay, **lissa_options(settings)
            )
            scores = computer.compute(queries, mode="each")
        elif method == "fastif":
            config = FastIFConfig(
                k=settings["k"],
                top_k=10,
                gradient_batch_size=64,
                weight_decay=problem.weight_decay,
                **lissa_options(settings),
            )
            fastif = FastIF(model, mean_loss, lambda batch: batch[0], train, config=config)
            with stopwatch("index"):
                fastif.refresh_index()
            results = fastif.explain(queries, mode="each")
            scores = torch.full((num_queries, num_train), float("nan"), dtype=torch.float64)
            candidates = torch.stack([result.candidate_indices for result in results])
            for row, result in enumerate(results):
                scores[row, result.candidate_indices] = result.scores.double()
            for stage in ("knn", "ihvp", "scores"):
                stopwatch.seconds[stage] = sum(result.timings[stage] for result in results)
        else:
            raise ValueError(f"Unknown method {method!r}; expected original-exact, original-lissa or fastif.")
    peaks = all_gather_objects(peak_rss_mib())
    baselines = all_gather_objects(baseline)
    if not dist.is_initialized() or dist.get_rank() == 0:
        write_result(
            Path(result_path),
            scores=scores,
            candidates=candidates,
            stopwatch=stopwatch,
            baseline_rss_mib=max(baselines),
            versions={"lightning_fastif": version("lightning-fastif"), "torch": torch.__version__},
            rank_peak_rss_mib=peaks,
            world_size=dist.get_world_size() if dist.is_initialized() else 1,
        )
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
