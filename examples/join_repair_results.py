"""Join the ``results.json`` files of several repair-study runs into one ``results.md`` and ``results.json``.

Runs of the same setting with other seeds are pooled: seeds 0-2 from one command and seeds 3-4 from
another give 5-seed tables with their standard deviations. Runs of different settings, for example the
HANS pool and the MNLI pool, are laid out together, with overall rows over all of them. The runs must
agree on every argument that changes a repair (steps, learning rate, sizes, LiSSA settings, strategies,
step selection), and no seed of a setting may come from two files.

Example:
    python examples/join_repair_results.py outputs/hans_pool/results.json outputs/mnli_pool/results.json \\
        --output-dir outputs/hans_joined
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from repair_study import aggregate, selects_on_validation, write_results  # noqa: E402

# Arguments that may differ between joined runs: where the output went, which seeds and settings a
# command ran, its threads and its W&B project.
FREE_ARGUMENTS = frozenset({"output_dir", "seeds", "heuristics", "pools", "threads", "wandb_project"})
# Arguments added to the study after some results were written, with the value that those runs used.
LATER_ARGUMENTS = {"update_parameters": "all"}


def join(payloads: list[dict[str, Any]], names: list[str]) -> tuple[list[dict[str, Any]], argparse.Namespace]:
    """Return the pooled settings and the arguments of the joined runs.

    Args:
        payloads: The parsed ``results.json`` of each run.
        names: A name for each payload in error messages, such as its path.

    Raises:
        ValueError: If two runs differ in an argument outside ``FREE_ARGUMENTS``, or hold the same seed of
            the same setting.
    """
    if not payloads:
        raise ValueError("Pass at least one results.json to join.")
    first = {**LATER_ARGUMENTS, **payloads[0]["arguments"]}
    for payload, name in zip(payloads[1:], names[1:], strict=True):
        arguments = {**LATER_ARGUMENTS, **payload["arguments"]}
        for key in sorted((set(first) | set(arguments)) - FREE_ARGUMENTS):
            if first.get(key) != arguments.get(key):
                raise ValueError(
                    f"{name} ran with {key}={arguments.get(key)!r} but {names[0]} with {key}={first.get(key)!r}. "
                    "Join only runs of the same study settings."
                )
    settings: dict[str, dict[str, Any]] = {}
    first_source: dict[str, str] = {}
    sources: dict[tuple[str, str], str] = {}
    for payload, name in zip(payloads, names, strict=True):
        for setting in payload["settings"]:
            first_source.setdefault(setting["name"], name)
            pooled = settings.setdefault(setting["name"], {**setting, "per_seed": {}, "seconds": 0.0, "aggregate": {}})
            if pooled["sizes"] != setting["sizes"]:
                raise ValueError(
                    f"Setting {setting['name']} has sizes {setting['sizes']} in {name} but {pooled['sizes']} in "
                    f"{first_source[setting['name']]}. Join only runs of the same study settings."
                )
            for seed, summary in setting["per_seed"].items():
                if (setting["name"], seed) in sources:
                    raise ValueError(
                        f"Seed {seed} of setting {setting['name']} is in both {sources[setting['name'], seed]} and "
                        f"{name}. Pass each seed once."
                    )
                sources[setting["name"], seed] = name
                pooled["per_seed"][seed] = summary
            pooled["seconds"] += setting["seconds"]
    args = argparse.Namespace(**first)
    seeds = {int(seed) for setting in settings.values() for seed in setting["per_seed"]}
    args.seeds = sorted(seeds)
    for setting in settings.values():
        setting["per_seed"] = dict(sorted(setting["per_seed"].items(), key=lambda item: int(item[0])))
        setting["aggregate"] = aggregate(setting["per_seed"], args.strategies, selects_on_validation(args))
    return list(settings.values()), args


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="results.json files of repair-study runs")
    parser.add_argument("--output-dir", type=Path, required=True, help="Folder of the joined results.")
    args = parser.parse_args(argv)
    missing = [str(path) for path in args.results if not path.is_file()]
    if missing:
        parser.error(f"No such file: {', '.join(missing)}. Pass the results.json of each run.")
    payloads = [json.loads(path.read_text(encoding="utf-8")) for path in args.results]
    try:
        settings, study_args = join(payloads, [str(path) for path in args.results])
    except ValueError as err:
        parser.error(str(err))
    study_args.output_dir = str(args.output_dir)
    markdown = write_results(args.output_dir, settings, study_args)
    print(markdown.read_text(encoding="utf-8"))
    print(f"Joined {len(payloads)} runs into {args.output_dir / 'results.json'} and {markdown}.")


if __name__ == "__main__":
    main()
