"""The side-by-side: dot-product vs taumode (as the reference crate defines it) vs the recency-only
control vs taumode + recency (at dot's head shape and at its own), trained with the same preset, seed,
data and steps, one after another:
``python -m tauformer_model.compare --preset tiny --out runs/compare``

Other flags (``--data``, ``--batch-size``, ...) are passed to every training run. Writes ``<out>/table.md``: val loss at equal steps and at equal training wall-clock, tokens/s, and the
cache bytes per token and layer (measured from the tensors of each model's cache).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

from .checkpoint import load_model
from .train import build_parser as train_parser
from .train import config_from_args, print0, train

# Flags per variant on top of the preset. The tiny preset gives taumode 8 heads of 16 and dot product 4 of
# 32 (its "model_taumode"); "-4x32" / "-8x16" pin the other shape, for the same-shape comparisons.
FOUR = ["--n-head", "4", "--n-kv-head", "4"]
EIGHT = ["--n-head", "8", "--n-kv-head", "8"]
VARIANTS = {
    "dot": ["--attention", "dot", "--recency", "none"],
    "dot-8x16": ["--attention", "dot", "--recency", "none", *EIGHT],
    "dot+recency": ["--attention", "dot", "--recency", "learned"],
    # taumode as the reference crate defines it (no recency term), at the dot baseline's shape
    "taumode": ["--attention", "taumode", "--recency", "none", *FOUR],
    # the control: λ term removed, the recency term alone (what the λ term adds is the difference)
    "recency-only": ["--attention", "taumode", "--recency", "learned", "--no-lambda-term", *FOUR],
    "taumode+recency-4x32": ["--attention", "taumode", "--recency", "learned", *FOUR],
    "taumode+recency": ["--attention", "taumode", "--recency", "learned"],
    "taumode+fixed-recency": ["--attention", "taumode", "--recency", "fixed"],
    "taumode+recency+lambda-before-rope": ["--attention", "taumode", "--recency", "learned", "--lambda-before-rope"],
    "taumode+recency+learn-tau": ["--attention", "taumode", "--recency", "learned", "--learn-tau"],
    "taumode+recency+learn-laplacian": ["--attention", "taumode", "--recency", "learned", "--learn-laplacian"],
}


def read_rows(folder: pathlib.Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def finished(folder: pathlib.Path, max_steps: int) -> bool:
    rows = read_rows(folder)
    return bool(rows) and rows[-1]["step"] >= max_steps


def table(out: pathlib.Path, names: list[str]) -> str:
    runs = {n: read_rows(out / n) for n in names}
    runs = {n: r for n, r in runs.items() if len(r) > 1}
    if not runs:
        return "(no finished runs)"
    wall = min(r[-1]["train_time_s"] for r in runs.values())
    lines = [f"| variant | val @ step {min(r[-1]['step'] for r in runs.values())} | val @ {wall:.0f} s of training "
             "(step) | best val | tokens/s (median) | training time | cache bytes / token / layer |",
             "|---|---|---|---|---|---|---|"]
    for name, rows in runs.items():
        last = rows[-1]
        at_wall = [r for r in rows if r["train_time_s"] <= wall + 1e-6][-1]
        tps = statistics.median(r["tokens_per_s"] for r in rows if r.get("tokens_per_s"))
        model, _ = load_model(out / name / "checkpoint")
        cache = model.new_cache(1, 1)
        lines.append(f"| {name} | {last['val_loss']:.4f} | {at_wall['val_loss']:.4f} ({at_wall['step']}) | "
                     f"{min(r['val_loss'] for r in rows):.4f} | {tps:.0f} | {last['train_time_s']:.0f} s | "
                     f"{cache.bytes_per_token_per_layer:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tauformer_model.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="the training preset every variant uses")
    p.add_argument("--out", default="runs/compare", help="one sub-folder per variant, and table.md")
    p.add_argument("--variants", default="dot,taumode,recency-only,taumode+recency-4x32,taumode+recency",
                   help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--max-steps", type=int, default=None, help="override the preset's number of steps")
    p.add_argument("--seed", type=int, default=None, help="seed shared by all variants")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for every run")
    p.add_argument("--retrain", action="store_true", help="train again even where a finished run exists")
    p.add_argument("--table-only", action="store_true", help="only write the table from the runs in --out")
    args, passthrough = p.parse_known_args(argv)  # any other flag goes to every training run
    out = pathlib.Path(args.out)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    for name in names:
        if name not in VARIANTS:
            p.error(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    if not args.table_only:
        for name in names:
            argv_train = ["--preset", args.preset, "--out", str(out / name), "--no-progress", *VARIANTS[name],
                          *passthrough]
            for flag, value in (("--max-steps", args.max_steps), ("--seed", args.seed), ("--threads", args.threads)):
                if value is not None:
                    argv_train += [flag, str(value)]
            tc = config_from_args(train_parser().parse_args(argv_train))
            if not args.retrain and finished(out / name, tc.max_steps):
                print0(f"{name}: finished run found in {out / name}, not retrained")
                continue
            print0(f"=== {name} ===")
            train(tc)
    text = table(out, names)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text + "\n")
    print0(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
