"""The side-by-side: dot-product vs taumode (as the reference crate defines it) vs the recency-only
control vs taumode + recency (at dot's head shape and at its own), each trained with the same preset, data
and steps for several seeds (3 by default), one run after another:
``python -m tauformer_model.compare --preset tiny --seeds 3 --out runs/compare``

Other flags (``--data``, ``--batch-size``, ...) are passed to every training run. Every run is scored on the
same val windows (train.evaluate), so seeds differ only in initialisation and batches. Writes
``<out>/table.md``: val loss as mean ± sd over the seeds at equal steps and at equal training wall-clock, the
gap to the first variant paired by seed, tokens/s, and the cache bytes per token and layer (measured from the
tensors of each model's cache).
"""

from __future__ import annotations

import argparse
import pathlib
import shlex
import statistics
import sys

from .checkpoint import load_model
from .common import mean_sd, print0, read_metrics
from .train import build_parser as train_parser
from .train import config_from_args, train
from .variants import VARIANTS, as_flags


def finished(folder: pathlib.Path, max_steps: int) -> bool:
    rows = read_metrics(folder / "metrics.jsonl")
    return bool(rows) and rows[-1]["step"] >= max_steps


def run_folder(out: pathlib.Path, name: str, seed: int) -> pathlib.Path:
    return out / name / f"seed-{seed}"


def table(out: pathlib.Path, names: list[str], seeds: list[int], references: list[str] | None = None) -> str:
    """Val loss of every variant as mean ± sd over the seeds that finished, at the last step every run reached
    and at the training wall-clock every run reached; the gap to each of ``references`` (default: the first
    variant) paired by seed (the same seed draws the same batches for every variant), as mean ± sd of the
    per-seed relative gaps."""
    runs = {n: {s: rows for s in seeds if len(rows := read_metrics(run_folder(out, n, s) / "metrics.jsonl")) > 1}
            for n in names}
    last = max((rows[-1]["step"] for by_seed in runs.values() for rows in by_seed.values()), default=0)
    # a run still going (or stopped early) is left out: every row compares runs of the same length
    runs = {n: {s: rows for s, rows in by_seed.items() if rows[-1]["step"] == last} for n, by_seed in runs.items()}
    runs = {n: by_seed for n, by_seed in runs.items() if by_seed}
    if not runs:
        return "(no finished runs)"
    every = [rows for by_seed in runs.values() for rows in by_seed.values()]
    step = min(rows[-1]["step"] for rows in every)
    wall = min(rows[-1]["train_time_s"] for rows in every)

    def at_step(rows):
        return [r for r in rows if r["step"] <= step][-1]["val_loss"]

    def at_wall(rows):
        return [r for r in rows if r["train_time_s"] <= wall + 1e-6][-1]

    # a reference without finished runs has no column (its gaps could not be computed)
    references = [r for r in (references or [next(iter(runs))]) if r in runs]
    gap_heads = "".join(f" vs {reference} (paired by seed) |" for reference in references)
    lines = [f"| variant | seeds | val @ step {step} |{gap_heads} val @ {wall:.0f} s of "
             "training (steps) | tokens/s (median) | training time | cache bytes / token / layer |",
             "|---" * (7 + len(references)) + "|"]

    def gap(name, reference):
        paired = [s for s in runs[name] if s in runs[reference]]
        gaps = [100 * (at_step(runs[name][s]) / at_step(runs[reference][s]) - 1) for s in paired]
        return "–" if name == reference else (mean_sd(gaps, 2) + " %" if gaps else "(no common seed)")

    for name, by_seed in runs.items():
        vals = [at_step(rows) for rows in by_seed.values()]
        gaps = " | ".join(gap(name, reference) for reference in references)
        walls = [at_wall(rows) for rows in by_seed.values()]
        tps = statistics.median(r["tokens_per_s"] for rows in by_seed.values() for r in rows if r.get("tokens_per_s"))
        times = [rows[-1]["train_time_s"] for rows in by_seed.values()]
        model, _ = load_model(run_folder(out, name, next(iter(by_seed))) / "checkpoint")
        cache = model.new_cache(1, 1)
        lines.append(f"| {name} | {', '.join(map(str, by_seed))} | {mean_sd(vals)} | {gaps} | "
                     f"{mean_sd([r['val_loss'] for r in walls])} ({'/'.join(str(r['step']) for r in walls)}) | "
                     f"{tps:.0f} | {statistics.mean(times):.0f} s | {cache.bytes_per_token_per_layer:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tauformer_model.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="the training preset every variant uses")
    p.add_argument("--out", default="runs/compare", help="<out>/<variant>/seed-<seed> per run, and table.md")
    p.add_argument("--variants", default="dot,taumode,recency-only,taumode+recency-4x32,taumode+recency",
                   help=f"comma-separated, from {', '.join(VARIANTS)}; the first is the reference of the gaps")
    p.add_argument("--gaps-to", default=None, metavar="NAMES",
                   help="comma-separated variants (of --variants) to give the paired gap to, one column each "
                        "(default: the first variant)")
    p.add_argument("--max-steps", type=int, default=None, help="override the preset's number of steps")
    p.add_argument("--seed", type=int, default=1337, help="the first seed (of the initialisation and the batches)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant: --seed, --seed + 1, ...")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for every run")
    p.add_argument("--retrain", action="store_true", help="train again even where a finished run exists")
    p.add_argument("--table-only", action="store_true", help="only write the table from the runs in --out")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                   help="define a variant of your own, e.g. 'corpus=--laplacian lap.npz' (repeatable); "
                        "name it in --variants")
    args, passthrough = p.parse_known_args(argv)  # any other flag goes to every training run
    if args.seeds < 1:
        p.error(f"--seeds must be at least 1, got {args.seeds}")
    variants = {name: as_flags(overrides) for name, overrides in VARIANTS.items()}
    for spec in args.variant:
        name, sep, flags = spec.partition("=")
        name = name.strip()
        if not sep or not name:
            p.error(f"--variant must be NAME=FLAGS, got {spec!r}")
        if name in variants:  # a silent redefinition would label one model's runs with another's name
            what = "a built-in variant" if name in VARIANTS else "an earlier --variant"
            p.error(f"--variant {name}: {what} has this name ({' '.join(variants[name])}); choose another name")
        variants[name] = shlex.split(flags)
    out = pathlib.Path(args.out)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    for name in names:
        if name not in variants:
            p.error(f"unknown variant {name!r}; choose from {', '.join(variants)}")
    references = [n.strip() for n in args.gaps_to.split(",") if n.strip()] if args.gaps_to else None
    for name in references or []:
        if name not in names:
            p.error(f"--gaps-to {name!r}: not one of --variants ({', '.join(names)})")
    seeds = [args.seed + i for i in range(args.seeds)]
    if not args.table_only:
        for name in names:
            for seed in seeds:
                folder = run_folder(out, name, seed)
                argv_train = ["--preset", args.preset, "--out", str(folder), "--no-progress", "--seed", str(seed),
                              *variants[name], *passthrough]
                for flag, value in (("--max-steps", args.max_steps), ("--threads", args.threads)):
                    if value is not None:
                        argv_train += [flag, str(value)]
                tc = config_from_args(train_parser().parse_args(argv_train))
                if not args.retrain and finished(folder, tc.max_steps):
                    print0(f"{name} seed {seed}: finished run found in {folder}, not retrained")
                    continue
                print0(f"=== {name}, seed {seed} ===")
                train(tc)
    text = table(out, names, seeds, references)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text + "\n")
    print0(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
