"""FastIF on the real pretrained MiniLM and bundled MNLI and HANS rows."""

import pytest
import torch
from torch.utils.data import default_collate

from lightning_fastif import compute_influences
from lightning_fastif.fastif import FastIF, FastIFConfig
from lightning_fastif.functional import influence_mode
from lightning_fastif.nli import NLIClassifier, NLIDataset, read_nli_jsonl


@pytest.fixture(scope="module")
def minilm():
    torch.manual_seed(0)
    return NLIClassifier(model_name_or_path="all-MiniLM-L6-v2")


@pytest.fixture(scope="module")
def datasets(minilm):
    train = NLIDataset(read_nli_jsonl("mnli/train.jsonl.gz", limit=24, seed=0), minilm.tokenizer, max_length=64)
    hans = NLIDataset(read_nli_jsonl("hans/evaluation.jsonl.gz", limit=4, seed=0), minilm.tokenizer, max_length=64)
    return train, hans


def test_minilm_vmap_gradients_match_loop(minilm, datasets):
    train, _ = datasets
    fastif = FastIF(
        minilm,
        lambda module, batch: module.influence_loss(batch),
        minilm.influence_features,
        train,
        parameters=minilm.influence_parameters(),
        config=FastIFConfig(k=8, depth=2),
    )
    loss = fastif.computer.loss
    batch = fastif.computer.train.batch(range(4))
    with influence_mode(minilm):
        vectorised = loss.per_example_gradients(batch, vectorize="vmap")
        looped = loss.per_example_gradients(batch, vectorize="loop")
    assert vectorised.shape[1] == fastif.computer.selection.numel
    torch.testing.assert_close(vectorised, looped, rtol=1e-4, atol=1e-6)


def test_minilm_fastif_scores_hans_query(minilm, datasets):
    train, hans = datasets
    fastif = FastIF(
        minilm,
        lambda module, batch: module.influence_loss(batch),
        minilm.influence_features,
        train,
        parameters=minilm.influence_parameters(),
        config=FastIFConfig(k=8, top_k=3, depth=3, scale=1e4, damping=5e-3),
    )
    query = default_collate([hans[0], hans[1]])
    results = fastif.explain(query, mode="mean", query_indices=[0, 1])
    assert len(results) == 1
    assert results[0].scores.shape == (8,)
    assert torch.isfinite(results[0].scores).all()
    assert results[0].top.helpful_scores[0] <= results[0].top.harmful_scores[0]


def test_minilm_full_influences_entry_point(minilm, datasets):
    train, hans = datasets
    scores = compute_influences(
        minilm,
        lambda module, batch: module.influence_loss(batch),
        train,
        default_collate([hans[2]]),
        solver="lissa",
        depth=2,
        parameters=minilm.influence_parameters(),
    )
    assert scores.shape == (24,)
    assert torch.isfinite(scores).all()
