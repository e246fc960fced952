"""Run one peer influence package on the saved problem, in that peer's own virtual environment.

In the logistic setting every peer gets the same fitted float64 model, the plain mean loss and
``2 * weight_decay`` as damping (see ``problem.py``). Scores are converted to this package's sign:
``-grad L(query)^T H^-1 grad L(train)``, negative is helpful. Each peer computes all queries in one call,
and the timed stage covers everything from building the peer's objects to its ``[Q, N]`` scores.

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

With ``"setting": "minilm"`` PROBLEM.pt is a :class:`problem.MiniLMProblem`. Every peer then gets
all-MiniLM-L6-v2 with the driver's parameters, loaded before the timed stage as this package's runner
does, the mean cross-entropy, and the effective damping ``damping * scale`` of this package's LiSSA:

    dattri: ``IFAttributorLiSSA`` with the same ``damping``, ``scaling``, depth, repeats and batch size,
        and the parameters outside FastIF's selection frozen. It reruns LiSSA for every training batch of
        ``dattri_train_batch_size`` pairs. With ``dattri_candidates`` (a ``[Q, k]`` file that peers.py
        writes from fastif-1's result) it scores only those candidates, one query at a time, as FastIF does.
    pydvl: ``LissaInfluence`` restricted to FastIF's selection by ``block_structure``, with
        ``regularization = damping * scale``, ``dampen=0`` and one chain of ``depth * repeats`` steps. The
        query factors are computed once, then scored against the training set in batches.
    kronfluence: EKFAC on the ``nn.Linear`` modules of FastIF's selection (kronfluence tracks no
        LayerNorm), true Fisher, ``damping_factor = damping * scale``.
    captum: ``TracInCPFast`` on the classifier, the only layer it differentiates.

dattri, pyDVL and Captum read tuple batches, so their datasets hold the tensors in the order
``input_ids, attention_mask, token_type_ids, labels`` (pyDVL packs the first three into one ``[B, 3, L]``
input). kronfluence reads the dict batches that this package uses.

Usage: python run_peer.py PEER PROBLEM.pt RESULT.pt '{"depth": 300, ...}'
"""

from __future__ import annotations

import importlib
import json
import sys
import tempfile
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import Stopwatch, rss_mib, set_threads, write_result  # noqa: E402
from problem import (  # noqa: E402
    MINILM_INPUT_KEYS,
    MiniLMProblem,
    Problem,
    load_minilm_problem,
    load_problem,
    minilm_inputs,
    minilm_logits,
)

# Training examples per batch of dattri's `attribute` on the logistic problem, unless the driver sets one.
DATTRI_LOGISTIC_TRAIN_BATCH_SIZE = 64


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
    batch_size = settings.get("dattri_train_batch_size") or DATTRI_LOGISTIC_TRAIN_BATCH_SIZE
    train_loader = DataLoader(problem.train_dataset(), batch_size=batch_size, shuffle=False)
    query_loader = DataLoader(problem.query_dataset(), batch_size=problem.x_query.shape[0], shuffle=False)
    # As in run_dattri_minilm: no_grad keeps autograd from recording dattri's LiSSA steps.
    with torch.no_grad():
        # dattri sums the ihvp over the batches of the full training loader, so the loader must be one batch.
        attributor.cache(DataLoader(problem.train_dataset(), batch_size=num_train, shuffle=False))
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


# ---------------------------------------------------------------------------------------------------
# MiniLM on MNLI
# ---------------------------------------------------------------------------------------------------

# Training examples per gradient batch when a peer scores the training set, as in run_ours.py.
MINILM_GRADIENT_BATCH_SIZE = 16
# dattri reruns LiSSA for every training batch of `attribute`, so its batches are larger. On 100 training
# examples, batches of 50 took 278 s against 211 s for one batch of 100, and with 100 the process peaked at
# 10,302 MiB RSS on 200 examples (dattri 0.3.0, one thread).
DATTRI_TRAIN_BATCH_SIZE = 100


class DictDataset(Dataset):
    """Rows of a dict of equally long tensors, each row a dict, so that batches collate to dicts."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors["labels"])

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {key: value[index] for key, value in self.tensors.items()}


def tuple_dataset(tensors: dict[str, Tensor]) -> TensorDataset:
    """Return ``(input_ids, attention_mask, token_type_ids, labels)`` rows, for peers that read tuple batches."""
    return TensorDataset(*(tensors[key] for key in MINILM_INPUT_KEYS), tensors["labels"])


def tuple_batch(tensors: Sequence[Tensor], *, labels: Tensor | None = None) -> dict[str, Tensor]:
    """Turn the leading tensors of a tuple batch back into a dict batch (ids may arrive as floats)."""
    batch = {key: value.long() for key, value in zip(MINILM_INPUT_KEYS, tensors, strict=True)}
    if labels is not None:
        batch["labels"] = labels.long()
    return batch


def freeze_outside(model: nn.Module, names: list[str]) -> None:
    """Freeze every parameter of ``model`` except the named ones."""
    selected = set(names)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in selected)


def run_dattri_minilm(
    problem: MiniLMProblem, model: nn.Module, settings: dict, workdir: Path, candidates: Tensor | None = None
) -> Tensor:
    """Score the training pairs with dattri's LiSSA: all of them, or only ``candidates[q]`` (NaN elsewhere)."""
    from dattri.algorithm import IFAttributorLiSSA
    from dattri.task import AttributionTask

    # dattri differentiates the parameters that require grad. Its `layer_name` option selects them too, but
    # then dattri 0.3.0 concatenates all 22.7M parameters into one vector on every loss call.
    freeze_outside(model, list(problem.parameters))

    def loss_func(params: dict[str, Tensor], data: tuple[Tensor, ...]) -> Tensor:
        # The leading dimension of `data` is 1 in dattri's per-example vmap and the batch size in LiSSA.
        # dattri's LiSSA collate function casts every tensor to float32, so tuple_batch casts ids back.
        *inputs, labels = data
        batch = tuple_batch(inputs, labels=labels)
        logits = torch.func.functional_call(model, params, kwargs=minilm_inputs(batch)).logits
        return F.cross_entropy(logits, batch["labels"])

    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
    attributor = IFAttributorLiSSA(
        task=task,
        batch_size=settings["batch_size"],
        num_repeat=settings["repeats"],
        recursion_depth=settings["depth"],
        damping=settings["damping"],
        scaling=settings["scale"],
    )
    train = tuple_dataset(problem.train)
    queries = tuple_dataset(problem.queries)
    query_loader = DataLoader(queries, batch_size=len(queries), shuffle=False)
    # The parameters require grad, so without no_grad autograd records every LiSSA step on top of dattri's
    # torch.func transforms and the memory grows with the depth. At depth 200 on 100 training pairs the
    # process peaked at 21,685 MiB without it and 7,394 MiB with it. torch.func ignores an enclosing no_grad.
    batch_size = settings.get("dattri_train_batch_size") or DATTRI_TRAIN_BATCH_SIZE
    with torch.no_grad():
        # dattri sums the ihvp over the batches of the full training loader, so the loader must be one batch.
        attributor.cache(DataLoader(train, batch_size=len(train), shuffle=False))
        if candidates is None:
            influence = attributor.attribute(DataLoader(train, batch_size=batch_size, shuffle=False), query_loader)
            return -influence.T  # [Q, N]
        # Each query scores its own candidates, as FastIF does. The rest of its row stays NaN.
        scores = torch.full((len(queries), len(train)), float("nan"), dtype=torch.float64)
        for query, rows in enumerate(candidates):
            train_loader = DataLoader(Subset(train, rows.tolist()), batch_size=batch_size, shuffle=False)
            one_query = DataLoader(Subset(queries, [query]), batch_size=1, shuffle=False)
            scores[query, rows] = -attributor.attribute(train_loader, one_query)[:, 0].double()
        return scores


class PackedMiniLM(nn.Module):
    """MiniLM taking one int64 input ``[B, 3, L]`` (ids, padding mask, token types), as pyDVL's ``(x, y)`` needs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return minilm_logits(self.model, tuple_batch(x.unbind(1)))


def packed_inputs(tensors: dict[str, Tensor]) -> Tensor:
    return torch.stack([tensors[key] for key in MINILM_INPUT_KEYS], dim=1)


def run_pydvl_minilm(problem: MiniLMProblem, model: nn.Module, settings: dict, workdir: Path) -> Tensor:
    from collections import OrderedDict

    from pydvl.influence.torch import LissaInfluence

    packed = PackedMiniLM(model)
    names = [f"model.{name}" for name in problem.parameters]
    influence_model = LissaInfluence(
        packed,
        F.cross_entropy,
        regularization=settings["damping"] * settings["scale"],
        maxiter=settings["depth"] * settings["repeats"],
        dampen=0.0,
        scale=settings["scale"],
        warn_on_max_iteration=False,
        block_structure=OrderedDict(fastif=names),
    )
    x_train, y_train = packed_inputs(problem.train), problem.train["labels"]
    influence_model.fit(DataLoader(TensorDataset(x_train, y_train), batch_size=settings["batch_size"], shuffle=False))
    factors = influence_model.influence_factors(packed_inputs(problem.queries), problem.queries["labels"])
    chunks = [
        influence_model.influences_from_factors(factors, x_train[start:stop], y_train[start:stop])
        for start, stop in batch_bounds(len(y_train), MINILM_GRADIENT_BATCH_SIZE)
    ]
    return -torch.cat(chunks, dim=1)


def batch_bounds(total: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, total)) for start in range(0, total, size)]


def run_kronfluence_minilm(problem: MiniLMProblem, model: nn.Module, settings: dict, workdir: Path) -> Tensor:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    modules = dict(model.named_modules())
    owners = dict.fromkeys(name.rsplit(".", 1)[0] for name in problem.parameters)
    tracked = [name for name in owners if isinstance(modules[name], nn.Linear)]

    class MiniLMTask(Task):
        def compute_train_loss(self, batch, model, sample: bool = False) -> Tensor:
            logits = minilm_logits(model, batch)
            labels = batch["labels"]
            if sample:
                # The true Fisher: labels drawn from the model's own predictive distribution.
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1).flatten()
            return F.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model) -> Tensor:
            return F.cross_entropy(minilm_logits(model, batch), batch["labels"], reduction="sum")

        def get_influence_tracked_modules(self) -> list[str]:
            return tracked

        def get_attention_mask(self, batch) -> Tensor:
            return batch["attention_mask"]

    task = MiniLMTask()
    model = prepare_model(model, task)
    analyzer = Analyzer("peers", model, task, cpu=True, disable_tqdm=True, output_dir=str(workdir))
    train, queries = DictDataset(problem.train), DictDataset(problem.queries)
    batch_size = MINILM_GRADIENT_BATCH_SIZE
    factor_args = FactorArguments(strategy="ekfac")
    analyzer.fit_all_factors("ekfac", train, per_device_batch_size=batch_size, factor_args=factor_args)
    score_args = ScoreArguments(damping_factor=settings["damping"] * settings["scale"])
    analyzer.compute_pairwise_scores(
        "scores",
        "ekfac",
        queries,
        train,
        per_device_query_batch_size=len(queries),
        per_device_train_batch_size=batch_size,
        score_args=score_args,
    )
    return -analyzer.load_pairwise_scores("scores")["all_modules"]


class TupleMiniLM(nn.Module):
    """MiniLM taking ``(input_ids, attention_mask, token_type_ids)``, as Captum passes a tuple batch."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> Tensor:
        return minilm_logits(self.model, tuple_batch((input_ids, attention_mask, token_type_ids)))


def run_captum_minilm(problem: MiniLMProblem, model: nn.Module, settings: dict, workdir: Path) -> Tensor:
    from captum.influence import TracInCPFast

    wrapper = TupleMiniLM(model)
    checkpoint = workdir / "minilm.pt"
    torch.save(wrapper.state_dict(), checkpoint)
    tracin = TracInCPFast(
        wrapper,
        final_fc_layer=wrapper.model.classifier,
        train_dataset=tuple_dataset(problem.train),
        checkpoints=[str(checkpoint)],
        loss_fn=nn.CrossEntropyLoss(reduction="sum"),
        batch_size=MINILM_GRADIENT_BATCH_SIZE,
    )
    queries = tuple(problem.queries[key] for key in (*MINILM_INPUT_KEYS, "labels"))
    influence = tracin.influence(queries, k=None)
    return -influence


RUNNERS = {"dattri": run_dattri, "pydvl": run_pydvl, "kronfluence": run_kronfluence, "captum": run_captum}
MINILM_RUNNERS = {
    "dattri": run_dattri_minilm,
    "pydvl": run_pydvl_minilm,
    "kronfluence": run_kronfluence_minilm,
    "captum": run_captum_minilm,
}
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
    versions = {PACKAGES[peer]: version(PACKAGES[peer]), "torch": str(torch.__version__)}
    candidates = None
    if peer == "dattri" and settings.get("dattri_candidates"):
        candidates = torch.load(settings["dattri_candidates"], weights_only=True)  # [Q, k], from fastif-1
    if settings.get("setting", "logistic") == "minilm":
        minilm_problem = load_minilm_problem(Path(problem_path))
        # Loading the model is data loading, outside the timed stage, as in run_ours.py.
        model = minilm_problem.model()
        versions["transformers"] = version("transformers")

        def run(workdir: Path) -> Tensor:
            if candidates is not None:
                return run_dattri_minilm(minilm_problem, model, settings, workdir, candidates)
            return MINILM_RUNNERS[peer](minilm_problem, model, settings, workdir)

    else:
        problem = load_problem(Path(problem_path))

        if candidates is not None:
            raise ValueError(
                f"dattri_candidates is set to {settings['dattri_candidates']}, but dattri scores candidates only "
                "in the minilm setting. Run peers.py with --setting minilm or without --dattri-on-candidates."
            )

        def run(workdir: Path) -> Tensor:
            return RUNNERS[peer](problem, settings, workdir)

    baseline = rss_mib()
    stopwatch = Stopwatch()
    with tempfile.TemporaryDirectory() as workdir, stopwatch("total"):
        scores = run(Path(workdir))
    write_result(
        Path(result_path),
        scores=scores,
        candidates=candidates,
        stopwatch=stopwatch,
        baseline_rss_mib=baseline,
        versions=versions,
    )


if __name__ == "__main__":
    main()
