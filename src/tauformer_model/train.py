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

``--fsdp``: the model sharded over the ranks instead of replicated (FSDP2's fully_shard, one unit per block
and one for the rest). A checkpoint is the same files as ever: the full weights and optimizer state are
gathered to rank 0, which writes them as one unit, so any number of ranks, sharded or not, resumes it.

``--context-parallel C``: each window split over C ranks (tauformer_kernels.ContextParallel: zigzag chunks,
λk and V exchanged per layer); the N ranks form N / C data-parallel groups of C.
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
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from tauformer_kernels import BACKENDS, ContextParallel, load_laplacian
from tauformer_kernels.context_parallel import exchange_bytes

from .checkpoint import CheckpointError, find_checkpoint, load_model, load_state, remove_temporaries, save_checkpoint
from .common import (
    fraction,
    laplacian_spec,
    lr_at,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    print0,
    read_metrics,
    resolve_device,
)
from .config import ATTENTIONS, PRESETS, RECENCIES, TAU_RULES, TauGPTConfig
from .data import DataError, Dataset, load_dataset
from .model import TauGPT, TaumodeAttention

FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on rank 0's CPU


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
    fsdp: bool = False  # shard the model over the ranks (FSDP2) instead of replicating it (DDP)
    context_parallel: int = 1  # ranks each window is split over
    resume: bool = False
    recalibrate_tau: bool = False
    # Adaptive tau (0: off): before the steps after every N-th, tau is set again to the median E of the first
    # layer's keys (calibrate_tau) over a training batch of its own, as the keys drift in training. Saved with the
    # run's config, so --resume keeps the schedule; the batch depends only on the seed and the step.
    recalibrate_tau_every: int = 0
    # Attention never crosses a document (a file of the corpus) inside a window, and RoPE positions restart
    # at each document (docs/math.md §Packed sequences); evaluation windows are cut the same way.
    pack_documents: bool = False
    progress: bool = True
    model: TauGPTConfig = field(default_factory=TauGPTConfig)

    def learning_rate(self, step: int) -> float:
        """The learning rate of `step`: warm-up to lr, cosine decay to lr * min_lr_frac at max_steps."""
        return lr_at(step, max_lr=self.lr, warmup=self.warmup_steps, total=self.max_steps,
                     min_ratio=self.min_lr_frac)


@dataclass
class Dist:
    """Where this process stands in a torchrun job (rank 0 of 1 without one)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this module initialised the process group (and destroys it)
    collective_device: str = "cpu"  # where all_sum's tensor lives (the GPU under NCCL)
    context: ContextParallel | None = None  # this rank's context-parallel group (consecutive ranks)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def cp_size(self) -> int:
        return 1 if self.context is None else self.context.world

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel index: the ranks of one context-parallel group read the same windows."""
        return self.rank // self.cp_size

    @property
    def dp_world(self) -> int:
        return self.world // self.cp_size

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


def setup_distributed(device_name: str, context_parallel: int = 1) -> tuple[Dist, torch.device]:
    """Join the torchrun job described by RANK / WORLD_SIZE / LOCAL_RANK (NCCL on GPUs, gloo on CPU), with
    context-parallel groups of ``context_parallel`` consecutive ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % context_parallel:
        raise ValueError(f"--context-parallel {context_parallel}: the {world} ranks of this job do not split into "
                         f"groups of {context_parallel} (start it with torchrun --nproc_per_node=a multiple)")
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
    context = None
    if context_parallel > 1:  # every rank creates every group, in the same order
        groups = [dist.new_group(list(range(g, g + context_parallel))) for g in range(0, world, context_parallel)]
        context = ContextParallel(groups[rank // context_parallel])
    return Dist(rank, world, local_rank, owns, str(device) if device.type == "cuda" else "cpu", context), device


PLOT_TMP = "loss.png.tmp"


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
    tmp = out / PLOT_TMP
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, out / "loss.png")
    finally:  # a failed write (a full disk) leaves no half plot behind
        tmp.unlink(missing_ok=True)


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


def read_batch(dataset: Dataset, split: str, starts: list[int], tc: TrainConfig, device):
    """The windows at ``starts``: x, y on ``device`` and, with --pack-documents, the document ids of x's
    tokens (on the host, where the model reads the boundaries; else None)."""
    x, y = dataset.windows(split, starts, tc.model.block_size, device)
    doc_ids = dataset.document_ids(split, starts, tc.model.block_size) if tc.pack_documents else None
    return x, y, doc_ids


@torch.no_grad()
def evaluate(model, dataset, tc: TrainConfig, device, autocast, dist: Dist) -> float:
    """Mean val loss over tc.eval_batches batches of windows spread evenly over the val split: the same
    text at every evaluation and for every seed (runs of different seeds are scored alike), split over ranks."""
    model.eval()
    size, cp = tc.batch_size, dist.context
    all_starts = dataset.evaluation_starts("val", tc.eval_batches * size, tc.model.block_size)
    total = 0.0
    # every rank runs as many forwards (FSDP and context parallel forwards are collectives): a rank left
    # without a batch of its own repeats the first one and does not count it
    rounds = -(-tc.eval_batches // dist.dp_world)
    for i in range(dist.dp_rank, rounds * dist.dp_world, dist.dp_world):
        starts = all_starts[i * size:(i + 1) * size] if i < tc.eval_batches else all_starts[:size]
        x, y, doc_ids = read_batch(dataset, "val", starts, tc, device)
        if cp is not None:
            x, y = cp.shard(x, 1), cp.shard(y, 1)
        with autocast():
            loss = float(model(x, y, doc_ids=doc_ids, context_parallel=cp))
        total += loss if i < tc.eval_batches else 0.0
    model.train()
    return dist.all_sum([total])[0] / (tc.eval_batches * dist.cp_size)


@dataclass
class RunState:
    """The counters the steps advance. The first four are saved in a checkpoint; the throughput
    counters restart at every evaluation (and on --resume)."""

    step: int = 0
    loss_sum: float = 0.0  # training losses since the last evaluation, for its mean
    loss_count: int = 0
    train_time: float = 0.0  # seconds spent in steps (not evaluations or saves), over the whole run
    interval_tokens: int = 0
    interval_time: float = 0.0

    def count_step(self, loss: float, seconds: float, tokens: int) -> None:
        self.step += 1
        self.loss_sum += loss
        self.loss_count += 1
        self.train_time += seconds
        self.interval_time += seconds
        self.interval_tokens += tokens

    @property
    def tokens_per_s(self) -> float:
        return self.interval_tokens / max(self.interval_time, 1e-9)


@dataclass
class Run:
    """What one training run works with, built by start_run; `state` is the part the steps change."""

    tc: TrainConfig
    log: Callable[..., None]
    dist: Dist
    device: torch.device
    dataset: Dataset
    model: TauGPT
    optimizer: torch.optim.Optimizer
    data_gen: torch.Generator  # the training-batch sampler, advanced alike on every rank
    state: RunState = field(default_factory=RunState)
    wrapped: torch.nn.Module | None = None  # the model under DDP with several ranks (wrap_model); FSDP: model
    fwd: Callable | None = None  # `wrapped`, or torch.compile of it

    @property
    def out(self) -> pathlib.Path:
        return pathlib.Path(self.tc.out)

    @property
    def metrics_path(self) -> pathlib.Path:
        return self.out / "metrics.jsonl"

    @property
    def sharded(self) -> bool:
        """FSDP over several ranks (--fsdp in one process is a plain run)."""
        return self.tc.fsdp and self.dist.world > 1

    @property
    def label(self) -> str:
        return f"{self.model.config.attention} recency={self.model.config.recency}"

    def autocast(self):
        """bf16 autocast on a GPU; plain fp32 on a CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()


def train(tc: TrainConfig, log=print0) -> dict:
    """Run (or resume) one training run; returns a summary dict. Raises NonFiniteLoss on NaN/inf.

    Under torchrun each step's global batch is batch_size × grad_accum × world_size windows, drawn by
    one sampler that every rank advances identically; rank r trains on its own slice of them."""
    dist, device = setup_distributed(tc.device, tc.context_parallel)
    try:
        run = start_run(tc, log if dist.main else (lambda *a, **k: None), dist, device)
        stopped = train_loop(run)
        # Every rank leaves the loop at the same step; wait for all before the group is torn down (a rank
        # that destroyed it while gloo still served another's last collective aborted once, on a loaded CPU).
        # Not on the error path: a rank that raised would leave the others waiting here.
        dist.barrier()
    finally:
        if dist.owns_group:
            import torch.distributed

            torch.distributed.destroy_process_group()
    rows = read_metrics(run.metrics_path) if dist.main else []
    return {"stopped": stopped, "step": run.state.step, "train_time_s": run.state.train_time,
            "final_val_loss": rows[-1]["val_loss"] if rows else None, "val_step": rows[-1]["step"] if rows else None,
            "best_val_loss": min(r["val_loss"] for r in rows) if rows else None}


def start_run(tc: TrainConfig, log, dist: Dist, device: torch.device) -> Run:
    """Everything before the first step: the data, then the model and optimizer, either new (tau
    calibrated, evaluated at step 0) or as the checkpoint in tc.out left them (--resume)."""
    if dist.main:
        pathlib.Path(tc.out).mkdir(parents=True, exist_ok=True)
        # what a killed or failed write left (a partial checkpoint on a full disk) goes before anything is written
        remove_temporaries(tc.out)
        (pathlib.Path(tc.out) / PLOT_TMP).unlink(missing_ok=True)
    check_adaptive_tau(tc)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)  # before the model is built: its initialisation draws from it
    dataset = load_data(tc, log, dist)
    if tc.resume:
        ckpt_dir, model, saved = load_checkpoint_model(tc, dataset, device)
    else:
        tc.model.vocab_size = dataset.tokenizer.vocab_size
        model = TauGPT(tc.model).to(device)
    run = Run(tc, log, dist, device, dataset, model, None, torch.Generator().manual_seed(tc.seed + 1))
    if model.config.attention == "taumode" and (not tc.resume or tc.recalibrate_tau):
        # before sharding: calibration reads the first layer's keys outside a forward
        calibrate_tau(run, "tau recalibrated" if tc.resume else "tau calibrated (median E of layer-0 keys)")
    if run.sharded:
        shard_model(run)
    # after sharding: FSDP replaces the parameters by sharded ones, which the optimizer must hold
    run.optimizer = torch.optim.AdamW(model.optimizer_groups(tc.weight_decay), lr=tc.lr,
                                      betas=(tc.beta1, tc.beta2), eps=1e-8)
    if tc.resume:
        restore_state(run, ckpt_dir, saved)
    elif dist.main:
        run.metrics_path.write_text("")
    log_model(run)
    wrap_model(run)
    if not tc.resume:
        evaluate_and_log(run)
    return run


def load_data(tc: TrainConfig, log, dist: Dist) -> Dataset:
    """The corpus, tokenised by rank 0 alone; the other ranks then open its cache."""
    if not dist.main:
        dist.barrier()
    dataset = load_dataset(tc.data, tc.data_cache, tc.tokenizer, tc.bpe_vocab_size, log=log)
    if dist.main:
        dist.barrier()
    return dataset


def load_checkpoint_model(tc: TrainConfig, dataset: Dataset, device: torch.device):
    """--resume: the checkpoint folder in tc.out, its model and its saved state. tc.model becomes
    the checkpoint's model config, with the backend given now."""
    ckpt_dir = find_checkpoint(tc.out)
    if ckpt_dir is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {tc.out}")
    model, _ = load_model(ckpt_dir, device)
    saved = load_state(ckpt_dir)
    model.config.backend = tc.model.backend  # the one model option a resumed run may change
    tc.model = model.config
    if model.config.vocab_size != dataset.tokenizer.vocab_size:
        raise ValueError(f"the checkpoint's vocab_size {model.config.vocab_size} does not match the data's "
                         f"tokenizer ({dataset.tokenizer.vocab_size})")
    return ckpt_dir, model, saved


def restore_state(run: Run, ckpt_dir: pathlib.Path, saved: dict) -> None:
    """Put the optimizer, the sampler, the RNGs and the counters back where the checkpoint left them,
    so that the resumed run draws and computes what the uninterrupted one would have."""
    load_optimizer_state(run, saved["optimizer"])
    run.data_gen.set_state(saved["data_rng"])
    torch.set_rng_state(saved["torch_rng"])
    if run.device.type == "cuda" and saved.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(saved["cuda_rng"])
    run.state = RunState(step=saved["step"], loss_sum=saved["loss_sum"], loss_count=saved["loss_count"],
                         train_time=saved["train_time"])
    if run.dist.main:  # drop evaluations written after the checkpoint
        rows = read_metrics(run.metrics_path, up_to_step=run.state.step)
        run.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run.log(f"resumed {ckpt_dir} at step {run.state.step}")


def load_optimizer_state(run: Run, saved: dict) -> None:
    """The optimizer state of a checkpoint: whole tensors keyed by parameter name (get_optimizer_state_dict),
    which a sharded or a plain optimizer takes alike; checkpoints written before are keyed by position."""
    if saved["param_groups"] and isinstance(saved["param_groups"][0]["params"][0], int):
        if run.sharded:
            raise CheckpointError("this checkpoint predates --fsdp (its optimizer state is keyed by position): "
                                  "resume it once without --fsdp")
        run.optimizer.load_state_dict(saved)
        return
    set_optimizer_state_dict(run.model, run.optimizer, saved, options=StateDictOptions(full_state_dict=True))


def calibrate_tau(run: Run, message: str, step: int = 0) -> None:
    """Set tau from one training batch of its own generator (the same batch on every rank: the same tau). The
    batch depends on the seed and ``step`` alone, not on the sampler's state: adaptive tau (--recalibrate-tau-every)
    leaves the training batches those of the run without it, and a resumed run recalibrates on the same batch."""
    gen = torch.Generator().manual_seed(run.tc.seed + 2 + step)
    starts = run.dataset.starts("train", run.tc.batch_size, run.model.config.block_size, gen)
    x, _, doc_ids = read_batch(run.dataset, "train", starts, run.tc, run.device)
    run.log(f"{message}: {run.model.calibrate_tau(x, doc_ids):.4f}")


def log_model(run: Run) -> None:
    """The run's header line: the model's size and shape, the device, the ranks; with context parallel, the
    bytes its exchange sends."""
    mc, dist = run.model.config, run.dist
    total, embedding = run.model.num_params(), run.model.num_embedding_params()
    ranks = f", {dist.world} ranks ({'FSDP' if run.sharded else 'DDP'}" if dist.world > 1 else ""
    if ranks and dist.context is not None:
        ranks += f", context parallel over {dist.cp_size} × data parallel over {dist.dp_world}"
    run.log(f"{run.label}: {total / 1e6:.2f}M parameters ({(total - embedding) / 1e6:.2f}M in the blocks, "
            f"{embedding / 1e6:.2f}M in the embedding and lm head of {mc.vocab_size} tokens), {mc.n_layer} layers, "
            f"{mc.n_head} heads ({mc.n_kv_head} kv) of {mc.head_dim}, context {mc.block_size}, device {run.device}"
            + (ranks + ")" if ranks else ""))
    if dist.context is not None:
        sent = context_parallel_bytes(run)
        run.log(f"context parallel: each rank sends {sent['lambda_v'] / 1e6:.3f} MB per layer and step (λk and V, "
                f"forward and backward), a K/V exchange would send {sent['k_v'] / 1e6:.3f} MB "
                f"({100 * sent['ratio']:.1f} %)")


def context_parallel_bytes(run: Run) -> dict:
    """tauformer_kernels.context_parallel.exchange_bytes for this run's step (its micro-batches; V in bf16
    under the GPU's autocast)."""
    mc, tc = run.model.config, run.tc
    return exchange_bytes(batch=tc.batch_size * tc.grad_accum, kv_heads=mc.n_kv_head, seq_len=mc.block_size,
                          head_dim=mc.head_dim, v_dim=mc.head_dim, world=run.dist.cp_size,
                          v_itemsize=2 if run.device.type == "cuda" else 4)


def shard_model(run: Run) -> None:
    """FSDP2: each block one unit, the rest (embedding, head, a learned Laplacian's edge weights) the root's;
    each rank keeps a shard of every parameter (tau and temperatures included). Buffers (the Laplacian, a
    fixed tau) stay whole on every rank, as they are small."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(run.device.type, (run.dist.world,))
    for block in run.model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(run.model, mesh=mesh)


def wrap_model(run: Run) -> None:
    """The model as the steps call it: under DDP with several ranks (FSDP: already sharded), then
    torch.compile'd with --compile."""
    run.wrapped = run.model
    if run.dist.world > 1 and not run.sharded:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [run.device.index] if run.device.type == "cuda" else None
        run.wrapped = DistributedDataParallel(run.model, device_ids=device_ids)
    run.fwd = torch.compile(run.wrapped) if run.tc.compile else run.wrapped


def train_loop(run: Run) -> str:
    """Step to max_steps (or stop_at, or Ctrl-C), evaluating and checkpointing on schedule, and
    checkpoint where it stops; returns why it stopped: "done", "stop_at" or "interrupted"."""
    tc, state = run.tc, run.state
    end_step = tc.max_steps if tc.stop_at is None else min(tc.max_steps, tc.stop_at)
    tokens_per_step = tc.batch_size * tc.grad_accum * run.dist.dp_world * run.model.config.block_size
    stopped = "done"
    with ctrl_c_flag() as interrupted:
        progress = Progress(tc.max_steps, state.step, run.label, run.log) if tc.progress and run.dist.main else None
        try:
            run.model.train()
            while state.step < end_step:
                if run.dist.all_sum([float(interrupted.is_set())])[0] > 0:  # every rank stops at the same step
                    stopped = "interrupted"
                    break
                every = tc.recalibrate_tau_every
                # at the start of the step after every N-th, so that the checkpoint and evaluation of step N see
                # the tau it trained with, and a run resumed at step N recalibrates just as the unbroken one
                if every and state.step and state.step % every == 0:
                    calibrate_tau(run, f"step {state.step}: tau recalibrated", state.step)
                t0 = time.perf_counter()
                loss = train_step(run)
                state.count_step(loss, time.perf_counter() - t0, tokens_per_step)
                if progress is not None:
                    progress.update(state.step, loss, state.tokens_per_s)
                if state.step % tc.eval_every == 0 or state.step == tc.max_steps:
                    evaluate_and_log(run)
                if state.step % tc.checkpoint_every == 0 or state.step == tc.max_steps:
                    save(run)
            if state.step == end_step and state.step < tc.max_steps:
                stopped = "stop_at"
            if stopped != "done" and state.step % tc.checkpoint_every:  # else the loop saved this step
                save(run)
            if stopped == "interrupted":
                run.log(f"interrupted: checkpoint saved at step {state.step} in {run.out / 'checkpoint'}; "
                        "continue with --resume")
        finally:
            if progress is not None:
                progress.close()
    return stopped


@contextlib.contextmanager
def ctrl_c_flag():
    """An Event that Ctrl-C sets (a second Ctrl-C raises KeyboardInterrupt): the loop checks it between
    steps, so a step is never half-applied. Only the main thread can take signals; elsewhere it stays clear."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted
        return

    def on_sigint(signum, frame):
        if interrupted.is_set():
            raise KeyboardInterrupt
        interrupted.set()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield interrupted
    finally:
        if previous is not None:  # None: the previous handler was not set from Python
            signal.signal(signal.SIGINT, previous)


def train_step(run: Run) -> float:
    """One optimizer step on this step's global batch; returns its mean loss over all ranks. Raises
    NonFiniteLoss before a non-finite loss, gradient norm or parameter can reach a checkpoint."""
    tc, dist, step, block = run.tc, run.dist, run.state.step, run.model.config.block_size
    for group in run.optimizer.param_groups:
        group["lr"] = tc.learning_rate(step)
    cp = dist.context
    # alike on every rank; the ranks of a context-parallel group read the same windows
    starts = run.dataset.starts("train", tc.batch_size * tc.grad_accum * dist.dp_world, block, run.data_gen)
    local_loss = 0.0
    for micro in range(tc.grad_accum):
        first = (dist.dp_rank * tc.grad_accum + micro) * tc.batch_size
        x, y, doc_ids = read_batch(run.dataset, "train", starts[first:first + tc.batch_size], tc, run.device)
        if cp is not None:
            x, y = cp.shard(x, 1), cp.shard(y, 1)
        sync = dist.world == 1 or micro + 1 == tc.grad_accum  # gradients reduced on the last micro-batch only
        if run.sharded:
            run.model.set_requires_gradient_sync(sync)
        with (contextlib.nullcontext() if sync or run.sharded else run.wrapped.no_sync()), run.autocast():
            loss = run.fwd(x, y, doc_ids=doc_ids, context_parallel=cp)
        (loss / tc.grad_accum).backward()
        local_loss += float(loss.detach())
    # every rank's loss is the mean over as many tokens (its share of its windows): the mean of the means
    loss_value = dist.all_sum([local_loss])[0] / (tc.grad_accum * dist.world)
    # the norm is needed to clip; with clipping off, max_norm = inf only measures it
    norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf"))
    grad_norm = float(norm.full_tensor() if run.sharded else norm)  # FSDP: a DTensor
    for what, value in (("training loss", loss_value), ("gradient norm", grad_norm)):
        if not math.isfinite(value):
            raise NonFiniteLoss(divergence_message(run, f"non-finite {what} ({value})", step + 1))
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    broken = broken_parameters(run.model, dist.all_sum if run.sharded else None)
    if broken:
        raise NonFiniteLoss(divergence_message(run, f"the update made {broken}", step + 1))
    return loss_value


def divergence_message(run: Run, what: str, at_step: int) -> str:
    last = find_checkpoint(run.out)
    kept = f"the last good checkpoint is kept: {last}" if last else "no checkpoint had been written"
    return f"{what} at step {at_step}; stopping ({kept}). Try a lower --lr or --grad-clip."


def evaluate_and_log(run: Run) -> None:
    """Evaluate now: a row appended to metrics.jsonl (loss.png redrawn) and a line printed; then the
    train-loss and throughput counters restart. The step-0 evaluation, before training, has neither."""
    st = run.state
    val_loss = evaluate(run.fwd, run.dataset, run.tc, run.device, run.autocast, run.dist)
    row = {"step": st.step, "train_loss": st.loss_sum / st.loss_count if st.loss_count else None,
           "val_loss": val_loss, "tokens_per_s": round(st.tokens_per_s, 1) if st.step else None,
           "train_time_s": round(st.train_time, 3), "lr": run.tc.learning_rate(max(st.step - 1, 0)), "label": run.label,
           "tau": current_tau(run.model)}
    if run.dist.main:
        with run.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        write_plot(run.out, read_metrics(run.metrics_path))
    if st.step == 0:
        run.log(f"step 0: val {val_loss:.4f}")
    else:
        run.log(f"step {st.step}: train {row['train_loss']:.4f} val {val_loss:.4f} "
                f"tokens/s {st.tokens_per_s:.0f} time {st.train_time:.0f}s")
    st.loss_sum, st.loss_count, st.interval_tokens, st.interval_time = 0.0, 0, 0, 0.0


def current_tau(model: TauGPT) -> float | None:
    """The tau of the first taumode layer (the mean over its kv heads; calibration gives every layer and head the
    same one), or None where no calibrated tau exists (dot product only, a per-vector tau rule)."""
    if model.config.tau_rule != "calibrated":
        return None
    for block in model.blocks:
        if isinstance(block.attn, TaumodeAttention):
            log_tau = block.attn.log_tau.detach()
            log_tau = log_tau.full_tensor() if hasattr(log_tau, "full_tensor") else log_tau  # FSDP: a DTensor
            return float(log_tau.float().exp().mean())
    return None


def save(run: Run) -> None:
    """Checkpoint the run: every rank takes part in gathering the full weights and optimizer state (FSDP: from
    the shards) to rank 0, which writes them (atomically, see checkpoint.py); every rank waits for it."""
    weights = get_model_state_dict(run.model, options=FULL_STATE) if run.sharded else None
    state = checkpoint_state(run)
    if run.dist.main:
        save_checkpoint(run.out, run.model, state, run.dataset.tokenizer, weights=weights)
    run.dist.barrier()


def checkpoint_state(run: Run) -> dict:
    """Everything but the weights that --resume needs to continue exactly (state.pt)."""
    st = run.state
    optimizer = get_optimizer_state_dict(run.model, run.optimizer, options=FULL_STATE)  # keyed by name
    return {"step": st.step, "optimizer": optimizer, "data_rng": run.data_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None,
            "loss_sum": st.loss_sum, "loss_count": st.loss_count, "train_time": st.train_time,
            "train_config": train_config_to_dict(run.tc), "model_config": run.model.config.to_dict()}


# Parameters and buffers held in log space (by name suffix): the model uses exp of them, which is 0 or inf for
# finite logs past fp32's range (a diverged --lr 1e3 run drove a temperature to exactly 0).
LOG_SCALES = ("log_temperature", "log_tau")


def broken_parameters(model: torch.nn.Module, all_sum: Callable | None = None) -> str | None:
    """What the last update broke, or None: parameters that are not finite, or a temperature or tau (exp of
    its log, as the model computes it) that is 0 or not finite. One device-to-host read for all of them.
    Sharded parameters (FSDP): each rank checks its shards and ``all_sum`` (Dist.all_sum) joins the verdicts,
    so every rank stops at the same step."""
    params = [(name, _local(t)) for name, t in model.named_parameters()]
    scales = [(name, t) for name, t in (*params, *model.named_buffers()) if name.endswith(LOG_SCALES)]
    norms = torch._foreach_norm([t.detach() for _, t in params])  # inf only for values past ~1e38
    exps = [t.detach().float().exp() for _, t in scales]
    ok = torch.stack([torch.isfinite(n) for n in norms] + [(torch.isfinite(e) & (e > 0)).all() for e in exps]).tolist()
    if all_sum is not None:
        ok = [bad == 0 for bad in all_sum([float(not good) for good in ok])]
    bad = [name for (name, _), good in zip(params + scales, ok) if not good]
    if not bad:
        return None
    named = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    if all(good for good in ok[:len(params)]):
        return f"a temperature or tau 0 or non-finite (exp of {named} under- or overflowed)"
    return f"parameters non-finite ({named})"


def _local(t: torch.Tensor) -> torch.Tensor:
    """A sharded parameter's shard on this rank (a DTensor's local tensor); others as they are."""
    return t.to_local() if hasattr(t, "to_local") else t


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
    "tau_rule": (str, "taumode: 'calibrated' (one tau per kv head) or the reference crate's per-vector "
                      "'vector-median' / 'vector-mean'", TAU_RULES),
    "learn_laplacian": (bool, "taumode: learn the Laplacian's edge weights (kept >= 0: L stays a Laplacian)"),
    "lambda_term": (bool, "taumode: --no-lambda-term is the recency-only control (λq = λk = 0)"),
    "output_gate": (bool, "scale each head's attention output by a learned sigmoid gate of the block's input"),
    "dot_every": (nonnegative_int, "taumode: hybrid stack, the last of every N layers is dot-product (0: none)"),
    "lambda_slices": (positive_int, "taumode: m λ per head from m slices of it (eager PyTorch; 1: the kernels)"),
    "laplacian": (laplacian_spec,
                  "'chain' or a Laplacian file (python -m tauformer_model.laplacian_cli, or an F×F .npy)"),
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
    "grad_accum": (positive_int,
                   "micro-batches per step and rank; a step trains on batch_size × grad_accum × ranks sequences"),
    "eval_every": (positive_int, "evaluate the val loss every N steps"),
    "eval_batches": (positive_int, "batches per evaluation"),
    "checkpoint_every": (positive_int, "write a checkpoint every N steps"),
    "seed": (int, "seed of the initialisation and of the batch sampler"),
    "device": (str, "'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ..."),
    "threads": (positive_int, "torch.set_num_threads (CPU)"),
    "recalibrate_tau_every": (nonnegative_int, "adaptive tau: recalibrate tau (median E of layer-0 keys over a "
                                                "training batch) after every N steps (0: only at the start)"),
    "pack_documents": (bool, "attention never crosses a document (a file of the corpus) inside a training window; "
                             "RoPE positions restart at each document"),
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
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the model over the ranks (FSDP2) instead of replicating it (DDP)")
    p.add_argument("--context-parallel", type=positive_int, default=1, metavar="C",
                   help="under torchrun: split each window over C ranks (taumode layers; the ranks form groups of "
                        "C, data parallel between the groups)")
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
    # how the run is spread over ranks is chosen anew at each start, as the number of ranks is
    train_fields.update(out=out, compile=args.compile, fsdp=args.fsdp, context_parallel=args.context_parallel,
                        resume=args.resume,
                        recalibrate_tau=args.recalibrate_tau, progress=not args.no_progress)
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"model"}
    resolve_device(train_fields.get("device", "auto"))  # a GPU this machine lacks fails here, not in the run
    model = TauGPTConfig.from_dict(model_fields)
    if model.attention == "taumode" and model.laplacian != "chain" and not found:
        load_laplacian(model.laplacian, model.head_dim)  # a file that is not a head_dim² Laplacian fails here
    tc = TrainConfig(**{k: v for k, v in train_fields.items() if k in names}, model=model)
    check_context_parallel(tc)
    check_adaptive_tau(tc)
    return tc


def check_adaptive_tau(tc: TrainConfig) -> None:
    """--recalibrate-tau-every N needs a tau that calibration sets (ValueError otherwise)."""
    N, mc = tc.recalibrate_tau_every, tc.model
    if not N:
        return
    if mc.attention != "taumode" or mc.tau_rule != "calibrated":
        raise ValueError(f"--recalibrate-tau-every {N}: needs taumode layers with --tau-rule calibrated (got "
                         f"attention={mc.attention!r}, tau_rule={mc.tau_rule!r}: no tau to recalibrate)")
    if mc.learn_tau:  # the optimizer's moments of a learned tau would describe a value calibration replaced
        raise ValueError(f"--recalibrate-tau-every {N}: not with --learn-tau (tau is either learned or calibrated)")
    if tc.fsdp:  # calibration reads the first layer's weights outside a forward, which FSDP shards
        raise ValueError(f"--recalibrate-tau-every {N}: not with --fsdp")


def check_context_parallel(tc: TrainConfig) -> None:
    """--context-parallel C runs what tauformer_kernels.ContextParallel covers (ValueError otherwise)."""
    C, mc = tc.context_parallel, tc.model
    if C == 1:
        return
    if mc.attention != "taumode" or mc.dot_every or mc.lambda_slices > 1:
        raise ValueError(f"--context-parallel {C}: taumode layers with one λ per head only (no --attention dot, "
                         "--dot-every or --lambda-slices)")
    if tc.pack_documents:
        raise ValueError(f"--context-parallel {C}: not with --pack-documents (dense windows only)")
    if tc.fsdp:
        raise ValueError(f"--context-parallel {C}: with DDP only (--fsdp together with it is untested)")
    if mc.block_size % (2 * C):
        raise ValueError(f"--context-parallel {C}: the context {mc.block_size} must split into {2 * C} equal "
                         "chunks (two per rank, for the causal load balance)")


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
    except OSError as e:  # metrics.jsonl or loss.png not written (a full disk); the checkpoint is whole
        print0(f"error: could not write {e.filename or tc.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    if summary["final_val_loss"] is None:  # not rank 0
        return 0
    at = "" if summary["val_step"] == summary["step"] else f" (the last evaluation, at step {summary['val_step']})"
    print0(f"{summary['stopped']} at step {summary['step']}: val loss {summary['final_val_loss']:.4f}{at} "
           f"(best {summary['best_val_loss']:.4f}), training time {summary['train_time_s']:.0f}s; "
           f"outputs in {tc.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
