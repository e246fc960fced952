"""Time the query gradients of FastIF's batched query stage on MiniLM against one gradient per query.

``FastIF.explain(mode="each")`` computes the gradients of a chunk of queries as per-example gradients in
one pass (``InfluenceComputer.query_gradients(..., mode="each")``), where it used to compute one mean-loss
gradient per query. This script times both on MNLI dev-matched queries with the main job's parameter
selection (the last 2 encoder layers, the pooler and the classifier), on one torch thread, and prints
the largest relative difference between the two.

Usage:
    python benchmarks/query_gradients.py --checkpoint runs/mnli_hans/checkpoints/minilm-mnli.ckpt
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
from run_ours import minilm_setting  # noqa: E402

from lightning_fastif.functional.batches import slice_batch  # noqa: E402
from lightning_fastif.influence import InfluenceComputer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="Lightning checkpoint of an NLIClassifier (default: a fresh head)")
    parser.add_argument("--queries", type=int, default=2, help="queries per pass (FastIF's chunk on MiniLM is 2)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each method")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = {"seed": 0, "num_train": 16, "queries": args.queries, "max_length": 64, "checkpoint": args.checkpoint}
    setting = minilm_setting(settings)
    computer = InfluenceComputer(
        setting.model, setting.loss_fn, setting.train, solver="lissa", parameters=setting.parameters
    )
    queries = setting.queries
    for round_number in range(1, args.rounds + 1):
        start = time.perf_counter()
        together = computer.query_gradients(queries, mode="each")
        together_seconds = time.perf_counter() - start
        start = time.perf_counter()
        alone = torch.cat([computer.query_gradients(slice_batch(queries, i, i + 1)) for i in range(args.queries)])
        alone_seconds = time.perf_counter() - start
        difference = float((together - alone).abs().max() / alone.abs().max())
        print(
            f"round {round_number}: one per-example pass {together_seconds:.3f} s, "
            f"one gradient per query {alone_seconds:.3f} s, max relative difference {difference:.1e}"
        )


if __name__ == "__main__":
    main()
