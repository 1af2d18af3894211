"""Sample from a trained TauGPT with its cache:
``python -m tauformer_model.generate --checkpoint runs/tiny-taumode --prompt "def "``

The prompt is written into the cache in one batched call (prefill); each new token is one decode call
at the next position. Reports tokens/s of both phases and the cache's size in bytes.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from tauformer_kernels import BACKENDS

from .checkpoint import CheckpointError, find_checkpoint, load_model
from .cli import nonnegative_float, nonnegative_int, positive_int
from .data import BPETokenizer, ByteTokenizer
from .model import TauGPT
from .train import print0, resolve_device


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of logits (B, vocab); temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: TauGPT, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.8,
             top_k: int | None = 50, generator: torch.Generator | None = None,
             sorted_cache: bool = False) -> tuple[torch.Tensor, dict]:
    """Continue prompt_ids (B, T0) by max_new_tokens tokens with the cache; returns (B, T0 + new), stats.

    sorted_cache: decode with the sorted (V, λk) cache (taumode; O(log T)-ish blocks per step)."""
    model.eval()
    B, T0 = prompt_ids.shape
    model(prompt_ids[:, :1], cache=model.new_cache(B, 1, sorted=sorted_cache))  # one-time op setup, untimed
    cache = model.new_cache(B, T0 + max_new_tokens, sorted=sorted_cache)
    t0 = time.perf_counter()
    logits = model(prompt_ids, cache=cache)[:, -1]
    t1 = time.perf_counter()
    out = [prompt_ids]
    for i in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, generator)
        out.append(token[:, None])
        if i + 1 < max_new_tokens:
            logits = model(token[:, None], cache=cache)[:, -1]
    t2 = time.perf_counter()
    stats = {"prefill_tokens_per_s": B * T0 / max(t1 - t0, 1e-9),
             "decode_tokens_per_s": B * max_new_tokens / max(t2 - t1, 1e-9),
             "cache_bytes": cache.nbytes, "cache_bytes_per_token_per_layer": cache.bytes_per_token_per_layer,
             "cache_max_len": cache.max_len}
    return torch.cat(out, dim=1), stats


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tauformer_model.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run folder (--out of train) or its checkpoint/ folder")
    p.add_argument("--prompt", default="def ", help="text to continue")
    p.add_argument("--max-new-tokens", type=positive_int, default=200, help="tokens to sample after the prompt")
    p.add_argument("--temperature", type=nonnegative_float, default=0.8, help="sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=nonnegative_int, default=50, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--num-samples", type=positive_int, default=1, help="independent samples, decoded as one batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', ...")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch.set_num_threads (on a busy CPU, 1 thread decodes faster than 2)")
    p.add_argument("--backend", default=None, choices=BACKENDS, help="override the checkpoint's tauformer_kernels backend")
    p.add_argument("--sorted-cache", action="store_true",
                   help="taumode: decode with the sorted cache (exact; per step O(log T)-ish blocks instead of "
                        "O(T) keys, for long contexts; about 3x the cache bytes)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = find_checkpoint(args.checkpoint)
    if folder is None:
        parser.error(f"--checkpoint {args.checkpoint}: no checkpoint there (a run folder of train, or its "
                     f"checkpoint/ folder)")
    device = resolve_device(args.device)
    try:
        model, meta = load_model(folder, device)
    except CheckpointError as e:
        print0(f"error: {e}", file=sys.stderr)
        return 1
    if args.backend:
        model.config.backend = args.backend
    tok = BPETokenizer.load(folder / "tokenizer.json") if (folder / "tokenizer.json").exists() else ByteTokenizer()
    ids = tok.encode(args.prompt) or tok.encode("\n")
    prompt = torch.tensor([ids] * args.num_samples, dtype=torch.long, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    out, stats = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k or None, gen,
                          sorted_cache=args.sorted_cache)
    cfg = model.config
    for i, row in enumerate(out.tolist()):
        print0(f"--- sample {i} (step {meta.get('step')}, {cfg.attention} recency={cfg.recency}) ---")
        print0(tok.decode(row))
    dot_bytes = 2 * cfg.n_kv_head * cfg.head_dim * next(model.parameters()).element_size()
    print0(f"--- prefill {stats['prefill_tokens_per_s']:.0f} tokens/s, decode {stats['decode_tokens_per_s']:.0f} "
           f"tokens/s; cache {stats['cache_bytes']} bytes for {args.num_samples} × {stats['cache_max_len']} "
           f"positions = {stats['cache_bytes_per_token_per_layer']:.0f} bytes per token per layer "
           f"(a K,V cache: {dot_bytes})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
