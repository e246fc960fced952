"""Shared code of the data-repair studies in ``examples/mnli_hans`` and ``examples/anli``.

It loads an :class:`~lightning_fastif.nli.NLIClassifier` checkpoint, whose influence hooks score HANS rows
on HANS's two labels (``neutral`` and ``contradiction`` both count as ``non-entailment``), runs
:class:`~lightning_fastif.callbacks.DataRepairCallback` for every seed of one setting (a target set, a pool
and a source set), and writes the results as JSON and as markdown tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from torch.utils.data import Dataset

from lightning_fastif.callbacks import DataRepairCallback
from lightning_fastif.callbacks.repair import SELECT_STEPS, STRATEGIES
from lightning_fastif.nli import (
    NLIClassifier,
    NLIDataset,
    collate_nli,
    load_tokenizer,
    read_nli_jsonl,
)

log = logging.getLogger(__name__)

METRICS = ("target_acc", "holdout_acc", "source_acc")


def load_classifier(checkpoint: str | Path, tokenizer: str | None = None) -> tuple[NLIClassifier, Any]:
    """Load an ``NLIClassifier`` checkpoint on the CPU in eval mode, with its tokenizer.

    Args:
        checkpoint: A Lightning checkpoint of :class:`~lightning_fastif.nli.NLIClassifier`.
        tokenizer: Tokenizer name or folder; defaults to the one the classifier was built with.

    Raises:
        ValueError: If no tokenizer is given and the checkpoint's classifier has none.
    """
    model = NLIClassifier.load_from_checkpoint(str(checkpoint), map_location="cpu")
    model.eval()
    if tokenizer is not None:
        return model, load_tokenizer(tokenizer)
    if model.tokenizer is None:
        raise ValueError(
            f"The classifier in {checkpoint} was built without a tokenizer. Pass --tokenizer with a tokenizer "
            "name or folder."
        )
    return model, model.tokenizer


def checkpoint_datamodule_hparams(checkpoint: str | Path) -> dict[str, Any]:
    """Return the data module hyperparameters saved in a checkpoint, or {} when it has none."""
    state = torch.load(str(checkpoint), map_location="cpu", weights_only=False)
    return dict(state.get("datamodule_hyper_parameters") or {})


def read_rows(path: str, size: int | None, seed: int) -> list[dict[str, Any]]:
    """Read at most ``size`` rows of an NLI file, a seeded uniform sample in file order."""
    return read_nli_jsonl(path, limit=size, seed=seed)


@dataclass
class Setting:
    """One repair setting: the target errors, the pool of update examples and the source set."""

    name: str
    description: str
    target: Dataset
    pool: Dataset
    source: Dataset


def dataset(rows: Sequence[dict[str, Any]], tokenizer: Any, max_length: int) -> NLIDataset:
    return NLIDataset(rows, tokenizer, max_length=max_length)


# Command line.


def add_repair_arguments(parser: argparse.ArgumentParser, *, defaults: Mapping[str, Any]) -> None:
    """Add the arguments every repair study takes; ``defaults`` sets the sizes of the study."""
    parser.add_argument("--checkpoint", required=True, help="Lightning checkpoint of an NLIClassifier.")
    parser.add_argument("--tokenizer", default=None, help="Tokenizer name or folder (default: the model's).")
    parser.add_argument("--output-dir", default=defaults["output_dir"], help="Folder of the results.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Seeds of the repeated runs.")
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--num-steps", type=int, default=defaults["num_steps"], help="Repair steps per run.")
    parser.add_argument("--lr", type=float, default=1e-4, help="SGD learning rate of the repair steps.")
    parser.add_argument("--anchor-batch-size", type=int, default=10, help="Target examples per anchor batch.")
    parser.add_argument(
        "--anchors-from",
        choices=("errors", "all"),
        default="errors",
        help="Draw anchor batches from the anchor split's errors, or from all of it (errors and correct examples).",
    )
    parser.add_argument("--num-examples", type=int, default=10, help="Update examples per step.")
    parser.add_argument(
        "--update-parameters",
        choices=("all", "influence"),
        default="all",
        help="Parameters the update steps change: all, or those FastIF differentiates (last 2 layers and head).",
    )
    parser.add_argument("--holdout-fraction", type=float, default=0.5, help="Share of the target set held out.")
    parser.add_argument(
        "--validation-fraction",
        type=float,
        default=0.0,
        help="Share of the target set split off as a validation split for choosing the step, in [0, 1). The "
        "default 0 makes none.",
    )
    parser.add_argument(
        "--select-step",
        choices=SELECT_STEPS,
        default="last",
        help="The step whose weights each run ends with: 'last', or 'best_validation' (the highest accuracy on "
        "the validation split, the earliest on ties; needs --validation-fraction above 0).",
    )
    parser.add_argument("--pool-size", type=int, default=defaults["pool_size"], help="Pool examples (sampled).")
    parser.add_argument("--target-size", type=int, default=defaults["target_size"], help="Target examples.")
    parser.add_argument("--source-size", type=int, default=defaults["source_size"], help="Source examples.")
    parser.add_argument("--max-length", type=int, default=128, help="Tokens per example after truncation.")
    parser.add_argument("--k", type=int, default=defaults["k"], help="kNN candidates scored per anchor batch.")
    parser.add_argument("--depth", type=int, default=defaults["depth"], help="LiSSA recursion steps.")
    parser.add_argument("--repeats", type=int, default=1, help="LiSSA repeats averaged.")
    parser.add_argument("--scale", type=float, default=1e4, help="LiSSA scale.")
    parser.add_argument("--damping", type=float, default=5e-3, help="LiSSA damping.")
    parser.add_argument("--lissa-batch-size", type=int, default=1, help="Examples per Hessian-vector product.")
    parser.add_argument("--eval-batch-size", type=int, default=64, help="Batch size of the accuracy passes.")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads. One is the default because LiSSA's single-example Hessian-vector products "
        "ran 0.075 s on one thread and 2.9 s on two on a busy 2-core machine.",
    )
    parser.add_argument(
        "--wandb-project",
        default=None,
        help="Also log each seed's curves to a W&B run in this project (offline when WANDB_MODE=offline), "
        "beside the CSV log.",
    )
    parser.add_argument("--quick", action="store_true", help="A smoke run of a few minutes with tiny sizes.")


QUICK_SIZES = {
    "seeds": [0],
    "num_steps": 2,
    "pool_size": 64,
    "target_size": 60,
    "source_size": 40,
    "k": 32,
    "depth": 20,
    "anchor_batch_size": 4,
    "num_examples": 4,
}


def apply_quick(args: argparse.Namespace) -> None:
    """Shrink every size to ``QUICK_SIZES`` for a smoke run."""
    for name, value in QUICK_SIZES.items():
        setattr(args, name, value)


def repair_callback(args: argparse.Namespace, setting: Setting, seed: int, output_dir: Path) -> DataRepairCallback:
    return DataRepairCallback(
        target_dataset=setting.target,
        pool_dataset=setting.pool,
        source_dataset=setting.source,
        collate_fn=collate_nli,
        strategies=list(args.strategies),
        num_steps=args.num_steps,
        anchor_batch_size=args.anchor_batch_size,
        anchors_from=args.anchors_from,
        num_examples=args.num_examples,
        lr=args.lr,
        update_parameters=args.update_parameters,
        holdout_fraction=args.holdout_fraction,
        validation_fraction=args.validation_fraction,
        select_step=args.select_step,
        policy="restore",
        seed=seed,
        k=min(args.k, len(setting.pool)),
        damping=args.damping,
        scale=args.scale,
        depth=args.depth,
        repeats=args.repeats,
        lissa_batch_size=args.lissa_batch_size,
        eval_batch_size=args.eval_batch_size,
        output_dir=str(output_dir),
        save_checkpoint=False,
    )


# Running and reporting.


def run_setting(model: NLIClassifier, setting: Setting, args: argparse.Namespace, output_dir: Path) -> dict[str, Any]:
    """Run every strategy for every seed of ``args.seeds`` from the model's weights; return the results."""
    log.info("Setting %s: %s", setting.name, setting.description)
    per_seed: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    for seed in args.seeds:
        seed_dir = output_dir / setting.name / f"seed_{seed}"
        loggers: list[Logger] = [CSVLogger(output_dir / setting.name, name="logs", version=f"seed_{seed}")]
        if args.wandb_project:
            loggers.append(
                WandbLogger(project=args.wandb_project, name=f"{setting.name}-seed{seed}", save_dir=str(output_dir))
            )
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            logger=loggers,
            enable_checkpointing=False,
            enable_model_summary=False,
        )
        try:
            result = repair_callback(args, setting, seed, seed_dir).repair(trainer, model)
        finally:
            if args.wandb_project:
                import wandb

                wandb.finish()
        per_seed[str(seed)] = result.summary()
    return {
        "name": setting.name,
        "description": setting.description,
        "sizes": {"target": len(setting.target), "pool": len(setting.pool), "source": len(setting.source)},
        "seconds": time.perf_counter() - start,
        "per_seed": per_seed,
        "aggregate": aggregate(per_seed, args.strategies, selects_on_validation(args)),
    }


def selects_on_validation(args: argparse.Namespace) -> bool:
    """Return whether the runs choose their step on the validation split, so the tables add that step."""
    return args.select_step == "best_validation"


def aggregate(
    per_seed: Mapping[str, Mapping[str, Any]], strategies: Sequence[str], selected: bool = False
) -> dict[str, Any]:
    """Return the mean and standard deviation over seeds of each metric before and after, per strategy.

    With ``selected`` the table also has each metric at the selected step (``<metric>/selected``), the
    validation accuracy and the selected step itself (``selected_step``).
    """
    moments = ("before", "after", "selected") if selected else ("before", "after")
    metrics = (*METRICS, "validation_acc") if selected else METRICS
    table: dict[str, Any] = {}
    for strategy in strategies:
        table[strategy] = {}
        for metric in metrics:
            for moment in moments:
                values = [seed["runs"][strategy][metric][moment] for seed in per_seed.values()]
                table[strategy][f"{metric}/{moment}"] = _mean_std([v for v in values if v is not None])
        if selected:
            steps = [seed["runs"][strategy]["selected_step"] for seed in per_seed.values()]
            table[strategy]["selected_step"] = _mean_std(steps)
    return table


def _mean_std(values: Sequence[float]) -> dict[str, float | int | None]:
    if not values:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def _cell(entry: Mapping[str, Any]) -> str:
    if entry["mean"] is None:
        return "-"
    return f"{100 * entry['mean']:.1f} ± {100 * entry['std']:.1f}"


# The columns of a setting's table: heading and aggregate key. SELECTED_COLUMNS are added when the runs
# choose their step on the validation split.
COLUMNS = (
    ("target after", "target_acc/after"),
    ("held-out before", "holdout_acc/before"),
    ("held-out after", "holdout_acc/after"),
    ("source before", "source_acc/before"),
    ("source after", "source_acc/after"),
)
SELECTED_COLUMNS = (
    ("selected step", "selected_step"),
    ("target at selected step", "target_acc/selected"),
    ("held-out at selected step", "holdout_acc/selected"),
    ("source at selected step", "source_acc/selected"),
)


def markdown_table(settings: Sequence[Mapping[str, Any]], args: argparse.Namespace) -> str:
    """Lay out the aggregated results as markdown: one table per setting, accuracies in percent."""
    updated = (
        ", updating only the parameters that FastIF differentiates" if args.update_parameters == "influence" else ""
    )
    lines = [
        f"Accuracy in % (mean ± sample standard deviation over seeds {args.seeds}). `target` is the held-out "
        "target errors (0 before by construction), `held-out` the whole held-out target split, `source` the "
        f"source set. {args.num_steps} SGD steps of lr {args.lr:g}, {args.num_examples} examples a step, "
        f"anchor batches of {args.anchor_batch_size} drawn from the anchor split's "
        f"{'errors' if args.anchors_from == 'errors' else 'examples (errors and correct)'}, k={args.k}, "
        f"LiSSA depth {args.depth}{updated}.",
        "",
    ]
    columns: tuple[tuple[str, str], ...] = COLUMNS
    if selects_on_validation(args):
        columns += SELECTED_COLUMNS
        lines[0] += (
            f" A validation split of {args.validation_fraction:g} of the target set, disjoint from the anchor and "
            "held-out splits, chooses each run's step: the one with the highest validation accuracy, the earliest "
            "on ties (step 0 is the start weights). `after` is after the last step, and `at selected step` at "
            "the chosen step."
        )
    for setting in settings:
        sizes = setting["sizes"]
        lines += [
            f"### {setting['name']}",
            "",
            f"{setting['description']} Target {sizes['target']}, pool {sizes['pool']}, source {sizes['source']} "
            f"examples; {setting['seconds'] / 60:.1f} min.",
            "",
            "| strategy | " + " | ".join(heading for heading, _ in columns) + " |",
            "|---|" + "---|" * len(columns),
        ]
        for strategy, row in setting["aggregate"].items():
            cells = [_step_cell(row[key]) if key == "selected_step" else _cell(row[key]) for _, key in columns]
            lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += gain_table(settings, args)
    lines += step_table(settings, args)
    return "\n".join(lines)


def seed_changes(setting: Mapping[str, Any], strategy: str, metric: str, moment: str = "after") -> list[float]:
    """Return the change of ``metric`` from before the repair to ``moment``, one value per seed.

    ``moment`` is "after" (the last step) or "selected" (the selected step).
    """
    changes = []
    for seed in setting["per_seed"].values():
        entry = seed["runs"][strategy][metric]
        if entry["before"] is not None and entry[moment] is not None:
            changes.append(entry[moment] - entry["before"])
    return changes


def gain_groups(settings: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Group settings for the overall rows: all of them, and by pool when names end in ``-<pool>``."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for setting in settings:
        if "-" in setting["name"]:
            groups.setdefault(f"overall, pool {setting['name'].rsplit('-', 1)[1]}", []).append(setting)
    if len(settings) > 1:
        groups["overall"] = list(settings)
    return groups


GAIN_METRICS = (
    ("holdout_acc", "held-out target split (errors and correct examples)"),
    ("target_acc", "held-out target errors"),
    ("source_acc", "source set"),
)


def gain_table(settings: Sequence[Mapping[str, Any]], args: argparse.Namespace) -> list[str]:
    """Lay out the change of each accuracy per setting and strategy, plus overall rows.

    A setting's cell is the mean ± sample standard deviation over seeds. An overall cell pools every
    (setting, seed) run of its group, so its spread covers settings and seeds. When the runs choose their
    step on the validation split, each strategy has two columns: the change after the last step and the
    change at the selected step.
    """
    strategies = list(args.strategies)
    rows = [(setting["name"], [setting]) for setting in settings] + list(gain_groups(settings).items())
    if selects_on_validation(args):
        columns = [(strategy, moment) for strategy in strategies for moment in ("after", "selected")]
        headings = [f"{strategy}, {MOMENT_LABELS[moment]}" for strategy, moment in columns]
        subject = "after the last step and at the step selected on the validation split, minus before"
    else:
        columns = [(strategy, "after") for strategy in strategies]
        headings = strategies
        subject = "after minus before"
    lines = []
    for metric, title in GAIN_METRICS:
        lines += [
            f"### Change in accuracy on the {title}, {subject}, in points",
            "",
            "| setting | " + " | ".join(headings) + " |",
            "|---|" + "---|" * len(headings),
        ]
        for name, group in rows:
            cells = [
                _points([c for setting in group for c in seed_changes(setting, strategy, metric, moment)])
                for strategy, moment in columns
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


MOMENT_LABELS = {"after": "last step", "selected": "selected step"}


def step_changes(setting: Mapping[str, Any], strategy: str, metric: str) -> list[list[float]]:
    """Return, per seed, the change of ``metric`` from the start weights after each step."""
    curves = []
    for seed in setting["per_seed"].values():
        steps = seed["runs"][strategy][metric].get("steps") or []
        if steps and all(value is not None for value in steps):
            curves.append([value - steps[0] for value in steps[1:]])
    return curves


def step_table(settings: Sequence[Mapping[str, Any]], args: argparse.Namespace) -> list[str]:
    """Lay out the mean change of held-out accuracy after each step, per group of settings and strategy.

    The table shows whether a strategy's gain peaked at an earlier step and was lost by later ones.
    """
    groups = gain_groups(settings)
    if not groups:
        groups = {setting["name"]: [setting] for setting in settings}
    steps = range(1, args.num_steps + 1)
    lines = [
        "### Change in held-out target accuracy after each step, in points (mean over settings and seeds)",
        "",
        "| group | strategy | " + " | ".join(f"step {step}" for step in steps) + " |",
        "|---|---|" + "---:|" * len(steps),
    ]
    for name, group in groups.items():
        for strategy in args.strategies:
            curves = [curve for setting in group for curve in step_changes(setting, strategy, "holdout_acc")]
            cells = []
            for index in range(len(steps)):
                values = [curve[index] for curve in curves if len(curve) > index]
                cells.append(f"{100 * statistics.fmean(values):+.1f}" if values else "-")
            lines.append(f"| {name} | {strategy} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _step_cell(entry: Mapping[str, Any]) -> str:
    if entry["mean"] is None:
        return "-"
    return f"{entry['mean']:.1f} ± {entry['std']:.1f}"


def _points(changes: Sequence[float]) -> str:
    entry = _mean_std(changes)
    if entry["mean"] is None:
        return "-"
    return f"{100 * entry['mean']:+.1f} ± {100 * entry['std']:.1f}"


def write_results(output_dir: Path, settings: Sequence[Mapping[str, Any]], args: argparse.Namespace) -> Path:
    """Write ``results.json`` and ``results.md`` to ``output_dir``; return the markdown path."""
    output_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "arguments": {key: value for key, value in vars(args).items() if _is_json(value)},
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
        "settings": list(settings),
    }
    (output_dir / "results.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    markdown = output_dir / "results.md"
    markdown.write_text(markdown_table(settings, args) + "\n", encoding="utf-8")
    return markdown


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return not (isinstance(value, float) and not math.isfinite(value))


def prepare(args: argparse.Namespace) -> None:
    """Apply ``--quick`` and ``--threads`` and check the sizes."""
    if args.quick:
        apply_quick(args)
    torch.set_num_threads(args.threads)
    for name in ("pool_size", "target_size", "source_size", "num_steps", "k", "depth", "threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be a positive integer, but got {getattr(args, name)}.")
    if selects_on_validation(args) and args.validation_fraction == 0:
        raise SystemExit(
            "--select-step best_validation chooses the step on a validation split, but --validation-fraction is 0. "
            "Pass --validation-fraction above 0, for example 0.2."
        )


def run_study(args: argparse.Namespace, build_settings: Callable[[argparse.Namespace, Any], list[Setting]]) -> None:
    """Load the checkpoint, run every setting that ``build_settings`` returns and write the results."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    prepare(args)
    model, tokenizer = load_classifier(args.checkpoint, args.tokenizer)
    output_dir = Path(args.output_dir)
    results = [run_setting(model, setting, args, output_dir) for setting in build_settings(args, tokenizer)]
    markdown = write_results(output_dir, results, args)
    print(markdown.read_text(encoding="utf-8"))
    print(f"Results written to {output_dir / 'results.json'} and {markdown}.")
