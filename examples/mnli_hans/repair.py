"""Repair an MNLI model's HANS errors by fine-tuning on the examples FastIF finds helpful, per heuristic.

For each HANS heuristic (lexical overlap, subsequence, constituent) the target set is a sample of HANS
evaluation examples of that heuristic, balanced over its subcases. The model's errors on one part of it
are the anchors, and the errors on the other part measure the repair. Two pools are tried:

- ``mnli``: the model's own MNLI training set (the rows its data module read, when the checkpoint saved
  the data module's settings, else a sample of ``--mnli-train``);
- ``hans``: HANS training examples, balanced over all 30 subcases, which the model never saw.

Each setting runs the strategies helpful, harmful, random and anchors for every seed, from the same
checkpoint weights, and measures the cost on MNLI matched validation examples. The results go to
``results.json`` and ``results.md`` under ``--output-dir``.

Example:
    python examples/mnli_hans/repair.py --checkpoint path/to/nli.ckpt --quick
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from repair_study import (  # noqa: E402
    Setting,
    add_repair_arguments,
    checkpoint_datamodule_hparams,
    dataset,
    read_rows,
    run_study,
)

from lightning_fastif.nli import balanced_hans_sample, read_nli_jsonl, sample_rows  # noqa: E402

HEURISTICS = ("lexical_overlap", "subsequence", "constituent")
POOLS = ("mnli", "hans")

# Default sizes. docs/results.md gives the sizes and measured times of the reported study.
DEFAULTS = {
    "output_dir": "outputs/repair/mnli_hans",
    "num_steps": 5,
    "pool_size": 1000,
    "target_size": 200,
    "source_size": 300,
    "k": 100,
    "depth": 100,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_repair_arguments(parser, defaults=DEFAULTS)
    parser.add_argument("--heuristics", nargs="+", choices=HEURISTICS, default=list(HEURISTICS))
    parser.add_argument("--pools", nargs="+", choices=POOLS, default=list(POOLS))
    parser.add_argument("--mnli-train", default="mnli/train.jsonl.gz", help="MNLI rows when the checkpoint has none.")
    parser.add_argument("--mnli-val", default="mnli/validation_matched.jsonl.gz", help="Source set rows.")
    parser.add_argument("--hans-eval", default="hans/evaluation.jsonl.gz", help="HANS rows of the target sets.")
    parser.add_argument("--hans-train", default="hans/train.jsonl.gz", help="HANS rows of the hans pool.")
    parser.add_argument("--data-seed", type=int, default=0, help="Seed of the data samples, fixed across seeds.")
    return parser.parse_args(argv)


def mnli_pool_rows(args: argparse.Namespace) -> tuple[list[dict[str, Any]], str]:
    """Return a sample of the model's MNLI training rows and where they came from."""
    hparams = checkpoint_datamodule_hparams(args.checkpoint)
    if "train_path" in hparams:
        rows = read_nli_jsonl(hparams["train_path"], limit=hparams.get("train_size"), seed=hparams.get("seed", 0))
        where = f"the checkpoint's training rows ({hparams['train_path']}, {len(rows)} rows)"
    else:
        rows = read_nli_jsonl(args.mnli_train)
        where = f"{args.mnli_train} (the checkpoint saved no data module settings)"
    return sample_rows(rows, args.pool_size, args.data_seed), where


def build_settings(args: argparse.Namespace, tokenizer: Any) -> list[Setting]:
    def encode(rows: list[dict[str, Any]]) -> Any:
        return dataset(rows, tokenizer, args.max_length)

    source = encode(read_rows(args.mnli_val, args.source_size, args.data_seed))
    pools: dict[str, tuple[Any, str]] = {}
    if "mnli" in args.pools:
        rows, where = mnli_pool_rows(args)
        pools["mnli"] = (encode(rows), f"Pool: {len(rows)} MNLI training examples from {where}.")
    if "hans" in args.pools:
        rows = balanced_hans_sample(read_nli_jsonl(args.hans_train), args.pool_size, seed=args.data_seed)
        pools["hans"] = (encode(rows), f"Pool: {len(rows)} HANS training examples over all subcases.")

    hans_eval = read_nli_jsonl(args.hans_eval)
    settings = []
    for heuristic in args.heuristics:
        rows = [row for row in hans_eval if row.get("heuristic") == heuristic]
        target = encode(balanced_hans_sample(rows, min(args.target_size, len(rows)), seed=args.data_seed))
        for pool_name, (pool, pool_text) in pools.items():
            description = f"Target: HANS evaluation, heuristic {heuristic}. {pool_text} Source: MNLI matched."
            settings.append(Setting(f"{heuristic}-{pool_name}", description, target, pool, source))
    return settings


def main(argv: list[str] | None = None) -> None:
    run_study(parse_args(argv), build_settings)


if __name__ == "__main__":
    main()
