"""Train a TauGPT: ``python -m tauformer_model.train [--preset tiny] [--attention taumode|dot] ...``

Everything of a run lives in --out: metrics.jsonl (one JSON object per evaluation), loss.png and
checkpoint/ (see checkpoint.py: written as one unit, so a kill at any instant leaves a resumable one).
``--resume`` continues the run in --out exactly where its checkpoint left it (same batches, same RNG,
same optimizer state). Ctrl-C saves a checkpoint and exits. A step whose loss, gradient norm or updated
parameters are not finite stops the run (exit code 1) before anything non-finite reaches a checkpoint.

Data parallel: ``torchrun --nproc_per_node=N -m tauformer_model.train ...`` (DDP; NCCL on GPUs, gloo
on CPU). A step trains on batch_size × grad_accum × N windows drawn by one sampler; rank r reads its
own slice, rank 0 alone writes. A run resumes under another N when batch_size × grad_accum × N stays
the same (e.g. 2 ranks, or 1 rank with --grad-accum 2).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import pathlib
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

from tauformer_kernels import BACKENDS, load_laplacian

from .checkpoint import CheckpointError, find_checkpoint, load_model, load_state, save_checkpoint
from .cli import fraction, laplacian_spec, nonnegative_float, nonnegative_int, positive_float, positive_int
from .config import ATTENTIONS, PRESETS, RECENCIES, TauGPTConfig
from .data import DataError, load_dataset
from .model import TauGPT

def print0(*args, **kwargs) -> None:
    """The one output function: prints on rank 0 only, above the progress bar."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    from tqdm import tqdm

    out = kwargs.get("file", sys.stdout)
    tqdm.write(" ".join(str(a) for a in args), file=out)
    out.flush()


class NonFiniteLoss(RuntimeError):
    """The run diverged: a loss, gradient norm or parameter is inf or nan (nothing of it was saved)."""


@dataclass
class TrainConfig:
    """Training options (the model's are TauGPTConfig). Defaults come from the preset."""

    preset: str = "tiny"
    out: str = "runs/tiny"
    data: str | None = None
    data_cache: str | None = None
    tokenizer: str = "byte"
    bpe_vocab_size: int = 4096
    batch_size: int = 32
    max_steps: int = 600
    stop_at: int | None = None
    lr: float = 3e-3
    min_lr_frac: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    grad_accum: int = 1
    eval_every: int = 100
    eval_batches: int = 16
    checkpoint_every: int = 200
    seed: int = 1337
    device: str = "auto"
    threads: int | None = None
    compile: bool = False
    resume: bool = False
    recalibrate_tau: bool = False
    progress: bool = True
    model: TauGPTConfig = field(default_factory=TauGPTConfig)


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warm-up to tc.lr, then cosine decay to tc.lr * tc.min_lr_frac at tc.max_steps."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps))
    low = tc.lr * tc.min_lr_frac
    return low + 0.5 * (tc.lr - low) * (1.0 + math.cos(math.pi * progress))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


@dataclass
class Dist:
    """Where this process stands in a torchrun job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this module initialised the process group (and destroys it)
    collective_device: str = "cpu"  # where all_sum's tensor lives (the GPU under NCCL)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        """Sum a few floats over the ranks (in float64)."""
        if self.world == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.collective_device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def setup_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """Join the torchrun job described by RANK / WORLD_SIZE / LOCAL_RANK (NCCL on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), resolve_device(device_name)
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    owns = not dist.is_initialized()
    if owns:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_rank, owns, str(device) if device.type == "cuda" else "cpu"), device


def write_plot(out: pathlib.Path, rows: list[dict]) -> None:
    """loss.png: train and val loss against step (matplotlib's Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    steps = [r["step"] for r in rows]
    train = [(r["step"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
    if train:
        ax.plot(*zip(*train), label="train", marker=".")
    ax.plot(steps, [r["val_loss"] for r in rows], label="val", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(rows[-1].get("label", "TauGPT"))
    ax.grid(alpha=0.3)
    ax.legend()
    tmp = out / "loss.png.tmp"
    fig.savefig(tmp, format="png")
    os.replace(tmp, out / "loss.png")


class Progress:
    """Training progress: a tqdm bar on a terminal; in a log file or CI (stderr not a terminal) a plain
    line every `every_s` seconds instead of a carriage-return redraw per update."""

    def __init__(self, total: int, initial: int, label: str, log, every_s: float = 30.0):
        self.total, self.log, self.every_s = total, log, every_s
        self.last = time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=label, mininterval=1.0, dynamic_ncols=True)

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:.0f}")
        elif time.monotonic() - self.last >= self.every_s:
            self.last = time.monotonic()
            self.log(f"step {step}/{self.total}: loss {loss:.4f}, {tokens_per_s:.0f} tokens/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def read_metrics(path: pathlib.Path, up_to_step: int | None = None) -> list[dict]:
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i + 1 < len(lines):
                raise
            # the last line of a run killed while appending it: that evaluation is redone on --resume
    return [r for r in rows if up_to_step is None or r["step"] <= up_to_step]


@torch.no_grad()
def evaluate(model, dataset, tc: TrainConfig, device, autocast, dist: Dist) -> float:
    """Mean val loss over tc.eval_batches fixed batches (the same ones at every evaluation), split over ranks."""
    model.eval()
    gen = torch.Generator().manual_seed(tc.seed + 3)
    total = 0.0
    for i in range(tc.eval_batches):
        x, y = dataset.batch("val", tc.batch_size, tc.model.block_size, gen, device)  # every rank draws every batch
        if i % dist.world == dist.rank:
            with autocast():
                total += float(model(x, y))
    model.train()
    return dist.all_sum([total])[0] / tc.eval_batches


def train(tc: TrainConfig, log=print0) -> dict:
    """Run (or resume) one training run; returns a summary dict. Raises NonFiniteLoss on NaN/inf.

    Under torchrun each step's global batch is batch_size × grad_accum × world_size windows, drawn by
    one sampler that every rank advances identically; rank r trains on its own slice of them."""
    dist, device = setup_distributed(tc.device)
    try:
        return _train(tc, log if dist.main else (lambda *a, **k: None), dist, device)
    finally:
        if dist.owns_group:
            import torch.distributed

            torch.distributed.destroy_process_group()


def _train(tc: TrainConfig, log, dist: Dist, device: torch.device) -> dict:
    out = pathlib.Path(tc.out)
    metrics_path = out / "metrics.jsonl"
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    if dist.main:  # tokenise once, then the other ranks open the cache
        dataset = load_dataset(tc.data, tc.data_cache, tc.tokenizer, tc.bpe_vocab_size, log=log)
    dist.barrier()
    if not dist.main:
        dataset = load_dataset(tc.data, tc.data_cache, tc.tokenizer, tc.bpe_vocab_size, log=log)

    state = None
    if tc.resume:
        ckpt_dir = find_checkpoint(out)
        if ckpt_dir is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {out}")
        model, _ = load_model(ckpt_dir, device)
        state = load_state(ckpt_dir)
        model.config.backend = tc.model.backend  # the one model option a resumed run may change
        tc.model = model.config
    else:
        tc.model.vocab_size = dataset.tokenizer.vocab_size
        model = TauGPT(tc.model).to(device)
    mc = model.config
    if model.config.vocab_size != dataset.tokenizer.vocab_size:
        raise ValueError(f"the checkpoint's vocab_size {mc.vocab_size} does not match the data's "
                         f"tokenizer ({dataset.tokenizer.vocab_size})")
    optimizer = torch.optim.AdamW(model.optimizer_groups(tc.weight_decay), lr=tc.lr,
                                  betas=(tc.beta1, tc.beta2), eps=1e-8)
    data_gen = torch.Generator().manual_seed(tc.seed + 1)
    step, loss_sum, loss_count, train_time = 0, 0.0, 0, 0.0
    calib_gen = torch.Generator().manual_seed(tc.seed + 2)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        data_gen.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"])
        step, loss_sum, loss_count = state["step"], state["loss_sum"], state["loss_count"]
        train_time = state["train_time"]
        if dist.main:  # drop evaluations written after the checkpoint
            rows = read_metrics(metrics_path, up_to_step=step)
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        log(f"resumed {ckpt_dir} at step {step}")
        if tc.recalibrate_tau and mc.attention == "taumode":
            x, _ = dataset.batch("train", tc.batch_size, mc.block_size, calib_gen, device)
            log(f"tau recalibrated: {model.calibrate_tau(x):.4f}")
    else:
        if dist.main:
            metrics_path.write_text("")
        if mc.attention == "taumode":  # the same batch on every rank: the same tau
            x, _ = dataset.batch("train", tc.batch_size, mc.block_size, calib_gen, device)
            log(f"tau calibrated (median E of layer-0 keys): {model.calibrate_tau(x):.4f}")

    label = f"{mc.attention} recency={mc.recency}"
    log(f"{label}: {model.num_params() / 1e6:.2f}M parameters, {mc.n_layer} layers, {mc.n_head} heads "
        f"({mc.n_kv_head} kv) of {mc.head_dim}, context {mc.block_size}, device {device}"
        + (f", {dist.world} ranks" if dist.world > 1 else ""))
    wrapped = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    fwd = torch.compile(wrapped) if tc.compile else wrapped
    if device.type == "cuda":
        autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    else:
        autocast = contextlib.nullcontext

    def make_state() -> dict:
        return {"step": step, "optimizer": optimizer.state_dict(), "data_rng": data_gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "loss_sum": loss_sum, "loss_count": loss_count, "train_time": train_time,
                "train_config": train_config_to_dict(tc), "model_config": mc.to_dict()}

    def diverged(what: str, at_step: int) -> str:
        last = find_checkpoint(out)
        kept = f"the last good checkpoint is kept: {last}" if last else "no checkpoint had been written"
        return f"{what} at step {at_step}; stopping ({kept}). Try a lower --lr or --grad-clip."

    def save() -> None:
        if dist.main:
            save_checkpoint(out, model, make_state(), dataset.tokenizer)
        dist.barrier()

    def record(val_loss: float, tokens_per_s: float | None) -> dict:
        row = {"step": step, "train_loss": loss_sum / loss_count if loss_count else None,
               "val_loss": val_loss, "tokens_per_s": tokens_per_s, "train_time_s": round(train_time, 3),
               "lr": lr_at(max(step - 1, 0), tc), "label": label}
        if dist.main:
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            write_plot(out, read_metrics(metrics_path))
        return row

    if state is None:
        row = record(evaluate(fwd, dataset, tc, device, autocast, dist), None)
        log(f"step {step}: val {row['val_loss']:.4f}")

    # Ctrl-C sets a flag that the loop checks between steps (a step is never half-applied).
    interrupted = threading.Event()
    previous_handler = None
    if threading.current_thread() is threading.main_thread():
        def on_sigint(signum, frame):
            if interrupted.is_set():
                raise KeyboardInterrupt
            interrupted.set()
        previous_handler = signal.signal(signal.SIGINT, on_sigint)

    micro_batches = tc.grad_accum * dist.world
    global_batch = tc.batch_size * micro_batches
    tokens_per_step = global_batch * mc.block_size
    end_step = tc.max_steps if tc.stop_at is None else min(tc.max_steps, tc.stop_at)
    progress = Progress(tc.max_steps, step, label, log) if tc.progress and dist.main else None
    summary = {"stopped": "done"}
    interval_tokens, interval_time = 0, 0.0
    try:
        model.train()
        while step < end_step:
            if dist.all_sum([float(interrupted.is_set())])[0] > 0:  # every rank stops at the same step
                summary["stopped"] = "interrupted"
                break
            t0 = time.perf_counter()
            lr = lr_at(step, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr
            local_loss = 0.0
            starts = dataset.starts("train", global_batch, mc.block_size, data_gen)  # alike on every rank
            for micro in range(tc.grad_accum):
                first = (dist.rank * tc.grad_accum + micro) * tc.batch_size
                x, y = dataset.windows("train", starts[first:first + tc.batch_size], mc.block_size, device)
                sync = dist.world == 1 or micro + 1 == tc.grad_accum
                with (contextlib.nullcontext() if sync else wrapped.no_sync()), autocast():
                    loss = fwd(x, y)
                (loss / tc.grad_accum).backward()
                local_loss += float(loss.detach())
            loss_value = dist.all_sum([local_loss])[0] / micro_batches
            # the norm is needed to clip; with clipping off, max_norm = inf only measures it
            grad_norm = float(torch.nn.utils.clip_grad_norm_(
                model.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf")))
            for what, value in (("training loss", loss_value), ("gradient norm", grad_norm)):
                if not math.isfinite(value):
                    raise NonFiniteLoss(diverged(f"non-finite {what} ({value})", step + 1))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if not all_finite(model.parameters()):
                raise NonFiniteLoss(diverged("the update made parameters non-finite", step + 1))
            step += 1
            loss_sum += loss_value
            loss_count += 1
            dt = time.perf_counter() - t0
            train_time += dt
            interval_time += dt
            interval_tokens += tokens_per_step
            if progress is not None:
                progress.update(step, loss_value, interval_tokens / max(interval_time, 1e-9))
            if step % tc.eval_every == 0 or step == tc.max_steps:
                tps = interval_tokens / max(interval_time, 1e-9)
                row = record(evaluate(fwd, dataset, tc, device, autocast, dist), round(tps, 1))
                log(f"step {step}: train {row['train_loss']:.4f} val {row['val_loss']:.4f} "
                    f"tokens/s {tps:.0f} time {train_time:.0f}s")
                loss_sum, loss_count, interval_tokens, interval_time = 0.0, 0, 0, 0.0
            if step % tc.checkpoint_every == 0 or step == tc.max_steps:
                save()
        if step == end_step and step < tc.max_steps:
            summary["stopped"] = "stop_at"
        if summary["stopped"] != "done" or step % tc.checkpoint_every:
            save()
        if summary["stopped"] == "interrupted":
            log(f"interrupted: checkpoint saved at step {step} in {out / 'checkpoint'}; continue with --resume")
    finally:
        if progress is not None:
            progress.close()
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
    rows = read_metrics(metrics_path) if dist.main else []
    summary.update(step=step, train_time_s=train_time, final_val_loss=rows[-1]["val_loss"] if rows else None,
                   best_val_loss=min(r["val_loss"] for r in rows) if rows else None)
    return summary


def all_finite(tensors) -> bool:
    """One device-to-host read for all of them (a norm overflows to inf only for values past ~1e38)."""
    norms = torch._foreach_norm([t.detach() for t in tensors])
    return bool(torch.isfinite(torch.stack(norms)).all())


def train_config_to_dict(tc: TrainConfig) -> dict:
    d = dataclasses.asdict(tc)
    d["model"] = tc.model.to_dict()
    return d


# ---------------------------------------------------------------------------------------------
# Command line: argparse -> TrainConfig. Flags left unset take the preset's (or the checkpoint's) value.

# name: (argument type, help); choices where the values are a fixed set
MODEL_FLAGS = {
    "n_layer": (positive_int, "number of transformer blocks"),
    "n_head": (positive_int, "query heads per layer"),
    "n_kv_head": (positive_int, "key/value heads (GQA); n_head must be a multiple"),
    "n_embd": (positive_int, "model width; head dim = n_embd // n_head"),
    "block_size": (positive_int, "training context length"),
    "attention": (str, "'taumode' (λ scalars, tauformer_kernels) or 'dot' (PyTorch SDPA, the baseline)", ATTENTIONS),
    "recency": (str, "logit term -slope_h*|i-j|: none | fixed | learned | auto (learned for taumode, none for dot)",
                ("auto",) + RECENCIES),
    "temperature_init": (positive_float, "initial per-head taumode temperature (learned in log space)"),
    "lambda_before_rope": (bool, "taumode: λ from the un-rotated q, k (no RoPE; position only via mask and recency)"),
    "learn_tau": (bool, "learn tau per kv head (after calibration) instead of keeping it fixed"),
    "learn_laplacian": (bool, "taumode: learn the Laplacian's edge weights (kept >= 0: L stays a Laplacian)"),
    "lambda_term": (bool, "taumode: --no-lambda-term is the recency-only control (λq = λk = 0)"),
    "laplacian": (laplacian_spec, "'chain' or a Laplacian file (python -m tauformer_model.laplacian_cli, or an F×F .npy)"),
    "backend": (str, "tauformer_kernels backend", BACKENDS),
}
TRAIN_FLAGS = {
    "out": (str, "run folder: metrics.jsonl, loss.png, checkpoint/ (default runs/<preset>-<attention>)"),
    "data": (str, "a text file or a folder of text files (default: the Python stdlib's .py sources)"),
    "data_cache": (str, "where tokenised corpora are cached (default ~/.cache/tauformer)"),
    "tokenizer": (str, "'byte' (vocab 256) or 'bpe' (trained locally with the tokenizers package)", ("byte", "bpe")),
    "bpe_vocab_size": (positive_int, "vocabulary size of the BPE tokenizer"),
    "batch_size": (positive_int, "sequences per step"),
    "max_steps": (positive_int, "length of the run (the learning-rate schedule ends here)"),
    "stop_at": (positive_int, "stop (and checkpoint) at this step, as if interrupted; continue with --resume"),
    "lr": (positive_float, "peak learning rate (AdamW)"),
    "min_lr_frac": (fraction, "final learning rate as a fraction of --lr (cosine decay)"),
    "warmup_steps": (nonnegative_int, "linear warm-up steps"),
    "weight_decay": (nonnegative_float, "AdamW weight decay (matrices only)"),
    "grad_clip": (nonnegative_float, "clip the gradient norm to this (0: off)"),
    "grad_accum": (positive_int, "micro-batches per step and rank; a step trains on batch_size × grad_accum × ranks sequences"),
    "eval_every": (positive_int, "evaluate the val loss every N steps"),
    "eval_batches": (positive_int, "batches per evaluation"),
    "checkpoint_every": (positive_int, "write a checkpoint every N steps"),
    "seed": (int, "seed of the initialisation and of the batch sampler"),
    "device": (str, "'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ..."),
    "threads": (positive_int, "torch.set_num_threads (CPU)"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tauformer_model.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="named sizes and schedule (default: tiny without a GPU, 30m with one)")
    for name, (typ, text, *choices) in {**MODEL_FLAGS, **TRAIN_FLAGS}.items():
        flag = "--" + name.replace("_", "-")
        if typ is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            p.add_argument(flag, type=typ, default=None, help=text, choices=choices[0] if choices else None)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--resume", action="store_true", help="continue the run whose checkpoint is in --out")
    p.add_argument("--recalibrate-tau", action="store_true",
                   help="with --resume: recalibrate tau on the (new) data instead of keeping the checkpoint's")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    preset = args.preset or ("30m" if torch.cuda.is_available() else "tiny")
    given = {k: v for k, v in vars(args).items() if v is not None}
    out = given.get("out") or f"runs/{preset}-{given.get('attention', 'taumode')}"
    found = find_checkpoint(out) if args.resume else None
    if found is not None:  # the run's own config, then the flags given now
        saved = load_state(found)["train_config"]
        model_fields = dict(saved.pop("model"))
        train_fields = dict(saved, stop_at=None)  # a stop point applies to the run that set it
    else:
        model_fields = dict(PRESETS[preset]["model"])
        attention = given.get("attention", model_fields.get("attention", "taumode"))
        model_fields.update(PRESETS[preset].get(f"model_{attention}", {}))
        train_fields = dict(PRESETS[preset]["train"], preset=preset)
    for name in MODEL_FLAGS:
        if name in given:
            model_fields[name] = given[name]
    for name in TRAIN_FLAGS:
        if name in given:
            train_fields[name] = given[name]
    train_fields.update(out=out, compile=args.compile, resume=args.resume,
                        recalibrate_tau=args.recalibrate_tau, progress=not args.no_progress)
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"model"}
    model = TauGPTConfig.from_dict(model_fields)
    if model.attention == "taumode" and model.laplacian != "chain" and not found:
        load_laplacian(model.laplacian, model.head_dim)  # a file that is not a head_dim² Laplacian fails here
    return TrainConfig(**{k: v for k, v in train_fields.items() if k in names}, model=model)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        tc = config_from_args(args)
    except (ValueError, CheckpointError) as e:  # a model shape the config rejects, an unreadable checkpoint
        parser.error(str(e))
    try:
        summary = train(tc)
    except (NonFiniteLoss, CheckpointError, DataError, FileNotFoundError) as e:
        print0(f"error: {e}", file=sys.stderr)
        return 1
    if summary["final_val_loss"] is None:  # not rank 0
        return 0
    print0(f"{summary['stopped']} at step {summary['step']}: val loss {summary['final_val_loss']:.4f} "
           f"(best {summary['best_val_loss']:.4f}), training time {summary['train_time_s']:.0f}s; "
           f"outputs in {tc.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
