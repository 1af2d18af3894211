"""Laplacian builders, validation, and the file round trip (docs/math.md §The Laplacian)."""
import json
import os

import numpy as np
import pytest
import torch

from tauformer_kernels import chain_laplacian, knn_laplacian, load_laplacian, save_laplacian, taumode_lambda, validate_laplacian

REFERENCE_MANIFOLD = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "reference-manifold", "laplacian_384_coo.npz")


def test_chain_laplacian():
    lap = chain_laplacian(5, dtype=torch.float64)
    assert torch.equal(torch.diag(lap), torch.tensor([1.0, 2, 2, 2, 1], dtype=torch.float64))
    assert torch.equal(torch.diag(lap, 1), -torch.ones(4, dtype=torch.float64))
    validate_laplacian(lap, 5)
    assert chain_laplacian(1).shape == (1, 1)


def _clustered_embeddings(n=400, f=24, groups=4, seed=0):
    """Features in `groups` blocks that move together: the kNN graph should connect within blocks."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, groups))
    return latent.repeat(f // groups, axis=1) + 0.1 * rng.normal(size=(n, f))


def test_knn_laplacian_finds_the_feature_groups():
    emb = _clustered_embeddings()
    lap = knn_laplacian(emb, k=3, dtype=torch.float64)
    validate_laplacian(lap, 24)
    adjacency = (-lap).clamp_min(0) > 0
    block = torch.arange(24) // 6
    assert bool((adjacency <= (block[:, None] == block[None, :])).all()), "an edge crosses feature groups"
    assert bool((adjacency.sum(1) >= 3).all())
    weights = -lap[adjacency]
    assert bool(((weights > 0) & (weights <= 1)).all())


def test_knn_laplacian_weights_follow_the_formula():
    emb = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])  # columns: (1,0), (1,1), (0,1)
    lap = knn_laplacian(emb, k=1, sigma=0.5, p=2.0, dtype=torch.float64)
    d = 1 - 1 / np.sqrt(2)  # cosine distance between (1,0) and (1,1)
    w = 1 / (1 + (d / 0.5) ** 2)
    assert lap[0, 1].item() == pytest.approx(-w) and lap[2, 1].item() == pytest.approx(-w)
    assert lap[0, 2].item() == 0.0


def test_knn_laplacian_eps_graph_and_kmeans():
    emb = _clustered_embeddings(n=500)
    sparse = knn_laplacian(emb, k=5, eps_graph=1e-3)
    assert (sparse != 0).sum() < (knn_laplacian(emb, k=5) != 0).sum()
    reduced = knn_laplacian(emb, k=3, n_clusters=16, seed=1)
    validate_laplacian(reduced, 24)


@pytest.mark.parametrize(
    "matrix, match",
    [
        (np.ones((3, 4)), "square"),
        (np.array([[1.0, -1.0], [0.0, 0.0]]), "symmetric"),
        (np.array([[2.0, -1.0], [-1.0, 2.0]]), "rows must sum to 0"),
        (np.array([[-1.0, 1.0], [1.0, -1.0]]), "positive semi-definite"),
        (np.array([[np.nan, 0.0], [0.0, 0.0]]), "non-finite"),
    ],
)
def test_validation_errors(matrix, match):
    with pytest.raises(ValueError, match=match):
        validate_laplacian(matrix)


def test_validation_checks_the_head_dim():
    with pytest.raises(ValueError, match="8×8"):
        validate_laplacian(chain_laplacian(6), 8)


def test_save_load_round_trip(tmp_path):
    lap = knn_laplacian(_clustered_embeddings(), k=4)
    path = tmp_path / "domain.npz"
    save_laplacian(path, lap, k=4, sigma=1.0, corpus="synthetic")
    loaded, params = load_laplacian(path, 24, with_parameters=True)
    assert torch.equal(loaded, lap)
    assert params == {"k": 4, "sigma": 1.0, "corpus": "synthetic"}
    with pytest.raises(ValueError, match="16×16"):
        load_laplacian(path, 16)


def test_load_rejects_a_broken_file(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, laplacian=np.array([[1.0, 0.0], [0.0, 1.0]]), build_parameters=json.dumps({}))
    with pytest.raises(ValueError, match="rows must sum to 0"):
        load_laplacian(path)
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(ValueError, match="not a Laplacian file"):
        load_laplacian(tmp_path / "other.npz")


@pytest.mark.skipif(not os.path.exists(REFERENCE_MANIFOLD), reason="the reference crate's 384×384 Laplacian (outside the repo) is absent")
def test_reference_crate_manifold_loads_and_projects_heads_of_384():
    lap = load_laplacian(REFERENCE_MANIFOLD, 384)
    assert lap.shape == (384, 384) and int((lap != 0).sum()) == 6408
    lam = taumode_lambda(torch.randn(1, 2, 64, 384), lap, tau=1.0)
    assert lam.shape == (1, 2, 64) and bool(((lam >= 0) & (lam < 1)).all())
