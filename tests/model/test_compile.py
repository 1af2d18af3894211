"""torch.compile end to end: `--compile` training and a compiled Hugging Face model's forward and backward.

Both hosts hand the ops token-major views (q.transpose(1, 2) of a (B, T, H, F) projection) and, with packed
documents or padding, (B·T, H, F) packs; a compiled graph asserts the strides each op's fake implementation
promises, so a fake that says "contiguous" where the real op returns the input's layout dies in the first
backward (#29). tests/kernels/test_opcheck.py checks the ops one by one; these check that the hosts train.
Everything runs on the CPU through the reference backend (`auto` there): a compiled graph cannot trace a
Triton kernel under the interpreter (the ops' bodies stay opaque, but the interpreter is minutes a step).
"""
import json
import pathlib

import pytest
import torch
from helpers import relative_error

from tauformer_model import train as train_mod


def _train(out: pathlib.Path, corpus: pathlib.Path, *flags: str) -> list[float]:
    """The tiny preset's heads (8 of F = 16, taumode) in 1 layer and context 64, 3 steps; the train losses."""
    argv = ["--preset", "tiny", "--n-layer", "1", "--block-size", "64", "--batch-size", "2", "--max-steps", "3",
            "--warmup-steps", "1", "--eval-every", "3", "--eval-batches", "1", "--checkpoint-every", "3",
            "--out", str(out), "--data", str(corpus), "--data-cache", str(out.parent / "cache"), "--no-progress",
            "--device", "cpu", "--seed", "3", *flags]
    assert train_mod.main(argv) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if r.get("train_loss") is not None]


@pytest.mark.slow  # 40-110 s on 2 busy CPU cores: inductor compiles the forward and the backward
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "pack_documents"])
def test_compile_trains_like_eager(tmp_path, corpus, packed):
    """`--compile` trains (it died in the first backward) and its losses are eager's to fp32 noise: the same
    data and initialisation, the same ops, only the graph around them fused by inductor."""
    flags = ("--pack-documents",) if packed else ("--no-pack-documents",)
    compiled = _train(tmp_path / "compiled", corpus, "--compile", *flags)
    eager = _train(tmp_path / "eager", corpus, *flags)
    assert len(compiled) == len(eager) >= 1
    for a, b in zip(compiled, eager):
        assert abs(a - b) < 1e-4 * abs(b), (compiled, eager)


@pytest.mark.slow  # about 100 s on 2 busy CPU cores: two graphs (dense, padded), each forward and backward
def test_compiled_hf_forward_and_backward_match_eager():
    """A tiny random Llama with attn_implementation="taumode", compiled (fullgraph): loss and every parameter's
    gradient equal eager's to fp32 noise, dense and with a padding mask (packed sequences)."""
    transformers = pytest.importorskip("transformers", minversion="5.4")
    from tauformer_model import hf

    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                      max_position_embeddings=128)
    model = hf.enable_taumode(transformers.AutoModelForCausalLM.from_config(config))
    ids = torch.randint(1, 256, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :5] = 0  # left padding: the mask becomes packed sequences (cu_seqlens), nothing read back
    inputs = [dict(input_ids=ids, labels=ids, use_cache=False),
              dict(input_ids=ids, labels=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0),
                   use_cache=False)]
    compiled = torch.compile(model, fullgraph=True)
    for kw in inputs:
        results = []
        for run in (compiled, model):
            model.zero_grad(set_to_none=True)
            loss = run(**kw).loss
            loss.backward()
            results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                            if p.grad is not None}))
        (loss_c, grads_c), (loss_e, grads_e) = results
        assert relative_error(loss_c, loss_e) < 1e-5
        assert grads_c.keys() == grads_e.keys() and any("taumode" in n or "temperature" in n for n in grads_e)
        for name, g in grads_e.items():
            assert relative_error(grads_c[name], g, floor=1e-30) < 1e-4, name
