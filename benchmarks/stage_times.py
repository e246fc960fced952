"""Print the median seconds of each stage of this package's methods over the rounds of ``peers.py`` runs.

``benchmarks/peers.py`` keeps each round's result of a method as ``<method>.<round>.pt`` in its output
folder, with the seconds of every stage that the runner timed. This script pools the rounds of all the
folders it is given, for example the alternating runs of ``compare_commits.sh``, and prints one row per
method with the median of each stage, in seconds for all queries.

Usage::

    python benchmarks/stage_times.py runs/peers/ab_rows_r1_new_1 runs/peers/ab_rows_r1_new_2
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

METHODS = ("original-exact", "original-lissa", "fastif-1", "fastif-2")
STAGES = ("index", "knn", "ihvp", "scores", "total")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="output folders of benchmarks/peers.py")
    args = parser.parse_args()
    missing = [str(folder) for folder in args.folders if not folder.is_dir()]
    if missing:
        parser.error(f"No such folder: {', '.join(missing)}. Pass the --out-dir folders of benchmarks/peers.py.")
    print("| method | rounds | " + " | ".join(STAGES) + " |")
    print("|---|---:|" + "---:|" * len(STAGES))
    for method in METHODS:
        results = [
            torch.load(path, weights_only=True)["seconds"]
            for folder in args.folders
            for path in sorted(folder.glob(f"{method}.*.pt"))
        ]
        if not results:
            continue
        cells = []
        for stage in STAGES:
            values = [seconds[stage] for seconds in results if stage in seconds]
            cells.append(f"{statistics.median(values):.3f}" if values else "-")
        print(f"| {method} | {len(results)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
