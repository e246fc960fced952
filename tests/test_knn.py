"""Tests of the kNN step against brute-force torch search and real tiny Hugging Face models."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from lightning_fastif.knn import (
    KNNIndex,
    ShardedKNNIndex,
    classifier_input_features,
    compute_features,
    merge_nearest,
    weights_fingerprint,
)

DISTANCE_RTOL = 1e-4
DISTANCE_ATOL = 1e-5
FEATURE_ATOL = 1e-6
HNSW_MIN_RECALL = 0.9
FAISS_SEES_GPU = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def random_features(rows: int, dim: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, dim, generator=generator)


def brute_force_l2(train: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    distances = torch.cdist(queries.double(), train.double())  # [Q, N]
    return distances.topk(k, dim=1, largest=False)


def brute_force_cosine(train: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    similarities = nn.functional.normalize(queries.double(), dim=1) @ nn.functional.normalize(train.double(), dim=1).T
    values, positions = similarities.topk(k, dim=1, largest=True)
    return 1.0 - values, positions


def tiny_bert_config(**overrides) -> BertConfig:
    settings = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=100,
        num_labels=3,
        attn_implementation="eager",
    )
    settings.update(overrides)
    return BertConfig(**settings)


def tiny_bert_batch(batch_size: int = 4, length: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    attention_mask = torch.ones(batch_size, length, dtype=torch.long)
    attention_mask[0, -2:] = 0
    return {
        "input_ids": torch.randint(1, 100, (batch_size, length), generator=generator),
        "attention_mask": attention_mask,
        "token_type_ids": torch.zeros(batch_size, length, dtype=torch.long),
        "labels": torch.randint(0, 3, (batch_size,), generator=generator),
        "index": torch.arange(10, 10 + batch_size),
    }


# ---------------------------------------------------------------------------------------------------------------------
# KNNIndex search
# ---------------------------------------------------------------------------------------------------------------------


def test_flat_l2_matches_cdist():
    train = random_features(300, 16, seed=0)
    queries = random_features(25, 16, seed=1)
    expected_distances, expected_positions = brute_force_l2(train, queries, k=7)

    index = KNNIndex(train, metric="l2", index_type="flat")
    distances, neighbors = index.search(queries, k=7)

    assert distances.shape == (25, 7)
    assert distances.dtype == torch.float32
    assert neighbors.dtype == torch.int64
    assert torch.equal(neighbors, expected_positions)
    torch.testing.assert_close(distances.double(), expected_distances, rtol=DISTANCE_RTOL, atol=DISTANCE_ATOL)


def test_flat_cosine_matches_normalised_dot():
    train = random_features(300, 16, seed=2)
    queries = random_features(25, 16, seed=3)
    expected_distances, expected_positions = brute_force_cosine(train, queries, k=5)

    index = KNNIndex(train, metric="cosine", index_type="flat")
    distances, neighbors = index.search(queries, k=5)

    assert torch.equal(neighbors, expected_positions)
    torch.testing.assert_close(distances.double(), expected_distances, rtol=DISTANCE_RTOL, atol=DISTANCE_ATOL)


def test_index_leaves_caller_arrays_unchanged():
    train = random_features(50, 8, seed=4).numpy()
    queries = random_features(3, 8, seed=5).numpy()
    train_copy = train.copy()
    queries_copy = queries.copy()

    index = KNNIndex(train, metric="cosine")
    index.search(queries, k=2)

    assert np.array_equal(train, train_copy)
    assert np.array_equal(queries, queries_copy)


def test_search_maps_positions_to_ids():
    train = random_features(100, 8, seed=6)
    queries = random_features(6, 8, seed=7)
    ids = torch.randperm(100, generator=torch.Generator().manual_seed(0)) * 3 + 1000
    _, expected_positions = brute_force_l2(train, queries, k=4)

    index = KNNIndex(train, ids=ids)
    _, neighbors = index.search(queries, k=4)

    assert torch.equal(neighbors, ids[expected_positions])


def test_search_mean_matches_search_of_mean():
    train = random_features(200, 12, seed=8)
    anchors = random_features(9, 12, seed=9)
    for metric in ("l2", "cosine"):
        index = KNNIndex(train, metric=metric)
        expected_distances, expected_neighbors = index.search(anchors.mean(dim=0, keepdim=True), k=6)

        distances, neighbors = index.search_mean(anchors, k=6)

        assert distances.shape == (6,)
        assert neighbors.shape == (6,)
        assert torch.equal(neighbors, expected_neighbors[0])
        torch.testing.assert_close(distances, expected_distances[0], rtol=DISTANCE_RTOL, atol=DISTANCE_ATOL)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_ivf_full_probe_equals_exact(metric):
    train = random_features(1000, 16, seed=10)
    queries = random_features(20, 16, seed=11)
    exact = KNNIndex(train, metric=metric, index_type="flat")
    expected_distances, expected_neighbors = exact.search(queries, k=10)

    ivf = KNNIndex(train, metric=metric, index_type="ivf", nlist=10, nprobe=10)
    distances, neighbors = ivf.search(queries, k=10)

    assert torch.equal(neighbors, expected_neighbors)
    torch.testing.assert_close(distances, expected_distances, rtol=DISTANCE_RTOL, atol=DISTANCE_ATOL)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_merged_shards_match_whole_index(metric):
    train, queries = random_features(301, 12), random_features(25, 12, seed=1)
    whole = KNNIndex(train, metric=metric)
    expected_distances, expected_ids = whole._search_raw(whole._prepare_queries(queries), 40)
    found = []
    for start, stop in [(0, 100), (100, 130), (130, 301)]:
        shard = KNNIndex(train[start:stop], ids=torch.arange(start, stop), metric=metric)
        found.append(shard._search_raw(shard._prepare_queries(queries), min(40, stop - start)))
    raw_distances = np.concatenate([distances for distances, _ in found], axis=1)
    ids = np.concatenate([shard_ids for _, shard_ids in found], axis=1)
    distances, merged_ids = merge_nearest(raw_distances, ids, 40, metric)
    np.testing.assert_array_equal(merged_ids, expected_ids)
    np.testing.assert_array_equal(distances, expected_distances)


def test_merge_nearest_breaks_ties_by_id():
    raw_distances = np.array([[0.5, 0.2, 0.5, 0.2, 9.0]], dtype=np.float32)
    ids = np.array([[7, 9, 3, 4, -1]])
    distances, merged = merge_nearest(raw_distances, ids, 4, "l2")
    assert merged.tolist() == [[4, 9, 3, 7]]
    np.testing.assert_array_equal(distances, np.array([[0.2, 0.2, 0.5, 0.5]], dtype=np.float32))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_equally_near_rows_in_id_order(metric):
    train = random_features(8, 4)
    train[[2, 5, 6]] = train[0].clone()
    _, neighbors = KNNIndex(train, ids=torch.arange(10, 18), metric=metric).search(train[:1], k=4)
    assert neighbors.tolist() == [[10, 12, 15, 16]]


def test_merge_nearest_puts_missing_last():
    # For cosine the raw values are inner products, so larger is nearer. A missing entry loses to any row.
    raw_distances = np.array([[np.inf, 0.1, 0.9], [0.3, -np.inf, -0.5]], dtype=np.float32)
    ids = np.array([[-1, 2, 5], [1, -1, 0]])
    _, merged = merge_nearest(raw_distances, ids, 3, "cosine")
    assert merged.tolist() == [[5, 2, -1], [1, 0, -1]]


def test_sharded_index_without_process_group_is_its_shard():
    train, queries = random_features(30, 5), random_features(4, 5, seed=1)
    local = KNNIndex(train, ids=torch.arange(100, 130))
    sharded = ShardedKNNIndex(local, size=30)
    for got, expected in zip(sharded.search(queries, 7), local.search(queries, 7), strict=True):
        assert torch.equal(got, expected)
    for got, expected in zip(sharded.search_mean(queries, 7), local.search_mean(queries, 7), strict=True):
        assert torch.equal(got, expected)
    assert sharded.size == 30
    assert sharded.dim == 5


def test_sharded_index_rejects_approximate_shard():
    local = KNNIndex(random_features(40, 4), index_type="hnsw")
    with pytest.raises(ValueError, match=r"needs flat shards, got index_type='hnsw'"):
        ShardedKNNIndex(local, size=80)


def test_sharded_index_k_above_total_raises():
    sharded = ShardedKNNIndex(KNNIndex(random_features(20, 4)), size=20)
    with pytest.raises(ValueError, match=r"k=21 exceeds the index size 20"):
        sharded.search(random_features(2, 4), 21)


def test_ivf_missing_neighbors_are_marked():
    train = random_features(400, 8, seed=12)
    ids = torch.arange(400) + 5000
    index = KNNIndex(train, ids=ids, index_type="ivf", nlist=8, nprobe=1)

    distances, neighbors = index.search(train[:3], k=400)

    missing = neighbors == -1
    assert missing.any()
    assert torch.isinf(distances[missing]).all()
    assert torch.isfinite(distances[~missing]).all()
    assert (neighbors[~missing] >= 5000).all()


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_hnsw_recall_at_10(metric):
    train = random_features(2000, 32, seed=13)
    queries = random_features(100, 32, seed=14)
    _, expected = KNNIndex(train, metric=metric).search(queries, k=10)

    _, neighbors = KNNIndex(train, metric=metric, index_type="hnsw").search(queries, k=10)

    hits = sum(len(set(found.tolist()) & set(exact.tolist())) for found, exact in zip(neighbors, expected, strict=True))
    recall = hits / expected.numel()
    assert recall >= HNSW_MIN_RECALL, f"HNSW recall@10 is {recall:.3f}"


@pytest.mark.parametrize("index_type", ["flat", "ivf", "hnsw"])
def test_save_load_round_trip(tmp_path, index_type):
    train = random_features(500, 16, seed=15)
    queries = random_features(10, 16, seed=16)
    ids = torch.arange(500) * 2
    index = KNNIndex(
        train, ids=ids, metric="cosine", index_type=index_type, nlist=10, nprobe=3, fingerprint="weights-abc"
    )
    expected_distances, expected_neighbors = index.search(queries, k=8)
    path = tmp_path / "nested" / "train.faiss"

    index.save(path)
    loaded = KNNIndex.load(path)
    distances, neighbors = loaded.search(queries, k=8)

    assert torch.equal(neighbors, expected_neighbors)
    assert torch.equal(distances, expected_distances)
    assert loaded.fingerprint == "weights-abc"
    assert loaded.metric == "cosine"
    assert loaded.index_type == index_type
    assert loaded.options == index.options
    assert (loaded.size, loaded.dim) == (500, 16)
    metadata = json.loads((tmp_path / "nested" / "train.faiss.json").read_text())
    assert metadata["fingerprint"] == "weights-abc"
    assert (metadata["size"], metadata["dim"]) == (500, 16)
    assert metadata["ids_file"] == "train.faiss.ids.npy"


def test_load_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.faiss"):
        KNNIndex.load(tmp_path / "missing.faiss")


def test_load_mismatched_ids_raises(tmp_path):
    path = tmp_path / "train.faiss"
    KNNIndex(random_features(20, 4)).save(path)
    np.save(tmp_path / "train.faiss.ids.npy", np.arange(7))

    with pytest.raises(ValueError, match=r"ids have shape \(7,\)"):
        KNNIndex.load(path)


def test_fingerprint_and_is_stale():
    train = random_features(30, 4)
    index = KNNIndex(train, fingerprint="abc")
    default = KNNIndex(train)

    assert index.fingerprint == "abc"
    assert not index.is_stale("abc")
    assert index.is_stale("abd")
    assert isinstance(default.fingerprint, str)
    assert default.fingerprint == KNNIndex(train.clone()).fingerprint
    assert default.fingerprint != KNNIndex(train + 1).fingerprint


def test_size_and_dim():
    index = KNNIndex(random_features(42, 5).numpy())

    assert index.size == 42
    assert index.dim == 5


# ---------------------------------------------------------------------------------------------------------------------
# KNNIndex errors
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_index() -> KNNIndex:
    return KNNIndex(random_features(20, 8))


@pytest.mark.parametrize("k", [0, -3])
def test_search_nonpositive_k_raises(small_index, k):
    with pytest.raises(ValueError, match=rf"k={k} is invalid.*index size is 20"):
        small_index.search(random_features(2, 8), k=k)


def test_search_k_above_size_raises(small_index):
    with pytest.raises(ValueError, match=r"k=21 exceeds the index size 20\. Pass k <= 20"):
        small_index.search(random_features(2, 8), k=21)


def test_search_mean_k_above_size_raises(small_index):
    with pytest.raises(ValueError, match=r"k=50 exceeds the index size 20"):
        small_index.search_mean(random_features(2, 8), k=50)


def test_search_non_int_k_raises(small_index):
    with pytest.raises(TypeError, match=r"k must be an int, got float \(2\.0\)"):
        small_index.search(random_features(2, 8), k=2.0)


def test_search_wrong_dimension_raises(small_index):
    with pytest.raises(ValueError, match=r"dimension 6 but the index has dimension 8"):
        small_index.search(random_features(2, 6), k=3)


def test_search_one_dimensional_query_raises(small_index):
    with pytest.raises(ValueError, match=r"queries must be a 2-D array.*got shape \(8,\)"):
        small_index.search(random_features(1, 8)[0], k=3)


def test_search_nan_query_raises(small_index):
    queries = random_features(3, 8)
    queries[1, 2] = float("nan")
    queries[2, 0] = float("inf")

    with pytest.raises(ValueError, match=r"1 NaN and 1 inf values"):
        small_index.search(queries, k=3)


def test_search_mean_nan_query_raises(small_index):
    queries = random_features(3, 8)
    queries[0, 0] = float("nan")

    with pytest.raises(ValueError, match=r"1 NaN and 0 inf values"):
        small_index.search_mean(queries, k=3)


def test_ivf_too_few_rows_raises():
    with pytest.raises(ValueError, match=r"at least nlist=64 training rows.*N=50 rows"):
        KNNIndex(random_features(50, 4), index_type="ivf", nlist=64, nprobe=4)


@pytest.mark.parametrize(
    ("options", "pattern"),
    [
        ({"metric": "dot"}, r"metric must be one of .*got 'dot'"),
        ({"index_type": "lsh"}, r"index_type must be one of .*got 'lsh'"),
        ({"nlist": 0}, r"nlist must be a positive int, got 0"),
        ({"ef_search": -1}, r"ef_search must be a positive int, got -1"),
        ({"index_type": "ivf", "nlist": 4, "nprobe": 5}, r"nprobe=5 exceeds nlist=4"),
        ({"index_type": "hnsw", "use_gpu": True}, r"use_gpu=True is not supported with index_type='hnsw'"),
        ({"use_gpu": "yes"}, r"use_gpu must be True, False or None, got 'yes'"),
    ],
)
def test_invalid_options_raise(options, pattern):
    with pytest.raises(ValueError, match=pattern):
        KNNIndex(random_features(20, 4), **options)


def test_invalid_features_raise():
    features = random_features(10, 4)
    features[3, 1] = float("nan")

    with pytest.raises(ValueError, match=r"features contain 1 NaN and 0 inf values"):
        KNNIndex(features)
    with pytest.raises(ValueError, match=r"features must be a 2-D array.*got shape \(10,\)"):
        KNNIndex(random_features(10, 4)[:, 0])
    with pytest.raises(ValueError, match=r"ids must have shape \(10,\).*got shape \(9,\)"):
        KNNIndex(random_features(10, 4), ids=torch.arange(9))


@pytest.mark.skipif(FAISS_SEES_GPU, reason="faiss sees a GPU here")
def test_use_gpu_without_gpu_raises():
    with pytest.raises(RuntimeError, match=r"use_gpu=True but faiss has no GPU support"):
        KNNIndex(random_features(20, 4), use_gpu=True)


@pytest.mark.skipif(FAISS_SEES_GPU, reason="faiss sees a GPU here")
def test_use_gpu_auto_without_gpu_uses_cpu():
    index = KNNIndex(random_features(20, 4), use_gpu=None)

    assert isinstance(index._index, faiss.IndexFlatL2)


# ---------------------------------------------------------------------------------------------------------------------
# weights_fingerprint
# ---------------------------------------------------------------------------------------------------------------------


def test_fingerprint_changes_after_optimizer_step():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = weights_fingerprint(model)

    model(torch.randn(5, 4))
    after_forward = weights_fingerprint(model)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    after_step = weights_fingerprint(model)

    assert before == after_forward
    assert after_step != before
    assert weights_fingerprint(model.parameters()) == weights_fingerprint(list(model.parameters()))


def test_fingerprint_detects_one_ulp():
    model = nn.Linear(4, 3)
    before = weights_fingerprint(model)
    with torch.no_grad():
        model.weight[1, 2] = torch.nextafter(model.weight[1, 2], torch.tensor(float("inf")))

    assert weights_fingerprint(model) != before


def test_fingerprint_covers_buffers_and_dtypes():
    model = nn.BatchNorm1d(3)
    before = weights_fingerprint(model)
    model(torch.randn(8, 3))

    assert weights_fingerprint(model) != before
    assert weights_fingerprint([torch.zeros(2)]) != weights_fingerprint([torch.zeros(2, dtype=torch.float64)])
    assert weights_fingerprint([torch.zeros(2, 3)]) != weights_fingerprint([torch.zeros(3, 2)])
    assert weights_fingerprint([torch.ones(2, dtype=torch.bfloat16)]) == weights_fingerprint(
        [torch.ones(2, dtype=torch.bfloat16)]
    )


# ---------------------------------------------------------------------------------------------------------------------
# classifier_input_features
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config())


def test_bert_features_equal_pooler_output(tiny_bert):
    batch = tiny_bert_batch()
    tiny_bert.train()
    fingerprint = weights_fingerprint(tiny_bert)
    problem_type = tiny_bert.config.problem_type

    features = classifier_input_features(tiny_bert, batch)

    tiny_bert.eval()
    with torch.no_grad():
        expected = tiny_bert.bert(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
        ).pooler_output
    assert features.shape == (4, 32)
    assert not features.requires_grad
    torch.testing.assert_close(features, expected, rtol=0, atol=FEATURE_ATOL)
    assert weights_fingerprint(tiny_bert) == fingerprint
    assert tiny_bert.config.problem_type == problem_type


def test_bert_features_restore_modes_and_hooks(tiny_bert):
    tiny_bert.train()
    tiny_bert.bert.embeddings.eval()
    modes = {name: module.training for name, module in tiny_bert.named_modules()}

    classifier_input_features(tiny_bert, tiny_bert_batch())

    assert {name: module.training for name, module in tiny_bert.named_modules()} == modes
    assert len(tiny_bert.classifier._forward_pre_hooks) == 0


def test_bert_features_restore_on_error(tiny_bert):
    tiny_bert.train()
    batch = tiny_bert_batch()
    batch["input_ids"] = batch["input_ids"] + 1000  # out of the vocabulary

    with pytest.raises(IndexError):
        classifier_input_features(tiny_bert, batch)

    assert tiny_bert.training
    assert all(module.training for module in tiny_bert.modules())
    assert len(tiny_bert.classifier._forward_pre_hooks) == 0


def test_bert_features_stable_across_calls(tiny_bert):
    tiny_bert.train()  # dropout must not apply
    batch = tiny_bert_batch()

    first = classifier_input_features(tiny_bert, batch)
    second = classifier_input_features(tiny_bert, batch)

    assert torch.equal(first, second)


def test_roberta_head_features_are_first_token():
    torch.manual_seed(0)
    config = RobertaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=100,
        num_labels=3,
        attn_implementation="eager",
    )
    model = RobertaForSequenceClassification(config).eval()
    batch = tiny_bert_batch()
    batch["input_ids"] = batch["input_ids"].clamp(min=3)  # skip the padding id 1

    features = classifier_input_features(model, batch)

    with torch.no_grad():
        hidden = model.roberta(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    torch.testing.assert_close(features, hidden[:, 0, :], rtol=0, atol=FEATURE_ATOL)


def test_model_without_head_raises():
    torch.manual_seed(0)
    model = BertModel(tiny_bert_config())

    with pytest.raises(ValueError, match=r"BertModel has no classification head.*Pass a features function"):
        classifier_input_features(model, tiny_bert_batch())


class MeanPoolScorer(nn.Module):
    """A model whose head is named `score`, as in GPT-2 style classifiers, with a 2-D head input."""

    def __init__(self, call_head: bool = True) -> None:
        super().__init__()
        self.embedding = nn.Embedding(100, 6)
        self.score = nn.Linear(6, 3)
        self.call_head = call_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        pooled = self.embedding(input_ids).mean(dim=1)
        return self.score(pooled) if self.call_head else pooled


def test_score_head_features():
    torch.manual_seed(0)
    model = MeanPoolScorer()
    batch = tiny_bert_batch()

    features = classifier_input_features(model, batch)

    torch.testing.assert_close(features, model.embedding(batch["input_ids"]).mean(dim=1).detach())


def test_head_never_called_raises():
    model = MeanPoolScorer(call_head=False)

    with pytest.raises(RuntimeError, match=r"MeanPoolScorer never called `model\.score`"):
        classifier_input_features(model, tiny_bert_batch())
    assert len(model.score._forward_pre_hooks) == 0


def test_per_token_head_raises():
    torch.manual_seed(0)
    model = BertForTokenClassification(tiny_bert_config())

    with pytest.raises(NotImplementedError, match=r"shape \(4, 7, 32\).*Pass a features function"):
        classifier_input_features(model, tiny_bert_batch())
    assert len(model.classifier._forward_pre_hooks) == 0


def test_no_forward_keys_raises(tiny_bert):
    with pytest.raises(ValueError, match=r"None of the input keys \['index', 'text'\]"):
        classifier_input_features(tiny_bert, {"text": ["a"], "index": torch.tensor([0])})


# ---------------------------------------------------------------------------------------------------------------------
# compute_features
# ---------------------------------------------------------------------------------------------------------------------


def test_compute_features_with_index_key(tiny_bert):
    batches = [tiny_bert_batch(batch_size=3, seed=seed) for seed in range(3)]
    for number, batch in enumerate(batches):
        batch["index"] = torch.tensor([7, 3, 11]) + 100 * number

    features, indices = compute_features(lambda batch: classifier_input_features(tiny_bert, batch), batches)

    expected = torch.cat([classifier_input_features(tiny_bert, batch) for batch in batches])
    assert features.shape == (9, 32)
    assert features.dtype == torch.float32
    assert indices.dtype == torch.int64
    assert torch.equal(features, expected)
    assert indices.tolist() == [7, 3, 11, 107, 103, 111, 207, 203, 211]


def test_compute_features_running_order():
    data = random_features(10, 4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=4)

    features, indices = compute_features(lambda batch: batch[0] * 2, loader, progress=True)

    assert torch.equal(features, data * 2)
    assert torch.equal(indices, torch.arange(10))


def test_compute_features_wrong_rows_raises():
    batches = [{"x": torch.ones(3, 3)}, {"x": torch.ones(2, 3)}]

    with pytest.raises(ValueError, match=r"shape \(3, 3\) for batch 1, expected \[2, 3\]"):
        compute_features(lambda batch: torch.zeros(3, 3), batches)


def test_compute_features_wrong_dim_raises():
    batches = [torch.ones(4, 3), torch.ones(4, 5)]

    with pytest.raises(ValueError, match=r"shape \(4, 5\) for batch 1, expected \[4, 3\]"):
        compute_features(lambda batch: batch, batches)


def test_compute_features_not_2d_raises():
    with pytest.raises(ValueError, match=r"shape \(4,\) for batch 0, expected \[4, D\]"):
        compute_features(lambda batch: batch.sum(dim=1), [torch.ones(4, 3)])


def test_compute_features_nan_raises():
    bad = torch.ones(4, 3)
    bad[0, 0] = float("nan")
    bad[1, 1] = float("nan")
    bad[2, 2] = float("-inf")

    with pytest.raises(ValueError, match=r"2 NaN and 1 inf values for batch 1"):
        compute_features(lambda batch: batch, [torch.ones(4, 3), bad])


def test_compute_features_non_tensor_raises():
    with pytest.raises(TypeError, match=r"returned list for batch 0"):
        compute_features(lambda batch: [[1.0]], [torch.ones(1, 1)])


def test_compute_features_mixed_index_key_raises():
    batches = [{"x": torch.ones(2, 3), "index": torch.tensor([0, 1])}, {"x": torch.ones(2, 3)}]

    with pytest.raises(ValueError, match=r"Batch 1 lacks the `index` key"):
        compute_features(lambda batch: batch["x"], batches)


def test_compute_features_empty_loader_raises():
    with pytest.raises(ValueError, match=r"yielded no batches"):
        compute_features(lambda batch: batch, [])


def test_features_to_index_end_to_end(tiny_bert):
    batches = [tiny_bert_batch(batch_size=4, seed=seed) for seed in range(4)]
    for number, batch in enumerate(batches):
        batch["index"] = torch.arange(4) + 4 * number

    features, indices = compute_features(lambda batch: classifier_input_features(tiny_bert, batch), batches)
    index = KNNIndex(features, ids=indices, metric="cosine", fingerprint=weights_fingerprint(tiny_bert))
    _, neighbors = index.search(features[5:6], k=1)

    assert neighbors.tolist() == [[5]]
    assert not index.is_stale(weights_fingerprint(tiny_bert))
