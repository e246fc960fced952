"""Run one of this package's methods and write its scores, timings and memory.

The logistic setting reads the problem that ``benchmarks/peers.py`` saved. With ``"setting": "minilm"`` in
the settings, every process loads all-MiniLM-L6-v2 and the bundled MNLI pairs itself (see
:func:`minilm_setting`), and PROBLEM.pt is not read.

Methods:
    original-exact: every training example scored, ihvp from the explicit Hessian (``solver="exact"``).
    original-lissa: every training example scored, ihvp from LiSSA.
    fastif: FastIF, the ``k`` nearest training examples scored (faiss, on the inputs of the logistic model or
        MiniLM's classifier input), ihvp from LiSSA.

Under torchrun (``WORLD_SIZE`` > 1) the script joins a gloo process group, so ``InfluenceComputer`` splits
the LiSSA repeats and the scored candidates over the ranks. Rank 0 writes the result.

Usage: python run_ours.py METHOD PROBLEM.pt RESULT.pt '{"depth": 500, ...}'
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import Stopwatch, peak_rss_mib, rss_mib, set_threads, write_result  # noqa: E402
from problem import load_problem, mean_loss  # noqa: E402

from lightning_fastif.distributed import all_gather_objects  # noqa: E402
from lightning_fastif.fastif import FastIF, FastIFConfig  # noqa: E402
from lightning_fastif.influence import InfluenceComputer  # noqa: E402


@dataclass
class Setting:
    """The inputs of a method: model, loss, kNN features, data and the differentiated parameters."""

    model: nn.Module
    loss_fn: Callable[[nn.Module, Any], Tensor]
    features_fn: Callable[[Any], Tensor]
    train: Dataset
    queries: Any
    num_queries: int
    weight_decay: float = 0.0
    parameters: list[str] | None = None
    gradient_batch_size: int = 64


def logistic_setting(problem_path: Path) -> Setting:
    problem = load_problem(problem_path)
    return Setting(
        model=problem.model(),
        loss_fn=mean_loss,
        features_fn=lambda batch: batch[0],
        train=problem.train_dataset(),
        queries=(problem.x_query, problem.y_query),
        num_queries=problem.x_query.shape[0],
        weight_decay=problem.weight_decay,
    )


def checkpoint_weights(path: str) -> dict[str, Tensor]:
    """Return the transformers model's state dict from a Lightning checkpoint of an ``NLIClassifier``.

    The module keeps the transformers model as ``model``, so its keys start with ``model.``.
    """
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    weights = {key.removeprefix("model."): value for key, value in state.items() if key.startswith("model.")}
    if not weights:
        raise ValueError(f"The checkpoint {path} has no `model.*` weights. Pass a checkpoint of an NLIClassifier.")
    return weights


def minilm_setting(settings: dict) -> Setting:
    """MiniLM with a 3-way head on bundled MNLI training pairs; queries from MNLI dev-matched.

    The head is freshly initialised (seeded) unless ``settings["checkpoint"]`` names a Lightning
    checkpoint of an ``NLIClassifier``, whose weights then replace the whole model's.

    Every process reads the same rows (``read_nli_jsonl`` with a fixed seed) and seeds the head's
    initialisation, so all ranks and all methods see the same model and data.
    """
    from lightning_fastif.hf import fastif_parameter_patterns, sequence_classification_loss
    from lightning_fastif.knn import classifier_input_features
    from lightning_fastif.nli.data import NLIDataset, read_nli_jsonl
    from lightning_fastif.nli.model import load_sequence_classifier, load_tokenizer

    data = Path(__file__).resolve().parents[2] / "examples" / "data" / "mnli"
    torch.manual_seed(settings["seed"])
    model = load_sequence_classifier("all-MiniLM-L6-v2").eval()
    if settings.get("checkpoint"):
        model.load_state_dict(checkpoint_weights(settings["checkpoint"]))
    tokenizer = load_tokenizer("all-MiniLM-L6-v2")
    length = settings["max_length"]
    train_rows = read_nli_jsonl(data / "train.jsonl.gz", limit=settings["num_train"], seed=settings["seed"])
    query_rows = read_nli_jsonl(data / "validation_matched.jsonl.gz", limit=settings["queries"], seed=settings["seed"])
    queries = default_collate(list(NLIDataset(query_rows, tokenizer, max_length=length)))
    return Setting(
        model=model,
        loss_fn=sequence_classification_loss,
        features_fn=lambda batch: classifier_input_features(model, batch),
        train=NLIDataset(train_rows, tokenizer, max_length=length),
        queries=queries,
        num_queries=len(query_rows),
        parameters=fastif_parameter_patterns(model, num_layers=2),
        gradient_batch_size=16,
    )


def lissa_options(settings: dict) -> dict:
    return {key: settings[key] for key in ("damping", "scale", "depth", "repeats", "batch_size", "seed")}


def run_method(method: str, setting: Setting, settings: dict, stopwatch: Stopwatch) -> tuple[Tensor, Tensor | None]:
    """Return scores ``[Q, N]`` (NaN where not scored) and the candidates ``[Q, k]`` (``None``: all scored)."""
    common = dict(parameters=setting.parameters, weight_decay=setting.weight_decay)
    if method == "original-exact":
        computer = InfluenceComputer(
            setting.model, setting.loss_fn, setting.train, solver="exact", damping=0.0, **common
        )
        return computer.compute(setting.queries, mode="each"), None
    if method == "original-lissa":
        computer = InfluenceComputer(
            setting.model,
            setting.loss_fn,
            setting.train,
            solver="lissa",
            gradient_batch_size=setting.gradient_batch_size,
            **common,
            **lissa_options(settings),
        )
        return computer.compute(setting.queries, mode="each"), None
    if method != "fastif":
        raise ValueError(f"Unknown method {method!r}; expected original-exact, original-lissa or fastif.")
    config = FastIFConfig(
        k=settings["k"],
        metric=settings["metric"],
        score_method=settings.get("score_method", "gradient"),
        top_k=10,
        gradient_batch_size=setting.gradient_batch_size,
        weight_decay=setting.weight_decay,
        **{**lissa_options(settings), **settings.get("fastif_lissa", {})},
    )
    fastif = FastIF(
        setting.model, setting.loss_fn, setting.features_fn, setting.train, parameters=setting.parameters, config=config
    )
    with stopwatch("index"):
        fastif.refresh_index()
    results = fastif.explain(setting.queries, mode="each")
    scores = torch.full((setting.num_queries, len(setting.train)), float("nan"), dtype=torch.float64)
    for row, result in enumerate(results):
        scores[row, result.candidate_indices] = result.scores.double()
    for stage in ("knn", "ihvp", "scores"):
        stopwatch.seconds[stage] = sum(result.timings[stage] for result in results)
    return scores, torch.stack([result.candidate_indices for result in results])


def main() -> None:
    method, problem_path, result_path, settings_json = sys.argv[1:5]
    settings = json.loads(settings_json)
    set_threads()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    if settings.get("setting", "logistic") == "minilm":
        setting = minilm_setting(settings)
    else:
        setting = logistic_setting(Path(problem_path))
    baseline = rss_mib()
    stopwatch = Stopwatch()
    if dist.is_initialized():
        dist.barrier()
    with stopwatch("total"):
        scores, candidates = run_method(method, setting, settings, stopwatch)
    peaks = all_gather_objects(peak_rss_mib())
    rank_cpu_seconds = all_gather_objects(stopwatch.cpu_seconds["total"])
    baselines = all_gather_objects(baseline)
    if not dist.is_initialized() or dist.get_rank() == 0:
        write_result(
            Path(result_path),
            scores=scores,
            candidates=candidates,
            stopwatch=stopwatch,
            baseline_rss_mib=max(baselines),
            versions={"lightning_fastif": version("lightning-fastif"), "torch": str(torch.__version__)},
            rank_peak_rss_mib=peaks,
            rank_cpu_seconds=rank_cpu_seconds,
            world_size=dist.get_world_size() if dist.is_initialized() else 1,
        )
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
