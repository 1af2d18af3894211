"""tauformer_kernels: taumode attention (attention from Laplacian-compressed scalars) for PyTorch.

Public API:
    taumode_lambda, taumode_attention, taumode_attention_from_lambda   (also torch.ops.tauformer.*)
    paged_attention_from_lambda   (keys in a paged (V, λk) cache through a block table, as vLLM keeps them)
    chain_laplacian, knn_laplacian, arrowspace_laplacian, save_laplacian, load_laplacian, validate_laplacian
    vector_tau, TAU_RULES   (the reference crate's per-vector tau: tau="vector-median" / "vector-mean")
    SortedCache   (exact decode in O(log T)-ish blocks per step)
    ContextParallel, context_parallel_attention, context_parallel_taumode_attention   (a sequence over ranks)
    BACKENDS
"""
from .api import taumode_attention, taumode_attention_from_lambda, taumode_lambda
from .backends import BACKENDS
from .context_parallel import ContextParallel, context_parallel_attention, context_parallel_taumode_attention
from .laplacian import (
    arrowspace_laplacian,
    chain_laplacian,
    knn_laplacian,
    load_laplacian,
    save_laplacian,
    validate_laplacian,
)
from .paged import paged_attention_from_lambda
from .reference import TAU_RULES, vector_tau
from .sorted_cache import SortedCache

__all__ = [
    "BACKENDS",
    "ContextParallel",
    "SortedCache",
    "TAU_RULES",
    "arrowspace_laplacian",
    "chain_laplacian",
    "context_parallel_attention",
    "context_parallel_taumode_attention",
    "knn_laplacian",
    "load_laplacian",
    "paged_attention_from_lambda",
    "save_laplacian",
    "taumode_attention",
    "taumode_attention_from_lambda",
    "taumode_lambda",
    "validate_laplacian",
    "vector_tau",
]
__version__ = "0.1.0"
