"""Recall diagnostics: what one λ scalar per head can retrieve, on synthetic tasks trained from scratch.

``python -m tauformer_model.tasks --tasks mqar --seeds 3 --out bench/results/recall-mqar-cpu.md``

Four tasks, generated on the fly (the tasks the reference crate tests):
- ``selective-copy``: a few content tokens scattered among blanks, then a separator; the model writes the
  content tokens back in order.
- ``mqar`` (multi-query associative recall, Zoology's layout): key–value pairs, then keys alone at random
  places among blanks; the model answers each with its value, which x never shows again.
- ``needle``: a haystack of random tokens with one marked token (the needle) at a depth, and a query token
  at the end; the model answers the needle. Scored per depth (0.1, 0.5, 0.9) at length 256; training
  batches hold more query tokens after the needle (answers in y only).
- ``induction``: a random segment of distinct tokens, repeated; in the repeat the model predicts each next
  token from the first copy.

Each task has its own settings and budget (Task: length, generator options, TaskRun: steps, lr, batch, width);
the flags replace them, and the results file records every task's. Every sequence is (x, y) with y = -100 except
at the answers, and each task has a solver that reads the answers off x alone (the tests check that the answer
is in the sequence). The variants are the model comparison's (tauformer_model.variants), on top of this
module's one small model (2 layers, 4 heads); by default dot product, taumode as the crate defines it, taumode +
learned recency (the default), and the recency-only control. Accuracy is over a fixed evaluation set drawn from
its own seed, the same for every training seed and variant; a cell gives mean ± sd and the seeds at >= 95 %.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tauformer_kernels.backends import BACKENDS

from .common import fraction, git_commit, lr_at, mean_sd, output_file, positive_float, positive_int
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


def mqar(n: int, length: int, gen: torch.Generator, pairs: int = 4,
         queries: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``pairs`` key–value pairs at the start (keys from the first half of the content tokens, values from the
    second, both distinct within a row), then ``queries`` keys (default: one per pair), alone, at random places
    among blanks: every key once in a random order, then keys drawn at random (queries > pairs); the answer at
    a query is its key's value. Zoology's MQAR layout (Arora et al. 2023), with blanks where it puts random
    tokens (in a vocabulary of 64 those would repeat keys) and uniform places where it draws power-law gaps.

    x never shows a value after the pairs. The earlier layout (each repeated key followed by its value, the
    queries in a block at the end) let a model answer by elimination: the values not yet given, 1/4, 1/3, 1/2
    and 1 of the 4 queries, 52 % on average, where dot product stalled (bench/results/recall-discriminating-cpu.md).
    """
    half = CONTENT // 2
    queries = pairs if queries is None else queries
    if not 1 <= pairs <= half or not pairs <= queries <= length - 2 * pairs:
        raise ValueError(f"mqar: need 1 <= pairs <= {half} and pairs <= queries <= length - 2 * pairs, got "
                         f"pairs={pairs}, queries={queries}, length={length}")
    keys = torch.argsort(torch.rand(n, half, generator=gen), dim=1)[:, :pairs] + FIRST_CONTENT
    values = torch.argsort(torch.rand(n, half, generator=gen), dim=1)[:, :pairs] + FIRST_CONTENT + half
    x = torch.full((n, length), BLANK, dtype=torch.long)
    y = torch.full((n, length), IGNORE, dtype=torch.long)
    x[:, 0:2 * pairs:2], x[:, 1:2 * pairs:2] = keys, values
    which = torch.cat([torch.argsort(torch.rand(n, pairs, generator=gen), dim=1),
                       torch.randint(0, pairs, (n, queries - pairs), generator=gen)], dim=1)
    places = torch.argsort(torch.rand(n, length - 2 * pairs, generator=gen), dim=1)[:, :queries] + 2 * pairs
    x.scatter_(1, places, keys.gather(1, which))
    y.scatter_(1, places, values.gather(1, which))  # the answer at a query is the value the pairs gave its key
    return x, y


def solve_mqar(x: torch.Tensor, pairs: int = 4) -> torch.Tensor:
    y = torch.full_like(x, IGNORE)
    for row, seq in zip(y, x.tolist()):
        table = dict(zip(seq[0:2 * pairs:2], seq[1:2 * pairs:2]))
        for i in range(2 * pairs, len(seq)):
            if seq[i] != BLANK:
                row[i] = table[seq[i]]
    return y


def needle(n: int, length: int, gen: torch.Generator, depth: float | None = None,
           queries: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random content tokens with NEEDLE, v at ``depth`` of the haystack (uniform when None) and QUERY at the
    end of x; the answer there is v. With ``queries`` > 1 (training batches), up to queries - 1 more QUERY
    tokens at random places after v, each answered with v in y only (x never repeats v): more answers per
    sequence for the same compute."""
    x = content_tokens((n, length), gen)
    y = torch.full((n, length), IGNORE, dtype=torch.long)
    room = length - 3  # NEEDLE, v, and QUERY at length - 1 fit in x
    if depth is None:
        at = torch.randint(0, room + 1, (n,), generator=gen)
    else:
        at = torch.full((n,), round(depth * room))
    rows = torch.arange(n)
    x[rows, at] = NEEDLE
    value = x[rows, at + 1]
    x[:, -1], y[:, -1] = QUERY, value
    if queries > 1:
        after = torch.arange(length - 1)[None, :] > (at + 1)[:, None]  # places between v and the last QUERY
        r = torch.rand(n, length - 1, generator=gen).masked_fill(~after, 2.0)
        extra = torch.argsort(r, dim=1)[:, :queries - 1]
        keep = after.gather(1, extra)  # rows with fewer places than queries - 1 get fewer queries
        at_rows = rows[:, None].expand_as(extra)[keep]
        x[at_rows, extra[keep]], y[at_rows, extra[keep]] = QUERY, value[at_rows]
    return x, y


def solve_needle(x: torch.Tensor) -> torch.Tensor:
    y = torch.full_like(x, IGNORE)
    for row, seq in zip(y, x.tolist()):
        value = seq[seq.index(NEEDLE) + 1]
        for i, t in enumerate(seq):
            if t == QUERY:
                row[i] = value
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


@dataclass
class TaskRun:
    """A task's training budget and model width (each a flag; the results file records every task's)."""

    steps: int = 2000
    batch_size: int = 32
    eval_size: int = 512
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1
    n_embd: int = 64  # the model's width (4 heads of n_embd // 4)


@dataclass(frozen=True)
class Task:
    name: str
    make: Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (n, length, generator, **options) -> (x, y)
    solve: Callable[..., torch.Tensor]  # (x, **options) -> y
    length: int  # training and evaluation length (needle: the evaluation lengths are ``lengths``)
    run: TaskRun = field(default_factory=TaskRun)
    options: dict = field(default_factory=dict)  # the generator's keywords, in training and evaluation
    train_options: dict = field(default_factory=dict)  # keywords for the training batches only
    lengths: tuple[int, ...] = ()  # needle: training draws a length from these, evaluation has each
    depths: tuple[float, ...] = ()  # needle: the evaluation depths

    @property
    def chance(self) -> float:
        """Accuracy of a uniform guess among the candidate answers the sequence holds."""
        return {"selective-copy": lambda: 1 / self.options.get("count", 8),  # which of the 8 comes next
                "mqar": lambda: 1 / self.options.get("pairs", 4),  # which of the values
                "needle": lambda: 1 / CONTENT,  # which haystack token
                "induction": lambda: 1 / (self.length // 3),  # which of the segment's tokens
                }[self.name]()

    @property
    def block_size(self) -> int:
        return max((self.length, *self.lengths))

    def eval_sets(self, size: int = 512) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The fixed evaluation sets, by label: ``size`` sequences each, from EVAL_SEED (not the training seed)."""
        gen = torch.Generator().manual_seed(EVAL_SEED + sum(map(ord, self.name)))
        if not self.lengths:
            return {"all": self.make(size, self.length, gen, **self.options)}
        return {f"L{length} d{depth}": self.make(size, length, gen, depth, **self.options)
                for length in self.lengths for depth in self.depths}

    def train_batch(self, batch_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        length = self.length
        if self.lengths:
            length = self.lengths[int(torch.randint(len(self.lengths), (1,), generator=gen))]
        return self.make(batch_size, length, gen, **self.options, **self.train_options)

    def settings(self) -> dict:
        """What the results file records: the generator's parameters and the training budget."""
        out = {"length": self.length, **self.options, **self.train_options, **dataclasses.asdict(self.run)}
        if self.lengths:
            out = {"lengths": list(self.lengths), "depths": list(self.depths), **out}
            del out["length"]
        return out


NEEDLE_DEPTHS = (0.1, 0.5, 0.9)
NEEDLE_LENGTHS = (256,)  # at depth 0.1 the needle is ~230 tokens before the query: a recency bias must be overcome
TASKS = {t.name: t for t in (
    Task("selective-copy", selective_copy, solve_selective_copy, 32),
    # 24 queries (every place after the 4 pairs) give 6 times the answers of one per pair, for the same compute:
    # dot product left the plateau of a guess among the 4 values near step 2,400 (recall-discriminating-cpu.md)
    Task("mqar", mqar, solve_mqar, 32, run=TaskRun(steps=5000), options=dict(pairs=4, queries=24)),
    # 32 queries per training sequence (after the needle, answers in y only): at lengths 32 and 64 with 8, dot
    # product solved the needle in ~1,500 steps instead of ~6,000 with one. At 256 this budget is not enough:
    # dot product stayed at chance (bench/results/recall-needle256-cpu.md), so no taumode row is reported.
    Task("needle", needle, solve_needle, max(NEEDLE_LENGTHS), run=TaskRun(steps=2000, batch_size=8),
         lengths=NEEDLE_LENGTHS, depths=NEEDLE_DEPTHS, train_options=dict(queries=32)),
    Task("induction", induction, solve_induction, 32),
)}

# The model every variant's TauGPTConfig fields go on top of: 4 heads (a variant's n_head counts heads of
# n_embd // 4); n_embd and block_size come from the task. The plain PyTorch taumode backend: at MQAR's size
# (batch 32 of 32 tokens, heads of 16, 1 thread) a taumode+recency step takes 41 ms of CPU with it and 45 ms
# with numba (auto), once numba's first-call compilation is done (it was counted in an earlier 262 ms); at 64
# tokens numba is ahead (84 vs 100 ms), at the needle's 256 tokens ~3x (--backend auto).
MODEL = dict(n_layer=2, n_head=4, n_kv_head=4, vocab_size=VOCAB, backend="reference")
DEFAULT_VARIANTS = ("dot", "taumode", "taumode+recency", "recency-only")
MODEL_FIELDS = {f.name for f in dataclasses.fields(TauGPTConfig)}
TRAIN_FIELDS = {"recalibrate_tau_every"}  # the training options of variants that train_task takes
SOLVED = 0.95  # a seed solves a task's column at this accuracy or more


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


def train_task(task: Task, variant: str, seed: int, backend: str = MODEL["backend"]) -> dict[str, float]:
    """Train a TauGPT from scratch on ``task`` with its budget (batches from ``seed``); accuracy on each
    evaluation set."""
    run, overrides = task.run, dict(VARIANTS[variant])
    every = overrides.pop("recalibrate_tau_every", 0)  # adaptive tau, as train's --recalibrate-tau-every
    torch.manual_seed(seed)
    model = TauGPT(TauGPTConfig(**{**MODEL, "n_embd": run.n_embd, "block_size": task.block_size,
                                   "backend": backend, **overrides}))
    gen = torch.Generator().manual_seed(seed)
    if model.config.attention == "taumode":
        model.calibrate_tau(task.train_batch(run.batch_size, gen)[0])
    optimizer = torch.optim.AdamW(model.optimizer_groups(run.weight_decay), lr=run.lr, betas=(0.9, 0.95))
    for step in range(run.steps):
        if every and step and step % every == 0:  # on a batch of its own, so the training batches stay the same
            model.calibrate_tau(task.train_batch(run.batch_size, torch.Generator().manual_seed(seed + 2 + step))[0])
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, max_lr=run.lr, warmup=run.warmup_steps, total=run.steps, min_ratio=0.1)
        x, y = task.train_batch(run.batch_size, gen)
        loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return {label: accuracy(model, x, y) for label, (x, y) in task.eval_sets(run.eval_size).items()}


def table(results: dict, tasks: dict[str, Task], variants: list[str], seeds: list[int]) -> str:
    """results[task][variant][seed] = {label: accuracy}: one row per variant, one column per task (needle:
    per length and depth); each cell mean ± sd over the seeds and (k/n): the seeds at SOLVED or more."""
    columns = [(t, label) for t in tasks for label in next(iter(results[t][variants[0]].values()))]
    head = [t if label == "all" else f"{t} {label}" for t, label in columns]
    lines = ["| variant | " + " | ".join(head) + " |", "|---|" + "---|" * len(columns),
             "| chance | " + " | ".join(f"{100 * tasks[t].chance:.1f}" for t, _ in columns) + " |"]
    for v in variants:
        cells = []
        for t, label in columns:
            acc = [results[t][v][s][label] for s in seeds]
            solved = sum(a >= SOLVED for a in acc)
            cells.append(f"{mean_sd([100 * a for a in acc], 1)} ({solved}/{len(seeds)})")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def configured(name: str, args: argparse.Namespace) -> Task:
    """TASKS[name] with the flags given (None: the task's own setting)."""
    task = TASKS[name]
    run = dataclasses.replace(task.run, **{k: v for k, v in (
        ("steps", args.steps), ("batch_size", args.batch_size), ("eval_size", args.eval_size), ("lr", args.lr),
        ("n_embd", args.width)) if v is not None})
    changes: dict = {"run": run}
    if args.length is not None and not task.lengths:
        changes["length"] = args.length
    if name == "mqar":
        changes["options"] = {**task.options, **{k: v for k, v in (("pairs", args.pairs), ("queries", args.queries))
                                                 if v is not None}}
    if name == "needle":
        if args.needle_lengths is not None:
            changes["lengths"] = args.needle_lengths
            changes["length"] = max(args.needle_lengths)
        if args.needle_depths is not None:
            changes["depths"] = args.needle_depths
        if args.needle_queries is not None:
            changes["train_options"] = {**task.train_options, "queries": args.needle_queries}
    task = dataclasses.replace(task, **changes)
    if name == "mqar":  # the generator checks pairs and queries against the length
        task.make(1, task.length, torch.Generator(), **task.options)
    return task


def _ints(text: str) -> tuple[int, ...]:
    return tuple(positive_int(t) for t in text.split(",") if t.strip())


def _depths(text: str) -> tuple[float, ...]:
    return tuple(fraction(t) for t in text.split(",") if t.strip())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tauformer_model.tasks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)}")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated, from {', '.join(VARIANTS)} (tauformer_model.variants)")
    p.add_argument("--seeds", type=positive_int, default=3, help="training seeds per task and variant: 0, 1, ...")
    p.add_argument("--eval-size", type=positive_int, default=None, help="sequences per evaluation set")
    # each task has its own budget and generator settings (TASKS); these flags replace them for every task run
    p.add_argument("--steps", type=positive_int, default=None, help="AdamW steps per training run")
    p.add_argument("--batch-size", type=positive_int, default=None)
    p.add_argument("--lr", type=positive_float, default=None, help="peak learning rate (cosine to 1/10)")
    p.add_argument("--width", type=positive_int, default=None, help="n_embd (4 heads of width / 4)")
    p.add_argument("--length", type=positive_int, default=None, help="sequence length (not the needle's)")
    p.add_argument("--pairs", type=positive_int, default=None, help="mqar: key-value pairs")
    p.add_argument("--queries", type=positive_int, default=None, help="mqar: queries per sequence (default pairs)")
    p.add_argument("--needle-lengths", type=_ints, default=None, help="needle: lengths, comma-separated")
    p.add_argument("--needle-depths", type=_depths, default=None, help="needle: evaluation depths in [0, 1]")
    p.add_argument("--needle-queries", type=positive_int, default=None,
                   help="needle: QUERY tokens per training sequence (evaluation: 1, at the end)")
    p.add_argument("--backend", default=MODEL["backend"], choices=BACKENDS, help="taumode kernel backend")
    p.add_argument("--threads", type=positive_int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", type=output_file, default=None,
                   help="write the table (with the command, machine and every task's settings) to this file, and "
                        "every seed's accuracies beside it (.json); checked before the runs start")
    args = p.parse_args(argv)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for given, known, flag in ((names, TASKS, "--tasks"), (variants, VARIANTS, "--variants")):
        for n in given:
            if n not in known:
                p.error(f"{flag}: unknown {n!r}; choose from {', '.join(known)}")
    for v in variants:
        other = VARIANTS[v].keys() - MODEL_FIELDS - TRAIN_FIELDS  # tasks trains with its own loop, not train's
        if other:
            p.error(f"--variants: {v!r} sets training options ({', '.join(sorted(other))}), which tasks does not take")
    try:
        tasks = {n: configured(n, args) for n in names}
    except ValueError as e:
        p.error(f"--pairs/--queries/--length: {e}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    seeds = list(range(args.seeds))
    results: dict = {}
    start, code = time.perf_counter(), git_commit()  # the code the runs use, not what HEAD is when they end
    for t, task in tasks.items():
        for v in variants:
            for s in seeds:
                t0 = time.perf_counter()
                acc = train_task(task, v, s, args.backend)
                results.setdefault(t, {}).setdefault(v, {})[s] = acc
                print(f"{t} {v} seed {s}: " + ", ".join(f"{k} {100 * a:.1f}%" for k, a in acc.items())
                      + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    text = table(results, tasks, variants, seeds)
    print(text)
    if args.out:
        command = "python -m tauformer_model.tasks " + " ".join(argv if argv is not None else sys.argv[1:])
        settings = "".join(f"- {t}: {task.settings()}\n" for t, task in tasks.items())
        header = (f"# Recall diagnostics: accuracy (%) on the answer tokens, mean ± sd over seeds {seeds} "
                  f"(seeds at >= {100 * SOLVED:.0f} %)\n\n"
                  f"Command: `{command}`; commit {code}; torch {torch.__version__}; {platform.machine()}, "
                  f"{torch.get_num_threads()} thread(s); "
                  f"{time.perf_counter() - start:.0f} s in all.\n"
                  f"Model: {dict(MODEL, backend=args.backend)} (n_embd and block_size from the task); "
                  "evaluation: fixed sequences from "
                  f"seed {EVAL_SEED}, the same for every training seed and variant. Settings:\n\n{settings}\n")
        pathlib.Path(args.out).write_text(header + text + "\n")
        # every seed's accuracies, for what a mean ± sd hides (a task solved by some seeds and not others)
        pathlib.Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
