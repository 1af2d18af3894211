"""End-to-end decode: TauGPT with its (V, λk) cache against the dot-product model with its (K, V) cache.

``python -m tauformer_model.decode_bench --out bench/results/decode-e2e-cpu.md``

The rows of the reference's companion bench (taugpt-kvcache-bench): for each model, prompt length and cache
mode, the prefill time, the time to first token (prefill + the first sampled token), the per-token decode
time (p50, p95), decode tokens/s, the process's peak resident memory and the cache's bytes. Cache modes:
``cache`` (the model's KV cache: (V, λk) for taumode, (K, V) for dot), ``sorted`` (taumode's sorted cache,
tauformer_kernels.SortedCache) and ``none`` (every step recomputes the whole sequence, as a model without a
cache must). Every row runs in a fresh process (its peak memory is its own), greedy, batch 1.

Models: ``random`` builds both attentions at one shape (by default the 30m preset's: 6 layers, 6 heads of
64, width 384; byte vocabulary) with random weights; ``--checkpoint NAME=PATH`` adds trained ones. Sequences
may run past a model's training context (RoPE has no limit): the timings stand, the text does not matter.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

import torch

from .checkpoint import load_model
from .common import git_commit, output_file
from .config import TauGPTConfig
from .model import TauGPT

RANDOM_SHAPE = dict(n_layer=6, n_head=6, n_kv_head=6, n_embd=384, vocab_size=256)
MODES = ("cache", "sorted", "none")


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), in MB; 0 where /proc is missing."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def build(model_spec: str, attention: str, max_len: int) -> TauGPT:
    """``random`` at RANDOM_SHAPE with ``attention``, or a checkpoint folder; its context set to max_len."""
    if model_spec == "random":
        torch.manual_seed(0)
        model = TauGPT(TauGPTConfig(**RANDOM_SHAPE, attention=attention, block_size=max_len))
    else:
        model, _ = load_model(pathlib.Path(model_spec))
        model.config.block_size = max(max_len, model.config.block_size)  # the no-cache forward's length guard
    return model.eval()


@torch.no_grad()
def measure(model: TauGPT, mode: str, prompt_len: int, new_tokens: int) -> dict:
    """One greedy generation of new_tokens after a random prompt; the timings of each part."""
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    if mode == "none":
        seq = prompt
        model(prompt[:, :8])  # first-call setup, untimed
        t0 = time.perf_counter()
        logits = model(seq)[:, -1]
        prefill = time.perf_counter() - t0
        steps = []
        for _ in range(new_tokens):
            t = time.perf_counter()
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
            logits = model(seq)[:, -1]
            steps.append(time.perf_counter() - t)
        cache_bytes = 0
    else:
        sorted_cache = mode == "sorted"
        model(prompt[:, :8], cache=model.new_cache(1, 8, sorted=sorted_cache))  # first-call setup, untimed
        cache = model.new_cache(1, prompt_len + new_tokens + 1, sorted=sorted_cache)
        t0 = time.perf_counter()
        logits = model(prompt, cache=cache)[:, -1]
        prefill = time.perf_counter() - t0
        steps = []
        for _ in range(new_tokens):
            t = time.perf_counter()
            logits = model(logits.argmax(-1, keepdim=True), cache=cache)[:, -1]
            steps.append(time.perf_counter() - t)
        cache_bytes = cache.nbytes
    ordered = sorted(steps)
    return {"prefill_ms": 1e3 * prefill, "ttft_ms": 1e3 * (prefill + steps[0]),
            "p50_ms": 1e3 * statistics.median(ordered),
            "p95_ms": 1e3 * ordered[math.ceil(0.95 * len(ordered)) - 1],  # nearest rank
            "tokens_per_s": len(steps) / sum(steps), "peak_rss_mb": peak_rss_mb(), "cache_bytes": cache_bytes,
            "params_m": model.num_params() / 1e6}


def run_row(row: dict, threads: int) -> dict:
    """``measure`` in a fresh interpreter (its peak memory is the row's own)."""
    cmd = [sys.executable, "-m", "tauformer_model.decode_bench", "--row", json.dumps(row), "--threads", str(threads)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"decode_bench row {row} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = ["| model | attention | cache | prompt | new tokens | prefill ms | TTFT ms | per token p50 / p95 ms "
             "| tokens/s | vs dot (same cache mode) | peak RSS MB | cache MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    dot = {(r["model"], r["mode"], r["prompt"]): r for r in rows if r["attention"] == "dot"}
    for r in rows:
        peer = dot.get((r["model"], "cache" if r["mode"] == "sorted" else r["mode"], r["prompt"]))
        ratio = f"{r['tokens_per_s'] / peer['tokens_per_s']:.2f}×" if peer and r["attention"] != "dot" else "–"
        lines.append(f"| {r['model']} | {r['attention']} | {r['mode']} | {r['prompt']} | {r['new_tokens']} | "
                     f"{r['prefill_ms']:.1f} | {r['ttft_ms']:.1f} | {r['p50_ms']:.2f} / {r['p95_ms']:.2f} | "
                     f"{r['tokens_per_s']:.1f} | {ratio} | {r['peak_rss_mb']:.0f} | {r['cache_bytes'] / 2**20:.2f} |")
    return "\n".join(lines)


def parse_int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"a comma-separated list of positive integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tauformer_model.decode_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-lengths", type=parse_int_list, default=[384, 768, 1152])
    p.add_argument("--new-tokens", type=int, default=1024, help="tokens generated with a cache")
    p.add_argument("--no-cache-new-tokens", type=int, default=128,
                   help="tokens generated without a cache (each step is a whole forward)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    p.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                   help="a trained run's checkpoint folder (repeatable); its attention is the checkpoint's. Give a "
                        "taumode and a dot checkpoint the same NAME to pair them in the ratio column")
    p.add_argument("--no-random", action="store_true", help="skip the random-weight models")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every row")
    p.add_argument("--out", type=output_file, default=None,
                   help="write the table (with the command and machine) here; checked before the rows run")
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # internal: measure one row, print JSON
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    if args.row is not None:
        row = json.loads(args.row)
        model = build(row["path"], row["attention"], row["prompt"] + row["new_tokens"] + 1)
        print(json.dumps({**row, **measure(model, row["mode"], row["prompt"], row["new_tokens"])}))
        return 0
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            p.error(f"--modes: unknown {m!r}; choose from {', '.join(MODES)}")
    for flag, value in (("--new-tokens", args.new_tokens), ("--no-cache-new-tokens", args.no_cache_new_tokens)):
        if value < 1:
            p.error(f"{flag} must be at least 1, got {value}")
    models = [] if args.no_random else [("random", "random", a) for a in ("taumode", "dot")]
    for spec in args.checkpoint:
        name, sep, path = spec.partition("=")
        if not sep or not pathlib.Path(path).exists():
            p.error(f"--checkpoint wants NAME=PATH of a checkpoint folder, got {spec!r}")
        models.append((name, path, load_model(pathlib.Path(path))[0].config.attention))
    if not models:
        p.error("no models: give --checkpoint NAME=PATH or drop --no-random")
    rows, code = [], git_commit()
    # the models alternate within each mode and prompt, so the rows a ratio compares ran close in time
    for mode in modes:
        for prompt in args.prompt_lengths:
            for name, path, attention in models:
                if mode == "sorted" and attention != "taumode":
                    continue
                new = args.no_cache_new_tokens if mode == "none" else args.new_tokens
                row = dict(model=name, path=path, attention=attention, mode=mode, prompt=prompt, new_tokens=new)
                rows.append(run_row(row, args.threads))
                r = rows[-1]
                print(f"{name} {attention} {mode} prompt {prompt}: prefill {r['prefill_ms']:.0f} ms, "
                      f"{r['tokens_per_s']:.1f} tokens/s, p95 {r['p95_ms']:.1f} ms", flush=True)
    order = {(name, attention): i for i, (name, _, attention) in enumerate(models)}
    # stable: the prompts stay in order
    rows.sort(key=lambda r: (order[r["model"], r["attention"]], modes.index(r["mode"])))
    text = table(rows)
    print(text)
    if args.out:
        command = "python -m tauformer_model.decode_bench " + " ".join(argv if argv is not None else sys.argv[1:])
        header = (f"# End-to-end decode, batch 1, greedy\n\nCommand: `{command}`; commit {code}; "
                  f"torch {torch.__version__}; "
                  f"{platform.machine()}, {args.threads} threads; random models: {RANDOM_SHAPE}.\n\n")
        pathlib.Path(args.out).write_text(header + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
