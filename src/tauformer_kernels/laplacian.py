"""Feature-space graph Laplacians (docs/math.md §The Laplacian): build, validate, save, load.

L is F×F, shared by every head and layer of a model: symmetric, rows summing to 0, positive
semi-definite. `chain_laplacian` is the reference crate's default; `knn_laplacian` builds the
arrowspace-style graph over features from a domain corpus, with an exact kNN search.
"""
from __future__ import annotations

import json
import os
import warnings

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


def _embedding_matrix(embeddings, min_rows: int) -> np.ndarray:
    """N×F float64 (C-contiguous) from a tensor or array, checked: N >= min_rows, F >= 2, finite."""
    emb = np.ascontiguousarray(embeddings.detach().cpu() if isinstance(embeddings, torch.Tensor) else embeddings,
                               dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] < min_rows or emb.shape[1] < 2:
        raise ValueError(f"embeddings must be an N×F matrix with N >= {min_rows} and F >= 2, got shape {emb.shape}")
    if not np.isfinite(emb).all():
        raise ValueError("embeddings contain non-finite values")
    return emb


def knn_laplacian(embeddings, k: int = 8, sigma: float = 1.0, p: float = 2.0, *, eps_graph: float | None = None,
                  n_clusters: int | None = None, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """The feature graph of a domain corpus: L = D − W over the F columns of an N×F embedding matrix.

    Each feature is a node whose profile is its column (over the N rows, or over k-means centroids of the
    rows when n_clusters is given). Each feature connects to its k nearest features by cosine distance
    d = 1 − cos (exact search), keeping edges with d <= eps_graph (all k when None); edge weight
    w = 1 / (1 + (d / sigma)^p); the graph is symmetrised by union (the larger weight of the two
    directions). A feature whose column is all zeros has no direction: it gets no edges.
    """
    emb = _embedding_matrix(embeddings, min_rows=1)
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


def arrowspace_laplacian(embeddings, k: int = 8, sigma: float = 1.0, p: float = 2.0, eps: float = 1.0, *,
                         topk: int | None = None, dtype=torch.float32) -> torch.Tensor:
    """The F×F feature Laplacian that arrowspace (the reference crate's builder) makes of an N×F matrix, with
    its own graph settings: eps (cosine-distance cut-off), k (neighbours), topk, p and sigma of the weight
    1 / (1 + (d/sigma)^p). Needs ``pip install "tauformer[arrowspace]"`` and an arrowspace whose
    GraphLaplacian exposes its entries (to_dense: the 0.25 releases; 0.21, the last built for Python 3.11,
    gives only its shape). The result is validated like any loaded Laplacian.
    """
    try:
        import arrowspace
    except ImportError as e:
        raise ImportError('arrowspace_laplacian needs the arrowspace package: '
                          'pip install "tauformer[arrowspace]"') from e
    emb = _embedding_matrix(embeddings, min_rows=2)
    params = {"eps": float(eps), "k": int(k), "topk": int(topk or k), "p": float(p), "sigma": float(sigma)}
    builder = arrowspace.ArrowSpaceBuilder
    try:
        _, graph = builder().build(params, emb)
    except TypeError:  # before 0.25 build is a static method of the class
        _, graph = builder.build(params, emb)
    if not hasattr(graph, "to_dense"):
        from importlib.metadata import version

        raise RuntimeError(f"arrowspace {version('arrowspace')} builds the Laplacian but does not expose its "
                           f"entries (GraphLaplacian.to_dense arrived in the 0.25 releases, published for Python "
                           f">= 3.13): use knn_laplacian, or a Python with a newer arrowspace")
    lap = np.asarray(graph.to_dense(), dtype=np.float64)
    features = emb.shape[1]
    if lap.shape != (features, features):
        raise RuntimeError(f"arrowspace returned a {lap.shape} matrix, not the {features}×{features} feature Laplacian")
    validate_laplacian(lap, features)
    return torch.from_numpy(lap).to(dtype)


def _as_matrix(laplacian):
    """A dense float64 ndarray, or a scipy CSR matrix for sparse input (torch sparse or scipy)."""
    import scipy.sparse as sp

    if isinstance(laplacian, torch.Tensor):
        if laplacian.layout in (torch.sparse_csr, torch.sparse_coo):
            csr = laplacian.detach().cpu().to_sparse_csr()
            return sp.csr_matrix((csr.values().double().numpy(), csr.col_indices().numpy(), csr.crow_indices().numpy()),
                                 shape=tuple(csr.shape))
        return np.asarray(laplacian.detach().cpu(), dtype=np.float64)
    if sp.issparse(laplacian):
        return sp.csr_matrix(laplacian, dtype=np.float64)
    return np.asarray(laplacian, dtype=np.float64)


def validate_laplacian(laplacian, features: int | None = None, *, rtol: float = 1e-5) -> None:
    """Raise ValueError unless L is a square (F×F) finite, symmetric matrix with zero row sums, PSD.

    Dense or sparse (torch sparse CSR/COO, scipy). Tolerances are relative to the largest |entry| (rtol), so
    float32 files pass and broken ones fail. PSD: a symmetric matrix with zero row sums and no positive
    off-diagonal entry is a graph Laplacian (diagonally dominant, so PSD: no eigensolve); any other is checked
    by its smallest eigenvalue.
    """
    import scipy.sparse as sp

    lap = _as_matrix(laplacian)
    sparse = sp.issparse(lap)
    if lap.ndim != 2 or lap.shape[0] != lap.shape[1]:
        raise ValueError(f"laplacian must be a square matrix, got shape {lap.shape}")
    if features is not None and lap.shape[0] != features:
        raise ValueError(f"laplacian must be {features}×{features} for heads of dim {features}, got {lap.shape}")
    values = lap.data if sparse else lap
    if not np.isfinite(values).all():
        raise ValueError("laplacian contains non-finite values")
    scale = max(np.abs(values).max(initial=0.0), 1e-30)
    diff = lap - lap.T
    asym = np.abs(diff.data if sparse else diff).max(initial=0.0)
    if asym > rtol * scale:
        raise ValueError(f"laplacian is not symmetric: max |L - Lᵀ| = {asym:.3g} (scale {scale:.3g})")
    row_sum = np.abs(np.asarray(lap.sum(1)).ravel()).max()
    if row_sum > rtol * scale * lap.shape[0]:
        raise ValueError(f"laplacian rows must sum to 0: max |row sum| = {row_sum:.3g}")
    off_diagonal = lap - sp.diags(lap.diagonal()) if sparse else lap - np.diag(np.diag(lap))
    if np.max(off_diagonal.data if sparse else off_diagonal, initial=0.0) <= 0:
        return
    if sparse:
        from scipy.sparse.linalg import eigsh

        smallest = eigsh(0.5 * (lap + lap.T), k=1, which="SA", return_eigenvectors=False)[0]
    else:
        smallest = np.linalg.eigvalsh(0.5 * (lap + lap.T))[0]
    if smallest < -rtol * scale * lap.shape[0]:
        raise ValueError(f"laplacian is not positive semi-definite: smallest eigenvalue {smallest:.3g}")


# The reference crate's "domain manifold": <name>.parquet of COO triplets with this schema (one row per
# stored entry; the sizes repeated on every row) and manifold.json beside it (arrowspace's build record:
# builder_config.nfeatures.Usize = F, builder_config.synthesis.TauMode = "Median" | "Mean").
CRATE_COLUMNS = ("name_id", "n_rows", "n_cols", "nnz", "row", "col", "value")
CRATE_METADATA = "manifold.json"
TAU_RULE_OF_SYNTHESIS = {"Median": "vector-median", "Mean": "vector-mean"}


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as e:
        raise ImportError("the crate's manifold.parquet needs pyarrow: pip install 'tauformer[parquet]'") from e
    return pyarrow, pyarrow.parquet


def _crate_paths(path):
    """(manifold parquet, manifold.json) of a crate manifold given as its .parquet or its folder."""
    path = os.fspath(path)
    parquet = os.path.join(path, "manifold.parquet") if os.path.isdir(path) else path
    return parquet, os.path.join(os.path.dirname(parquet) or ".", CRATE_METADATA)


def _read_crate_manifold(path):
    """(scipy CSR L, the manifold.json dict) from the crate's files; duplicates summed, as the crate does."""
    import scipy.sparse as sp

    _, pq = _pyarrow()
    parquet, meta_path = _crate_paths(path)
    try:
        table = pq.read_table(parquet)
    except Exception as e:  # pyarrow raises several types for a missing or broken file
        raise ValueError(f"{parquet}: not a readable parquet file: {e}") from e
    missing = [c for c in ("n_rows", "n_cols", "row", "col", "value") if c not in table.column_names]
    if missing:
        raise ValueError(f"{parquet}: not a crate manifold (columns {missing} missing; expected {CRATE_COLUMNS})")
    if table.num_rows == 0:
        raise ValueError(f"{parquet}: no entries")
    shape = (int(table["n_rows"][0].as_py()), int(table["n_cols"][0].as_py()))
    lap = sp.coo_matrix((table["value"].to_numpy().astype(np.float64),
                         (table["row"].to_numpy().astype(np.int64), table["col"].to_numpy().astype(np.int64))),
                        shape=shape).tocsr()
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        config = meta["builder_config"]
        nfeatures = int(config["nfeatures"]["Usize"])
        synthesis = config["synthesis"]["TauMode"]
    except FileNotFoundError as e:
        raise ValueError(f"{parquet}: the crate's {CRATE_METADATA} must lie beside it ({meta_path} is absent)") from e
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{meta_path}: not the crate's manifold metadata (builder_config.nfeatures.Usize and "
                         f"builder_config.synthesis.TauMode needed): {e!r}") from e
    # arrowspace writes a TauMode with a payload as an object ({"Fixed": 0.1}): no per-vector rule of ours
    if not isinstance(synthesis, str) or synthesis not in TAU_RULE_OF_SYNTHESIS:
        raise ValueError(f"{meta_path}: synthesis TauMode {json.dumps(synthesis)} is not one of "
                         f"{sorted(TAU_RULE_OF_SYNTHESIS)} (the per-vector tau rules this package implements)")
    if nfeatures != shape[0]:
        raise ValueError(f"{meta_path}: nfeatures = {nfeatures} does not match the Laplacian's {shape[0]} rows")
    # the parquet names its matrix apart from the file (the crate's shipped one: "dataset-gl-matrix")
    meta["parquet_name_id"] = str(table["name_id"][0].as_py()) if "name_id" in table.column_names else "manifold"
    return lap, meta


def _write_crate_manifold(path, lap, params: dict) -> None:
    """The crate's pair: COO triplets in row-major order (as the crate writes its CSR), SNAPPY, and its json.
    params from a crate file (a builder_config) are kept as they are; otherwise a minimal builder_config
    (nfeatures, synthesis from params["tau_rule"], default Median) carries them under "tauformer".
    params["parquet_name_id"] (set by the reader) names the matrix in the parquet, else the file's stem.
    The crate reads one manifold.json per folder: a json that another .parquet of the folder shares is never
    changed (ValueError naming both), so no save rewrites another Laplacian's F or tau rule."""
    import scipy.sparse as sp

    pa, pq = _pyarrow()
    parquet, meta_path = _crate_paths(path)
    if not parquet.endswith(".parquet"):
        raise ValueError(f"{path}: a crate manifold is written as <name>.parquet")
    csr = sp.csr_matrix(lap)
    csr.eliminate_zeros()
    csr.sort_indices()
    coo = csr.tocoo()
    nnz, (n_rows, n_cols) = coo.nnz, csr.shape
    params = dict(params)
    name_id = str(params.pop("parquet_name_id", os.path.splitext(os.path.basename(parquet))[0]))
    u64 = pa.uint64()
    columns = {"name_id": pa.array([name_id] * nnz, pa.string()), "n_rows": pa.array([n_rows] * nnz, u64),
               "n_cols": pa.array([n_cols] * nnz, u64), "nnz": pa.array([nnz] * nnz, u64),
               "row": pa.array(coo.row.astype(np.uint64), u64), "col": pa.array(coo.col.astype(np.uint64), u64),
               "value": pa.array(coo.data, pa.float64())}
    schema = pa.schema([pa.field(n, columns[n].type, nullable=False) for n in CRATE_COLUMNS])
    if "builder_config" in params:
        meta = json.loads(json.dumps(params))
        meta["builder_config"]["nfeatures"] = {"Usize": n_rows}
    else:
        synthesis = {v: k for k, v in TAU_RULE_OF_SYNTHESIS.items()}.get(params.get("tau_rule"), "Median")
        meta = {"name_id": name_id,
                "builder_config": {"nfeatures": {"Usize": n_rows}, "synthesis": {"TauMode": synthesis}},
                "tauformer": params}
    _check_shared_metadata(parquet, meta_path, meta)
    tmp_parquet, tmp_meta = f"{parquet}.tmp", f"{meta_path}.tmp"
    pq.write_table(pa.Table.from_pydict(columns, schema=schema), tmp_parquet, compression="snappy")
    with open(tmp_meta, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp_parquet, parquet)
    os.replace(tmp_meta, meta_path)


def _check_shared_metadata(parquet: str, meta_path: str, meta: dict) -> None:
    """Refuse to write `meta` over a manifold.json that describes another .parquet of the folder differently."""
    own = os.path.basename(parquet)
    others = sorted(n for n in os.listdir(os.path.dirname(meta_path)) if n.endswith(".parquet") and n != own)
    if not others or not os.path.exists(meta_path):
        return
    try:
        with open(meta_path) as f:
            current = json.load(f)
    except (OSError, ValueError):
        current = None
    if current != meta:
        raise ValueError(f"{meta_path} describes {', '.join(others)} beside it (the crate reads one manifold.json "
                         f"per folder); writing {os.path.basename(parquet)} there would change it: save it into a "
                         f"folder of its own")


def save_laplacian(path, laplacian, **build_parameters) -> None:
    """Save L (validated; dense or sparse) with its build parameters (JSON-serialisable).

    A path ending in .parquet writes the reference crate's pair (<name>.parquet + manifold.json beside it,
    needs pyarrow); any other path this package's .npz."""
    validate_laplacian(laplacian)
    lap = _as_matrix(laplacian)
    if os.fspath(path).endswith(".parquet"):
        _write_crate_manifold(path, lap, build_parameters)
        return
    dense = lap.toarray() if not isinstance(lap, np.ndarray) else lap
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, laplacian=dense, build_parameters=json.dumps(build_parameters), format=LAPLACIAN_FORMAT)
    os.replace(tmp, path)


# "auto" keeps a loaded Laplacian sparse from this many features on, when at most SPARSE_DENSITY of it is
# stored: below, a dense F×F product is faster than any sparse one on CPU and GPU alike.
SPARSE_MIN_FEATURES = 1024
SPARSE_DENSITY = 0.1
# A dense load above this many features is refused (16384² float64 is 2 GiB while it is converted): a file that
# declares more (the crate's n_rows of 2e6 would be 29 TiB) is either broken or meant to stay sparse.
DENSE_MAX_FEATURES = 16384


def load_laplacian(path, features: int | None = None, *, dtype=torch.float32, with_parameters: bool = False,
                   layout: str = "dense"):
    """Load and validate a Laplacian: this package's .npz, the reference crate's manifold (its .parquet with
    manifold.json beside it, or their folder; needs pyarrow), a COO .npz with arrays row, col, value, shape,
    or an .npy holding the F×F matrix.

    layout: "dense" (an F×F tensor, up to F = DENSE_MAX_FEATURES), "sparse" (a torch sparse CSR tensor;
    taumode_lambda's reference backend multiplies it sparse), or "auto" (sparse for F >= SPARSE_MIN_FEATURES at
    density <= SPARSE_DENSITY).
    Returns L, or (L, build_parameters). Errors name the file."""
    import scipy.sparse as sp

    if layout not in ("dense", "sparse", "auto"):
        raise ValueError(f"layout must be 'dense', 'sparse' or 'auto', got {layout!r}")
    parquet, _ = _crate_paths(path)
    if parquet.endswith(".parquet"):
        lap, params = _read_crate_manifold(path)
    else:
        lap, params = _read_numpy_laplacian(path)
    f = lap.shape[0]
    stored = lap.nnz if sp.issparse(lap) else np.count_nonzero(lap)
    sparse = layout == "sparse" or (layout == "auto" and f >= SPARSE_MIN_FEATURES and stored <= SPARSE_DENSITY * f * f)
    if not sparse and f > DENSE_MAX_FEATURES:
        raise ValueError(f"{path}: a dense {f}×{f} Laplacian ({stored} entries stored) would take "
                         f"{f * f * 8 / 2**30:.3g} GiB in float64; load it with layout=\"sparse\" (dense is for "
                         f"F <= {DENSE_MAX_FEATURES})")
    try:
        validate_laplacian(lap, features)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    if sparse:
        csr = sp.csr_matrix(lap)
        csr.sort_indices()
        with warnings.catch_warnings():  # torch's "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            lap_t = torch.sparse_csr_tensor(torch.from_numpy(csr.indptr.astype(np.int64)),
                                            torch.from_numpy(csr.indices.astype(np.int64)),
                                            torch.from_numpy(csr.data).to(dtype), size=csr.shape,
                                            check_invariants=True)
    else:
        lap_t = torch.from_numpy(lap.toarray() if sp.issparse(lap) else lap).to(dtype)
    return (lap_t, params) if with_parameters else lap_t


def _read_numpy_laplacian(path):
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a Laplacian file (an .npz from save_laplacian, the crate's manifold.parquet, "
                         f"a COO .npz, or an F×F .npy): {e}") from e
    if isinstance(loaded, np.ndarray):
        return loaded.astype(np.float64), {"source": "npy"}
    with loaded as data:
        if "laplacian" in data:
            lap = data["laplacian"].astype(np.float64)
            params = json.loads(str(data["build_parameters"])) if "build_parameters" in data else {}
            return lap, params
        if {"row", "col", "value", "shape"} <= set(data.files):
            shape = tuple(int(s) for s in data["shape"])
            lap = np.zeros(shape)
            np.add.at(lap, (data["row"].astype(np.int64), data["col"].astype(np.int64)), data["value"])
            return lap, {"source": "coo"}
    raise ValueError(f"{path}: not a Laplacian file (expected arrays 'laplacian' or 'row', 'col', 'value', 'shape')")
