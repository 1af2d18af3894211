"""TauGPT: shapes, the (V, λk) cache against the full forward, cache bytes, tau calibration, recency."""

import math

import pytest
import torch

from tauformer_model import TauGPT, TauGPTConfig
from tauformer_model.model import DotAttention, TaumodeAttention, alibi_slopes, apply_rope, key_energy, rope_cos_sin


def make_model(seed=0, **kw) -> TauGPT:
    """A small model whose zero-initialised projections are randomised, so every path matters."""
    cfg = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, vocab_size=256, block_size=192, backend="auto")
    cfg.update(kw)
    torch.manual_seed(seed)
    model = TauGPT(TauGPTConfig(**cfg))
    with torch.no_grad():
        for block in model.blocks:
            block.attn.c_proj.weight.normal_(std=0.05)
            block.mlp.c_proj.weight.normal_(std=0.05)
            if isinstance(block.attn, TaumodeAttention):
                block.attn.log_temperature.add_(0.3 * torch.randn_like(block.attn.log_temperature))
        model.lm_head.weight.normal_(std=0.1)
    return model.eval()


def rel_err(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("attention", ["taumode", "dot"])
def test_forward_shapes_and_loss(attention):
    model = make_model(attention=attention)
    idx = torch.randint(0, 256, (3, 37))
    logits = model(idx)
    assert logits.shape == (3, 37, 256) and logits.dtype == torch.float32
    assert logits.abs().max() <= 15.0  # softcap
    loss = model(idx, targets=idx)
    assert loss.ndim == 0 and math.isfinite(float(loss.detach()))


def test_recency_auto_resolves():
    assert TauGPTConfig(attention="taumode").recency == "learned"
    assert TauGPTConfig(attention="dot").recency == "none"
    with pytest.raises(ValueError, match="recency"):
        TauGPTConfig(recency="sometimes")
    with pytest.raises(ValueError, match="n_kv_head"):
        TauGPTConfig(n_head=4, n_kv_head=3)


@pytest.mark.parametrize("attention,recency", [("taumode", "none"), ("taumode", "learned"),
                                               ("taumode", "fixed"), ("dot", "none"), ("dot", "learned"),
                                               ("taumode-lambda-before-rope", "learned"),
                                               ("taumode-hybrid", "learned"), ("taumode-gate", "none"),
                                               ("taumode-slices", "learned"), ("taumode-slices", "none")])
def test_decode_with_cache_matches_full_forward(attention, recency):
    """docs/math.md §The λ cache: a 100-token prefill in one call, then 64 single-token decodes, with GQA
    (4 q heads, 2 kv)."""
    extra = {"before-rope": dict(lambda_before_rope=True), "hybrid": dict(dot_every=2),
             "gate": dict(output_gate=True), "slices": dict(lambda_slices=4)}.get(attention.split("-")[-1], {})
    model = make_model(attention=attention.split("-")[0], recency=recency, **extra)
    idx = torch.randint(0, 256, (2, 164), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(2, 170)
        pointers = [t.data_ptr() for t in cache.tensors()]
        steps = [model(idx[:, :100], cache=cache)]
        steps += [model(idx[:, t:t + 1], cache=cache) for t in range(100, 164)]
    assert cache.pos == 164
    assert [t.data_ptr() for t in cache.tensors()] == pointers  # preallocated, never reallocated
    decoded = torch.cat(steps, dim=1)
    assert rel_err(decoded[:, :100], full[:, :100]) < 1e-5
    assert rel_err(decoded[:, 100:], full[:, 100:]) < 1e-5
    # a chunk appended to a non-empty cache (Tq > 1, Tq < Tk) is bottom-right causal too
    with torch.no_grad():
        cache = model.new_cache(2, 164)
        parts = [model(idx[:, :50], cache=cache), model(idx[:, 50:120], cache=cache), model(idx[:, 120:], cache=cache)]
    assert rel_err(torch.cat(parts, dim=1), full) < 1e-5


@pytest.mark.parametrize("recency", ["none", "learned"])
def test_decode_with_sorted_cache_matches_full_forward(recency, monkeypatch):
    """The sorted cache (small blocks, so decode crosses seals and merges) gives the full forward's
    logits: prefill in one call, single-token decodes, then a 5-token chunk one query at a time."""
    import functools

    import tauformer_kernels as tk

    monkeypatch.setattr(tk, "SortedCache", functools.partial(tk.SortedCache, block=8, fanout=3))
    model = make_model(recency=recency)
    idx = torch.randint(0, 256, (2, 164), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(2, 164, sorted=True)
        steps = [model(idx[:, :70], cache=cache)]
        steps += [model(idx[:, t:t + 1], cache=cache) for t in range(70, 159)]
        steps.append(model(idx[:, 159:], cache=cache))
    assert cache.pos == 164 and all(c.length == 164 for c in cache.sorted)
    # blocks of 8, 24 and 72 keys: 164 = 2·72 + 2·8 + 4, after decode steps that sealed and merged
    assert [c.block_sizes() for c in cache.sorted][0] == [72, 72, 8, 8] and cache.nbytes > 0
    assert rel_err(torch.cat(steps, dim=1), full) < 1e-5
    with pytest.raises(ValueError, match="taumode"):
        make_model(attention="dot").new_cache(1, 8, sorted=True)


def test_cache_overflow_is_an_error():
    model = make_model()
    cache = model.new_cache(1, 8)
    model(torch.zeros(1, 8, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="cache"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def test_cache_bytes_ratio_measured_from_tensors():
    """Per token and layer the taumode cache holds V and λk: (F+1)/(2F) of a (K, V) cache (fp32)."""
    F = 16
    tau_model = make_model(attention="taumode", n_embd=4 * F)
    dot_model = make_model(attention="dot", n_embd=4 * F)
    tau_cache, dot_cache = tau_model.new_cache(3, 50), dot_model.new_cache(3, 50)
    tau_bytes = sum(t.nbytes for t in tau_cache.tensors())
    dot_bytes = sum(t.nbytes for t in dot_cache.tensors())
    assert tau_cache.nbytes == tau_bytes and dot_cache.nbytes == dot_bytes
    assert tau_bytes / dot_bytes == pytest.approx((F + 1) / (2 * F), rel=1e-12)
    assert tau_cache.bytes_per_token_per_layer == 2 * (F + 1) * 4  # 2 kv heads × (F values + one λ) × fp32


def test_rope_half_split_layout():
    """y1 = x1·cos + x2·sin, y2 = x2·cos − x1·sin; norms are preserved; position 0 is the identity."""
    x = torch.randn(1, 1, 5, 8)
    cos, sin = rope_cos_sin(8, 0, 5, 10000.0, "cpu")
    y = apply_rope(x, cos, sin)
    assert torch.allclose(y[..., 0, :], x[..., 0, :])
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-6)
    assert torch.allclose(y[..., 1, 0], x[..., 1, 0] * math.cos(1.0) + x[..., 1, 4] * math.sin(1.0), atol=1e-6)


def test_calibrate_tau_is_median_energy():
    model = make_model()
    idx = torch.randint(0, 256, (4, 64))
    tau = model.calibrate_tau(idx)
    energy = model.first_layer_key_energy(idx)
    assert tau == pytest.approx(float(energy.median()), rel=1e-6)
    for block in model.blocks:
        assert torch.allclose(block.attn.log_tau.exp(), torch.full((2,), tau))
    lam = energy / (energy + tau)  # half of the calibration keys fall below λ = 1/2
    assert float((lam < 0.5).float().mean()) == pytest.approx(0.5, abs=0.05)


def test_key_energy_of_chain_laplacian():
    lap = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    assert float(key_energy(torch.tensor([1.0, -1.0]), lap, 0.0)) == pytest.approx(2.0)
    assert float(key_energy(torch.tensor([1.0, 1.0]), lap, 0.0)) == pytest.approx(0.0)


@pytest.mark.parametrize("recency", ["none", "fixed", "learned"])
def test_learnable_parameters_receive_gradients(recency):
    model = make_model(recency=recency, learn_tau=True).train()
    idx = torch.randint(0, 256, (2, 40))
    model(idx, targets=idx).backward()
    attn = model.blocks[0].attn
    for p in (attn.log_temperature, attn.log_tau, attn.c_q.weight, attn.c_k.weight, attn.c_v.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    if recency == "learned":
        assert attn.log_slopes.grad is not None and attn.log_slopes.grad.abs().sum() > 0
        assert torch.allclose(attn.log_slopes.detach().exp(), alibi_slopes(4))
    elif recency == "fixed":
        assert not attn.log_slopes.requires_grad
    else:
        assert attn.log_slopes is None


def test_dot_baseline_is_the_same_model():
    """attention="dot" differs only by the taumode-specific temperature and tau."""
    tau_names = {n for n, _ in make_model(attention="taumode", recency="none").named_parameters()}
    dot_names = {n for n, _ in make_model(attention="dot", recency="none").named_parameters()}
    assert dot_names <= tau_names
    assert {n.split(".")[-1] for n in tau_names - dot_names} == {"log_temperature"}


def test_laplacian_from_file(tmp_path):
    import numpy as np

    from tauformer_model import laplacian_cli

    emb = np.random.default_rng(0).normal(size=(200, 16))
    np.save(tmp_path / "emb.npy", emb)
    assert laplacian_cli.main(["--embeddings", str(tmp_path / "emb.npy"), "--out", str(tmp_path / "lap.npz"),
                              "--k", "3"]) == 0
    model = make_model(n_embd=64, laplacian=str(tmp_path / "lap.npz"))  # head dim 16
    lap = model.laplacian
    assert (lap.shape == (16, 16) and torch.allclose(lap, lap.T)
            and torch.allclose(lap.sum(1), torch.zeros(16), atol=1e-5))
    assert not torch.allclose(lap, TauGPT(TauGPTConfig(n_embd=64, n_head=4)).laplacian)
    with pytest.raises(ValueError):
        make_model(n_embd=128, laplacian=str(tmp_path / "lap.npz"))  # head dim 32 ≠ 16


def test_learned_laplacian_stays_a_laplacian_and_learns():
    model = make_model(learn_laplacian=True)
    L0 = model.attention_laplacian()
    assert torch.allclose(L0, model.laplacian)  # starts at the given graph
    with torch.no_grad():
        model.edge_log_scale.normal_()
    L = model.attention_laplacian()
    off = L - torch.diag(torch.diag(L))
    assert torch.allclose(L, L.T) and torch.allclose(L.sum(-1), torch.zeros(L.shape[0]), atol=1e-6)
    assert (off <= 0).all() and ((off != 0) == (model.laplacian - torch.diag(torch.diag(model.laplacian)) != 0)).all()
    idx = torch.randint(0, 256, (2, 33))
    model.train()
    model(idx, targets=idx).backward()
    assert model.edge_log_scale.grad is not None and model.edge_log_scale.grad.abs().sum() > 0


def test_recency_only_control_ignores_q_and_k():
    """lambda_term=False: λq = λk = 0, so the output does not depend on the query/key projections."""
    model = make_model(lambda_term=False, recency="learned")
    idx = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        before = model(idx)
        for block in model.blocks:
            block.attn.c_q.weight.normal_()
            block.attn.c_k.weight.normal_()
        assert rel_err(model(idx), before) < 1e-6
        cache = model.new_cache(2, 40)
        steps = [model(idx[:, :30], cache=cache)] + [model(idx[:, t:t + 1], cache=cache) for t in range(30, 40)]
    assert rel_err(torch.cat(steps, dim=1), model(idx)) < 1e-5
    with pytest.raises(ValueError, match="recency"):
        make_model(lambda_term=False, recency="none")


def test_hybrid_stack_has_dot_layers_and_their_cache():
    """dot_every=2 over 4 layers: layers 1 and 3 are dot product (K, V cache), 0 and 2 taumode (V, λk); the
    dot layers are the dot model's layers (same weights, same outputs)."""
    model = make_model(n_layer=4, dot_every=2)
    assert [type(b.attn) for b in model.blocks] == [TaumodeAttention, DotAttention] * 2
    assert [b.attn.layer_idx for b in model.blocks] == [0, 1, 2, 3]
    cache = model.new_cache(3, 50)
    F = 16
    assert cache.bytes_per_token_per_layer == 2 * 4 * ((F + 1) + 2 * F) / 2  # mean of a taumode and a dot layer
    assert [t is None for t in cache.k] == [True, False, True, False]
    assert [t is None for t in cache.lam_k] == [False, True, False, True]
    dot = make_model(n_layer=4, attention="dot", recency="learned")
    x = torch.randn(2, 9, 64)
    dot.blocks[1].load_state_dict(model.blocks[1].state_dict())
    lap = model.attention_laplacian()
    assert torch.equal(model.blocks[1](x, lap), dot.blocks[1](x, lap))
    with pytest.raises(ValueError, match="sorted"):
        model.new_cache(1, 8, sorted=True)
    for bad in (dict(dot_every=1), dict(dot_every=2, attention="dot")):
        with pytest.raises(ValueError, match="dot_every"):
            TauGPTConfig(**bad)


@pytest.mark.parametrize("extra", [dict(dot_every=2), dict(output_gate=True)])
def test_packed_documents_in_hybrid_and_gated_models(extra):
    """Documents packed in windows (doc_ids) give each document's own forward, with both kinds of layers
    (each gets its own layout) and with the gate; prompts of different lengths decode as each alone."""
    model = make_model(**extra)
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randint(0, 256, (1, 11), generator=gen), torch.randint(0, 256, (1, 20), generator=gen)
    packed = model(torch.cat([a, b], dim=1), doc_ids=torch.tensor([[0] * 11 + [1] * 20]))
    assert rel_err(packed, torch.cat([model(a), model(b)], dim=1)) < 1e-5
    cache = model.new_cache(2, 24)
    prompts = torch.cat([torch.cat([a, a[:, -1:].expand(1, 9)], dim=1), b], dim=0)
    logits = model(prompts, cache=cache, lengths=[11, 20])
    assert rel_err(logits[0, :11], model(a)[0]) < 1e-5 and rel_err(logits[1], model(b)[0]) < 1e-5


def test_output_gate_starts_at_one_half_and_learns():
    """The gate's weights start at zero: σ(0) = 1/2, i.e. the ungated model with half the output
    projection; the gate then gets gradients."""
    gated, plain = make_model(output_gate=True), make_model()
    assert all(float(b.attn.c_gate.weight.detach().abs().max()) == 0 for b in gated.blocks)
    missing = gated.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == [f"blocks.{i}.attn.c_gate.weight" for i in range(2)]
    with torch.no_grad():
        for block in plain.blocks:
            block.attn.c_proj.weight.mul_(0.5)
    idx = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(3))
    assert rel_err(gated(idx), plain(idx)) < 1e-6
    gated.train()
    gated(idx, targets=idx).backward()
    assert all(float(b.attn.c_gate.weight.grad.abs().max()) > 0 for b in gated.blocks)
    assert gated.num_params() - plain.num_params() == 2 * 64 * 4  # C·H per layer


def sliced_attention_f64(lam_q, lam_k, v, temperature, slopes):
    """sliced_attention restated one query and key at a time in float64."""
    B, H, Tq, m = lam_q.shape
    Hkv, Tk = lam_k.size(1), lam_k.size(2)
    out = torch.zeros(B, H, Tq, v.size(-1), dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            g = h // (H // Hkv)
            for i in range(Tq):
                at = i + Tk - Tq
                logits = torch.tensor([-sum(abs(float(lam_q[b, h, i, r]) - float(lam_k[b, g, j, r]))
                                            / float(temperature[h, r]) for r in range(m))
                                       - (0.0 if slopes is None else float(slopes[h]) * (at - j))
                                       for j in range(at + 1)], dtype=torch.float64)
                out[b, h, i] = torch.softmax(logits, 0) @ v[b, g, :at + 1].double()
    return out


@pytest.mark.parametrize("tq,tk,temp", [(7, 7, 0.3), (1, 9, 0.1), (5, 12, 1e-3), (13, 13, 10.0)])
@pytest.mark.parametrize("recency", [False, True])
def test_sliced_attention_against_float64(tq, tk, temp, recency):
    """m = 3 λ per head, GQA 4/2, decode and chunk shapes (Tq < Tk), tiny and large temperatures."""
    from tauformer_model.model import sliced_attention

    gen = torch.Generator().manual_seed(tq * 31 + tk)
    lam_q, lam_k = torch.rand(2, 4, tq, 3, generator=gen), torch.rand(2, 2, tk, 3, generator=gen)
    v = torch.randn(2, 2, tk, 8, generator=gen)
    temperature = temp * torch.exp(0.3 * torch.randn(4, 3, generator=gen))
    slopes = alibi_slopes(4) if recency else None
    out = sliced_attention(lam_q, lam_k, v, temperature, slopes)
    assert rel_err(out.double(), sliced_attention_f64(lam_q, lam_k, v, temperature, slopes)) < 1e-5


def test_one_slice_is_the_kernels_attention():
    """With m = 1 the sliced path is taumode attention from λ as the package's kernels compute it."""
    import tauformer_kernels as tk
    from tauformer_model.model import sliced_attention

    gen = torch.Generator().manual_seed(0)
    lam_q, lam_k, v = (torch.rand(2, 4, 11, generator=gen), torch.rand(2, 2, 11, generator=gen),
                       torch.randn(2, 2, 11, 8, generator=gen))
    temperature, slopes = torch.tensor([0.1, 0.2, 0.05, 1.0]), alibi_slopes(4)
    ours = sliced_attention(lam_q[..., None], lam_k[..., None], v, temperature[:, None], slopes)
    theirs = tk.taumode_attention_from_lambda(lam_q, lam_k, v, temperature=temperature, is_causal=True,
                                              alibi_slopes=slopes, backend="reference")
    assert rel_err(ours, theirs) < 1e-6


def test_sliced_attention_gradcheck():
    from tauformer_model.model import sliced_attention

    gen = torch.Generator().manual_seed(1)
    args = (torch.rand(1, 2, 4, 2, generator=gen, dtype=torch.float64),
            torch.rand(1, 1, 5, 2, generator=gen, dtype=torch.float64),
            torch.randn(1, 1, 5, 3, generator=gen, dtype=torch.float64),
            0.2 + torch.rand(2, 2, generator=gen, dtype=torch.float64),
            torch.rand(2, generator=gen, dtype=torch.float64))
    assert torch.autograd.gradcheck(sliced_attention, tuple(a.requires_grad_() for a in args))


def test_lambda_slices_model():
    """Each slice's λ uses its diagonal block of L; the model trains (gradients on every temperature),
    calibrates over all slices, caches m λ per key, and refuses what it does not run."""
    from tauformer_model.model import key_energy, slice_energy

    x, lap = torch.randn(3, 16), torch.randn(16, 16)
    per_slice = slice_energy(x, lap, 1e-6, 4)
    assert torch.allclose(per_slice[:, 1], key_energy(x[:, 4:8], lap[4:8, 4:8], 1e-6))
    model = make_model(lambda_slices=2).train()
    idx = torch.randint(0, 256, (2, 21))
    model(idx, targets=idx).backward()
    assert all(b.attn.log_temperature.shape == (4, 2) and b.attn.log_temperature.grad.abs().min() > 0
               for b in model.blocks)
    assert model.first_layer_key_energy(idx).shape == (2, 2, 21, 2)
    assert math.isfinite(model.calibrate_tau(idx))
    F = 16
    assert model.new_cache(1, 4).bytes_per_token_per_layer == 2 * (F + 2) * 4  # V and 2 λk per kv head
    with pytest.raises(ValueError, match="dense"):
        model(idx, doc_ids=torch.tensor([[0] * 10 + [1] * 11] * 2))
    for bad in (dict(lambda_slices=3), dict(lambda_slices=2, attention="dot"), dict(lambda_slices=0)):
        with pytest.raises(ValueError, match="lambda_slices"):
            TauGPTConfig(n_embd=64, n_head=4, **bad)
