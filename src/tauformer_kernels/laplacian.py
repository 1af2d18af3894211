"""Feature-space graph Laplacians (docs/math.md §The Laplacian): build, validate, save, load.

L is F×F, shared by every head and layer of a model: symmetric, rows summing to 0, positive
semi-definite. `chain_laplacian` is the reference crate's default; `knn_laplacian` builds the
arrowspace-style graph over features from a domain corpus, with an exact kNN search.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch

LAPLACIAN_FORMAT = "tauformer-laplacian-v1"


def chain_laplacian(features: int, *, dtype=torch.float32) -> torch.Tensor:
    """The path graph over F features: diagonal (1, 2, …, 2, 1), −1 on the first off-diagonals."""
    if not isinstance(features, int) or features < 1:
        raise ValueError(f"features must be a positive int, got {features!r}")
    lap = torch.zeros(features, features, dtype=torch.float64)
    idx = torch.arange(features - 1)
    lap[idx, idx + 1] = -1.0
    lap[idx + 1, idx] = -1.0
    lap -= torch.diag(lap.sum(1))
    return lap.to(dtype)


def knn_laplacian(embeddings, k: int = 8, sigma: float = 1.0, p: float = 2.0, *, eps_graph: float | None = None,
                  n_clusters: int | None = None, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """The feature graph of a domain corpus: L = D − W over the F columns of an N×F embedding matrix.

    Each feature is a node whose profile is its column (over the N rows, or over k-means centroids of the
    rows when n_clusters is given). Each feature connects to its k nearest features by cosine distance
    d = 1 − cos (exact search), keeping edges with d <= eps_graph (all k when None); edge weight
    w = 1 / (1 + (d / sigma)^p); the graph is symmetrised by union (the larger weight of the two
    directions). A feature whose column is all zeros has no direction: it gets no edges.
    """
    emb = np.asarray(embeddings.detach().cpu() if isinstance(embeddings, torch.Tensor) else embeddings, dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] < 1 or emb.shape[1] < 2:
        raise ValueError(f"embeddings must be an N×F matrix with N >= 1 and F >= 2, got shape {emb.shape}")
    if not np.isfinite(emb).all():
        raise ValueError("embeddings contain non-finite values")
    n, features = emb.shape
    if not 1 <= k < features:
        raise ValueError(f"k must be in [1, F) = [1, {features}), got {k}")
    if sigma <= 0 or p <= 0:
        raise ValueError(f"sigma and p must be > 0, got sigma={sigma}, p={p}")
    if n_clusters is not None and n_clusters < n:
        from scipy.cluster.vq import kmeans2

        emb, _ = kmeans2(emb, n_clusters, seed=seed, minit="++")
    profiles = emb.T  # (F, N'): one row per feature
    norms = np.linalg.norm(profiles, axis=1)
    live = norms > 0
    unit = np.where(live[:, None], profiles / np.where(live, norms, 1.0)[:, None], 0.0)
    dist = 1.0 - np.clip(unit @ unit.T, -1.0, 1.0)
    dist[~live, :] = np.inf
    dist[:, ~live] = np.inf
    np.fill_diagonal(dist, np.inf)
    weights = np.zeros((features, features))
    nearest = np.argpartition(dist, k - 1, axis=1)[:, :k]
    rows = np.repeat(np.arange(features), k)
    cols = nearest.ravel()
    d = dist[rows, cols]
    keep = np.isfinite(d) & (d <= (np.inf if eps_graph is None else eps_graph))
    weights[rows[keep], cols[keep]] = 1.0 / (1.0 + (d[keep] / sigma) ** p)
    weights = np.maximum(weights, weights.T)
    lap = np.diag(weights.sum(1)) - weights
    return torch.from_numpy(lap).to(dtype)


def validate_laplacian(laplacian, features: int | None = None, *, rtol: float = 1e-5) -> None:
    """Raise ValueError unless L is a square (F×F) finite, symmetric matrix with zero row sums, PSD.

    Tolerances are relative to the largest |entry| (rtol), so float32 files pass and broken ones fail.
    """
    lap = np.asarray(laplacian.detach().cpu() if isinstance(laplacian, torch.Tensor) else laplacian, dtype=np.float64)
    if lap.ndim != 2 or lap.shape[0] != lap.shape[1]:
        raise ValueError(f"laplacian must be a square matrix, got shape {lap.shape}")
    if features is not None and lap.shape[0] != features:
        raise ValueError(f"laplacian must be {features}×{features} for heads of dim {features}, got {lap.shape}")
    if not np.isfinite(lap).all():
        raise ValueError("laplacian contains non-finite values")
    scale = max(np.abs(lap).max(), 1e-30)
    asym = np.abs(lap - lap.T).max()
    if asym > rtol * scale:
        raise ValueError(f"laplacian is not symmetric: max |L - Lᵀ| = {asym:.3g} (scale {scale:.3g})")
    row_sum = np.abs(lap.sum(1)).max()
    if row_sum > rtol * scale * lap.shape[0]:
        raise ValueError(f"laplacian rows must sum to 0: max |row sum| = {row_sum:.3g}")
    smallest = np.linalg.eigvalsh(0.5 * (lap + lap.T))[0]
    if smallest < -rtol * scale * lap.shape[0]:
        raise ValueError(f"laplacian is not positive semi-definite: smallest eigenvalue {smallest:.3g}")


def save_laplacian(path, laplacian, **build_parameters) -> None:
    """Save L (validated) with its build parameters (JSON-serialisable) to a .npz file."""
    validate_laplacian(laplacian)
    lap = np.asarray(laplacian.detach().cpu() if isinstance(laplacian, torch.Tensor) else laplacian, dtype=np.float64)
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, laplacian=lap, build_parameters=json.dumps(build_parameters), format=LAPLACIAN_FORMAT)
    os.replace(tmp, path)


def load_laplacian(path, features: int | None = None, *, dtype=torch.float32, with_parameters: bool = False):
    """Load and validate a Laplacian: this package's .npz, a COO .npz with arrays row, col, value, shape
    (the layout of the reference crate's shipped manifold), or an .npy holding the F×F matrix.
    Returns L, or (L, build_parameters). Errors name the file."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a Laplacian file (an .npz from save_laplacian, a COO .npz, or an F×F "
                         f".npy): {e}") from e
    if isinstance(loaded, np.ndarray):
        lap, params = loaded.astype(np.float64), {"source": "npy"}
    else:
        with loaded as data:
            if "laplacian" in data:
                lap = data["laplacian"].astype(np.float64)
                params = json.loads(str(data["build_parameters"])) if "build_parameters" in data else {}
            elif {"row", "col", "value", "shape"} <= set(data.files):
                shape = tuple(int(s) for s in data["shape"])
                lap = np.zeros(shape)
                np.add.at(lap, (data["row"].astype(np.int64), data["col"].astype(np.int64)), data["value"])
                params = {"source": "coo"}
            else:
                raise ValueError(f"{path}: not a Laplacian file (expected arrays 'laplacian' or 'row', 'col', "
                                 f"'value', 'shape')")
    try:
        validate_laplacian(lap, features)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    lap_t = torch.from_numpy(lap).to(dtype)
    return (lap_t, params) if with_parameters else lap_t
