"""Recall diagnostics: what one λ scalar per head can retrieve, on synthetic tasks trained from scratch.

``python -m tauformer_model.tasks --seeds 3 --out bench/results/recall-tasks-cpu.md``

Four tasks, generated on the fly (the tasks the reference crate tests):
- ``selective-copy``: a few content tokens scattered among blanks, then a separator; the model writes the
  content tokens back in order.
- ``mqar`` (multi-query associative recall): key–value pairs, a stretch of blanks, then the keys again in
  another order; the model answers each key with its value.
- ``needle``: a haystack of random tokens with one marked token (the needle) at a depth, and a query token
  at the end; the model answers the needle. Scored per depth (0.1, 0.5, 0.9) and length (32, 64).
- ``induction``: a random segment of distinct tokens, repeated; in the repeat the model predicts each next
  token from the first copy.

Every sequence is (x, y) with y = -100 except at the answers, and each task has a solver that reads the answers
off x alone (the tests check that the answer is in the sequence). The variants are the model comparison's
(tauformer_model.variants), on top of this module's one small model (4 heads of 16); by default dot product,
taumode as the crate defines it, taumode + learned recency (the default), and the recency-only control.
Accuracy is over a fixed evaluation set drawn from its own seed, the same for every training seed and variant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import sys
import time
from dataclasses import dataclass

import torch

from .common import git_commit, lr_at, mean_sd, output_file
from .config import TauGPTConfig
from .model import TauGPT
from .variants import VARIANTS

IGNORE = -100
BLANK, SEP, QUERY, NEEDLE = 0, 1, 2, 3
FIRST_CONTENT = 8  # tokens 4..7 are left unused: content tokens are 8 .. VOCAB - 1
VOCAB = 64
CONTENT = VOCAB - FIRST_CONTENT
EVAL_SEED = 20_261_203  # the evaluation sets' own seed, apart from every training seed


def content_tokens(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    return torch.randint(FIRST_CONTENT, VOCAB, shape, generator=gen)


def distinct_content(n: int, count: int, gen: torch.Generator) -> torch.Tensor:
    """(n, count) content tokens, distinct within each row."""
    return torch.argsort(torch.rand(n, CONTENT, generator=gen), dim=1)[:, :count] + FIRST_CONTENT


def shifted(s: torch.Tensor, answer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x = s without its last token; y = the next token where ``answer`` (a mask over y) holds, else IGNORE."""
    x, y = s[:, :-1], s[:, 1:].clone()
    y[~answer] = IGNORE
    return x.contiguous(), y


def selective_copy(n: int, length: int, gen: torch.Generator, count: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` content tokens at random sorted places among blanks, SEP, then the same tokens in order."""
    region = length - count
    s = torch.full((n, length + 1), BLANK, dtype=torch.long)
    places = torch.sort(torch.argsort(torch.rand(n, region, generator=gen), dim=1)[:, :count], dim=1).values
    tokens = content_tokens((n, count), gen)
    s.scatter_(1, places, tokens)
    s[:, region] = SEP
    s[:, region + 1:] = tokens
    answer = torch.zeros(n, length, dtype=torch.bool)
    answer[:, region:] = True
    return shifted(s, answer)


def solve_selective_copy(x: torch.Tensor) -> torch.Tensor:
    y = torch.full_like(x, IGNORE)
    for row, seq in zip(y, x.tolist()):
        sep = seq.index(SEP)
        kept = [t for t in seq[:sep] if t != BLANK]
        row[sep:sep + len(kept)] = torch.tensor(kept)[: len(seq) - sep]
    return y


def mqar(n: int, length: int, gen: torch.Generator, pairs: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``pairs`` key–value pairs (keys from the first half of the content tokens, values from the second, keys
    distinct), blanks, then every key again in a new order, each followed by its value."""
    half = CONTENT // 2
    keys = torch.argsort(torch.rand(n, half, generator=gen), dim=1)[:, :pairs] + FIRST_CONTENT
    values = torch.randint(FIRST_CONTENT + half, VOCAB, (n, pairs), generator=gen)
    order = torch.argsort(torch.rand(n, pairs, generator=gen), dim=1)
    s = torch.full((n, length + 1), BLANK, dtype=torch.long)
    s[:, 0:2 * pairs:2], s[:, 1:2 * pairs:2] = keys, values
    tail = length + 1 - 2 * pairs
    s[:, tail::2], s[:, tail + 1::2] = keys.gather(1, order), values.gather(1, order)
    answer = torch.zeros(n, length, dtype=torch.bool)
    answer[:, tail::2] = True  # at a repeated key, the next token is its value
    return shifted(s, answer)


def solve_mqar(x: torch.Tensor, pairs: int = 4) -> torch.Tensor:
    y = torch.full_like(x, IGNORE)
    tail = x.size(1) + 1 - 2 * pairs
    for row, seq in zip(y, x.tolist()):
        table = dict(zip(seq[0:2 * pairs:2], seq[1:2 * pairs:2]))
        for i in range(tail, len(seq), 2):
            row[i] = table[seq[i]]
    return y


NEEDLE_DEPTHS = (0.1, 0.5, 0.9)
NEEDLE_LENGTHS = (32, 64)


def needle(n: int, length: int, gen: torch.Generator, depth: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random content tokens with NEEDLE, v at ``depth`` of the haystack (uniform when None), QUERY at the
    end of x; the answer (y's last entry) is v."""
    s = content_tokens((n, length + 1), gen)
    room = length - 3  # NEEDLE, v, and QUERY at length - 1 fit in x
    if depth is None:
        at = torch.randint(0, room + 1, (n,), generator=gen)
    else:
        at = torch.full((n,), round(depth * room))
    rows = torch.arange(n)
    s[rows, at] = NEEDLE
    s[:, length - 1] = QUERY
    s[:, length] = s[rows, at + 1]
    answer = torch.zeros(n, length, dtype=torch.bool)
    answer[:, -1] = True
    return shifted(s, answer)


def solve_needle(x: torch.Tensor) -> torch.Tensor:
    y = torch.full_like(x, IGNORE)
    for row, seq in zip(y, x.tolist()):
        row[-1] = seq[seq.index(NEEDLE) + 1]
    return y


def induction(n: int, length: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A segment of length // 3 distinct content tokens at a random place among blanks, and again at the end
    of the sequence: in the repeat each next token is the successor of the current one in the first copy.
    The first copy's place varies by row, so no fixed relative position (RoPE, recency) finds it."""
    size = length // 3
    segment = distinct_content(n, size, gen)
    s = torch.full((n, length + 1), BLANK, dtype=torch.long)
    first = torch.randint(0, length + 1 - 3 * size + 1, (n,), generator=gen)  # room for a gap of >= size
    rows = torch.arange(n)[:, None]
    s[rows, first[:, None] + torch.arange(size)] = segment
    s[:, length + 1 - size:] = segment
    answer = torch.zeros(n, length, dtype=torch.bool)
    answer[:, length + 1 - size:] = True  # from the repeat's first token on, the next token is in the first copy
    return shifted(s, answer)


def solve_induction(x: torch.Tensor) -> torch.Tensor:
    y = torch.full_like(x, IGNORE)
    size = x.size(1) // 3
    start = x.size(1) + 1 - size
    for row, seq in zip(y, x.tolist()):
        first = {t: i for i, t in enumerate(seq[:start]) if t != BLANK}
        for i in range(start, len(seq)):
            row[i] = seq[first[seq[i]] + 1]
    return y


@dataclass(frozen=True)
class Task:
    name: str
    make: object  # (n, length, generator, **kw) -> (x, y)
    solve: object  # x -> y
    length: int  # training length
    chance: float  # accuracy of a uniform guess among the candidate answers the sequence holds

    def eval_sets(self, size: int = 512) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The fixed evaluation sets, by label: ``size`` sequences each, from EVAL_SEED."""
        gen = torch.Generator().manual_seed(EVAL_SEED + sum(map(ord, self.name)))
        if self.name != "needle":
            return {"all": self.make(size, self.length, gen)}
        return {f"L{length} d{depth}": needle(size, length, gen, depth)
                for length in NEEDLE_LENGTHS for depth in NEEDLE_DEPTHS}

    def train_batch(self, batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if self.name != "needle":
            return self.make(batch_size, self.length, gen)
        length = NEEDLE_LENGTHS[int(torch.randint(len(NEEDLE_LENGTHS), (1,), generator=gen))]
        return needle(batch_size, length, gen)


TASKS = {t.name: t for t in (
    Task("selective-copy", selective_copy, solve_selective_copy, 32, 1 / 8),  # which of the 8 comes next
    Task("mqar", mqar, solve_mqar, 32, 1 / 4),  # which of the 4 values
    Task("needle", needle, solve_needle, max(NEEDLE_LENGTHS), 1 / CONTENT),  # which haystack token
    Task("induction", induction, solve_induction, 32, 1 / (32 // 3)),  # which of the segment's tokens
)}

# The model every variant's TauGPTConfig fields go on top of: 4 heads of 16 (a variant's n_head counts heads of
# this width).
MODEL = dict(n_layer=2, n_head=4, n_kv_head=4, n_embd=64, vocab_size=VOCAB, block_size=max(NEEDLE_LENGTHS))
DEFAULT_VARIANTS = ("dot", "taumode", "taumode+recency", "recency-only")
MODEL_FIELDS = {f.name for f in dataclasses.fields(TauGPTConfig)}


@dataclass
class TaskRun:
    # Dot product forms its retrieval heads late: induction (length 64) was 12 % right after 600 steps and
    # 100 % after 2000; MQAR (8 pairs, length 64) 27 % after 2000.
    steps: int = 2000
    batch_size: int = 32
    eval_size: int = 512
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1


@torch.no_grad()
def accuracy(model: TauGPT, x: torch.Tensor, y: torch.Tensor, batch_size: int = 128) -> float:
    """Fraction of the answer tokens (y != IGNORE) the model predicts (argmax)."""
    model.eval()
    correct = total = 0
    for i in range(0, x.size(0), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        pred = model(xb).argmax(-1)
        mask = yb != IGNORE
        correct += int((pred[mask] == yb[mask]).sum())
        total += int(mask.sum())
    model.train()
    return correct / total


def train_task(task: Task, variant: str, seed: int, run: TaskRun) -> dict[str, float]:
    """Train a TauGPT from scratch on ``task`` (batches from ``seed``); accuracy on each evaluation set."""
    torch.manual_seed(seed)
    model = TauGPT(TauGPTConfig(**{**MODEL, **VARIANTS[variant]}))
    gen = torch.Generator().manual_seed(seed)
    if model.config.attention == "taumode":
        model.calibrate_tau(task.train_batch(run.batch_size, gen)[0])
    optimizer = torch.optim.AdamW(model.optimizer_groups(run.weight_decay), lr=run.lr, betas=(0.9, 0.95))
    for step in range(run.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, max_lr=run.lr, warmup=run.warmup_steps, total=run.steps, min_ratio=0.1)
        x, y = task.train_batch(run.batch_size, gen)
        loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return {label: accuracy(model, x, y) for label, (x, y) in task.eval_sets(run.eval_size).items()}


def table(results: dict, tasks: list[str], variants: list[str], seeds: list[int]) -> str:
    """results[task][variant][seed] = {label: accuracy}: one row per variant, one column per task (needle:
    per length and depth)."""
    columns = [(t, label) for t in tasks for label in next(iter(results[t][variants[0]].values()))]
    head = [t if label == "all" else f"{t} {label}" for t, label in columns]
    lines = ["| variant | " + " | ".join(head) + " |", "|---|" + "---|" * len(columns),
             "| chance | " + " | ".join(f"{100 * TASKS[t].chance:.1f}" for t, _ in columns) + " |"]
    for v in variants:
        cells = [mean_sd([100 * results[t][v][s][label] for s in seeds], 1) for t, label in columns]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tauformer_model.tasks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)}")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated, from {', '.join(VARIANTS)} (tauformer_model.variants)")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per task and variant: 0, 1, ...")
    p.add_argument("--steps", type=int, default=TaskRun.steps, help="AdamW steps per training run")
    p.add_argument("--batch-size", type=int, default=TaskRun.batch_size)
    p.add_argument("--eval-size", type=int, default=TaskRun.eval_size, help="sequences per evaluation set")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", type=output_file, default=None,
                   help="write the table (with the command and machine) to this file, and every seed's accuracies "
                        "beside it (.json); checked before the runs start")
    args = p.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for name, known, flag in ((tasks, TASKS, "--tasks"), (variants, VARIANTS, "--variants")):
        for n in name:
            if n not in known:
                p.error(f"{flag}: unknown {n!r}; choose from {', '.join(known)}")
    for v in variants:
        if not VARIANTS[v].keys() <= MODEL_FIELDS:  # tasks trains with its own TaskRun, not TrainConfig
            p.error(f"--variants: {v!r} sets training options ({', '.join(VARIANTS[v].keys() - MODEL_FIELDS)}), "
                    "which tasks does not take")
    for flag, value in (("--seeds", args.seeds), ("--steps", args.steps), ("--batch-size", args.batch_size),
                        ("--eval-size", args.eval_size)):
        if value < 1:
            p.error(f"{flag} must be at least 1, got {value}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    run = TaskRun(steps=args.steps, batch_size=args.batch_size, eval_size=args.eval_size)
    seeds = list(range(args.seeds))
    results: dict = {}
    start, code = time.perf_counter(), git_commit()  # the code the runs use, not what HEAD is when they end
    for t in tasks:
        for v in variants:
            for s in seeds:
                t0 = time.perf_counter()
                acc = train_task(TASKS[t], v, s, run)
                results.setdefault(t, {}).setdefault(v, {})[s] = acc
                print(f"{t} {v} seed {s}: " + ", ".join(f"{k} {100 * a:.1f}%" for k, a in acc.items())
                      + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    text = table(results, tasks, variants, seeds)
    print(text)
    if args.out:
        command = "python -m tauformer_model.tasks " + " ".join(argv if argv is not None else sys.argv[1:])
        header = (f"# Recall diagnostics: accuracy (%) on the answer tokens, mean ± sd over seeds {seeds}\n\n"
                  f"Command: `{command}`; commit {code}; torch {torch.__version__}; {platform.machine()}, "
                  f"{torch.get_num_threads()} thread(s); "
                  f"{time.perf_counter() - start:.0f} s in all.\n"
                  f"Model: {MODEL}; training: {dataclasses.asdict(run)}; evaluation: {run.eval_size} fixed "
                  "sequences per column.\n\n")
        pathlib.Path(args.out).write_text(header + text + "\n")
        # every seed's accuracies, for what a mean ± sd hides (a task solved by some seeds and not others)
        pathlib.Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
