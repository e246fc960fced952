"""Benchmark FastIF against the original influence functions and other influence packages.

The problem is L2-regularised logistic regression in float64, fitted by Newton's method to machine
precision. Leave-one-out (LOO) retraining of every training example gives the ground truth; each refit
starts at the full fit and reuses its Hessian (``benchmarks/peers/problem.py``), so it stays affordable
for thousands of examples and a thousand features. Every method runs in its own subprocess on the
same saved problem and writes its ``[Q, N]`` scores, seconds and peak RSS back to a file:

* ``original-exact``, ``original-lissa``: this package's ``InfluenceComputer`` scoring every training
  example, with the explicit Hessian or with LiSSA;
* ``fastif-1``, ``fastif-2``: ``FastIF`` (kNN candidates on the inputs, then LiSSA) in one process, and in
  two processes under ``torchrun --nproc_per_node=2 --standalone`` with a gloo process group, where the LiSSA
  repeats and the candidates are split over the ranks. ``--fastif-depth``, ``--fastif-repeats`` and
  ``--fastif-lissa-batch-size`` give these two their own LiSSA settings, while the other LiSSA methods keep
  ``--depth``, ``--repeats`` and ``--lissa-batch-size``;
* ``dattri``, ``pydvl``, ``kronfluence``, ``captum``: the peers, each with the python of its own virtual
  environment under ``benchmarks/.venvs/<peer>`` (``bash benchmarks/peers/setup.sh`` creates them).
  dattri reruns LiSSA for each batch of ``--dattri-train-batch-size`` training pairs that it scores, so
  ``--dattri-on-candidates`` lets it score only fastif-1's candidates, where scoring every pair is too slow.

``--setting minilm`` runs every method but ``original-exact`` on all-MiniLM-L6-v2 and bundled MNLI pairs,
at a reduced scale and without LOO ground truth, with ``original-lissa`` as the reference. This package's
runners build the model and data themselves. For the peers, the driver saves the tokenised pairs and the
differentiated parameters to ``problem.pt`` (``problem.MiniLMProblem``).

All processes use one torch thread (``BENCH_THREADS``), so ``fastif-2`` uses two cores and the rest one.
Each method's scores are compared per query with the original influence functions and with the LOO change
of the query loss, and the table gives the mean over queries. The script prints a markdown table and
writes it, with the settings and the machine, to ``<out-dir>/table.md``.

Usage::

    bash benchmarks/peers/setup.sh
    python benchmarks/peers.py
    python benchmarks/peers.py --rounds 3 --methods original-exact fastif-1 fastif-2
    python benchmarks/peers.py --setting minilm
    python benchmarks/peers.py --num-train 5000 --fastif-depth 100 --fastif-repeats 1 --fastif-lissa-batch-size 64
    python benchmarks/peers.py --num-train 5000 --features 1000 --scale 20 --fastif-depth 100 --fastif-repeats 2 \
        --fastif-lissa-batch-size 64
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from scipy.stats import pearsonr, spearmanr

REPO_ROOT = Path(__file__).resolve().parents[1]
HELPERS = REPO_ROOT / "benchmarks" / "peers"
VENVS = REPO_ROOT / "benchmarks" / ".venvs"
sys.path.insert(0, str(HELPERS))
from problem import (  # noqa: E402
    MINILM_INPUT_KEYS,
    MiniLMProblem,
    load_problem,
    make_problem,
    minilm_logits,
    save_minilm_problem,
    save_problem,
)

OURS = ("original-exact", "original-lissa", "fastif-1", "fastif-2")
PEERS = ("dattri", "pydvl", "kronfluence", "captum")
TOP = 10


@dataclass
class Run:
    """The result files and process wall seconds of one method over all rounds."""

    method: str
    results: list[dict] = field(default_factory=list)
    process_seconds: list[float] = field(default_factory=list)
    load_averages: list[float] = field(default_factory=list)
    error: str = ""


def method_command(method: str, problem_path: Path, result_path: Path, settings: dict) -> list[str] | None:
    """Return the command that runs ``method``, or ``None`` when the peer's virtual environment is missing."""
    arguments = [str(problem_path), str(result_path), json.dumps(settings)]
    if method in PEERS:
        python = VENVS / method / "bin" / "python"
        if not python.exists():
            return None
        return [str(python), str(HELPERS / "run_peer.py"), method, *arguments]
    runner = str(HELPERS / "run_ours.py")
    if method == "fastif-2":
        torchrun = Path(sys.executable).with_name("torchrun")
        return [str(torchrun), "--nproc_per_node=2", "--standalone", runner, "fastif", *arguments]
    name = "fastif" if method == "fastif-1" else method
    return [sys.executable, runner, name, *arguments]


def run_method(method: str, problem_path: Path, out_dir: Path, settings: dict, round_index: int, run: Run) -> None:
    result_path = out_dir / f"{method}.{round_index}.pt"
    command = method_command(method, problem_path, result_path, settings)
    if command is None:
        run.error = f"no virtual environment at {VENVS / method}; run bash benchmarks/peers/setup.sh {method}"
        return
    environment = {**os.environ, "BENCH_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    completed = subprocess.run(command, env=environment, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        run.error = f"exit code {completed.returncode}: {completed.stderr.strip().splitlines()[-1:]}"
        (out_dir / f"{method}.{round_index}.stderr").write_text(completed.stderr)
        return
    run.results.append(torch.load(result_path, weights_only=True))
    run.process_seconds.append(seconds)
    run.load_averages.append(os.getloadavg()[0])


def scored_mask(result: dict, query: int, num_train: int) -> torch.Tensor:
    if result["candidates"] is None:
        return torch.ones(num_train, dtype=torch.bool)
    mask = torch.zeros(num_train, dtype=torch.bool)
    mask[result["candidates"][query]] = True
    return mask


def quality(result: dict, reference: dict, loo_change: torch.Tensor | None) -> dict[str, float]:
    """Mean over queries of the correlations on the examples that the method scored, and the top-10 recall.

    ``loo_*`` correlate the predicted change ``-score`` with the LOO change ``[Q, N]`` (NaN without one).
    ``top10_recall`` is the share of the reference's 10 most helpful examples (most negative scores) among
    the method's 10 most helpful.
    """
    scores, reference_scores = result["scores"], reference["scores"]
    num_queries, num_train = scores.shape
    rows: dict[str, list[float]] = {"spearman_ref": [], "loo_pearson": [], "loo_spearman": [], "top10_recall": []}
    for query in range(num_queries):
        mask = scored_mask(result, query, num_train)
        own, ref = scores[query][mask], reference_scores[query][mask]
        rows["spearman_ref"].append(float(spearmanr(own, ref).statistic))
        if loo_change is None:
            rows["loo_pearson"].append(float("nan"))
            rows["loo_spearman"].append(float("nan"))
        else:
            loo = loo_change[query][mask]
            rows["loo_pearson"].append(float(pearsonr(-own, loo).statistic))
            rows["loo_spearman"].append(float(spearmanr(-own, loo).statistic))
        positions = mask.nonzero().squeeze(1)
        own_top = set(positions[own.argsort()[:TOP]].tolist())
        ref_top = set(reference_scores[query].argsort()[:TOP].tolist())
        rows["top10_recall"].append(len(own_top & ref_top) / TOP)
    return {name: statistics.fmean(values) for name, values in rows.items()}


def summarise(run: Run, reference: dict, loo_change: torch.Tensor | None) -> dict:
    num_queries, num_train = reference["scores"].shape
    totals = [result["seconds"]["total"] for result in run.results]
    # The CPU seconds of the busiest rank: what the run would take on otherwise idle cores.
    cpu_totals = [max(result.get("rank_cpu_seconds", [result["cpu_seconds"]["total"]])) for result in run.results]
    last = run.results[-1]
    rank_peaks = last.get("rank_peak_rss_mib", [last["peak_rss_mib"]])
    return {
        "method": run.method,
        "seconds_per_query": statistics.median(totals) / num_queries,
        "seconds_range": (min(totals) / num_queries, max(totals) / num_queries),
        "cpu_seconds_per_query": statistics.median(cpu_totals) / num_queries,
        "process_seconds": statistics.median(run.process_seconds),
        "load_average": statistics.median(run.load_averages),
        "peak_rss_mib": max(rank_peaks),
        "peak_rss_sum_mib": sum(rank_peaks),
        "rss_rise_mib": max(rank_peaks) - last["baseline_rss_mib"],
        "scored": int(scored_mask(last, 0, num_train).sum()),
        "versions": last["versions"],
        **quality(last, reference, loo_change),
    }


def cpu_model() -> str:
    """Return the CPU's model name from ``/proc/cpuinfo``, or the machine type where that is missing."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def format_correlation(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def markdown_table(rows: list[dict]) -> str:
    header = (
        "| method | scored per query | s / query (median) | s / query (range) | CPU s / query (busiest rank) "
        "| process wall s | peak RSS MiB | RSS rise MiB | Spearman vs original | top-10 recall | LOO Pearson "
        "| LOO Spearman | load average |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [header]
    for row in rows:
        peak = f"{row['peak_rss_mib']:,.0f}"
        if row["peak_rss_sum_mib"] != row["peak_rss_mib"]:
            peak += f" per rank ({row['peak_rss_sum_mib']:,.0f} total)"
        low, high = row["seconds_range"]
        lines.append(
            f"| {row['method']} | {row['scored']} | {row['seconds_per_query']:.3g} | {low:.3g}-{high:.3g} "
            f"| {row['cpu_seconds_per_query']:.3g} | {row['process_seconds']:.1f} | {peak} "
            f"| {row['rss_rise_mib']:,.0f} | {row['spearman_ref']:.4f} "
            f"| {row['top10_recall']:.2f} | {format_correlation(row['loo_pearson'])} "
            f"| {format_correlation(row['loo_spearman'])} | {row['load_average']:.2f} |"
        )
    return "\n".join(lines)


# Per-setting defaults of the options left unset. MiniLM uses FastIF's MNLI LiSSA settings (damping 5e-3,
# scale 1e4, batch size 1) at a depth far below FastIF's 1,000, because every step is a MiniLM
# Hessian-vector product and the benchmark runs on a few CPU cores.
DEFAULTS = {
    "logistic": dict(num_train=500, queries=10, scale=1.5, depth=300, repeats=4, lissa_batch_size=16, k=100),
    "minilm": dict(num_train=200, queries=2, scale=1e4, depth=10, repeats=2, lissa_batch_size=1, k=50),
}


def build_minilm_problem(settings: dict) -> MiniLMProblem:
    """Build the MiniLM problem that ``run_ours.py`` builds, for the peers' runners, which lack this package."""
    from run_ours import minilm_setting
    from torch.utils.data import default_collate

    from lightning_fastif.functional.params import select_parameters

    setting = minilm_setting(settings)
    keys = (*MINILM_INPUT_KEYS, "labels")
    train = default_collate(list(setting.train))
    named = dict(setting.model.named_parameters())
    names = select_parameters(setting.model, setting.parameters).names
    with torch.no_grad():
        query_logits = minilm_logits(setting.model, setting.queries)
    return MiniLMProblem(
        train={key: train[key] for key in keys},
        queries={key: setting.queries[key] for key in keys},
        parameters={name: named[name].detach().clone() for name in names},
        query_logits=query_logits,
        state={k: v.detach().clone() for k, v in setting.model.state_dict().items()}
        if settings.get("checkpoint")
        else None,
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--setting",
        choices=sorted(DEFAULTS),
        default="logistic",
        help="logistic: all methods with LOO ground truth; minilm: MiniLM on MNLI, all but original-exact",
    )
    parser.add_argument("--num-train", type=int, help="training examples (default 500 logistic, 200 minilm)")
    parser.add_argument("--queries", type=int, help="query examples, each scored on its own (default 10, 2)")
    parser.add_argument("--features", type=int, default=20, help="logistic: input features (= parameters)")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="logistic: coefficient of ||theta||^2")
    parser.add_argument("--max-length", type=int, default=64, help="minilm: tokens per pair, padded and truncated")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of LiSSA's batches")
    parser.add_argument("--scale", type=float, help="LiSSA scale, above the batch Hessian's top eigenvalue")
    parser.add_argument("--depth", type=int, help="LiSSA steps per repeat (default 300, 10)")
    parser.add_argument("--repeats", type=int, help="LiSSA repeats, split over the ranks by fastif-2 (default 4, 2)")
    parser.add_argument("--lissa-batch-size", type=int, help="training examples per LiSSA step (default 16, 1)")
    parser.add_argument(
        "--fastif-depth", type=int, help="LiSSA steps per repeat of fastif-1 and fastif-2 only (default: --depth)"
    )
    parser.add_argument(
        "--fastif-repeats", type=int, help="LiSSA repeats of fastif-1 and fastif-2 only (default: --repeats)"
    )
    parser.add_argument(
        "--fastif-lissa-batch-size",
        type=int,
        help="training examples per LiSSA step of fastif-1 and fastif-2 only (default: --lissa-batch-size)",
    )
    parser.add_argument("--k", type=int, help="FastIF's kNN candidates per query (default 100, 50)")
    parser.add_argument("--knn-metric", choices=("l2", "cosine"), default="l2", help="FastIF's kNN distance")
    parser.add_argument(
        "--score-method",
        choices=("gradient", "jvp"),
        default="gradient",
        help="how FastIF scores its candidates (lightning_fastif's FastIFConfig.score_method)",
    )
    parser.add_argument(
        "--checkpoint",
        help="minilm: Lightning checkpoint of an NLIClassifier, such as the main job's "
        "runs/mnli_hans/checkpoints/minilm-mnli.ckpt (default: the pretrained encoder with a fresh seeded head)",
    )
    parser.add_argument(
        "--dattri-on-candidates",
        action="store_true",
        help="dattri scores only the candidates of fastif-1 in this run, each query on its own, as FastIF does",
    )
    parser.add_argument(
        "--dattri-train-batch-size",
        type=int,
        help="training examples per batch of dattri's attribute, which reruns LiSSA for each batch "
        "(default 64 logistic, 100 minilm)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="runs of each method; the table gives the median")
    parser.add_argument("--methods", nargs="+", choices=[*OURS, *PEERS], help="default: all that the setting runs")
    parser.add_argument("--out-dir", type=Path, help="folder for all files (default runs/peers/<setting>)")
    args = parser.parse_args()
    for name, value in DEFAULTS[args.setting].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.methods is None:
        args.methods = [*OURS, *PEERS] if args.setting == "logistic" else [*OURS[1:], *PEERS]
    if args.setting == "minilm" and "original-exact" in args.methods:
        parser.error(
            "--setting minilm cannot run original-exact, because the explicit Hessian of 3.7M parameters is too large."
        )
    if args.checkpoint is not None and args.setting != "minilm":
        parser.error(f"--checkpoint {args.checkpoint} needs --setting minilm; the logistic model is fitted here.")
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        parser.error(
            f"--checkpoint {args.checkpoint} is not a file. Run `bash examples/mnli_hans/run.sh` to train the main "
            "job's checkpoint, or leave the option out."
        )
    if args.dattri_on_candidates and args.setting != "minilm":
        parser.error(f"--dattri-on-candidates needs --setting minilm, got --setting {args.setting}.")
    if args.dattri_on_candidates:
        methods = args.methods
        if "dattri" not in methods or "fastif-1" not in methods or methods.index("fastif-1") > methods.index("dattri"):
            parser.error(
                f"--dattri-on-candidates needs fastif-1 before dattri in --methods, got {' '.join(methods)}. "
                "List fastif-1 first, for example --methods fastif-1 dattri."
            )
    if args.dattri_train_batch_size is not None and args.dattri_train_batch_size < 1:
        parser.error(f"--dattri-train-batch-size must be at least 1, got {args.dattri_train_batch_size}.")
    if args.out_dir is None:
        args.out_dir = REPO_ROOT / "runs" / "peers" / args.setting
    return args


def main() -> None:
    args = parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    # The original influence functions are the reference: exact on the small model, LiSSA on MiniLM.
    reference_method = "original-exact" if args.setting == "logistic" else "original-lissa"
    methods = list(dict.fromkeys([reference_method, *args.methods]))
    problem_path = args.out_dir / "problem.pt"
    settings = {
        "setting": args.setting,
        "scale": args.scale,
        "depth": args.depth,
        "repeats": args.repeats,
        "batch_size": args.lissa_batch_size,
        "seed": args.seed,
        "k": args.k,
        "metric": args.knn_metric,
        "score_method": args.score_method,
        "dattri_train_batch_size": args.dattri_train_batch_size,
        # FastIF's own LiSSA settings. run_ours.py puts them over the shared ones for fastif-1 and fastif-2.
        "fastif_lissa": {
            "depth": args.depth if args.fastif_depth is None else args.fastif_depth,
            "repeats": args.repeats if args.fastif_repeats is None else args.fastif_repeats,
            "batch_size": args.lissa_batch_size
            if args.fastif_lissa_batch_size is None
            else args.fastif_lissa_batch_size,
        },
    }
    loo_change = None
    if args.setting == "logistic":
        start = time.perf_counter()
        problem = make_problem(args.num_train, args.features, args.queries, args.weight_decay, args.seed)
        save_problem(problem, problem_path)
        loo_change = load_problem(problem_path).loo_change
        problem_line = (
            f"- Problem: N={args.num_train} training examples, D={args.features} features and parameters, "
            f"{args.queries} queries, weight decay {args.weight_decay}, seed {args.seed}; LOO retraining took "
            f"{time.perf_counter() - start:.1f} s."
        )
        # This package's methods put the L2 term into the Hessian through `weight_decay`, so their LiSSA needs
        # no extra damping. The peers get 2 * weight_decay as damping in their own conventions (run_peer.py).
        settings["damping"] = 0.0
    else:
        model_line = (
            f"the fine-tuned weights of {args.checkpoint}" if args.checkpoint else "a fresh 3-way head (seeded)"
        )
        problem_line = (
            f"- Problem: all-MiniLM-L6-v2 with {model_line}, FastIF's parameters (last 2 encoder "
            f"layers, pooler, classifier); N={args.num_train} bundled MNLI training pairs, {args.queries} "
            f"MNLI dev-matched queries, {args.max_length} tokens per pair; seed {args.seed}. The peers differentiate "
            "the same parameters, except kronfluence (only their nn.Linear modules) and Captum's TracInCPFast "
            "(only the classifier)."
        )
        settings.update(
            damping=5e-3,
            num_train=args.num_train,
            queries=args.queries,
            max_length=args.max_length,
            checkpoint=args.checkpoint,
        )
        if set(methods) & set(PEERS):
            save_minilm_problem(build_minilm_problem(settings), problem_path)
    runs = {method: Run(method) for method in methods}
    loads = [os.getloadavg()[0]]
    for round_index in range(args.rounds):
        for method in methods:
            print(f"round {round_index + 1}/{args.rounds}: {method}", flush=True)
            if method == "dattri" and args.dattri_on_candidates and "dattri_candidates" not in settings:
                # Without candidates dattri would score every pair, which --dattri-on-candidates is there to avoid.
                runs[method].error = f"not run, because fastif-1 failed ({runs['fastif-1'].error})"
                continue
            run_method(method, problem_path, args.out_dir, settings, round_index, runs[method])
            loads.append(os.getloadavg()[0])
            if method == "fastif-1" and args.dattri_on_candidates and runs[method].results:
                candidates_path = args.out_dir / "fastif-1.candidates.pt"
                torch.save(runs[method].results[-1]["candidates"], candidates_path)
                settings["dattri_candidates"] = str(candidates_path)
    if not runs[reference_method].results:
        raise RuntimeError(f"The reference method {reference_method} failed: {runs[reference_method].error}")
    reference = runs[reference_method].results[-1]
    rows = [summarise(run, reference, loo_change) for run in runs.values() if run.results]
    failed = {run.method: run.error for run in runs.values() if run.error}
    versions = {name: value for row in rows for name, value in row["versions"].items()}
    fastif_lissa = settings["fastif_lissa"]
    lines = [
        f"- Command: `{shlex.join(['python', 'benchmarks/peers.py', *sys.argv[1:]])}`",
        problem_line,
        f"- LiSSA: damping {settings['damping']}, scale {args.scale:g}, depth {args.depth}, repeats "
        f"{args.repeats}, batch size {args.lissa_batch_size}; FastIF k={args.k} with {args.knn_metric} kNN and "
        f"LiSSA depth {fastif_lissa['depth']}, repeats {fastif_lissa['repeats']}, batch size "
        f"{fastif_lissa['batch_size']}; "
        f"{args.rounds} round(s) per method; reference {reference_method}.",
        f"- Machine: {cpu_model()}, {os.cpu_count()} visible cores, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}.",
        f"- Versions: {', '.join(f'{name} {value}' for name, value in sorted(versions.items()))}.",
        f"- 1-minute load average: {min(loads):.2f} to {max(loads):.2f} over the runs "
        f"(start {loads[0]:.2f}, end {loads[-1]:.2f}).",
    ]
    if args.dattri_on_candidates:
        lines.append(
            "- dattri scored only fastif-1's candidates, each query on its own, with the Hessian over all "
            f"{reference['scores'].shape[1]} training examples. Its time per query covers those candidates only."
        )
    if failed:
        lines.append("- Not run or failed: " + "; ".join(f"{name}: {error}" for name, error in failed.items()) + ".")
    report = "\n".join(lines) + "\n\n" + markdown_table(rows) + "\n"
    (args.out_dir / "table.md").write_text(report)
    (args.out_dir / "summary.json").write_text(json.dumps({"rows": rows, "failed": failed, "loads": loads}, indent=2))
    print(report)


if __name__ == "__main__":
    main()
