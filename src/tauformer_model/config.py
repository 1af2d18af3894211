"""The model's configuration (a dataclass) and the named presets (plain data)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

ATTENTIONS = ("taumode", "dot")
TAU_RULES = ("calibrated", "vector-median", "vector-mean")
RECENCIES = ("none", "fixed", "learned")


@dataclass
class TauGPTConfig:
    """Shape and attention options of a TauGPT. Stored beside every checkpoint (``to_dict``)."""

    n_layer: int = 4
    n_head: int = 4
    # Key/value heads (GQA): n_head must be a multiple; query head h uses kv head h // (n_head // n_kv_head).
    n_kv_head: int = 4
    n_embd: int = 128
    vocab_size: int = 256
    # Longest sequence the training forward sees (RoPE itself has no limit; the cache takes any max_len).
    block_size: int = 256
    # "taumode": attention from Laplacian scalars (tauformer_kernels); "dot": PyTorch SDPA, the baseline.
    attention: str = "taumode"
    # Logit term -slope_h * |i - j| (ALiBi): "none" (the reference crate's model), "fixed" (ALiBi's
    # geometric slopes), "learned" (the same slopes as initial values, learned in log space), or
    # "auto": "learned" for taumode (what measures best, bench/results/model-comparison-tiny-cpu.md), "none"
    # for dot (plain SDPA).
    recency: str = "auto"
    # Initial per-head attention temperature of taumode (learned in log space). λ lies in [0, 1), so
    # temperature 1 would make attention nearly uniform (docs/math.md §Defaults); 0.1 measured best of
    # 0.01-0.1 (bench/results/model-comparison-tiny-cpu.md).
    temperature_init: float = 0.1
    # Initial tau of λ = E / (E + tau); the trainer replaces it by the median E of the first layer's
    # keys over a batch (calibrate_tau). One tau per kv head, shared by all layers.
    tau_init: float = 1.0
    learn_tau: bool = False
    # taumode only: "calibrated" (the tau above, one per kv head) or the reference crate's per-vector rule,
    # "vector-median" / "vector-mean": each q and k vector's tau is the median / mean of its own entries
    # (docs/math.md §Per-vector tau); then tau_init, learn_tau and the calibration do nothing.
    tau_rule: str = "calibrated"
    # "chain" (the path-graph Laplacian over the head dim) or the path of a file written by
    # tauformer_kernels.save_laplacian (e.g. by python -m tauformer_model.laplacian_cli).
    laplacian: str = "chain"
    eps: float = 1e-6
    # taumode only: compute λ from the un-rotated (RMS-normed) q and k, i.e. skip RoPE (the reference
    # applies RoPE first). λ then carries no position; order comes from the causal mask and recency.
    lambda_before_rope: bool = False
    # taumode only: learn the edge weights of the given graph (in log space, from the given weights), so
    # L = D − W stays a graph Laplacian (W ≥ 0 on the given edges only), shared by all heads and layers.
    learn_laplacian: bool = False
    # taumode only, a control: False drops the λ term (λq = λk = 0), leaving causal attention weighted by
    # the recency term alone, to tell the λ term's contribution from the recency term's (docs/math.md §Model).
    # The comparison is bench/results/model-comparison-tiny-cpu.md.
    lambda_term: bool = True
    # An output gate (an option, bench/results/model-comparison-tiny-cpu.md): each head's attention output is
    # scaled by σ(x·w_h), x the block's normed input, before the output projection (w zero-initialised, so
    # the gate starts at 1/2; C·H parameters per layer). Either attention.
    output_gate: bool = False
    # taumode only, a hybrid stack: the last layer of every group of dot_every layers is dot-product
    # attention (its cache holds K and V), e.g. 4: three taumode layers, then one dot layer; 0: none.
    dot_every: int = 0
    # taumode only, more than one λ per head: m > 1 cuts each head into m slices of F/m, each with its own λ
    # (from its diagonal block of the Laplacian) and temperature (initial temperature_init·m, so the sum
    # keeps the scale); logits −Σ_r |λq_r − λk_r| / T_r. The cache holds V and m λk per kv head. Runs in
    # eager PyTorch (no kernel): full forwards and a cache of rows of one length, not packed sequences.
    lambda_slices: int = 1
    rope_base: float = 10000.0
    logit_softcap: float = 15.0
    # Kernel backend passed to tauformer_kernels ("auto", "reference", "triton", ...).
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.recency == "auto":
            self.recency = "learned" if self.attention == "taumode" else "none"
        if self.recency not in RECENCIES:
            raise ValueError(f"recency must be 'auto' or one of {RECENCIES}, got {self.recency!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.dot_every and (self.attention != "taumode" or self.dot_every < 2):
            raise ValueError(f"dot_every ({self.dot_every}) makes a taumode stack hybrid: 0, or at least 2 with "
                             f"attention='taumode' (got {self.attention!r})")
        if self.lambda_slices < 1 or self.head_dim % self.lambda_slices or (
                self.lambda_slices > 1 and (self.attention != "taumode" or self.head_dim // self.lambda_slices < 2)):
            raise ValueError(f"lambda_slices ({self.lambda_slices}) must divide the head dim {self.head_dim} into "
                             f"slices of at least 2, with attention='taumode' (got {self.attention!r})")
        if self.tau_rule not in TAU_RULES or (self.tau_rule != "calibrated" and (
                self.attention != "taumode" or self.lambda_slices > 1)):
            raise ValueError(f"tau_rule ({self.tau_rule!r}) must be one of {TAU_RULES}; a per-vector rule needs "
                             f"attention='taumode' and lambda_slices=1")
        if self.head_dim % 2:
            raise ValueError(f"head dim n_embd // n_head = {self.head_dim} must be even (RoPE)")

    def layer_attention(self, layer: int) -> str:
        """The attention of layer ``layer``: ``attention``, or "dot" for the hybrid stack's dot layers."""
        return "dot" if self.dot_every and (layer + 1) % self.dot_every == 0 else self.attention

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TauGPTConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# Presets: model fields (TauGPTConfig) and training fields (train.TrainConfig), as plain data;
# "model_<attention>" overrides "model" for that attention (flags given on the command line win).
PRESETS: dict[str, dict[str, dict]] = {
    # About 5 minutes on 2 CPU cores; the README's model section has what it reaches.
    "tiny": {
        "model": dict(n_layer=4, n_head=4, n_kv_head=4, n_embd=128, block_size=128),
        # Same width and parameter count, more heads of smaller F: one λ scalar per head carries more with
        # more heads, dot product does better with fewer (bench/results/model-comparison-tiny-cpu.md).
        "model_taumode": dict(n_head=8, n_kv_head=8),
        "train": dict(batch_size=32, max_steps=600, lr=3e-3, warmup_steps=30, eval_every=100,
                      eval_batches=8, checkpoint_every=200),
    },
    # tiny at a 4× longer context (512), for the loss-by-position question (does loss keep falling deeper in
    # the window?): the same model, 8 windows per step so a step is tiny's 4096 tokens, and as many val tokens
    # (8 batches of 8 windows of 512). 120 steps: a step takes 1.5 s on an idle core of an EPYC and 3.6 s on the
    # shared 2-core machine, so compare's 4 variants × 3 seeds take 40-100 minutes
    # (bench/results/loss-by-position-cpu.md).
    "tiny-512": {
        "model": dict(n_layer=4, n_head=4, n_kv_head=4, n_embd=128, block_size=512),
        "model_taumode": dict(n_head=8, n_kv_head=8),
        "train": dict(batch_size=8, max_steps=120, lr=3e-3, warmup_steps=20, eval_every=40,
                      eval_batches=8, checkpoint_every=40),
    },
    # The reference crate's 30M run: 6 layers, 6 heads of 64, context 1024, lr 5e-4, 100 warm-up steps.
    # Its 30M counts a word-piece vocabulary: the blocks are 10.6M (6 × 12 × 384²), the untied embedding and
    # lm head 2 × 384 × 25,000 = 19.2M, so 29.8M in all with a BPE of 25,000 tokens trained on the corpus.
    "30m": {
        "model": dict(n_layer=6, n_head=6, n_kv_head=6, n_embd=384, block_size=1024),
        "train": dict(tokenizer="bpe", bpe_vocab_size=25_000,
                      batch_size=32, max_steps=5000, lr=5e-4, warmup_steps=100, eval_every=250,
                      eval_batches=20, checkpoint_every=500),
    },
    # For tests and smoke runs: seconds on a CPU.
    "micro": {
        "model": dict(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, block_size=32),
        "train": dict(batch_size=4, max_steps=8, lr=3e-3, warmup_steps=2, eval_every=2,
                      eval_batches=2, checkpoint_every=4),
    },
}
