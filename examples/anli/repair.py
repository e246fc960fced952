"""Repair an MNLI model's ANLI errors by fine-tuning on ANLI examples that FastIF finds helpful.

Each ANLI round's bundled dev set is split at random (``--split-seed``) into a pool and a test part that
share no example (``--pool-fraction`` of the rows go to the pool). The test part is the target set: the
model's errors on one half of it are the anchors, and the errors on the other half measure the repair.
The pool supplies the update examples. The cost is measured on MNLI matched validation examples. With
``--merge-rounds`` the chosen rounds form one setting: each round is split as above, and the pools and
the test parts of the rounds are joined. docs/results.md has the measured results.

Example:
    python examples/anli/repair.py --checkpoint path/to/nli.ckpt --quick
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
    dataset,
    read_rows,
    run_study,
)

from lightning_fastif.nli import read_nli_jsonl, sample_rows, split_rows  # noqa: E402

ROUNDS = (1, 2, 3)

# Default sizes. docs/results.md gives the sizes and measured times of the reported study.
DEFAULTS = {
    "output_dir": "outputs/repair/anli",
    "num_steps": 5,
    "pool_size": 500,
    "target_size": 200,
    "source_size": 300,
    "k": 100,
    "depth": 100,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_repair_arguments(parser, defaults=DEFAULTS)
    parser.add_argument("--rounds", type=int, nargs="+", choices=ROUNDS, default=list(ROUNDS))
    parser.add_argument("--anli-dir", default="anli", help="Folder of dev_r1.jsonl.gz .. dev_r3.jsonl.gz.")
    parser.add_argument("--pool-fraction", type=float, default=0.5, help="Share of each dev set in the pool.")
    parser.add_argument("--split-seed", type=int, default=0, help="Seed of the pool/test split of each dev set.")
    parser.add_argument(
        "--merge-rounds", action="store_true", help="Run the chosen rounds as one setting instead of one per round."
    )
    parser.add_argument("--mnli-val", default="mnli/validation_matched.jsonl.gz", help="Source set rows.")
    parser.add_argument("--data-seed", type=int, default=0, help="Seed of the data samples, fixed across seeds.")
    return parser.parse_args(argv)


def split_round(args: argparse.Namespace, round_number: int) -> tuple[list, list, int]:
    """Split one round's dev set into pool rows and test rows; return both and the dev set's size."""
    rows = read_nli_jsonl(f"{args.anli_dir}/dev_r{round_number}.jsonl.gz")
    pool_rows, test_rows = split_rows(rows, args.pool_fraction, args.split_seed)
    return pool_rows, test_rows, len(rows)


def build_settings(args: argparse.Namespace, tokenizer: Any) -> list[Setting]:
    if not 0.0 < args.pool_fraction < 1.0:
        raise SystemExit(f"--pool-fraction must be in (0, 1), but got {args.pool_fraction}.")
    source = dataset(read_rows(args.mnli_val, args.source_size, args.data_seed), tokenizer, args.max_length)
    groups = [list(args.rounds)] if args.merge_rounds else [[round_number] for round_number in args.rounds]
    settings = []
    for rounds in groups:
        pool_rows, test_rows, num_rows = [], [], 0
        for round_number in rounds:
            round_pool, round_test, round_size = split_round(args, round_number)
            pool_rows += round_pool
            test_rows += round_test
            num_rows += round_size
        pool_rows = sample_rows(pool_rows, args.pool_size, args.data_seed)
        test_rows = sample_rows(test_rows, args.target_size, args.data_seed)
        names = "+".join(str(round_number) for round_number in rounds)
        rounds_text = f"rounds {names}" if len(rounds) > 1 else f"round {names}"
        description = (
            f"ANLI {rounds_text} dev ({num_rows} rows), each round split with seed {args.split_seed} into "
            f"{args.pool_fraction:g} pool and {1 - args.pool_fraction:g} test: {len(pool_rows)} pool rows and "
            f"{len(test_rows)} test rows (the target) sampled from them. Source: MNLI matched."
        )
        settings.append(
            Setting(
                "anli_r" + names.replace("+", ""),
                description,
                target=dataset(test_rows, tokenizer, args.max_length),
                pool=dataset(pool_rows, tokenizer, args.max_length),
                source=source,
            )
        )
    return settings


def main(argv: list[str] | None = None) -> None:
    run_study(parse_args(argv), build_settings)


if __name__ == "__main__":
    main()
