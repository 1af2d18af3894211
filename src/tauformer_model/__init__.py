"""TauGPT: a small GPT on taumode attention (tauformer_kernels), with its (V, λk) cache, training and generation."""

from .config import PRESETS, TauGPTConfig
from .model import KVCache, TauGPT

__all__ = ["TauGPT", "TauGPTConfig", "KVCache", "PRESETS"]
