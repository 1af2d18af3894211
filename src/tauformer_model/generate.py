"""Sample from a trained TauGPT with its cache:
``python -m tauformer_model.generate --checkpoint runs/tiny-taumode --prompt "def "``

The prompts (``--prompt`` given several times: a batch of prompts of different lengths) are written into
the cache in one batched call (prefill); each new token is one decode call for the whole batch, every row
at its own position. Reports tokens/s of both phases and the cache's size in bytes.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from tauformer_kernels import BACKENDS

from .checkpoint import CheckpointError, find_checkpoint, load_model
from .common import nonnegative_float, nonnegative_int, positive_int, print0, resolve_device
from .data import BPETokenizer, ByteTokenizer
from .model import TauGPT


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of logits (B, vocab); temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def as_batch(prompts, lengths=None) -> tuple[torch.Tensor, list[int] | None]:
    """(B, T) ids and the real length of each row (None: all T): from a (B, T) tensor, a right-padded one with
    ``lengths``, or a list of 1-D id tensors of any lengths (padded here with their last token)."""
    if isinstance(prompts, torch.Tensor):
        if lengths is None:
            return prompts, None
        lengths = [int(n) for n in lengths]
        if len(lengths) != prompts.size(0) or not all(1 <= n <= prompts.size(1) for n in lengths):
            raise ValueError(f"lengths {lengths}: one per prompt, each in 1 .. {prompts.size(1)}")
        return prompts, lengths
    lengths = [len(p) for p in prompts]
    if not prompts or min(lengths) < 1:
        raise ValueError("generate needs at least one prompt, each of at least one token")
    batch = torch.stack([torch.cat([p, p[-1:].expand(max(lengths) - len(p))]) for p in prompts])
    return batch, lengths


@torch.no_grad()
def generate(model: TauGPT, prompts, max_new_tokens: int, temperature: float = 0.8, top_k: int | None = 50,
             generator: torch.Generator | None = None, sorted_cache: bool = False,
             lengths=None) -> tuple[torch.Tensor | list[torch.Tensor], dict]:
    """Continue prompts by max_new_tokens tokens each with the cache; returns (the sequences, stats).

    prompts: a (B, T0) tensor (returns (B, T0 + new)); or prompts of different lengths, as a list of 1-D id
    tensors or a right-padded (B, T0) tensor with ``lengths`` (returns a list of 1-D tensors, prompt then
    new tokens). The prompts go into the cache in one batched call (packed over the prompts when their
    lengths differ), then each step decodes one token per row, every row at its own length
    (docs/math.md §The λ cache). sorted_cache: the sorted (V, λk) cache (taumode, prompts of one length).
    The longest prompt plus max_new_tokens must fit the model's context (config.block_size): RoPE would go on
    past it, at positions the model never trained on, so it is refused (ValueError)."""
    model.eval()
    batch, valid = as_batch(prompts, lengths)
    B, T0 = batch.shape
    longest = T0 if valid is None else max(valid)
    if longest + max_new_tokens > model.config.block_size:
        raise ValueError(f"a prompt of {longest} tokens + max_new_tokens {max_new_tokens} = "
                         f"{longest + max_new_tokens} tokens exceeds the model's context of "
                         f"{model.config.block_size} (block_size): shorten the prompt or generate fewer tokens")
    model(batch[:, :1], cache=model.new_cache(B, 1, sorted=sorted_cache))  # one-time op setup, untimed
    cache = model.new_cache(B, T0 + max_new_tokens, sorted=sorted_cache)
    last = torch.tensor([T0 - 1] * B if valid is None else [n - 1 for n in valid], device=batch.device)
    t0 = time.perf_counter()
    logits = model(batch, cache=cache, lengths=valid)[torch.arange(B, device=batch.device), last]
    t1 = time.perf_counter()
    new = []
    for i in range(max_new_tokens):
        new.append(sample_next(logits, temperature, top_k, generator))
        if i + 1 < max_new_tokens:
            logits = model(new[-1][:, None], cache=cache)[:, -1]
    t2 = time.perf_counter()
    new = torch.stack(new, dim=1) if new else batch.new_zeros(B, 0)
    prompt_tokens = B * T0 if valid is None else sum(valid)
    stats = {"prefill_tokens_per_s": prompt_tokens / max(t1 - t0, 1e-9),
             "decode_tokens_per_s": B * max_new_tokens / max(t2 - t1, 1e-9),
             "cache_bytes": cache.nbytes, "cache_bytes_per_token_per_layer": cache.bytes_per_token_per_layer,
             "cache_max_len": cache.max_len}
    if valid is None:
        return torch.cat([batch, new], dim=1), stats
    return [torch.cat([row[:n], new_row]) for row, n, new_row in zip(batch, valid, new)], stats


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tauformer_model.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run folder (--out of train) or its checkpoint/ folder")
    p.add_argument("--prompt", action="append", default=None,
                   help="text to continue (default 'def '); give it several times for a batch of prompts of "
                        "different lengths, decoded together")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="tokens to sample after the prompt (default: up to the model's context, at most 200)")
    p.add_argument("--temperature", type=nonnegative_float, default=0.8, help="sampling temperature (0: greedy)")
    p.add_argument("--top-k", type=nonnegative_int, default=50, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--num-samples", type=positive_int, default=1,
                   help="independent samples per prompt; all are decoded as one batch")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', ...")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch.set_num_threads (on a busy CPU, 1 thread decodes faster than 2)")
    p.add_argument("--backend", default=None, choices=BACKENDS,
                   help="override the checkpoint's tauformer_kernels backend")
    p.add_argument("--sorted-cache", action="store_true",
                   help="taumode: decode with the sorted cache (exact; per step O(log T)-ish blocks instead of "
                        "O(T) keys, for long contexts; about 2.5x the cache bytes at 64k tokens)")
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
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    try:
        model, meta = load_model(folder, device)
    except CheckpointError as e:
        print0(f"error: {e}", file=sys.stderr)
        return 1
    if args.backend:
        model.config.backend = args.backend
    tok = BPETokenizer.load(folder / "tokenizer.json") if (folder / "tokenizer.json").exists() else ByteTokenizer()
    texts = args.prompt or ["def "]
    prompts = [torch.tensor(tok.encode(text) or tok.encode("\n"), dtype=torch.long, device=device)
               for text in texts for _ in range(args.num_samples)]
    if args.sorted_cache and len({len(p) for p in prompts}) > 1:
        parser.error("--sorted-cache decodes prompts of one length (in tokens); these differ")
    longest, context = max(len(p) for p in prompts), model.config.block_size
    new_tokens = args.max_new_tokens or min(200, context - longest)
    if longest >= context:
        parser.error(f"--prompt of {longest} tokens fills the model's context of {context} tokens: shorten it")
    if longest + new_tokens > context:
        parser.error(f"--prompt of {longest} tokens + --max-new-tokens {new_tokens} exceeds the model's context "
                     f"of {context} tokens: shorten the prompt or lower --max-new-tokens")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    out, stats = generate(model, prompts, new_tokens, args.temperature, args.top_k or None, gen,
                          sorted_cache=args.sorted_cache)
    cfg = model.config
    for i, row in enumerate(out):
        print0(f"--- sample {i} (prompt {i // args.num_samples}, step {meta.get('step')}, {cfg.attention} "
               f"recency={cfg.recency}) ---")
        print0(tok.decode(row.tolist()))
    dot_bytes = 2 * cfg.n_kv_head * cfg.head_dim * next(model.parameters()).element_size()
    print0(f"--- prefill {stats['prefill_tokens_per_s']:.0f} tokens/s, decode {stats['decode_tokens_per_s']:.0f} "
           f"tokens/s; cache {stats['cache_bytes']} bytes for {len(prompts)} × {stats['cache_max_len']} "
           f"positions = {stats['cache_bytes_per_token_per_layer']:.0f} bytes per token per layer "
           f"(a K,V cache: {dot_bytes})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
