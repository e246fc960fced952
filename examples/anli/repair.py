"""Repair an MNLI model's ANLI errors by fine-tuning on ANLI examples that FastIF finds helpful.

Each ANLI round's bundled dev set is split at random (``--split-seed``) into a pool and a test part that
share no example. The test part is the target set: the model's errors on one half of it are the anchors,
and the errors on the other half measure the repair. The pool supplies the update examples. The cost is
measured on MNLI matched validation examples. See README.md next to this file.

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
    sample_rows,
    split_rows,
)

from lightning_fastif.nli import read_nli_jsonl  # noqa: E402

ROUNDS = (1, 2, 3)

# Sized so that one round (4 strategies, 3 seeds) of the bundled MiniLM model takes well under an hour
# on 2 CPU cores; README.md gives measured times.
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
    parser.add_argument("--mnli-val", default="mnli/validation_matched.jsonl.gz", help="Source set rows.")
    parser.add_argument("--data-seed", type=int, default=0, help="Seed of the data samples, fixed across seeds.")
    return parser.parse_args(argv)


def build_settings(args: argparse.Namespace, tokenizer: Any) -> list[Setting]:
    if not 0.0 < args.pool_fraction < 1.0:
        raise SystemExit(f"--pool-fraction must be in (0, 1), but got {args.pool_fraction}.")
    source = dataset(read_rows(args.mnli_val, args.source_size, args.data_seed), tokenizer, args.max_length)
    settings = []
    for round_number in args.rounds:
        rows = read_nli_jsonl(f"{args.anli_dir}/dev_r{round_number}.jsonl.gz")
        pool_rows, test_rows = split_rows(rows, args.pool_fraction, args.split_seed)
        pool_rows = sample_rows(pool_rows, args.pool_size, args.data_seed)
        test_rows = sample_rows(test_rows, args.target_size, args.data_seed)
        description = (
            f"ANLI round {round_number} dev ({len(rows)} rows) split with seed {args.split_seed}: "
            f"{len(pool_rows)} pool rows, {len(test_rows)} test rows as the target. Source: MNLI matched."
        )
        settings.append(
            Setting(
                f"anli_r{round_number}",
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
