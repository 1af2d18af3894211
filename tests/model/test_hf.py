"""Hugging Face transformers drop-in (tauformer_model.hf): tiny random-init Llama, Qwen2 and Mistral models
with attn_implementation="taumode", and TauGPT as a transformers model."""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.4")

from helpers import relative_error as rel_err  # noqa: E402
from transformers import AttentionInterface, AutoModelForCausalLM, DynamicCache, LlamaConfig, MistralConfig, Qwen2Config  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

import tauformer_kernels as tk  # noqa: E402
from tauformer_kernels.backends import triton_available, triton_interpreting  # noqa: E402
from tauformer_model import hf  # noqa: E402
from tauformer_model.checkpoint import save_checkpoint  # noqa: E402
from tauformer_model.config import TauGPTConfig  # noqa: E402
from tauformer_model.data import load_dataset  # noqa: E402
from tauformer_model.generate import generate as taugpt_generate  # noqa: E402
from tauformer_model.model import TauGPT  # noqa: E402

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, max_position_embeddings=512)
FAMILIES = {
    "llama": lambda: LlamaConfig(**SHAPE),
    "qwen2": lambda: Qwen2Config(**SHAPE),
    "mistral": lambda: MistralConfig(**SHAPE, sliding_window=None),
}


def taumode_model(family="llama", **settings):
    model = AutoModelForCausalLM.from_config(FAMILIES[family]())
    return hf.enable_taumode(model, **settings).eval()


def taugpt_model(**extra):
    cfg = TauGPTConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=64, **extra)
    model = TauGPT(cfg)
    with torch.no_grad():  # TauGPT zero-initialises its output projections: give the blocks something to do
        for block in model.blocks:
            block.attn.c_proj.weight.normal_(0, 0.05)
            if block.attn.c_gate is not None:
                block.attn.c_gate.weight.normal_(0, 0.5)
            block.mlp.c_proj.weight.normal_(0, 0.05)
        model.lm_head.weight.normal_(0, 0.5)
    hf_model = hf.TauGPTForCausalLM(hf.TauGPTHFConfig(taugpt=cfg.to_dict()))
    hf_model.transformer.load_state_dict(model.state_dict())
    return hf_model.eval(), model.eval()


MODELS = list(FAMILIES) + ["taugpt"]


def any_model(name):
    return taugpt_model()[0] if name == "taugpt" else taumode_model(name)


def test_taumode_is_registered_with_its_mask():
    assert "taumode" in AttentionInterface._global_mapping
    assert "taumode" in AttentionMaskInterface._global_mapping  # else create_causal_mask returns None silently


def reference_attention(q, k, v, L, tau, temperature, slopes, eps=1e-6):
    """Float64 restatement (docs/math.md): RMS-normed q, k; λ = E/(E+tau); softmax(-|λq-λk|/T - s·dist)·V."""
    q, k, v, L = q.double(), k.double(), v.double(), L.double()
    H, Hkv = q.shape[1], k.shape[1]
    k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    tau = tau.double().repeat_interleave(H // Hkv)[:, None]

    def lam(x):
        x = x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
        e = (((x @ L) * x).sum(-1) / ((x * x).sum(-1) + eps)).clamp_min(0)
        return e / (e + tau)

    Tq, Tk = q.shape[2], k.shape[2]
    dist = (torch.arange(Tq)[:, None] + Tk - Tq - torch.arange(Tk)).double()
    logits = -(lam(q)[..., :, None] - lam(k)[..., None, :]).abs() / temperature.double()[:, None, None]
    logits = logits - slopes.double()[:, None, None] * dist.abs()
    logits = logits.masked_fill(dist < 0, float("-inf"))
    return logits.softmax(-1) @ v


@pytest.mark.parametrize("Tq,Tk", [(1, 1), (7, 7), (1, 9), (3, 11)])
@pytest.mark.parametrize("temperature_init", [1e-3, 0.1, 10.0])
def test_attention_function_matches_float64_reference(Tq, Tk, temperature_init):
    model = taumode_model(temperature_init=temperature_init)
    module = model.model.layers[0].self_attn
    p = module.taumode
    with torch.no_grad():
        p.log_tau.copy_(torch.tensor([0.3, -0.4]))
        p.log_temperature.add_(torch.randn(4) * 0.3)
    q, k, v = torch.randn(2, 4, Tq, 16), torch.randn(2, 2, Tk, 16), torch.randn(2, 2, Tk, 16)
    out, weights = hf.taumode_attention_forward(module, q, k, v, None)
    assert weights is None and out.shape == (2, Tq, 4, 16)
    ref = reference_attention(q, k, v, p.laplacian, p.tau(), p.temperature(), p.slopes())
    assert rel_err(out.transpose(1, 2), ref) < 1e-5
    # the same from cached λk (what a TaumodeCache holds)
    lam_k = p.key_lambda(hf.rms_norm(k), p.laplacian)[..., None]
    assert rel_err(hf.taumode_attention_forward(module, q, lam_k, v, None)[0].transpose(1, 2), ref) < 1e-5


@pytest.mark.parametrize("name", MODELS)
def test_cached_greedy_generate_equals_uncached(name):
    model = any_model(name)
    ids = torch.randint(1, 256, (2, 11))  # 1..: pad_token_id 0 marks padding
    cached = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
    assert isinstance(getattr(cached, hf.CACHE_FIELD), hf.TaumodeCache)
    uncached = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(cached.sequences, uncached)
    assert len(set(cached.sequences[:, 11:].flatten().tolist())) > 1  # not a constant continuation


@pytest.mark.parametrize("name", ["llama", "taugpt"])
def test_beam_search_and_sampling_with_the_cache(name):
    model = any_model(name)
    ids = torch.randint(1, 256, (2, 7))
    kw = dict(max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kw), model.generate(ids, use_cache=False, **kw))
    kw = dict(max_new_tokens=6, do_sample=True, top_k=20, pad_token_id=0)
    torch.manual_seed(5)
    sampled = model.generate(ids, **kw)
    torch.manual_seed(5)
    assert torch.equal(sampled, model.generate(ids, use_cache=False, **kw))


@pytest.mark.parametrize("name", MODELS)
def test_logits_with_the_cache_match_the_full_forward(name):
    model = any_model(name)
    ids = torch.randint(0, 256, (2, 13))
    full = model(ids, use_cache=False).logits
    cache = hf.TaumodeCache(model)
    first = model(ids[:, :9], **{hf.CACHE_FIELD: cache}).logits
    rest = [model(ids[:, t:t + 1], **{hf.CACHE_FIELD: cache}).logits for t in range(9, 13)]
    assert rel_err(torch.cat([first] + rest, 1), full) < 1e-5


@pytest.mark.parametrize("output_gate", [False, True])
def test_taugpt_for_causal_lm_is_taugpt(output_gate):
    hf_model, model = taugpt_model(output_gate=output_gate)
    ids = torch.randint(1, 256, (3, 17))
    assert rel_err(hf_model(ids, use_cache=False).logits, model(ids)) < 1e-6
    labels = ids.clone()
    assert math.isclose(float(hf_model(ids, labels=labels).loss.detach()),
                        float(model(ids[:, :-1], ids[:, 1:]).detach()), rel_tol=1e-5)
    ours, _ = taugpt_generate(model, ids, 10, temperature=0)
    theirs = hf_model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["llama", "taugpt"])
def test_cache_bytes_are_v_plus_one_scalar_per_key(name, dtype):
    model = any_model(name).to(dtype)
    # the (K, V) baseline: the same model's keys in a DynamicCache (Llama), or the dot-product TauGPT of its shape
    baseline = model if name == "llama" else taugpt_model(attention="dot")[0].to(dtype)
    ids = torch.randint(0, 256, (2, 20))
    taumode, ordinary = hf.TaumodeCache(model), DynamicCache(config=baseline.config)
    model(ids, **{hf.CACHE_FIELD: taumode})
    baseline(ids, **{hf.CACHE_FIELD: ordinary})
    ordinary_bytes = sum(t.nbytes for layer in ordinary.layers for t in (layer.keys, layer.values))
    F = 16
    v_bytes = 2 * 2 * 20 * F * dtype.itemsize * 2  # B Hkv T F, two layers
    assert taumode.nbytes == v_bytes + 2 * 2 * 20 * 4 * 2
    assert taumode.nbytes <= 0.6 * ordinary_bytes
    if dtype == torch.float32:
        assert taumode.nbytes / ordinary_bytes == pytest.approx((F + 1) / (2 * F))


@pytest.mark.parametrize("name", MODELS)
def test_gradients_reach_every_taumode_parameter(name):
    model = hf.TauGPTForCausalLM(hf.TauGPTHFConfig(taugpt=dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                                                                learn_tau=True, learn_laplacian=True))) \
        if name == "taugpt" else taumode_model(name, learn_tau=True)
    model.train()
    ids = torch.randint(0, 256, (2, 12))
    loss = model(ids, labels=ids).loss
    loss.backward()
    names = [n for n, _ in model.named_parameters()
             if (".taumode." in n)
             or any(s in n for s in ("log_temperature", "log_tau", "log_slopes", "edge_log_scale"))]
    assert len(names) >= 3 * 2
    if name == "taugpt":  # zero-initialised output projections: the first step's gradient reaches c_proj only
        model.zero_grad()
        with torch.no_grad():
            for block in model.transformer.blocks:
                block.attn.c_proj.weight.normal_(0, 0.05)
                block.mlp.c_proj.weight.normal_(0, 0.05)
            model.transformer.lm_head.weight.normal_(0, 0.5)
        model(ids, labels=ids).loss.backward()
    params = dict(model.named_parameters())
    dead = [n for n in names if params[n].grad is None or not bool(params[n].grad.abs().sum() > 0)]
    assert not dead


def left_pad(prompts, pad=0):
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = p
        mask[b, T - len(p):] = 1
    return ids, mask


@pytest.mark.parametrize("name", MODELS)
def test_left_padded_batch_gives_what_each_prompt_gives_alone(name):
    model = any_model(name)
    prompts = [torch.randint(1, 256, (n,)) for n in (5, 11, 8)]
    ids, mask = left_pad(prompts)
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=9, do_sample=False, pad_token_id=0)
    positions = (mask.cumsum(1) - 1).clamp_min(0)  # what generate passes (RoPE from each prompt's first token)
    logits = model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    for b, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=9, do_sample=False, pad_token_id=0)
        assert torch.equal(batch[b, ids.shape[1]:], alone[0, len(p):])
        real = logits[b, ids.shape[1] - len(p):]
        assert rel_err(real, model(p[None], use_cache=False).logits[0]) < 1e-5


def test_right_padding_and_holes():
    model = taumode_model()
    prompts = [torch.randint(1, 256, (n,)) for n in (4, 9)]
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, :len(p)], mask[b, :len(p)] = p, 1
    logits = model(ids, attention_mask=mask, use_cache=False).logits
    for b, p in enumerate(prompts):
        assert rel_err(logits[b, :len(p)], model(p[None], use_cache=False).logits[0]) < 1e-5
    mask[1, 3] = 0
    with pytest.raises(ValueError, match="padding between real tokens"):
        model(ids, attention_mask=mask, use_cache=False)


@pytest.mark.parametrize("how", ["cu_seq_lens", "position_ids"])
def test_packed_documents_are_attended_to_alone(how):
    model = taumode_model()
    docs = [torch.randint(0, 256, (n,)) for n in (6, 1, 9)]
    ids = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    kw = dict(position_ids=position_ids, use_cache=False)
    if how == "cu_seq_lens":
        cu = torch.tensor([0, 6, 7, 16], dtype=torch.int32)
        kw.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9)
    packed = model(ids, **kw).logits[0]
    alone = torch.cat([model(d[None], use_cache=False).logits[0] for d in docs])
    assert rel_err(packed, alone) < 1e-5
    if how == "cu_seq_lens":
        with pytest.raises(ValueError, match="batch 1"):
            model(ids.expand(2, -1), **{**kw, "position_ids": position_ids.expand(2, -1)})


def test_packed_training_gradients_match_separate_documents():
    model = taumode_model()
    model.train()
    docs = [torch.randint(0, 256, (n,)) for n in (7, 10)]
    cu = torch.tensor([0, 7, 17], dtype=torch.int32)
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    out = model(torch.cat(docs)[None], position_ids=pos, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=10,
                max_length_k=10, use_cache=False).logits
    out.square().sum().backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    sum(model(d[None], use_cache=False).logits.square().sum() for d in docs).backward()
    for n, p in model.named_parameters():
        assert rel_err(packed[n], p.grad) < 1e-4, n


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_save_pretrained_round_trip(tmp_path, family):
    L = tk.knn_laplacian(torch.randn(200, 16), k=3)
    laplacian_file = tmp_path / "graph.npz"
    tk.save_laplacian(laplacian_file, L)
    model = taumode_model(family, laplacian=str(laplacian_file), recency="fixed", temperature_init=0.05)
    with torch.no_grad():
        for m in hf._attention_modules(model):
            m.taumode.log_tau.normal_()
            m.taumode.log_temperature.normal_(-2, 0.3)
    model.save_pretrained(tmp_path / "saved")
    laplacian_file.unlink()  # the Laplacian travels in the weights
    loaded = hf.load_taumode(tmp_path / "saved").eval()
    assert loaded.config._attn_implementation == "taumode"
    assert loaded.config.taumode == model.config.taumode
    ids = torch.randint(0, 256, (2, 10))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    for a, b in zip(hf._attention_modules(model), hf._attention_modules(loaded)):
        assert torch.equal(a.taumode.laplacian, b.taumode.laplacian)
        assert torch.equal(a.taumode.laplacian, L)


def test_taugpt_checkpoint_and_save_pretrained_round_trip(tmp_path):
    hf_model, model = taugpt_model()
    save_checkpoint(tmp_path / "run", model, {"step": 3})
    from_checkpoint = hf.TauGPTForCausalLM.from_checkpoint(tmp_path / "run").eval()
    ids = torch.randint(1, 256, (2, 12))
    assert torch.equal(from_checkpoint(ids).logits, hf_model(ids).logits)
    from_checkpoint.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert isinstance(loaded, hf.TauGPTForCausalLM)
    assert torch.equal(loaded(ids).logits, hf_model(ids).logits)
    assert torch.equal(loaded.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0),
                       hf_model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return load_dataset(None, str(tmp_path_factory.mktemp("cache")), log=lambda *a: None)


@pytest.mark.parametrize("name", ["llama", "taugpt"])
def test_fifty_training_steps_on_the_built_in_corpus_lower_the_loss(corpus, name):
    if name == "taugpt":
        model = hf.TauGPTForCausalLM(hf.TauGPTHFConfig(taugpt=dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64)))
    else:
        model = taumode_model()
        hf.calibrate_tau(model, corpus.batch("train", 8, 64, torch.Generator().manual_seed(1))[0])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    val = corpus.batch("val", 16, 64, torch.Generator().manual_seed(123))[0]

    def val_loss():
        with torch.no_grad():
            return float(model(val, labels=val, use_cache=False).loss)

    before = val_loss()
    for _ in range(50):
        x, _ = corpus.batch("train", 8, 64, g)
        loss = model(x, labels=x, use_cache=False).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = val_loss()
    assert after < before - 1.0, (before, after)  # from ~ln 256 = 5.5 towards the byte unigram's 3.25


def test_calibrate_tau_sets_each_layer_to_its_median_key_energy():
    model = taumode_model()
    ids = torch.randint(0, 256, (2, 16))
    taus = hf.calibrate_tau(model, ids)
    assert len(taus) == 2 and all(t > 0 for t in taus)
    for m, tau in zip(hf._attention_modules(model), taus):
        assert torch.allclose(m.taumode.log_tau.exp(), torch.tensor(tau))


def test_bad_uses_get_clear_errors():
    plain = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPE))
    module = plain.model.layers[0].self_attn
    q = torch.randn(1, 4, 3, 16)
    with pytest.raises(ValueError, match="enable_taumode"):
        hf.taumode_attention_forward(module, q, q[:, :2], q[:, :2], None)
    with pytest.raises(ValueError, match="enable_taumode"):
        hf.TaumodeCache(plain)
    with pytest.raises(ValueError, match="AttentionInterface"):
        hf.enable_taumode(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="recency"):
        hf.enable_taumode(plain, recency="sometimes")
    with pytest.raises(ValueError, match="laplacian"):
        hf.enable_taumode(plain, laplacian=torch.eye(8))
    with pytest.raises(ValueError, match="attention_dropout"):
        hf.enable_taumode(AutoModelForCausalLM.from_config(LlamaConfig(**SHAPE, attention_dropout=0.1)))
    with pytest.raises(ValueError, match="sliding"):  # refused at enable time, not at the first long sequence
        hf.enable_taumode(AutoModelForCausalLM.from_config(MistralConfig(**SHAPE, sliding_window=8)))
    model = taumode_model()
    with pytest.raises(ValueError, match="static"):
        model.generate(torch.randint(1, 256, (1, 5)), max_new_tokens=2, cache_implementation="static", pad_token_id=0)


@pytest.mark.parametrize("padded", [False, True])
def test_torch_compile_has_no_graph_break(padded):
    model = taumode_model()
    ids = torch.randint(1, 256, (2, 12))
    kw = dict(use_cache=False)
    if padded:  # the padding mask becomes packed sequences without reading anything back
        kw["attention_mask"] = torch.ones(2, 12, dtype=torch.long)
        kw["attention_mask"][0, :5] = 0
        kw["position_ids"] = (kw["attention_mask"].cumsum(1) - 1).clamp_min(0)
    explanation = torch._dynamo.explain(model)(ids, **kw)
    assert explanation.graph_break_count == 0, [str(b.reason)[:300] for b in explanation.break_reasons]
    compiled = torch.compile(model, fullgraph=True)
    assert rel_err(compiled(ids, **kw).logits, model(ids, **kw).logits) < 1e-5


@pytest.mark.skipif(not (triton_available() and (torch.cuda.is_available() or triton_interpreting())),
                    reason="needs triton with CUDA or TRITON_INTERPRET=1")
def test_triton_kernels_through_the_transformers_path():
    """The same model on the Triton kernels (the interpreter here): dense and packed (left-padded) forwards,
    their gradients, and cached decoding agree with the reference backend."""
    triton_model = taumode_model(backend="triton")
    reference_model = taumode_model(backend="reference")
    reference_model.load_state_dict(triton_model.state_dict())
    ids, mask = left_pad([torch.randint(1, 256, (n,)) for n in (7, 10)])
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    for kw in (dict(), dict(attention_mask=mask, position_ids=positions)):
        outs = []
        for model in (triton_model, reference_model):
            model.zero_grad()
            logits = model(ids, use_cache=False, **kw).logits
            logits.square().mean().backward()
            outs.append((logits, [p.grad for p in model.parameters()]))
        assert rel_err(outs[0][0], outs[1][0]) < 1e-5
        for a, b in zip(outs[0][1], outs[1][1]):
            assert rel_err(a, b) < 1e-4
    with torch.no_grad():
        a = triton_model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        b = reference_model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(a, b)


def test_imports_from_the_repository_root():
    """transformers 5.25 imports Hugging Face's `kernels` package. The top-level kernels/ folder (the Triton
    sources) has no __init__.py, so from the repository's root it is only a namespace portion and the installed
    package wins; this package's own sources stay importable as tauformer_kernels.kernels."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[2]
    code = ("import transformers, kernels, tauformer_kernels.kernels.taumode_attention as t; "
            "print(kernels.__file__ is not None and 'site-packages' in kernels.__file__, t.__name__)")
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", "tauformer_kernels.kernels.taumode_attention"]


@pytest.mark.parametrize("extra", [dict(attention="dot"), dict(dot_every=2), dict(lambda_slices=2),
                                   dict(tau_rule="vector-median"), dict(learn_laplacian=True, learn_tau=True),
                                   dict(lambda_term=False, recency="fixed"), dict(lambda_before_rope=True)],
                         ids=["dot", "hybrid", "slices", "vector-tau", "learned-L", "recency-only", "before-rope"])
def test_taugpt_for_causal_lm_serves_every_option(extra):
    """TauGPTForCausalLM is a head over TauGPT's own forward: every model option, the same logits, the same
    greedy tokens from its cached generate as from this package's generate."""
    hf_model, model = taugpt_model(**extra)
    ids = torch.randint(1, 256, (2, 11))
    assert torch.equal(hf_model(ids, use_cache=False).logits, model(ids))
    ours, _ = taugpt_generate(model, ids, 6, temperature=0)
    theirs = hf_model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)
    if extra.get("lambda_slices", 1) == 1:  # padding masks: the packed path of every kind of layer
        prompts = [torch.randint(1, 256, (n,)) for n in (4, 9)]
        padded, mask = left_pad(prompts)
        positions = (mask.cumsum(1) - 1).clamp_min(0)
        logits = hf_model(padded, attention_mask=mask, position_ids=positions, use_cache=False).logits
        assert rel_err(logits[0, 5:], model(prompts[0][None])[0]) < 1e-5


def test_calibrate_tau_refuses_a_batch_without_real_tokens():
    model = taumode_model()
    ids = torch.randint(1, 256, (2, 6))
    before = [m.taumode.log_tau.clone() for m in hf._attention_modules(model)]
    with pytest.raises(ValueError, match="real token"):
        hf.calibrate_tau(model, ids, attention_mask=torch.zeros(2, 6, dtype=torch.long))
    assert all(torch.equal(a, m.taumode.log_tau) for a, m in zip(before, hf._attention_modules(model)))
    assert all(m.taumode.key_energies is None for m in hf._attention_modules(model))  # listening ended
    _, taugpt = taugpt_model()
    with pytest.raises(ValueError, match="at least one token"):
        taugpt.calibrate_tau(torch.zeros(2, 0, dtype=torch.long))


def test_a_plain_from_pretrained_refuses_a_taumode_folder(tmp_path, caplog):
    model = taumode_model()
    model.save_pretrained(tmp_path)
    ids = torch.randint(1, 256, (1, 6))
    # with this module imported: the folder loads as taumode attention, and without enable_taumode's tensors
    # its first forward names load_taumode instead of running another attention
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert plain.config._attn_implementation == "taumode"
    with pytest.raises(ValueError, match="load_taumode"):
        plain(ids)
    # without it (a process that never imported tauformer_model.hf): transformers refuses the implementation
    import subprocess
    import sys
    code = "import sys, transformers; transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])"
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode != 0 and "taumode" in result.stderr
    # load_taumode: the model, with no "unexpected keys" report
    caplog.clear()
    loaded = hf.load_taumode(tmp_path)
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert "UNEXPECTED" not in caplog.text and "unexpected" not in caplog.text.lower()


def test_load_taumode_names_a_truncated_weights_file(tmp_path):
    taumode_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors.*truncated"):
        hf.load_taumode(tmp_path)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_cu_seq_lens_are_checked(dtype):
    """Offsets that leave a token in no sequence (short of the row, past it, decreasing) are refused, whatever
    their integer dtype; valid ones in either dtype give the same logits."""
    for name in ("llama", "taugpt"):
        model = any_model(name)
        ids = torch.randint(1, 256, (1, 9))
        good = torch.tensor([0, 4, 9], dtype=dtype)
        positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]])  # as a padding-free collator gives them
        out = model(ids, position_ids=positions, cu_seq_lens_q=good, cu_seq_lens_k=good, max_length_q=5,
                    max_length_k=5, use_cache=False).logits
        assert rel_err(out[0, 4:], model(ids[:, 4:], use_cache=False).logits[0]) < 1e-5
        for bad in ([0, 4, 8], [0, 4, 12], [0, 6, 4, 9], [1, 4, 9]):
            cu = torch.tensor(bad, dtype=dtype)
            with pytest.raises(ValueError, match="cu_seq_lens_q"):
                model(ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9, use_cache=False)


def test_enable_taumode_validates_the_laplacian():
    F = 16
    with pytest.raises(ValueError, match="laplacian.*non-finite"):
        taumode_model(laplacian=torch.full((F, F), float("nan")))
    with pytest.raises(ValueError, match="laplacian.*symmetric"):
        taumode_model(laplacian=torch.randn(F, F))
    with pytest.raises(TypeError, match="laplacian"):
        taumode_model(laplacian=[[0.0]])
    L = tk.chain_laplacian(F)
    model = taumode_model(laplacian=L.numpy())  # a numpy array is a Laplacian too
    assert torch.equal(model.model.layers[0].self_attn.taumode.laplacian, L)


def test_models_without_rope_or_kv_head_counts():
    """OPT (learned positions, no num_key_value_heads in its config) runs taumode attention; its cache holds λk."""
    from transformers import OPTConfig

    model = AutoModelForCausalLM.from_config(OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                                       num_attention_heads=4, vocab_size=256,
                                                       max_position_embeddings=64, word_embed_proj_dim=64))
    hf.enable_taumode(model).eval()
    ids = torch.randint(1, 256, (1, 7))
    full = model(ids, use_cache=False).logits
    cache = hf.TaumodeCache(model)
    steps = torch.cat([model(ids[:, :5], **{hf.CACHE_FIELD: cache}).logits]
                      + [model(ids[:, t:t + 1], **{hf.CACHE_FIELD: cache}).logits for t in (5, 6)], 1)
    assert rel_err(steps, full) < 1e-5


def test_export_writes_a_folder_transformers_and_vllm_load(tmp_path, capsys):
    """python -m tauformer_model.export RUN OUT: the model and its byte tokenizer as transformers reads them."""
    from transformers import AutoTokenizer

    from tauformer_model import export

    hf_model, model = taugpt_model()
    save_checkpoint(tmp_path / "run", model, {"step": 3})
    assert export.main([str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert loaded.config.architectures == ["TauGPTForCausalLM"]
    ids = torch.randint(1, 256, (2, 12))
    assert torch.equal(loaded(ids).logits, hf_model(ids).logits)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "def f(x):\n    return 'é'"
    assert tokenizer(text)["input_ids"] == list(text.encode()) and tokenizer.decode(list(text.encode())) == text
    assert export.main([str(tmp_path / "nothing"), str(tmp_path / "x")]) == 1
    assert "error:" in capsys.readouterr().err
