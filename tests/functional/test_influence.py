"""compute_influences: scores against leave-one-out retraining, model state, and bad input."""

import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from torch import nn
from torch.utils.data import TensorDataset

import lightning_fastif.influence
from lightning_fastif import InfluenceComputer, compute_influences
from lightning_fastif.functional import influence_mode
from tests.helpers.problems import fit_logistic, logistic_problem

LOO_MIN_CORRELATION = 0.95


def test_scores_match_leave_one_out_retraining():
    problem = logistic_problem(n=100, d=10, weight_decay=0.01, seed=0)
    gen = torch.Generator().manual_seed(5)
    query_x = torch.randn(3, 10, generator=gen, dtype=torch.float64)
    query_y = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    scores = compute_influences(
        problem.model, problem.loss_fn, problem.dataset, (query_x, query_y), solver="exact", weight_decay=0.01
    )
    theta = problem.model.weight.detach()[0]

    def query_loss(weights: torch.Tensor) -> float:
        logits = query_x @ weights
        return float(nn.functional.binary_cross_entropy_with_logits(logits, query_y))

    base = query_loss(theta)
    actual = []
    for i in range(len(problem.dataset)):
        keep = torch.ones(len(problem.dataset), dtype=torch.float64)
        keep[i] = 0.0
        actual.append(query_loss(fit_logistic(problem.x, problem.y, 0.01, keep, init=theta)) - base)
    actual = torch.tensor(actual)
    # Removing example i is up-weighting it by -1/n, so the predicted change is -score / n.
    predicted = -scores / len(problem.dataset)
    assert pearsonr(predicted, actual).statistic >= LOO_MIN_CORRELATION
    assert spearmanr(predicted, actual).statistic >= LOO_MIN_CORRELATION
    # Signs: the examples whose removal raises the query loss most are the most helpful (most negative).
    assert actual[scores.argmin()] > 0
    assert actual[scores.argmax()] < 0


def test_solvers_agree_through_entry_point():
    problem = logistic_problem()
    query = (problem.x[:4], problem.y[:4])
    exact = compute_influences(problem.model, problem.loss_fn, problem.dataset, query, solver="exact", damping=0.01)
    cg = compute_influences(problem.model, problem.loss_fn, problem.dataset, query, solver="cg", damping=0.01)
    lissa = compute_influences(
        problem.model,
        problem.loss_fn,
        problem.dataset,
        query,
        solver="lissa",
        damping=0.002,
        scale=5.0,
        depth=2000,
        batch_size=100,
    )
    assert exact.shape == (100,)
    torch.testing.assert_close(cg, exact, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(lissa, exact, rtol=1e-6, atol=1e-10)


def test_weight_decay_in_gradients_shifts_towards_helpful():
    problem = logistic_problem()
    query = (problem.x[:4], problem.y[:4])
    common = dict(solver="exact", weight_decay=0.01)
    plain = compute_influences(problem.model, problem.loss_fn, problem.dataset, query, **common)
    shifted = compute_influences(
        problem.model, problem.loss_fn, problem.dataset, query, weight_decay_in_gradients=True, **common
    )
    assert not torch.allclose(plain, shifted)


def test_divide_by_train_size():
    problem = logistic_problem()
    query = (problem.x[:2], problem.y[:2])
    plain = compute_influences(problem.model, problem.loss_fn, problem.dataset, query, solver="exact")
    divided = compute_influences(
        problem.model, problem.loss_fn, problem.dataset, query, solver="exact", divide_by_train_size=True
    )
    torch.testing.assert_close(divided, plain / 100)


def mlp_with_dropout_and_batchnorm() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 1)).double()


def mlp_setup():
    model = mlp_with_dropout_and_batchnorm()
    x = torch.randn(30, 4, dtype=torch.float64)
    y = torch.randn(30, dtype=torch.float64)

    def loss_fn(m, batch):
        return ((m(batch[0]).squeeze(-1) - batch[1]) ** 2).mean()

    return model, TensorDataset(x, y), (x[:5], y[:5]), loss_fn


def test_model_state_is_restored():
    model, train, query, loss_fn = mlp_setup()
    model[0].weight.requires_grad_(False)
    model.train()
    model[3].eval()  # a mixed mode must come back exactly as it was
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in model.parameters()]
    compute_influences(model, loss_fn, train, query, solver="lissa", depth=5, scale=100.0)
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == flags
    for name, p in model.named_parameters():
        assert torch.equal(p, weights[name]), name
        assert p.grad is None, name
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name


def test_dropout_is_off_during_influence():
    model, train, query, loss_fn = mlp_setup()
    model.train()
    first = compute_influences(model, loss_fn, train, query, solver="exact", damping=0.1)
    second = compute_influences(model, loss_fn, train, query, solver="exact", damping=0.1)
    assert torch.equal(first, second)


def test_frozen_parameters_get_no_gradient():
    model, train, query, loss_fn = mlp_setup()
    model[0].weight.requires_grad_(False)
    computer = InfluenceComputer(model, loss_fn, train, solver="exact")
    assert "0.weight" not in computer.selection.names
    assert computer.selection.numel == sum(p.numel() for p in model.parameters() if p.requires_grad)
    grads = computer.train_gradients(range(4))
    assert grads.shape == (4, computer.selection.numel)
    assert model[0].weight.requires_grad is False
    assert model[0].weight.grad is None


def test_vmap_equals_loop_gradients():
    model, train, _, loss_fn = mlp_setup()
    computer = InfluenceComputer(model, loss_fn, train, solver="exact")
    batch = computer.train.batch(range(12))
    with influence_mode(model):
        vectorised = computer.loss.per_example_gradients(batch, vectorize="vmap")
        looped = computer.loss.per_example_gradients(batch, vectorize="loop")
    torch.testing.assert_close(vectorised, looped, rtol=0, atol=1e-10)


def test_vmap_handles_extra_leading_dims_and_dicts():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    # Each example is a [4, 3] block: the loss pools over the inner dim.
    items = [{"x": torch.randn(4, 3, dtype=torch.float64), "y": torch.randn(2, dtype=torch.float64)} for _ in range(6)]

    def loss_fn(m, batch):
        return ((m(batch["x"]).mean(dim=1) - batch["y"]) ** 2).sum(dim=1).mean()

    computer = InfluenceComputer(model, loss_fn, items, solver="exact")
    batch = computer.train.batch(range(6))
    torch.testing.assert_close(
        computer.loss.per_example_gradients(batch, vectorize="vmap"),
        computer.loss.per_example_gradients(batch, vectorize="loop"),
        rtol=0,
        atol=1e-10,
    )


def test_parameter_patterns_select_subset():
    model, train, _, loss_fn = mlp_setup()
    computer = InfluenceComputer(model, loss_fn, train, solver="exact", parameters=[r"^4\."])
    assert computer.selection.names == ("4.weight", "4.bias")
    explicit = InfluenceComputer(model, loss_fn, train, solver="exact", parameters=[model[4].weight])
    assert explicit.selection.names == ("4.weight",)


# Bad input: each message names the value and the fix.


def test_empty_training_set_rejected():
    model, _, query, loss_fn = mlp_setup()
    empty = TensorDataset(torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0, dtype=torch.float64))
    with pytest.raises(ValueError, match="training set is empty"):
        compute_influences(model, loss_fn, empty, query, solver="exact")


@pytest.mark.parametrize(
    ("query", "pattern"),
    [
        ("not a batch", r"`query_batch` is not a batch: it contains no tensor \(got str\)"),
        ({"x": torch.tensor(1.0)}, r"`query_batch` is not a batch: it contains a 0-dim tensor"),
        ((torch.zeros(3, 4), torch.zeros(2)), r"`query_batch` is not a batch: .*different first dims \[2, 3\]"),
    ],
)
def test_query_that_is_not_a_batch_rejected(query, pattern):
    model, train, _, loss_fn = mlp_setup()
    with pytest.raises(TypeError, match=pattern):
        compute_influences(model, loss_fn, train, query, solver="exact")


def test_no_trainable_parameter_rejected():
    model, train, query, loss_fn = mlp_setup()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="No selected parameter requires grad"):
        compute_influences(model, loss_fn, train, query, solver="exact")


def test_pattern_matching_nothing_rejected():
    model, train, query, loss_fn = mlp_setup()
    with pytest.raises(ValueError, match=r"pattern 'decoder' matches no parameter name.*0\.weight"):
        compute_influences(model, loss_fn, train, query, solver="exact", parameters=["decoder"])


def test_non_scalar_loss_rejected():
    model, train, query, _ = mlp_setup()

    def per_example_loss(m, batch):
        return (m(batch[0]).squeeze(-1) - batch[1]) ** 2

    with pytest.raises(ValueError, match=r"must return the mean loss .* scalar tensor, but returned \(5,\)"):
        compute_influences(model, per_example_loss, train, query, solver="exact")


def test_non_finite_loss_rejected():
    model, train, query, loss_fn = mlp_setup()
    bad_query = (query[0] * float("nan"), query[1])
    with pytest.raises(ValueError, match=r"non-finite loss \(nan\) on the query batch"):
        compute_influences(model, loss_fn, train, bad_query, solver="exact")


def test_non_finite_query_gradients_name_queries():
    model, train, query, loss_fn = mlp_setup()
    bad_query = (query[0] * float("nan"), query[1])
    computer = InfluenceComputer(model, loss_fn, train, solver="exact")
    with pytest.raises(ValueError, match=r"Check the loss of the query examples\."):
        computer.query_gradients(bad_query, mode="each")


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"solver": "lissa", "damping": -0.1}, r"`damping` must be a finite number >= 0, but got -0.1"),
        ({"solver": "lissa", "scale": 0.0}, r"`scale` must be a finite number > 0, but got 0.0"),
        ({"solver": "exact", "damping": -1.0}, r"`damping` must be a finite number >= 0, but got -1.0"),
        ({"solver": "newton"}, r"Unknown solver 'newton'. Choose one of \['cg', 'exact', 'lissa'\]"),
    ],
)
def test_bad_solver_options_rejected(options, pattern):
    model, train, query, loss_fn = mlp_setup()
    with pytest.raises(ValueError, match=pattern):
        compute_influences(model, loss_fn, train, query, **options)


def test_unknown_solver_option_rejected():
    model, train, query, loss_fn = mlp_setup()
    with pytest.raises(TypeError, match=r"Solver 'exact' takes no option\(s\) \['depth'\]"):
        compute_influences(model, loss_fn, train, query, solver="exact", depth=10)


@pytest.mark.parametrize("wd_in_gradients", [False, True])
def test_jvp_scores_equal_gradient_scores(wd_in_gradients):
    problem = logistic_problem(n=40, d=6, weight_decay=0.01, seed=3)
    query = (problem.x[:3], problem.y[:3])
    options = dict(solver="exact", weight_decay=0.01, weight_decay_in_gradients=wd_in_gradients, gradient_batch_size=7)
    by_gradient = compute_influences(
        problem.model, problem.loss_fn, problem.dataset, query, score_method="gradient", **options
    )
    by_jvp = compute_influences(problem.model, problem.loss_fn, problem.dataset, query, score_method="jvp", **options)
    torch.testing.assert_close(by_jvp, by_gradient, rtol=1e-10, atol=1e-12)


def test_unknown_score_method_rejected():
    problem = logistic_problem(n=10, d=3)
    with pytest.raises(ValueError, match="`score_method` must be 'auto', 'gradient' or 'jvp', but got 'hvp'"):
        InfluenceComputer(problem.model, problem.loss_fn, problem.dataset, score_method="hvp")


class _CountingLoss:
    """Wraps a ``FunctionalLoss`` and counts the calls of its two scoring paths."""

    def __init__(self, loss):
        self.loss = loss
        self.calls = {"jvp": 0, "gradient": 0}

    def per_example_directional_derivatives(self, batch, vectors):
        self.calls["jvp"] += 1
        return self.loss.per_example_directional_derivatives(batch, vectors)

    def per_example_gradients(self, batch, **options):
        self.calls["gradient"] += 1
        return self.loss.per_example_gradients(batch, **options)


@pytest.mark.parametrize(("num_queries", "expected"), [(1, "jvp"), (3, "gradient")])
def test_auto_score_method_choice(num_queries, expected):
    problem = logistic_problem(n=30, d=5, seed=4)
    computer = InfluenceComputer(problem.model, problem.loss_fn, problem.dataset, solver="exact", damping=0.01)
    assert computer.score_method == "auto"
    query = (problem.x[:num_queries], problem.y[:num_queries])
    ihvps = computer.ihvp(computer.query_gradients(query, mode="each"))
    counting = _CountingLoss(computer.loss)
    computer.loss = counting
    scores = computer.scores(ihvps)
    other = "gradient" if expected == "jvp" else "jvp"
    assert counting.calls[expected] > 0
    assert counting.calls[other] == 0
    computer.score_method = "gradient"
    torch.testing.assert_close(scores, computer.scores(ihvps), rtol=1e-10, atol=1e-12)


class _RecordingLoss(_CountingLoss):
    """A ``_CountingLoss`` that also records the rows of every scoring call."""

    def __init__(self, loss):
        super().__init__(loss)
        self.rows = {"jvp": 0, "gradient": 0}

    def per_example_directional_derivatives(self, batch, vectors):
        self.rows["jvp"] += len(batch[0])
        return super().per_example_directional_derivatives(batch, vectors)

    def per_example_gradients(self, batch, **options):
        self.rows["gradient"] += len(batch[0])
        return super().per_example_gradients(batch, **options)


SHARED_CANDIDATES = [[0, 1, 2, 3, 4, 5], [3, 4, 5, 6, 7], [], [1, 7, 9]]


def row_scores_recorded(score_method, monkeypatch=None, max_parameters=None):
    problem = logistic_problem(n=30, d=5, seed=4)
    computer = InfluenceComputer(
        problem.model, problem.loss_fn, problem.dataset, solver="exact", damping=0.01, score_method=score_method
    )
    if max_parameters is not None:
        monkeypatch.setattr(lightning_fastif.influence, "SHARED_SCORING_MAX_PARAMETERS", max_parameters)
    ihvps = computer.ihvp(computer.query_gradients((problem.x[:4], problem.y[:4]), mode="each"))
    recording = _RecordingLoss(computer.loss)
    computer.loss = recording
    rows, _ = computer.row_scores(ihvps, SHARED_CANDIDATES)
    computer.loss = recording.loss
    return computer, ihvps, rows, recording.rows


@pytest.mark.parametrize("score_method", ["auto", "gradient"])
def test_row_scores_share_candidate_gradients(score_method):
    # Candidates 1, 3, 4, 5 and 7 appear in two lists: each gets one gradient, and the 4 rows one pass.
    computer, ihvps, rows, scored = row_scores_recorded(score_method)
    union = set().union(*SHARED_CANDIDATES)
    assert scored == {"jvp": 0, "gradient": len(union)}
    computer.score_method = "jvp"
    for row, positions in enumerate(SHARED_CANDIDATES):
        expected = computer.scores(ihvps[row : row + 1], positions)[0]
        assert rows[row].shape == (len(positions),)
        torch.testing.assert_close(rows[row], expected, rtol=1e-12, atol=0)


def test_row_scores_jvp_scores_each_row():
    _, _, _, scored = row_scores_recorded("jvp")
    assert scored == {"jvp": sum(map(len, SHARED_CANDIDATES)), "gradient": 0}


def test_row_scores_large_model_scores_each_row(monkeypatch):
    # Above SHARED_SCORING_MAX_PARAMETERS "auto" keeps a forward-mode pass per row; "gradient" still scores the union.
    _, _, _, scored = row_scores_recorded("auto", monkeypatch, max_parameters=4)
    assert scored == {"jvp": sum(map(len, SHARED_CANDIDATES)), "gradient": 0}
    _, _, _, scored = row_scores_recorded("gradient", monkeypatch, max_parameters=4)
    assert scored == {"jvp": 0, "gradient": len(set().union(*SHARED_CANDIDATES))}


class _TanhWithoutForwardAD(torch.autograd.Function):
    """tanh with a backward formula but no ``jvp``, like a custom operation that lacks forward-mode AD."""

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad_output):
        (output,) = ctx.saved_tensors
        return grad_output * (1 - output**2)

    @staticmethod
    def vmap(info, in_dims, x):
        return _TanhWithoutForwardAD.apply(x), in_dims[0]


class _CustomTanhModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(4, 3).double()
        self.out = nn.Linear(3, 1).double()

    def forward(self, x):
        return self.out(_TanhWithoutForwardAD.apply(self.hidden(x))).squeeze(-1)


def _custom_tanh_problem():
    torch.manual_seed(0)
    model = _CustomTanhModel()
    x = torch.randn(12, 4, dtype=torch.float64)
    y = torch.randn(12, dtype=torch.float64)
    return model, TensorDataset(x, y), (x[:1], y[:1]), lambda m, batch: ((m(batch[0]) - batch[1]) ** 2).mean()


def test_auto_score_method_falls_back_without_forward_ad(caplog):
    model, train, query, loss_fn = _custom_tanh_problem()
    options = dict(solver="exact", damping=0.1, gradient_batch_size=5)
    with caplog.at_level("WARNING", logger="lightning_fastif.influence"):
        by_auto = compute_influences(model, loss_fn, train, query, **options)
    by_gradient = compute_influences(model, loss_fn, train, query, score_method="gradient", **options)
    torch.testing.assert_close(by_auto, by_gradient, rtol=1e-10, atol=1e-12)
    warnings = [r for r in caplog.records if "Forward-mode scoring failed" in r.getMessage()]
    assert len(warnings) == 1  # the later batches go straight to per-example gradients


def test_jvp_without_forward_ad_rejected():
    model, train, query, loss_fn = _custom_tanh_problem()
    with pytest.raises(RuntimeError, match=r"score_method='jvp'\) failed: .*Use score_method='gradient'"):
        compute_influences(model, loss_fn, train, query, solver="exact", damping=0.1, score_method="jvp")


@pytest.mark.parametrize("score_method", ["gradient", "jvp"])
def test_row_scores_take_tensor_candidates(score_method):
    # FastIF passes its kNN candidates as int64 tensors, one of them empty and one with a repeat.
    computer, ihvps, rows, _ = row_scores_recorded(score_method)
    candidates = [torch.tensor(positions, dtype=torch.long) for positions in [*SHARED_CANDIDATES[:3], [1, 7, 7]]]
    tensor_rows, _ = computer.row_scores(ihvps, candidates)
    for row in range(3):
        torch.testing.assert_close(tensor_rows[row], rows[row], rtol=1e-12, atol=0)
    expected = computer.scores(ihvps[3:], [1, 7, 7])[0]
    torch.testing.assert_close(tensor_rows[3], expected, rtol=1e-12, atol=0)


def test_row_scores_reject_bad_candidate_tensors():
    computer, ihvps, _, _ = row_scores_recorded("gradient")
    bad = [torch.tensor([[0, 1], [2, 3]]), torch.tensor(3), torch.tensor([0.0, 1.0])]
    for tensor in bad:
        candidates = [tensor, [1], [2], [3]]
        with pytest.raises(ValueError, match=r"candidate tensor must be 1-D with an integer dtype"):
            computer.row_scores(ihvps, candidates)


def test_row_scores_waits_without_candidates(monkeypatch):
    from lightning_fastif.distributed import PendingSum

    computer, _, _, _ = row_scores_recorded("gradient")
    waits = []
    result = PendingSum.result
    monkeypatch.setattr(PendingSum, "result", lambda self: waits.append(self) or result(self))
    pending = PendingSum(torch.zeros(0, 5))
    assert computer.row_scores(pending, []) == ([], [])
    assert waits == [pending]
