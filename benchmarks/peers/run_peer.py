"""Run one peer influence package on the saved problem, in that peer's own virtual environment.

Every peer gets the same fitted float64 model, the plain mean loss and ``2 * weight_decay`` as damping
(see ``problem.py``), and its scores are converted to this package's sign: ``-grad L(query)^T H^-1 grad
L(train)``, negative is helpful. Each peer computes all queries in one call, and the timed stage covers
everything from building the peer's objects to its ``[Q, N]`` scores.

Peers:
    dattri: ``IFAttributorLiSSA`` (dattri 0.3). Its ``attribute`` returns ``g_train^T H^-1 g_test``, so the
        score is its negation. Its LiSSA step is ours, so ``damping = 2 * weight_decay / scale``.
    pydvl: ``LissaInfluence`` (pyDVL 0.10). ``influences(mode=Up)`` returns ``<H^-1 g_test, g_train>``, so
        the score is its negation. Its ``regularization`` is added to the Hessian, so it is
        ``2 * weight_decay`` with ``dampen=0``. It runs one chain of ``depth * repeats`` steps.
    kronfluence: EKFAC factors, then ``compute_pairwise_scores`` (kronfluence 1.0), which returns
        ``g_query^T (G + damping I)^-1 g_train`` with the EKFAC approximation ``G`` of the Fisher of the mean
        loss. The score is its negation.
    captum: ``TracInCPFast`` (Captum 0.9) with the fitted weights as its one checkpoint: ``g_train^T g_test``
        over the last linear layer, with no Hessian. The score is its negation.

Usage: python run_peer.py PEER PROBLEM.pt RESULT.pt '{"depth": 300, ...}'
"""

from __future__ import annotations

import importlib
import json
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import Stopwatch, rss_mib, set_threads, write_result  # noqa: E402
from problem import Problem, load_problem  # noqa: E402


def run_dattri(problem: Problem, settings: dict, workdir: Path) -> Tensor:
    from dattri.algorithm import IFAttributorLiSSA
    from dattri.task import AttributionTask

    model = problem.model()

    def loss_func(params: dict[str, Tensor], data: tuple[Tensor, Tensor]) -> Tensor:
        x, y = data
        # dattri's LiSSA collate function casts the sampled data to float32, so the loss casts it back to float64.
        logits = torch.func.functional_call(model, params, x.to(torch.float64))
        return F.binary_cross_entropy_with_logits(logits, y.to(torch.float64))

    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
    attributor = IFAttributorLiSSA(
        task=task,
        batch_size=settings["batch_size"],
        num_repeat=settings["repeats"],
        recursion_depth=settings["depth"],
        damping=2 * problem.weight_decay / settings["scale"],
        scaling=settings["scale"],
    )
    num_train = problem.x_train.shape[0]
    # dattri sums the ihvp over the batches of the full training loader, so the loader must be one batch.
    attributor.cache(DataLoader(problem.train_dataset(), batch_size=num_train, shuffle=False))
    train_loader = DataLoader(problem.train_dataset(), batch_size=64, shuffle=False)
    query_loader = DataLoader(problem.query_dataset(), batch_size=problem.x_query.shape[0], shuffle=False)
    influence = attributor.attribute(train_loader, query_loader)  # [N, Q]
    return -influence.T


def run_pydvl(problem: Problem, settings: dict, workdir: Path) -> Tensor:
    from pydvl.influence.torch import LissaInfluence

    model = problem.model()
    influence_model = LissaInfluence(
        model,
        F.binary_cross_entropy_with_logits,
        regularization=2 * problem.weight_decay,
        maxiter=settings["depth"] * settings["repeats"],
        dampen=0.0,
        scale=settings["scale"],
        warn_on_max_iteration=False,
    )
    influence_model.fit(DataLoader(problem.train_dataset(), batch_size=settings["batch_size"], shuffle=False))
    influence = influence_model.influences(problem.x_query, problem.y_query, problem.x_train, problem.y_train)
    return -influence


def run_kronfluence(problem: Problem, settings: dict, workdir: Path) -> Tensor:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class LogisticTask(Task):
        def compute_train_loss(self, batch, model, sample: bool = False) -> Tensor:
            x, y = batch
            logits = model(x)
            if sample:
                # The true Fisher: labels drawn from the model's own predictive distribution.
                with torch.no_grad():
                    y = torch.bernoulli(torch.sigmoid(logits))
            return F.binary_cross_entropy_with_logits(logits, y, reduction="sum")

        def compute_measurement(self, batch, model) -> Tensor:
            x, y = batch
            return F.binary_cross_entropy_with_logits(model(x), y, reduction="sum")

    task = LogisticTask()
    model = prepare_model(problem.model(), task)
    analyzer = Analyzer("peers", model, task, cpu=True, disable_tqdm=True, output_dir=str(workdir))
    float64 = torch.float64
    factor_args = FactorArguments(
        strategy="ekfac",
        activation_covariance_dtype=float64,
        gradient_covariance_dtype=float64,
        eigendecomposition_dtype=float64,
        lambda_dtype=float64,
        per_sample_gradient_dtype=float64,
    )
    analyzer.fit_all_factors("ekfac", problem.train_dataset(), per_device_batch_size=64, factor_args=factor_args)
    score_args = ScoreArguments(
        damping_factor=2 * problem.weight_decay,
        per_sample_gradient_dtype=float64,
        precondition_dtype=float64,
        score_dtype=float64,
    )
    analyzer.compute_pairwise_scores(
        "scores",
        "ekfac",
        problem.query_dataset(),
        problem.train_dataset(),
        per_device_query_batch_size=problem.x_query.shape[0],
        per_device_train_batch_size=64,
        score_args=score_args,
    )
    return -analyzer.load_pairwise_scores("scores")["all_modules"]


def run_captum(problem: Problem, settings: dict, workdir: Path) -> Tensor:
    from captum.influence import TracInCPFast

    # TracInCPFast differentiates the loss with respect to the model's output and needs it to be the output
    # of `final_fc_layer`, shape [B, 1] here, so the model is the bare linear layer and labels are [B, 1].
    model = problem.model().linear
    checkpoint = workdir / "final.pt"
    torch.save(model.state_dict(), checkpoint)
    train = torch.utils.data.TensorDataset(problem.x_train, problem.y_train.unsqueeze(1))
    tracin = TracInCPFast(
        model,
        final_fc_layer=model,
        train_dataset=train,
        checkpoints=[str(checkpoint)],
        loss_fn=torch.nn.BCEWithLogitsLoss(reduction="sum"),
        batch_size=64,
    )
    influence = tracin.influence((problem.x_query, problem.y_query.unsqueeze(1)), k=None)
    return -influence


RUNNERS = {"dattri": run_dattri, "pydvl": run_pydvl, "kronfluence": run_kronfluence, "captum": run_captum}
PACKAGES = {"dattri": "dattri", "pydvl": "pyDVL", "kronfluence": "kronfluence", "captum": "captum"}
# Imported before the timed stage, so the seconds and the RSS rise leave out loading the package.
MODULES = {
    "dattri": ["dattri.algorithm", "dattri.task"],
    "pydvl": ["pydvl.influence.torch"],
    "kronfluence": ["kronfluence.analyzer", "kronfluence.arguments", "kronfluence.task"],
    "captum": ["captum.influence"],
}


def main() -> None:
    peer, problem_path, result_path, settings_json = sys.argv[1:5]
    if peer not in RUNNERS:
        raise ValueError(f"Unknown peer {peer!r}; expected one of {sorted(RUNNERS)}.")
    settings = json.loads(settings_json)
    set_threads()
    torch.manual_seed(settings["seed"])
    for module in MODULES[peer]:
        importlib.import_module(module)
    problem = load_problem(Path(problem_path))
    baseline = rss_mib()
    stopwatch = Stopwatch()
    with tempfile.TemporaryDirectory() as workdir, stopwatch("total"):
        scores = RUNNERS[peer](problem, settings, Path(workdir))
    write_result(
        Path(result_path),
        scores=scores,
        candidates=None,
        stopwatch=stopwatch,
        baseline_rss_mib=baseline,
        versions={PACKAGES[peer]: version(PACKAGES[peer]), "torch": str(torch.__version__)},
    )


if __name__ == "__main__":
    main()
