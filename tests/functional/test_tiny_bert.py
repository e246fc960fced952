"""LiSSA against the exact solver through a tiny random BERT, and vmap against the loop on it."""

import torch
from torch.utils.data import default_collate

from lightning_fastif import InfluenceComputer, LiSSASolver
from lightning_fastif.functional import influence_mode
from lightning_fastif.hf import sequence_classification_loss
from tests.helpers.tiny_bert import tiny_bert, token_items

MIN_COSINE = 0.99
PARAMETERS = [r"encoder\.layer\.1\.output\.dense\.", r"pooler\.", r"classifier\."]


def test_lissa_matches_exact_on_tiny_bert():
    model = tiny_bert().double()
    train = token_items(32)
    query = default_collate(token_items(4, seed=1))
    exact = InfluenceComputer(model, sequence_classification_loss, train, solver="exact", parameters=PARAMETERS)
    assert 2000 <= exact.selection.numel <= 5000
    with influence_mode(model):
        hessian = exact.solver.hessian(exact.loss, exact.train)
    eigenvalues = torch.linalg.eigvalsh(hessian)
    # Damp enough to make H positive definite, then pick LiSSA settings with that effective damping.
    effective_damping = float(eigenvalues.min().clamp(max=0).abs() + 0.05 * eigenvalues.max())
    scale = 2.0 * float(eigenvalues.max())
    damped = hessian + effective_damping * torch.eye(hessian.shape[0], dtype=hessian.dtype)
    query_gradient = exact.query_gradients(query)[0]
    exact_scores = -(exact.train_gradients(range(32)) @ torch.linalg.solve(damped, query_gradient))

    lissa = LiSSASolver(damping=effective_damping / scale, scale=scale, depth=200, batch_size=16, seed=0)
    stochastic = InfluenceComputer(model, sequence_classification_loss, train, solver=lissa, parameters=PARAMETERS)
    lissa_scores = stochastic.compute(query)[0]
    cosine = torch.nn.functional.cosine_similarity(exact_scores, lissa_scores, dim=0)
    assert cosine >= MIN_COSINE


def test_vmap_equals_loop_on_tiny_bert():
    model = tiny_bert().double()
    train = token_items(8)
    computer = InfluenceComputer(model, sequence_classification_loss, train, solver="exact", parameters=PARAMETERS)
    batch = computer.train.batch(range(8))
    with influence_mode(model):
        vectorised = computer.loss.per_example_gradients(batch, vectorize="vmap")
        looped = computer.loss.per_example_gradients(batch, vectorize="loop")
    torch.testing.assert_close(vectorised, looped, rtol=0, atol=1e-10)
