"""lm-eval's local task (taugpt_val_loss) on the finished runs of a compare folder, beside each run's own last val
loss (metrics.jsonl): ``python bench/lm_eval_local.py --runs runs/evidence --variants dot,taumode+recency``.

Reads the run folders only. A run counts as finished when its checkpoint and the last row of its metrics.jsonl
are both at its train config's max_steps; the others are listed with the step they reached. Prints a Markdown
table: per run the two losses and their difference, then per variant the mean ± sd over its finished seeds.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import torch

from tauformer_model.checkpoint import find_checkpoint, load_state
from tauformer_model.common import mean_sd, read_metrics
from tauformer_model.compare import run_folder


def run_status(folder: pathlib.Path) -> tuple[bool, str, float | None]:
    """(finished, what it reached, the trainer's last val loss) of a run folder."""
    found = find_checkpoint(folder)
    rows = read_metrics(folder / "metrics.jsonl")
    if found is None or not rows:
        return False, "no checkpoint yet", None
    max_steps = load_state(found)["train_config"]["max_steps"]
    checkpoint_step = load_state(found)["step"]
    last = rows[-1]
    finished = last["step"] == max_steps and checkpoint_step == max_steps
    return finished, f"step {last['step']} of {max_steps} (checkpoint at {checkpoint_step})", last["val_loss"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs/evidence", help="a compare --out folder: <runs>/<variant>/seed-<seed>")
    p.add_argument("--variants", default="dot,taumode+recency,hybrid-dot-every-4", help="comma-separated")
    p.add_argument("--seeds", default="1337,1338,1339", help="comma-separated seeds")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from tauformer_model import evaluate as ev  # lm-eval's import takes a while: after the arguments parse

    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    rows, scores = [], {n: [] for n in names}
    for name in names:
        for seed in seeds:
            folder = run_folder(pathlib.Path(args.runs), name, seed)
            finished, reached, val_loss = run_status(folder)
            if not finished:
                rows.append(f"| {name} | {seed} | not finished: {reached} | | | | |")
                continue
            start = time.perf_counter()
            score = ev.local_task_score(ev.evaluate(folder, [ev.LOCAL_TASK], batch_size=args.batch_size))
            seconds = time.perf_counter() - start
            scores[name].append((score, val_loss))
            rows.append(f"| {name} | {seed} | {reached} | {val_loss:.6f} | {score:.6f} | {abs(score - val_loss):.1e} "
                        f"| {seconds:.1f} |")
            print(rows[-1], file=sys.stderr, flush=True)
    print("| variant | seed | run | val_loss (metrics.jsonl) | lm-eval taugpt_val_loss (nats/token) | difference "
          "| lm-eval seconds |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("\n| variant | finished seeds | val_loss | lm-eval taugpt_val_loss |")
    print("|---|---|---|---|")
    for name, pairs in scores.items():
        if pairs:
            print(f"| {name} | {len(pairs)} | {mean_sd([v for _, v in pairs])} | {mean_sd([s for s, _ in pairs])} |")
        else:
            print(f"| {name} | 0 | – | – |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
