"""FastIF: kNN-pruned scores against the full computation, index freshness, and bad input."""

import pytest
import torch
from torch.utils.data import default_collate

import lightning_fastif.fastif
import lightning_fastif.influence
from lightning_fastif import InfluenceComputer
from lightning_fastif.fastif import FastIF, FastIFConfig
from lightning_fastif.hf import sequence_classification_loss
from lightning_fastif.knn import classifier_input_features
from tests.helpers.tiny_bert import tiny_bert, token_items

PARAMETERS = [r"encoder\.layer\.1\.", r"pooler\.", r"classifier\."]
SETTINGS = dict(damping=1e-3, scale=100.0, depth=30, batch_size=4, seed=0)


def make_fastif(model, train, **config):
    return FastIF(
        model,
        sequence_classification_loss,
        lambda batch: classifier_input_features(model, batch),
        train,
        parameters=PARAMETERS,
        config=FastIFConfig(**{**SETTINGS, **config}),
    )


def record_solve_sizes(monkeypatch, fastif):
    """Return a list that collects the number of query rows of each LiSSA solve of ``fastif``."""
    solve_sizes = []
    solve = fastif.computer.start_ihvp

    def counting_solve(query_gradients):
        solve_sizes.append(len(query_gradients))
        return solve(query_gradients)

    monkeypatch.setattr(fastif.computer, "start_ihvp", counting_solve)
    return solve_sizes


def test_k_equal_n_matches_full_computation():
    model = tiny_bert().double()
    train = token_items(24)
    query = default_collate(token_items(3, seed=1))
    results = make_fastif(model, train, k=24).explain(query, mode="each")
    solver = FastIFConfig(**SETTINGS).solver()
    full = InfluenceComputer(model, sequence_classification_loss, train, solver=solver, parameters=PARAMETERS)
    expected = full.compute(query, mode="each")  # [3, 24]
    for i, result in enumerate(results):
        assert sorted(result.candidate_indices.tolist()) == list(range(24))
        torch.testing.assert_close(result.scores, expected[i, result.candidate_indices], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shared_scoring", [False, True])
def test_shared_solve_matches_queries_alone(monkeypatch, shared_scoring):
    # explain() solves all queries in one LiSSA run, so each query's scores must equal explaining it
    # alone. With the limit raised above the model's size the queries are also scored together over the
    # union of their candidates, which may change the scores by rounding only.
    model = tiny_bert().double()
    train = token_items(24)
    items = token_items(3, seed=1)
    fastif = make_fastif(model, train, k=8)
    numel = fastif.computer.selection.numel
    assert numel > lightning_fastif.influence.SHARED_SCORING_MAX_PARAMETERS
    if shared_scoring:
        monkeypatch.setattr(lightning_fastif.influence, "SHARED_SCORING_MAX_PARAMETERS", numel)
    assert fastif.computer._scores_union(len(items)) == shared_scoring
    together = fastif.explain(default_collate(items), mode="each")
    for item, result in zip(items, together, strict=True):
        (alone,) = fastif.explain(default_collate([item]), mode="each")
        assert torch.equal(result.candidate_indices, alone.candidate_indices)
        torch.testing.assert_close(result.scores, alone.scores, rtol=1e-12, atol=0)
        assert set(result.timings) == {"knn", "ihvp", "scores"}


def test_shared_solve_chunks_match(monkeypatch):
    model = tiny_bert().double()
    fastif = make_fastif(model, token_items(24), k=8)
    query = default_collate(token_items(3, seed=1))
    whole = fastif.explain(query, mode="each")
    monkeypatch.setattr(lightning_fastif.fastif, "SHARED_SOLVE_QUERIES", 2)
    monkeypatch.setattr(lightning_fastif.fastif, "BATCHED_SOLVE_QUERIES", 2)
    solve_sizes = record_solve_sizes(monkeypatch, fastif)
    chunked = fastif.explain(query, mode="each")
    assert solve_sizes == [2, 1]
    assert len(chunked) == 3
    for expected, result in zip(whole, chunked, strict=True):
        assert torch.equal(result.candidate_indices, expected.candidate_indices)
        torch.testing.assert_close(result.scores, expected.scores, rtol=1e-12, atol=0)


def test_batched_rows_memory_bound(monkeypatch):
    model = tiny_bert().double()
    fastif = make_fastif(model, token_items(24), k=8)
    numel = fastif.computer.selection.numel
    assert fastif.computer.loss.batches_hvps
    bound = lightning_fastif.fastif.BATCHED_SOLVE_ELEMENTS // numel
    assert fastif.rows_per_solve() == min(lightning_fastif.fastif.BATCHED_SOLVE_QUERIES, bound) >= 10
    solve_sizes = record_solve_sizes(monkeypatch, fastif)
    query = default_collate(token_items(10, seed=1))
    together = fastif.explain(query, mode="each")
    assert solve_sizes == [10]
    # Room for 3 rows of P per solve: chunks of 3, whose scores equal those of the one solve.
    monkeypatch.setattr(lightning_fastif.fastif, "BATCHED_SOLVE_ELEMENTS", 3 * numel + 1)
    assert fastif.rows_per_solve() == max(3, lightning_fastif.fastif.SHARED_SOLVE_QUERIES) == 8
    monkeypatch.setattr(lightning_fastif.fastif, "SHARED_SOLVE_QUERIES", 2)
    assert fastif.rows_per_solve() == 3
    solve_sizes.clear()
    chunked = fastif.explain(query, mode="each")
    assert solve_sizes == [3, 3, 3, 1]
    for expected, result in zip(together, chunked, strict=True):
        torch.testing.assert_close(result.scores, expected.scores, rtol=1e-10, atol=1e-14)
    # After a batched pass has failed, every row gets its own pass and the solve shares fewer rows.
    fastif.computer.loss._batched_hvps = False
    assert fastif.rows_per_solve() == 2


def test_large_model_shares_fewer_rows(monkeypatch):
    model = tiny_bert().double()
    fastif = make_fastif(model, token_items(24), k=8)
    fastif.computer.loss._batched_hvps = False  # as after a failed batched pass: one pass per row
    assert fastif.rows_per_solve() == lightning_fastif.fastif.SHARED_SOLVE_QUERIES
    # Make the tiny model count as large, so each solve shares at most LARGE_MODEL_SOLVE_QUERIES rows.
    monkeypatch.setattr(lightning_fastif.fastif, "LARGE_MODEL_PARAMETERS", 0)
    assert fastif.rows_per_solve() == lightning_fastif.fastif.LARGE_MODEL_SOLVE_QUERIES == 2
    solve_sizes = record_solve_sizes(monkeypatch, fastif)
    results = fastif.explain(default_collate(token_items(5, seed=1)), mode="each")
    assert solve_sizes == [2, 2, 1]
    assert len(results) == 5


def test_k_none_scores_every_example_in_order():
    model = tiny_bert().double()
    train = token_items(10)
    query = default_collate(token_items(2, seed=1))
    (result,) = make_fastif(model, train, k=None).explain(query, mode="mean")
    assert result.candidate_indices.tolist() == list(range(10))
    assert result.query_indices.tolist() == [0, 1]


def test_candidates_are_nearest_neighbours():
    model = tiny_bert()
    train = token_items(30)
    fastif = make_fastif(model, train, k=5)
    query = default_collate(token_items(1, seed=3))
    (result,) = fastif.explain(query)
    train_features = classifier_input_features(model, default_collate(train))
    query_features = classifier_input_features(model, query)
    expected = torch.cdist(query_features, train_features)[0].topk(5, largest=False).indices
    assert result.candidate_indices.tolist() == expected.tolist()


def test_query_chunk_searched_once(monkeypatch):
    # In "each" mode a chunk of queries gets one features call, one faiss search and one per-example
    # gradient call. Every row keeps the candidates and the query gradient that it would get alone.
    model = tiny_bert().double()
    items = token_items(4, seed=1)
    query = default_collate(items)
    calls = {"features": 0, "search": 0, "gradients": []}

    def features(batch):
        calls["features"] += 1
        return classifier_input_features(model, batch)

    fastif = FastIF(
        model,
        sequence_classification_loss,
        features,
        token_items(24),
        parameters=PARAMETERS,
        config=FastIFConfig(**SETTINGS, k=6),
    )
    index = fastif.refresh_index()
    search = index.search
    monkeypatch.setattr(
        index, "search", lambda queries, k: calls.__setitem__("search", calls["search"] + 1) or search(queries, k)
    )
    gradients = fastif.computer.query_gradients

    def recording_gradients(batch, *, mode="mean"):
        calls["gradients"].append(mode)
        calls["rows"] = gradients(batch, mode=mode)
        return calls["rows"]

    monkeypatch.setattr(fastif.computer, "query_gradients", recording_gradients)
    calls["features"] = 0
    results = fastif.explain(query, mode="each")
    assert calls["features"] == 1
    assert calls["search"] == 1
    assert calls["gradients"] == ["each"]
    for row, (item, result) in enumerate(zip(items, results, strict=True)):
        alone = fastif.candidates(fastif.query_features(default_collate([item])))
        assert torch.equal(result.candidate_indices, alone)
        torch.testing.assert_close(calls["rows"][row], gradients(default_collate([item]))[0], rtol=1e-12, atol=1e-15)


def test_each_query_without_k_matches_alone():
    model = tiny_bert().double()
    fastif = make_fastif(model, token_items(7), k=None)
    items = token_items(3, seed=1)
    together = fastif.explain(default_collate(items), mode="each")
    for item, result in zip(items, together, strict=True):
        (alone,) = fastif.explain(default_collate([item]), mode="each")
        assert result.candidate_indices.tolist() == list(range(7))
        torch.testing.assert_close(result.scores, alone.scores, rtol=1e-12, atol=0)


def test_query_chunk_in_batches():
    # A chunk larger than feature_batch_size and gradient_batch_size is run in slices, with the scores of
    # one call for the whole chunk.
    model = tiny_bert().double()
    query = default_collate(token_items(5, seed=1))
    whole = make_fastif(model, token_items(24), k=8).explain(query, mode="each")
    sliced = make_fastif(model, token_items(24), k=8, feature_batch_size=2, gradient_batch_size=2)
    sizes = []
    features = sliced.query_features

    def recording_features(batch):
        sizes.append(len(batch["input_ids"]))
        return features(batch)

    sliced.query_features = recording_features
    results = sliced.explain(query, mode="each")
    assert sizes == [2, 2, 1]
    for expected, result in zip(whole, results, strict=True):
        assert torch.equal(result.candidate_indices, expected.candidate_indices)
        torch.testing.assert_close(result.scores, expected.scores, rtol=1e-10, atol=1e-14)


def test_missing_neighbors_dropped(monkeypatch):
    # An approximate faiss index marks neighbors it did not find with -1, which explain leaves out.
    model = tiny_bert().double()
    fastif = make_fastif(model, token_items(24), k=6)
    index = fastif.refresh_index()
    search = index.search

    def search_with_gaps(queries, k):
        distances, neighbors = search(queries, k)
        neighbors[:, -2:] = -1
        return distances, neighbors

    monkeypatch.setattr(index, "search", search_with_gaps)
    results = fastif.explain(default_collate(token_items(2, seed=1)), mode="each")
    for result in results:
        assert result.candidate_indices.shape == (4,)
        assert (result.candidate_indices >= 0).all()
        assert result.scores.shape == (4,)


def test_tensor_features_read_in_batches(monkeypatch):
    # The kNN feature pass indexes a TensorDataset with all positions of a batch at once, never item by
    # item, and returns the rows in dataset order.
    x = torch.randn(50, 3, dtype=torch.float64)
    y = (x[:, 0] > 0).double()
    train = torch.utils.data.TensorDataset(x, y)
    model = torch.nn.Linear(3, 1, bias=False).double()

    def loss_fn(module, batch):
        return torch.nn.functional.binary_cross_entropy_with_logits(module(batch[0]).squeeze(-1), batch[1])

    fastif = FastIF(model, loss_fn, lambda batch: batch[0], train, config=FastIFConfig(k=5, feature_batch_size=8))
    reads = []
    item = torch.utils.data.TensorDataset.__getitem__
    monkeypatch.setattr(torch.utils.data.TensorDataset, "__getitem__", lambda self, i: reads.append(i) or item(self, i))
    index = fastif.refresh_index()
    assert reads == []
    _, neighbors = index.search(x, 1)
    assert neighbors[:, 0].tolist() == list(range(50))


def test_top_examples_carry_sign():
    model = tiny_bert().double()
    fastif = make_fastif(model, token_items(20), k=20, top_k=3)
    (result,) = fastif.explain(default_collate(token_items(1, seed=2)))
    assert result.top.helpful_scores.tolist() == sorted(result.scores.tolist())[:3]
    assert result.top.harmful_scores.tolist() == sorted(result.scores.tolist(), reverse=True)[:3]
    assert set(result.timings) == {"knn", "ihvp", "scores"}


def test_stale_index_rebuilt_after_training_step():
    model = tiny_bert()
    train = token_items(20)
    fastif = make_fastif(model, train, k=5)
    first = fastif.refresh_index()
    assert fastif.refresh_index() is first
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    sequence_classification_loss(model, default_collate(train[:8])).backward()
    optimizer.step()
    second = fastif.refresh_index()
    assert second is not first
    assert second.fingerprint != first.fingerprint


def test_index_saved_when_path_given(tmp_path):
    model = tiny_bert()
    fastif = FastIF(
        model,
        sequence_classification_loss,
        lambda batch: classifier_input_features(model, batch),
        token_items(12),
        parameters=PARAMETERS,
        config=FastIFConfig(k=3, **SETTINGS),
        index_path=tmp_path / "knn.index",
    )
    fastif.refresh_index()
    assert (tmp_path / "knn.index").exists()


@pytest.mark.parametrize("k", [0, -3])
def test_non_positive_k_rejected(k):
    with pytest.raises(ValueError, match=rf"`k` must be a positive integer or None .*but got {k}"):
        FastIFConfig(k=k)


def test_k_above_training_set_rejected():
    model = tiny_bert()
    with pytest.raises(ValueError, match=r"`k=50` is larger than the training set \(20 examples\).*k <= 20"):
        make_fastif(model, token_items(20), k=50)


def test_features_of_wrong_shape_rejected():
    model = tiny_bert()
    fastif = FastIF(
        model,
        sequence_classification_loss,
        lambda batch: classifier_input_features(model, batch)[:, :, None],
        token_items(12),
        parameters=PARAMETERS,
        config=FastIFConfig(k=3, **SETTINGS),
    )
    with pytest.raises(ValueError, match=r"shape \(12, 32, 1\)"):
        fastif.refresh_index()


def test_nan_features_rejected():
    model = tiny_bert()
    fastif = FastIF(
        model,
        sequence_classification_loss,
        lambda batch: classifier_input_features(model, batch) * float("nan"),
        token_items(12),
        parameters=PARAMETERS,
        config=FastIFConfig(k=3, **SETTINGS),
    )
    with pytest.raises(ValueError, match="NaN"):
        fastif.refresh_index()


def test_nan_query_features_rejected():
    model = tiny_bert()
    calls = {"n": 0}

    def features(batch):
        calls["n"] += 1
        out = classifier_input_features(model, batch)
        return out if calls["n"] == 1 else out * float("nan")

    fastif = FastIF(
        model,
        sequence_classification_loss,
        features,
        token_items(12),
        parameters=PARAMETERS,
        config=FastIFConfig(k=3, feature_batch_size=64, **SETTINGS),
    )
    with pytest.raises(ValueError, match="query features contain NaN"):
        fastif.explain(default_collate(token_items(1, seed=4)))


def test_progress_shows_lissa_and_keeps_solver(capsys):
    model = tiny_bert()
    fastif = make_fastif(model, token_items(24), k=8)
    configured = fastif.computer.solver
    quiet = fastif.explain(default_collate(token_items(1, seed=1)))
    assert "LiSSA" not in capsys.readouterr().err
    with_progress = fastif.explain(default_collate(token_items(1, seed=1)), progress=True)
    assert "LiSSA" in capsys.readouterr().err
    assert fastif.computer.solver is configured
    assert not configured.progress
    torch.testing.assert_close(with_progress[0].scores, quiet[0].scores)


def test_jvp_scoring_matches_gradient_on_tiny_bert():
    model = tiny_bert().double()
    train = token_items(24)
    query = default_collate(token_items(2, seed=1))
    by_gradient = make_fastif(model, train, k=10, score_method="gradient").explain(query, mode="each")
    by_jvp = make_fastif(model, train, k=10, score_method="jvp").explain(query, mode="each")
    for expected, result in zip(by_gradient, by_jvp, strict=True):
        assert torch.equal(result.candidate_indices, expected.candidate_indices)
        torch.testing.assert_close(result.scores, expected.scores, rtol=1e-10, atol=1e-12)
