"""Laplacian builders, validation, and the file round trip (docs/math.md §The Laplacian)."""
import json
import os

import numpy as np
import pytest
import torch

from tauformer_kernels import (
    chain_laplacian,
    knn_laplacian,
    load_laplacian,
    save_laplacian,
    taumode_lambda,
    validate_laplacian,
)

REFERENCE_MANIFOLD = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "reference-manifold",
                                  "laplacian_384_coo.npz")


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


@pytest.mark.skipif(not os.path.exists(REFERENCE_MANIFOLD),
                    reason="the reference crate's 384×384 Laplacian (outside the repo) is absent")
def test_reference_crate_manifold_loads_and_projects_heads_of_384():
    lap = load_laplacian(REFERENCE_MANIFOLD, 384)
    assert lap.shape == (384, 384) and int((lap != 0).sum()) == 6408
    lam = taumode_lambda(torch.randn(1, 2, 64, 384), lap, tau=1.0)
    assert lam.shape == (1, 2, 64) and bool(((lam >= 0) & (lam < 1)).all())


# ----------------------------------------------------------------------------------------------------
# The reference crate's manifold files: <name>.parquet (COO triplets) + manifold.json
# ----------------------------------------------------------------------------------------------------

# The crate's own shipped pair (domain_manifold/ of its repository), where a developer has it: beside the
# converted arrays, or in a folder named by TAUFORMER_CRATE_MANIFOLD.
CRATE_MANIFOLD = os.environ.get("TAUFORMER_CRATE_MANIFOLD", os.path.dirname(REFERENCE_MANIFOLD))
CRATE_SCHEMA = [("name_id", "string"), ("n_rows", "uint64"), ("n_cols", "uint64"), ("nnz", "uint64"),
                ("row", "uint64"), ("col", "uint64"), ("value", "double")]


def _crate_json(features, synthesis="Median"):
    return {"name_id": "manifold", "n_rows": 1000, "builder_config": {
        "nfeatures": {"Usize": features}, "synthesis": {"TauMode": synthesis}, "lambda_k": {"Usize": 25}}}


def _write_as_the_crate(folder, lap, *, synthesis="Median", duplicate_first=False):
    """A manifold pair written with pyarrow alone, in the crate's schema (not through save_laplacian)."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows, cols = np.nonzero(lap)
    vals = lap[rows, cols]
    if duplicate_first:  # the crate's TriMat sums repeated triplets: split one entry in two halves
        rows, cols = np.r_[rows[:1], rows], np.r_[cols[:1], cols]
        vals = np.r_[vals[:1] / 2, vals[:1] / 2, vals[1:]]
    n, nnz = lap.shape[0], len(vals)
    types = {"string": pa.string(), "uint64": pa.uint64(), "double": pa.float64()}
    schema = pa.schema([pa.field(name, types[ty], nullable=False) for name, ty in CRATE_SCHEMA])
    data = {"name_id": ["dataset-gl-matrix"] * nnz, "n_rows": [n] * nnz, "n_cols": [n] * nnz, "nnz": [nnz] * nnz,
            "row": rows.astype(np.uint64), "col": cols.astype(np.uint64), "value": vals}
    pq.write_table(pa.Table.from_pydict(data, schema=schema), folder / "manifold.parquet")
    (folder / "manifold.json").write_text(json.dumps(_crate_json(n, synthesis)))
    return folder / "manifold.parquet"


def test_crate_format_read(tmp_path):
    lap = knn_laplacian(np.random.default_rng(0).normal(size=(50, 24)), k=4, dtype=torch.float64).numpy()
    path = _write_as_the_crate(tmp_path, lap, duplicate_first=True)
    loaded, params = load_laplacian(path, 24, dtype=torch.float64, with_parameters=True)
    assert np.allclose(loaded.numpy(), lap, rtol=0, atol=1e-15)
    assert params["builder_config"]["synthesis"] == {"TauMode": "Median"}
    assert params["parquet_name_id"] == "dataset-gl-matrix"
    assert torch.equal(load_laplacian(tmp_path, dtype=torch.float64), loaded)  # the folder works too


def test_crate_format_round_trip(tmp_path):
    """crate format → package → crate format: the same table (schema, names, triplets) and the same json."""
    pq = pytest.importorskip("pyarrow.parquet")
    lap = knn_laplacian(np.random.default_rng(1).normal(size=(40, 16)), k=3, dtype=torch.float64).numpy()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    original = _write_as_the_crate(tmp_path / "a", lap, synthesis="Mean")
    loaded, params = load_laplacian(original, dtype=torch.float64, with_parameters=True)
    save_laplacian(tmp_path / "b" / "manifold.parquet", loaded, **params)
    assert pq.read_table(tmp_path / "b" / "manifold.parquet").equals(pq.read_table(original))
    assert json.loads((tmp_path / "b" / "manifold.json").read_text()) == _crate_json(16, "Mean")


def test_save_parquet_writes_the_crate_schema(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    lap = chain_laplacian(12, dtype=torch.float64)
    save_laplacian(tmp_path / "lap.parquet", lap, tau_rule="vector-mean", k=3)
    table = pq.read_table(tmp_path / "lap.parquet")
    assert [(f.name, str(f.type), f.nullable) for f in table.schema] == [(n, t, False) for n, t in CRATE_SCHEMA]
    assert table.num_rows == 12 + 2 * 11 and table["nnz"][0].as_py() == 34
    rows, cols = table["row"].to_numpy(), table["col"].to_numpy()
    assert (np.diff(rows * 12 + cols) > 0).all()  # row-major, as the crate writes its CSR
    meta = json.loads((tmp_path / "manifold.json").read_text())
    assert meta["builder_config"] == {"nfeatures": {"Usize": 12}, "synthesis": {"TauMode": "Mean"}}
    assert meta["tauformer"] == {"tau_rule": "vector-mean", "k": 3}
    assert torch.equal(load_laplacian(tmp_path / "lap.parquet", dtype=torch.float64), lap)


def test_crate_format_errors_name_the_file(tmp_path):
    pytest.importorskip("pyarrow")
    lap = chain_laplacian(6, dtype=torch.float64).numpy()
    path = _write_as_the_crate(tmp_path, lap)
    meta = tmp_path / "manifold.json"
    meta.write_text(json.dumps(_crate_json(7)))
    with pytest.raises(ValueError, match="nfeatures = 7 does not match"):
        load_laplacian(path)
    meta.write_text(json.dumps(_crate_json(6, "Percentile")))
    with pytest.raises(ValueError, match="Percentile"):
        load_laplacian(path)
    meta.unlink()
    with pytest.raises(ValueError, match="manifold.json must lie beside it"):
        load_laplacian(path)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="junk.parquet"):
        load_laplacian(tmp_path / "junk.parquet")
    bad = lap.copy()
    bad[0, 1] = bad[1, 0] = 2.0  # rows no longer sum to 0
    meta.write_text(json.dumps(_crate_json(6)))
    path = _write_as_the_crate(tmp_path, bad)
    with pytest.raises(ValueError, match="manifold.parquet: laplacian rows must sum to 0"):
        load_laplacian(path)


def test_two_laplacians_never_share_one_manifold_json(tmp_path):
    """The crate reads one manifold.json per folder: a second .parquet saved beside a first must not rewrite the
    first's tau rule (Mean → Median) nor its F; the first stays loadable as it was. Rewriting a file's own pair,
    or a second pair the json describes alike, is allowed."""
    pytest.importorskip("pyarrow")
    first = tmp_path / "first.parquet"
    save_laplacian(first, chain_laplacian(12, dtype=torch.float64), tau_rule="vector-mean")
    meta = (tmp_path / "manifold.json").read_text()
    for lap, rule in ((chain_laplacian(12, dtype=torch.float64), "vector-median"), (chain_laplacian(8), None)):
        with pytest.raises(ValueError, match=r"manifold\.json describes first\.parquet .*folder of its own"):
            save_laplacian(tmp_path / "second.parquet", lap, tau_rule=rule)
        assert (tmp_path / "manifold.json").read_text() == meta and not (tmp_path / "second.parquet").exists()
    _, params = load_laplacian(first, 12, with_parameters=True)
    assert params["builder_config"]["synthesis"] == {"TauMode": "Mean"}
    save_laplacian(first, chain_laplacian(12, dtype=torch.float64), tau_rule="vector-median")  # its own pair
    assert load_laplacian(first, with_parameters=True)[1]["builder_config"]["synthesis"] == {"TauMode": "Median"}
    (tmp_path / "b").mkdir()  # a folder of its own works
    save_laplacian(tmp_path / "b" / "second.parquet", chain_laplacian(8), tau_rule="vector-mean")
    assert load_laplacian(tmp_path / "b" / "second.parquet").shape == (8, 8)


def test_a_synthesis_with_a_payload_is_named(tmp_path):
    """arrowspace writes a TauMode with a payload as an object: a clear error, not `unhashable type: 'dict'`."""
    pytest.importorskip("pyarrow")
    path = _write_as_the_crate(tmp_path, chain_laplacian(6, dtype=torch.float64).numpy())
    (tmp_path / "manifold.json").write_text(json.dumps(_crate_json(6, {"Fixed": 0.5})))
    with pytest.raises(ValueError, match=r'manifold\.json: synthesis TauMode \{"Fixed": 0\.5\} is not one of'):
        load_laplacian(path)


def test_a_huge_declared_size_is_refused_dense(tmp_path):
    """A crate file declaring F = 2e6 (with a few entries) would be 29 TiB dense: refused, naming the way out;
    layout="sparse" (and "auto") load it."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    f = 2_000_000
    path = _write_as_the_crate(tmp_path, chain_laplacian(4, dtype=torch.float64).numpy())
    table = pq.read_table(path)
    declared = pa.array([f] * table.num_rows, pa.uint64())
    pq.write_table(table.set_column(1, "n_rows", declared).set_column(2, "n_cols", declared), path)
    (tmp_path / "manifold.json").write_text(json.dumps(_crate_json(f)))
    with pytest.raises(ValueError, match=r'manifold\.parquet: a dense 2000000×2000000 Laplacian .*layout="sparse"'):
        load_laplacian(path)
    assert load_laplacian(path, layout="sparse").shape == (f, f)
    assert load_laplacian(path, layout="auto").layout == torch.sparse_csr


@pytest.mark.skipif(not (os.path.exists(os.path.join(CRATE_MANIFOLD, "manifold.parquet"))
                         and os.path.exists(REFERENCE_MANIFOLD)),
                    reason="the reference crate's own manifold.parquet (outside the repo) is absent")
def test_the_crates_own_manifold_equals_the_converted_arrays(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    lap, params = load_laplacian(CRATE_MANIFOLD, 384, dtype=torch.float64, with_parameters=True)
    coo = np.load(REFERENCE_MANIFOLD)
    want = np.zeros(tuple(coo["shape"]))
    np.add.at(want, (coo["row"], coo["col"]), coo["value"])
    assert np.array_equal(lap.numpy(), want)
    assert params["builder_config"]["synthesis"] == {"TauMode": "Median"}
    save_laplacian(tmp_path / "manifold.parquet", lap, **params)
    original = os.path.join(CRATE_MANIFOLD, "manifold.parquet")
    assert pq.read_table(tmp_path / "manifold.parquet").equals(pq.read_table(original))
    with open(os.path.join(CRATE_MANIFOLD, "manifold.json")) as f:
        assert json.loads((tmp_path / "manifold.json").read_text()) == json.load(f)


# ----------------------------------------------------------------------------------------------------
# Sparse Laplacians: validation, loading, λ on the reference backend
# ----------------------------------------------------------------------------------------------------

def test_validate_sparse():
    lap = knn_laplacian(np.random.default_rng(2).normal(size=(30, 20)), k=3, dtype=torch.float64)
    validate_laplacian(lap.to_sparse_csr(), 20)
    asym = lap.clone()
    asym[0, 1] += 0.5
    asym[0, 0] -= 0.5
    with pytest.raises(ValueError, match="not symmetric"):
        validate_laplacian(asym.to_sparse_csr())
    not_psd = torch.tensor([[-1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)  # symmetric, rows 0, eigenvalue -2
    with pytest.raises(ValueError, match="positive semi-definite"):
        validate_laplacian(not_psd.to_sparse_csr())


def test_load_layouts(tmp_path, monkeypatch):
    from tauformer_kernels import laplacian as laplacian_module

    lap = knn_laplacian(np.random.default_rng(3).normal(size=(30, 64)), k=2, dtype=torch.float64)  # ~6 % stored
    save_laplacian(tmp_path / "lap.npz", lap)
    assert load_laplacian(tmp_path / "lap.npz").layout == torch.strided
    sparse = load_laplacian(tmp_path / "lap.npz", layout="sparse", dtype=torch.float64)
    assert sparse.layout == torch.sparse_csr and torch.equal(sparse.to_dense(), lap)
    assert load_laplacian(tmp_path / "lap.npz", layout="auto").layout == torch.strided  # F = 64: dense is faster
    monkeypatch.setattr(laplacian_module, "SPARSE_MIN_FEATURES", 32)
    assert load_laplacian(tmp_path / "lap.npz", layout="auto").layout == torch.sparse_csr
    with pytest.raises(ValueError, match="layout"):
        load_laplacian(tmp_path / "lap.npz", layout="csr")


@pytest.mark.parametrize("tau", [0.7, "vector-median"])
def test_sparse_lambda_equals_dense(tau):
    """The reference backend multiplies a CSR Laplacian sparse: λ and dx as with the dense one."""
    lap = knn_laplacian(np.random.default_rng(4).normal(size=(30, 48)), k=4, dtype=torch.float64)
    lap[0, 1] -= 0.25  # not symmetric: the backward's L_sym needs Lᵀ too
    lap[0, 0] += 0.25
    x = torch.randn(2, 3, 7, 48, dtype=torch.float64, requires_grad=True)
    dense = taumode_lambda(x, lap, tau=tau, backend="reference")
    sparse = taumode_lambda(x, lap.to_sparse_csr(), tau=tau, backend="reference")
    assert torch.allclose(sparse, dense, rtol=1e-12, atol=0)
    weights = torch.randn_like(dense)
    (g_dense,) = torch.autograd.grad((dense * weights).sum(), x)
    (g_sparse,) = torch.autograd.grad((sparse * weights).sum(), x)
    assert torch.allclose(g_sparse, g_dense, rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------------------------------
# arrowspace's builder (optional: pip install "tauformer[arrowspace]")
# ----------------------------------------------------------------------------------------------------

def test_arrowspace_builder():
    from tauformer_kernels import arrowspace_laplacian

    pytest.importorskip("arrowspace")
    emb = np.random.default_rng(5).normal(size=(300, 16))
    try:
        lap = arrowspace_laplacian(emb, k=6, eps=1.0, sigma=1.0, p=2.0, dtype=torch.float64)
    except RuntimeError as e:  # an arrowspace (0.21, Python 3.11) that keeps the entries to itself
        assert "does not expose its entries" in str(e) and "knn_laplacian" in str(e)
        return
    validate_laplacian(lap, 16)
    assert lap.shape == (16, 16) and bool((lap.diagonal() > 0).any())
    reference = knn_laplacian(emb, k=6, dtype=torch.float64)
    assert reference.shape == lap.shape  # the same data, both builders: a feature graph of F nodes
