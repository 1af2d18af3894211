"""Packed variable-length sequences (cu_seqlens) through the public API, on every backend: each sequence of
a pack equals the float64 oracle on that sequence alone, forward and every gradient, and nothing leaks
across a boundary (docs/math.md §Packed sequences)."""
import pytest
import torch
from helpers import NUMBA, oracle_attention, relative_error, temperature_tolerance

from tauformer_kernels import chain_laplacian, loglinear, reference, taumode_attention, taumode_attention_from_lambda

BACKENDS = ["reference", "loglinear", NUMBA, pytest.param("triton", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("triton") is None, reason="needs triton"))]

# (queries, keys) per sequence: ragged, with empty and one-token sequences
SELF = [(5, 5), (0, 0), (1, 1), (23, 23), (40, 40)]
DECODE = [(1, 7), (3, 3), (0, 4), (2, 30), (9, 12)]


@pytest.fixture
def small_blocks(monkeypatch):
    """loglinear's sorted path (not its dense fallback) on short sequences."""
    monkeypatch.setattr(loglinear, "LEAF", 16)
    monkeypatch.setattr(loglinear, "DENSE_QUERIES", 4)


def _offsets(lengths):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32)


def _pack(pairs, h, hkv, f, dv, dtype):
    cu_q, cu_k = _offsets([a for a, _ in pairs]), _offsets([b for _, b in pairs])
    q = torch.randn(int(cu_q[-1]), h, f, dtype=dtype)
    k = torch.randn(int(cu_k[-1]), hkv, f, dtype=dtype)
    v = torch.randn(int(cu_k[-1]), hkv, dv, dtype=dtype)
    return q, k, v, cu_q, cu_k


def _one(t, start, stop):
    """Rows start..stop of a packed tensor as a batch of one, (1, H, T, ...)."""
    return t[start:stop].movedim(0, 1).unsqueeze(0)


def _oracle(q, k, v, lap, tau, temp, slopes, causal, cu_q, cu_k):
    """Each sequence alone through the float64 oracle, packed back: (total_q, H, Dv)."""
    rows = []
    for b in range(len(cu_q) - 1):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        if q1 == q0:
            continue
        s = None if slopes is None else slopes.expand(len(cu_q) - 1, q.shape[1])[b:b + 1]
        out = oracle_attention(_one(q, q0, q1), _one(k, k0, k1), _one(v, k0, k1), lap, tau, temp, s, causal)
        rows.append(out[0].movedim(1, 0))
    return torch.cat(rows)


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pairs, causal", [(SELF, True), (DECODE, True), (SELF, False)], ids=["self", "decode", "full"])
@pytest.mark.parametrize("temperature, alibi", [(0.05, False), (1e-3, True), (10.0, False)])
def test_pack_equals_each_sequence_alone(backend, pairs, causal, temperature, alibi, small_blocks):
    h, hkv, f, dv = 4, 2, 16, 8
    q, k, v, cu_q, cu_k = _pack(pairs, h, hkv, f, dv, torch.float32)
    lap = chain_laplacian(f)
    tau = torch.tensor([0.7, 1.3])
    temp = temperature * torch.linspace(1.0, 1.5, h)
    slopes = 0.02 + 0.1 * torch.rand(len(pairs), h) if alibi else None
    leaves = _leaves(q, k, v, temp, tau, slopes)
    out = taumode_attention(*leaves[:3], lap, tau=leaves[4], temperature=leaves[3], alibi_slopes=leaves[5],
                            is_causal=causal, backend=backend, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    ref_leaves = _leaves(*(None if t is None else t.double() for t in (q, k, v, temp, tau, slopes)))
    ref = _oracle(*ref_leaves[:3], lap.double(), ref_leaves[4], ref_leaves[3], ref_leaves[5], causal, cu_q, cu_k)
    assert out.shape == (q.shape[0], h, dv) and out.is_contiguous()
    tol = temperature_tolerance(1e-5, temperature)
    assert relative_error(out, ref) < tol
    dout = torch.randn_like(ref)
    wanted = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, wanted, dout.float())
    ref_grads = torch.autograd.grad(ref, [t for t in ref_leaves if t is not None], dout)
    for name, g, r in zip(("q", "k", "v", "temperature", "tau", "slopes"), grads, ref_grads):
        assert relative_error(g, r, floor=1e-12) < 20 * tol, (name, relative_error(g, r))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nothing_leaks_across_a_boundary(backend, small_blocks):
    """Changing one sequence's keys and values changes no other sequence's output: bit for bit, or (loglinear,
    which runs sequences of one length as one batch and centres its factors on the batch's λ range) to
    rounding, where the changed sequence moves by O(1)."""
    lq, lk = torch.rand(70, 2), torch.rand(70, 1)
    v = torch.randn(70, 1, 8)
    cu = torch.tensor([0, 20, 20, 45, 70], dtype=torch.int32)
    before = taumode_attention_from_lambda(lq, lk, v, temperature=0.1, backend=backend,
                                           cu_seqlens_q=cu, cu_seqlens_k=cu)
    lk2, v2 = lk.clone(), v.clone()
    lk2[20:45], v2[20:45] = torch.rand(25, 1), torch.randn(25, 1, 8)
    after = taumode_attention_from_lambda(lq, lk2, v2, temperature=0.1, backend=backend, cu_seqlens_q=cu,
                                          cu_seqlens_k=cu)
    rounding = 1e-6 if backend == "loglinear" else 0.0
    assert relative_error(after[:20], before[:20]) <= rounding and relative_error(after[45:], before[45:]) <= rounding
    assert relative_error(after[20:45], before[20:45]) > 0.1


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_lambda_pack_and_given_max_lengths(backend):
    """taumode_attention_from_lambda on a pack, with max_seqlen given (nothing read on the host) and not."""
    pairs = DECODE
    cu_q, cu_k = _offsets([a for a, _ in pairs]), _offsets([b for _, b in pairs])
    lq, lk = torch.rand(int(cu_q[-1]), 4), torch.rand(int(cu_k[-1]), 1)
    v = torch.randn(int(cu_k[-1]), 1, 8)
    temp = torch.full((4,), 0.2)
    given = taumode_attention_from_lambda(lq, lk, v, temperature=temp, backend=backend, cu_seqlens_q=cu_q,
                                          cu_seqlens_k=cu_k, max_seqlen_q=9, max_seqlen_k=30)
    found = taumode_attention_from_lambda(lq, lk, v, temperature=temp, backend=backend, cu_seqlens_q=cu_q,
                                          cu_seqlens_k=cu_k)
    assert torch.equal(given, found)
    for b in range(len(pairs)):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        if q1 > q0:
            ref = reference.attention_naive(_one(lq, q0, q1).double(), _one(lk, k0, k1).double(),
                                            _one(v, k0, k1).double(), temp.double())
            assert relative_error(given[q0:q1], ref[0].movedim(1, 0)) < 1e-5


def test_bad_offsets_name_the_argument():
    lq, lk, v = torch.rand(10, 2), torch.rand(10, 2), torch.randn(10, 2, 4)
    good = torch.tensor([0, 4, 10], dtype=torch.int32)
    cases = [
        (dict(cu_seqlens_q=good.long(), cu_seqlens_k=good), TypeError, "cu_seqlens_q must be int32"),
        (dict(cu_seqlens_q=good, cu_seqlens_k=torch.tensor([1, 4, 10], dtype=torch.int32)), ValueError,
         "cu_seqlens_k must start at 0"),
        (dict(cu_seqlens_q=torch.tensor([0, 6, 4], dtype=torch.int32), cu_seqlens_k=good), ValueError,
         "cu_seqlens_q must be non-decreasing"),
        (dict(cu_seqlens_q=good, cu_seqlens_k=torch.tensor([0, 4, 11], dtype=torch.int32)), ValueError,
         "cu_seqlens_k ends at 11, but its tensor has 10 rows"),
        (dict(cu_seqlens_q=good, cu_seqlens_k=torch.tensor([0, 10], dtype=torch.int32)), ValueError,
         "cu_seqlens_q has 2 sequences and cu_seqlens_k 1"),
        (dict(cu_seqlens_q=good, cu_seqlens_k=torch.tensor([0, 3, 10], dtype=torch.int32)), ValueError,
         "sequence 0 has 4 queries"),
        (dict(cu_seqlens_q=good), ValueError, "given together"),
    ]
    for kwargs, error, says in cases:
        with pytest.raises(error, match=says):
            taumode_attention_from_lambda(lq, lk, v, **kwargs)
    with pytest.raises(ValueError, match="lq must have 2 dimensions"):
        taumode_attention_from_lambda(lq[None], lk, v, cu_seqlens_q=good, cu_seqlens_k=good)
    with pytest.raises(ValueError, match="alibi_slopes"):
        taumode_attention_from_lambda(lq, lk, v, cu_seqlens_q=good, cu_seqlens_k=good, alibi_slopes=torch.rand(3, 2))


def test_torch_compile_fullgraph_with_given_max_lengths():
    cu = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
    lq, lk, v = torch.rand(12, 2), torch.rand(12, 2), torch.randn(12, 2, 4)

    def attend(lq, lk, v):
        return torch.ops.tauformer.taumode_attention_from_lambda(lq, lk, v, torch.tensor(0.1), True, None, "auto",
                                                                 False, cu, cu, 7, 7)

    compiled = torch.compile(attend, fullgraph=True)
    leaves = _leaves(lq, lk, v)
    out = compiled(*leaves)
    eager = taumode_attention_from_lambda(lq, lk, v, temperature=0.1, cu_seqlens_q=cu, cu_seqlens_k=cu)
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    out.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


def test_groups_batch_self_attention_sequences_within_the_padding_budget():
    from tauformer_kernels import varlen

    def spans(pairs):
        q = k = 0
        out = []
        for a, b in pairs:
            out.append((q, q + a, k, k + b))
            q, k = q + a, k + b
        return out

    pairs = [(100, 100), (0, 0), (90, 90), (10, 10), (95, 95), (3, 7), (9, 9)]
    groups = varlen.groups(spans(pairs), is_causal=True)
    assert sorted(b for g in groups for b in g) == [0, 2, 3, 4, 5, 6]  # every non-empty sequence, once
    assert [0, 4, 2] in groups and [5] in groups  # decode-like (Tq < Tk) alone: right padding would misalign it
    for g in groups:
        longest = max(pairs[b][0] for b in g)
        assert g[0] == max(g, key=lambda b: pairs[b][0]) and len(g) * longest <= varlen.GROUP_WASTE * sum(
            pairs[b][0] for b in g)
    assert all(len(g) == 1 for g in varlen.groups(spans(pairs), is_causal=False))  # padding would be seen


@pytest.mark.parametrize("backend", ["reference", "loglinear"])
@pytest.mark.parametrize("slack", [0, 1 << 16])
def test_short_sequences_share_a_pass_and_long_ones_run_alone(backend, slack, monkeypatch, small_blocks):
    """The PyTorch backends' packed forward: runs of short sequences in one masked pass (varlen.blocks), the
    others alone in the backend (slack 0 puts every sequence of DECODE alone), both equal to the oracle;
    a non-finite V in one sequence of a shared pass reaches no other sequence."""
    from tauformer_kernels import varlen

    monkeypatch.setattr(varlen, "GROUP_SLACK", slack)
    pairs = DECODE + [(600, 600)]
    cu_q, cu_k = _offsets([a for a, _ in pairs]), _offsets([b for _, b in pairs])
    seq_bounds = varlen.visible_bounds(list(zip(cu_q.tolist(), cu_q.tolist()[1:], cu_k.tolist(), cu_k.tolist()[1:])),
                                       True)
    grouped = varlen.blocks(seq_bounds)
    assert [b for g in grouped for b in g] == [0, 1, 3, 4, 5] and grouped[-1] == [5]
    assert (len(grouped) == 5) == (slack == 0)
    lq, lk = torch.rand(int(cu_q[-1]), 2), torch.rand(int(cu_k[-1]), 2)
    v = torch.randn(int(cu_k[-1]), 2, 8)
    slopes = 0.05 * torch.rand(len(pairs), 2)
    out = taumode_attention_from_lambda(lq, lk, v, temperature=0.05, alibi_slopes=slopes, backend=backend,
                                        cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    for b, (q0, q1, k0, k1) in enumerate(seq_bounds):
        if q1 > q0:
            ref = reference.attention_naive(lq[q0:q1].double().t()[None], lk[k0:k1].double().t()[None],
                                            v[k0:k1].double().movedim(0, 1)[None], torch.full((2,), 0.05).double(),
                                            slopes[b:b + 1].double())
            assert relative_error(out[q0:q1], ref[0].movedim(1, 0)) < 1e-5, b
    v[cu_k[3]] = float("inf")  # sequence 3's first key
    poisoned = taumode_attention_from_lambda(lq, lk, v, temperature=0.05, alibi_slopes=slopes, backend=backend,
                                             cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    others = torch.cat([poisoned[:cu_q[3]], poisoned[cu_q[4]:]])
    assert torch.isfinite(others).all()
