"""Taumode attention inside Hugging Face transformers (5.x): ``pip install "tauformer[hf]"``.

Importing this module registers the attention implementation "taumode" (and its mask function) with
transformers. Then

    model = AutoModelForCausalLM.from_config(LlamaConfig(...))   # random init: taumode is trained from scratch
    enable_taumode(model)                                        # per-head temperature, tau, slopes, Laplacian
    ... train ...; model.generate(...)                           # keeps (V, λk) per layer, not (K, V)
    model.save_pretrained(path); model = load_taumode(path)

What happens where (docs/math.md has the math):
  taumode_attention_forward   the function transformers calls in each attention module, after q/k/v
                              projections and RoPE: weightless RMS norm of q and k, λ, the taumode kernels.
                              Padding masks become packed sequences (left / right padding, no holes), and
                              so do the cu_seq_lens of padding-free collators and restarting position_ids.
  TaumodeCache / TaumodeLayer a Cache whose layers turn each new key into its λ when the attention writes it,
                              so a layer holds V and one fp32 scalar per key and head: (F + 1) / 2F of the
                              bytes of (K, V) in fp32. enable_taumode makes `generate` use it by default.
  TauGPTHFConfig / TauGPTForCausalLM
                              this package's TauGPT as a transformers model (Auto classes "taugpt"), loading
                              its training checkpoints (`from_checkpoint`) and its own save_pretrained output.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import math
import os
import pathlib
import sys
import types

import torch
import torch.nn as nn


def _import_the_installed_kernels_package() -> None:
    """transformers 5.25 imports Hugging Face's `kernels` package. A process started in this repository's
    root (``python -m ...`` puts it first on sys.path) would find the repository's own top-level kernels/
    folder under that name instead (this package's Triton sources, installed as tauformer_kernels.kernels)
    and transformers would fail to import. Import the installed one first, skipping the root."""
    from tauformer_kernels import kernels as triton_sources

    if "kernels" in sys.modules:
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(triton_sources.__file__)))
    spec = importlib.machinery.PathFinder.find_spec("kernels", [p for p in sys.path if os.path.abspath(p or ".") != root])
    if spec is not None:
        module = importlib.util.module_from_spec(spec)
        sys.modules["kernels"] = module
        spec.loader.exec_module(module)


_import_the_installed_kernels_package()
try:
    import transformers
    from transformers import (AttentionInterface, AutoConfig, AutoModelForCausalLM, GenerationMixin,
                              PretrainedConfig, PreTrainedModel)
    from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError as e:  # the package itself needs no transformers
    raise ImportError("tauformer_model.hf needs Hugging Face transformers 5.4 or later: "
                      "pip install \"tauformer[hf]\"") from e

import tauformer_kernels as tk

from .config import RECENCIES, TauGPTConfig
from .model import TauGPT, alibi_slopes, build_laplacian, heads, key_energy, rms_norm, tokens

NAME = "taumode"
# The cache's keyword: "past_key_values" until transformers 5.2x renamed it "cache" (the old name still works)
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
CACHE_NAMES = ("cache", "past_key_values")
# The mask function's keyword calling convention and the Cache layers it relies on: tested 5.4 to 5.25
if tuple(int(n) for n in transformers.__version__.split(".")[:2]) < (5, 4):
    raise ImportError(f"tauformer_model.hf needs transformers 5.4 or later, found {transformers.__version__}")


# ---------------------------------------------------------------------------------------------------------
# The per-module taumode parameters
# ---------------------------------------------------------------------------------------------------------

class TaumodeParams(nn.Module):
    """What one attention module of a transformers model gains from enable_taumode (saved with its weights):
    log_temperature (H,), log_tau (Hkv,: a buffer unless learned), log_slopes (H,: the recency term
    -slope·|i - j|, a parameter when "learned", a buffer when "fixed", absent with "none") and its own copy of
    the (F, F) Laplacian (a copy per layer: safetensors stores no shared tensors)."""

    lambda_term = True  # TauGPT's recency-only control has it False (see TauGPTForCausalLM)
    normalize_qk = True  # taumode takes q and k after a weightless RMS norm; TauGPT's projection does it itself

    def __init__(self, n_head: int, n_kv_head: int, laplacian: torch.Tensor, *, temperature_init: float,
                 tau_init: float, learn_tau: bool, recency: str, eps: float, backend: str):
        super().__init__()
        self.n_head, self.n_kv_head, self.eps, self.backend = n_head, n_kv_head, eps, backend
        self.log_temperature = nn.Parameter(torch.full((n_head,), math.log(temperature_init)))
        log_tau = torch.full((n_kv_head,), math.log(tau_init))
        if learn_tau:
            self.log_tau = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_tau", log_tau)
        if recency == "learned":
            self.log_slopes = nn.Parameter(alibi_slopes(n_head).log())
        elif recency == "fixed":
            self.register_buffer("log_slopes", alibi_slopes(n_head).log())
        else:
            self.log_slopes = None
        self.register_buffer("laplacian", laplacian.detach().to(torch.float32).clone())

    def attention_laplacian(self) -> torch.Tensor:
        return self.laplacian

    def tau(self) -> torch.Tensor:
        return self.log_tau.float().exp()

    def temperature(self) -> torch.Tensor:
        return self.log_temperature.float().exp()

    def slopes(self) -> torch.Tensor | None:
        return None if self.log_slopes is None else self.log_slopes.float().exp()


class _TauGPTParams:
    """The same interface over a TauGPT attention module (its parameters stay where TauGPT keeps them)."""

    def __init__(self, attn, model: TauGPT):
        self.attn, self.model = attn, model
        self.n_head, self.n_kv_head = attn.n_head, attn.n_kv_head
        self.eps, self.backend, self.lambda_term = model.config.eps, model.config.backend, model.config.lambda_term
        self.normalize_qk = False

    def attention_laplacian(self):
        return self.model.attention_laplacian()

    def tau(self):
        return self.attn.log_tau.float().exp()

    def temperature(self):
        return self.attn.log_temperature.float().exp()

    def slopes(self):
        return self.attn.slopes()


def _normed(params, x: torch.Tensor) -> torch.Tensor:
    return rms_norm(x) if params.normalize_qk else x


def key_lambda(params, key: torch.Tensor) -> torch.Tensor:
    """λ of keys (B, Hkv, T, F) after RoPE: (B, Hkv, T) fp32 (zeros for the recency-only control)."""
    if not params.lambda_term:
        return key.new_zeros(key.shape[:3], dtype=torch.float32)
    return tk.taumode_lambda(_normed(params, key), params.attention_laplacian(), tau=params.tau(), eps=params.eps,
                             backend=params.backend)


# ---------------------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------------------

class TaumodeLayer(DynamicLayer):
    """A DynamicLayer that stores λk (B, Hkv, T, 1) in fp32 as its "keys" and V as its values: `update` turns
    each new key into its λ with the layer's parameters. Cropping, beam reordering and batch selection are
    DynamicLayer's (they slice the token dim, which both tensors share)."""

    def __init__(self, params):
        super().__init__()
        self.params = params

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)  # here key_states are λk (fp32)
        self.values = self.values.to(value_states.dtype)

    def update(self, key_states, value_states, *args, **kwargs):
        return super().update(key_lambda(self.params, key_states)[..., None], value_states)


class TaumodeCache(DynamicCache):
    """The (V, λk) cache of a taumode model: ``TaumodeCache(model)``, one TaumodeLayer per attention layer.
    `generate` on a model that went through enable_taumode makes one itself; pass one as the `cache` (`past_key_values` before transformers 5.2x)
    for a decode loop of your own."""

    def __init__(self, model):
        Cache.__init__(self, layers=[TaumodeLayer(p) for p in _taumode_params(model)])

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached tensors, all layers."""
        return sum(t.nbytes for layer in self.layers if layer.is_initialized for t in (layer.keys, layer.values))


def _taumode_params(model) -> list:
    if isinstance(model, TauGPTForCausalLM):
        return model.attention_params()
    found = [m.taumode for m in _attention_modules(model) if isinstance(getattr(m, "taumode", None), TaumodeParams)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no taumode attention: call enable_taumode(model) first")
    return found


# ---------------------------------------------------------------------------------------------------------
# The attention function transformers calls
# ---------------------------------------------------------------------------------------------------------

def _mask_segments(attention_mask: torch.Tensor, Tq: int, Tk: int):
    """The packing of a (B, Tk) padding mask whose rows are 0^p 1^n 0^r (left and/or right padding): row b is
    three sequences (its left padding, its real tokens, its right padding), each attended to as if alone, so
    a left-padded row gives what its prompt gives alone. The padding's outputs are discarded by the model.
    Device ops only; the offsets are checked on the host outside torch.compile."""
    if attention_mask.dim() != 2 or attention_mask.shape[1] != Tk:
        raise ValueError(f"taumode attention takes a 2D padding mask (batch, {Tk} keys); got attention_mask of "
                         f"shape {tuple(attention_mask.shape)} (a 4D or custom mask is not supported)")
    m = attention_mask.to(torch.int32)
    B = m.shape[0]
    if not torch.compiler.is_compiling():
        runs = (m.diff(dim=1) == 1).sum(1) + m[:, 0]  # starts of runs of real tokens
        if bool((runs > 1).any()):
            raise ValueError("attention_mask has padding between real tokens; taumode attention takes left or "
                             "right padding only (for generate, pad on the left: tokenizer.padding_side='left')")
    n = m.sum(1)
    first = torch.where(n > 0, m.argmax(1), Tk)
    key_bounds = torch.stack([torch.zeros_like(first), first, first + n], 1)  # (B, 3) sequence starts in a row
    query_bounds = (key_bounds - (Tk - Tq)).clamp(0, Tq)  # query i stands at key Tk - Tq + i
    rows = torch.arange(B, device=m.device)[:, None]
    cu_q = torch.cat([(query_bounds + rows * Tq).flatten(), query_bounds.new_full((1,), B * Tq)])
    cu_k = torch.cat([(key_bounds + rows * Tk).flatten(), key_bounds.new_full((1,), B * Tk)])
    return cu_q.to(torch.int32), cu_k.to(torch.int32), Tq, Tk  # the maxima are bounds: nothing is read back


def _position_segments(position_ids: torch.Tensor, B: int, T: int):
    """Packed documents marked by restarting position_ids (padding-free collators without cu_seq_lens): a token
    starts a sequence when its position is not its left neighbour's + 1. None when no row restarts. Eager only
    (it reads the positions on the host)."""
    pos = position_ids.expand(B, T).detach().cpu()
    first = torch.ones(B, T, dtype=torch.bool)
    first[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    first = first.flatten()
    if int(first.sum()) == B:
        return None
    cu = torch.cat([torch.arange(B * T)[first], torch.tensor([B * T])]).to(torch.int32)
    longest = int(cu.diff().max())
    return cu.to(position_ids.device), cu.to(position_ids.device), longest, longest


def _packing(query, key, attention_mask, position_ids, kwargs):
    """(cu_q, cu_k, max_q, max_k) of this call, or None for the dense causal path."""
    B, _, Tq, _ = query.shape
    Tk = key.shape[2]
    cu_q = kwargs.get("cu_seq_lens_q")
    if cu_q is not None:  # padding-free collators (DataCollatorWithFlattening(return_flash_attn_kwargs=True))
        if B != 1 or attention_mask is not None:
            raise ValueError("cu_seq_lens_q/k describe one flattened row (batch 1, no attention_mask); got batch "
                             f"{B}" + (" and an attention_mask" if attention_mask is not None else ""))
        cu_k = kwargs.get("cu_seq_lens_k")
        cu_k = cu_q if cu_k is None else cu_k
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        max_q = Tq if max_q is None else int(max_q)
        return cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, Tk if max_k is None else int(max_k)
    if attention_mask is None and (position_ids is None or Tq != Tk):
        return None
    if torch.compiler.is_compiling():  # no host reads: position_ids are not looked at (pass cu_seq_lens_*)
        return None if attention_mask is None else _mask_segments(attention_mask, Tq, Tk)
    # Eager: every layer of a forward sees the same mask and positions; their host reads are made once
    # (the tensors are held, so their ids stay theirs; _version changes when one is written in place)
    tensors = (attention_mask, position_ids)
    key = (Tq, Tk, B) + tuple(None if t is None else (id(t), t._version) for t in tensors)
    if _last_packing.get("key") != key:
        packing = (_mask_segments(attention_mask, Tq, Tk) if attention_mask is not None
                   else _position_segments(position_ids, B, Tq))
        _last_packing.update(key=key, tensors=tensors, packing=packing)
    return _last_packing["packing"]


_last_packing: dict = {}  # the last eager call's key, mask and positions, and their packing


def taumode_attend(params, query, key, value, attention_mask=None, position_ids=None, **kwargs) -> torch.Tensor:
    """Taumode attention of q (B, H, Tq, F) over keys (B, Hkv, Tk, F), or over their cached λ (B, Hkv, Tk, 1),
    and values (B, Hkv, Tk, Dv): (B, H, Tq, Dv). Causal, bottom-right aligned (a chunk after a cache sees
    every earlier key); the mask / packing arguments as `_packing` reads them."""
    B, H, Tq, F = query.shape
    group = H // params.n_kv_head
    lambda_keys = key.shape[-1] == 1 and F != 1
    packing = _packing(query, key, attention_mask, position_ids, kwargs)
    L, tau, temperature = params.attention_laplacian(), params.tau(), params.temperature()
    kw = dict(temperature=temperature, is_causal=True, alibi_slopes=params.slopes(), backend=params.backend)
    if packing is not None:
        cu_q, cu_k, max_q, max_k = packing
        kw.update(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k)
    if not lambda_keys and params.lambda_term:  # training / no cache: the fused λ + attention op
        q, k, v = _normed(params, query), _normed(params, key), value
        if packing is None:
            return tk.taumode_attention(q, k, v, L, tau=tau, eps=params.eps, **kw)
        return heads(tk.taumode_attention(tokens(q), tokens(k), tokens(v), L, tau=tau, eps=params.eps, **kw), B)
    lam_k = key[..., 0] if lambda_keys else key_lambda(params, key)
    if params.lambda_term:
        lam_q = tk.taumode_lambda(_normed(params, query), L, tau=tau.repeat_interleave(group), eps=params.eps,
                                  backend=params.backend)
    else:
        lam_q = query.new_zeros(query.shape[:3], dtype=torch.float32)
    if packing is None:
        return tk.taumode_attention_from_lambda(lam_q, lam_k, value, **kw)
    return heads(tk.taumode_attention_from_lambda(tokens(lam_q), tokens(lam_k), tokens(value), **kw), B)


def taumode_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                              sliding_window=None, position_ids=None, **kwargs):
    """The AttentionInterface function "taumode" (transformers' calling convention): returns (output
    (B, Tq, H, Dv), None). `scaling` is unused (the logits are -|λq - λk| / temperature)."""
    params = getattr(module, "taumode", None)
    if not isinstance(params, TaumodeParams):
        raise ValueError(f"{type(module).__name__} has no taumode parameters: attn_implementation='taumode' "
                         "needs tauformer_model.hf.enable_taumode(model)")
    if dropout:
        raise ValueError(f"attention dropout {dropout}: taumode attention has none; set the config's "
                         "attention_dropout to 0")
    if sliding_window is not None and key.shape[2] > sliding_window:
        raise ValueError(f"sliding_window={sliding_window} with {key.shape[2]} keys: taumode attention has no "
                         "sliding window; build the model with config.sliding_window=None")
    if _key_energy is not None:
        _key_energy[module.layer_idx] = key_energy(rms_norm(key), params.attention_laplacian(), params.eps)
    y = taumode_attend(params, query, key, value, attention_mask, position_ids, **kwargs)
    return y.transpose(1, 2), None


_key_energy: dict | None = None  # set by calibrate_tau: layer -> E of its keys (B, Hkv, T)


def taumode_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
                 **kwargs):
    """The AttentionMaskInterface function "taumode": the 2D padding mask for the attention's last kv_length keys,
    None when it has no padding (the dense path). Under torch.compile the mask passes as it is (checking it
    would be a data-dependent branch): the packed path then runs, which gives the same attention."""
    if isinstance(q_offset, torch.Tensor) or kv_offset != 0 or kv_length != q_offset + q_length:
        # a static (preallocated) or sliding cache: its keys are not the causal prefix taumode_attend assumes
        raise ValueError(f"taumode attention needs a cache that holds exactly the past tokens (DynamicCache or "
                         f"TaumodeCache, the default); got kv_length {kv_length} for {q_length} queries at offset "
                         f"{q_offset} (a static cache: drop cache_implementation='static')")
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if not torch.compiler.is_compiling() and bool(attention_mask.all()):
        return None
    return attention_mask


AttentionInterface.register(NAME, taumode_attention_forward)
# Without its own entry, create_causal_mask would hand the attention a silent None mask.
AttentionMaskInterface.register(NAME, taumode_mask)


# ---------------------------------------------------------------------------------------------------------
# Turning a transformers model into a taumode model
# ---------------------------------------------------------------------------------------------------------

def _attention_modules(model) -> list[nn.Module]:
    """The model's self-attention modules, by layer: the modules with a layer_idx and q/k/v projections."""
    found = [m for m in model.modules()
             if isinstance(getattr(m, "layer_idx", None), int) and all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj"))]
    return sorted(found, key=lambda m: m.layer_idx)


def enable_taumode(model, *, laplacian: str | torch.Tensor = "chain", temperature_init: float = 0.1,
                   tau_init: float = 1.0, learn_tau: bool = False, recency: str = "learned", eps: float = 1e-6,
                   backend: str = "auto"):
    """Turn a causal LM of transformers (one whose attention goes through its AttentionInterface: Llama,
    Qwen2, Mistral, ...) into a taumode model, in place; returns it.

    Each attention module gains a TaumodeParams (`.taumode`): per-head temperature (initial
    temperature_init), per-kv-head tau (tau_init; see calibrate_tau), recency slopes (recency "learned",
    "fixed" or "none", as TauGPT's) and the (F, F) Laplacian ("chain", a file written by
    tauformer_kernels.save_laplacian, or a tensor). The settings go into config.taumode (so save_pretrained
    writes them and load_taumode rebuilds the model), the attention implementation becomes "taumode", and
    `generate` keeps a TaumodeCache. The q/k/v weights stay as they are: taumode is trained from scratch.
    """
    if not getattr(model, "_supports_attention_backend", False):
        raise ValueError(f"{type(model).__name__} does not route its attention through transformers' "
                         "AttentionInterface, so attn_implementation='taumode' cannot reach it")
    if recency not in RECENCIES:
        raise ValueError(f"recency must be one of {RECENCIES}, got {recency!r}")
    if not temperature_init > 0 or not tau_init > 0:
        raise ValueError(f"temperature_init and tau_init must be > 0, got {temperature_init}, {tau_init}")
    config = model.config.get_text_config(decoder=True)
    modules = _attention_modules(model)
    if len(modules) != config.num_hidden_layers:
        raise ValueError(f"found {len(modules)} attention modules with q/k/v projections in "
                         f"{type(model).__name__}, its config has {config.num_hidden_layers} layers")
    if getattr(config, "attention_dropout", 0.0):
        raise ValueError(f"config.attention_dropout={config.attention_dropout}: taumode attention has no dropout")
    H, Hkv = config.num_attention_heads, config.num_key_value_heads
    F = modules[0].head_dim
    L = laplacian if isinstance(laplacian, torch.Tensor) else build_laplacian(laplacian, F)
    if tuple(L.shape) != (F, F):
        raise ValueError(f"laplacian has shape {tuple(L.shape)}; the head dim needs ({F}, {F})")
    ref = next(model.parameters())
    for m in modules:
        m.taumode = TaumodeParams(H, Hkv, L, temperature_init=temperature_init, tau_init=tau_init,
                                  learn_tau=learn_tau, recency=recency, eps=eps, backend=backend).to(ref.device)
    model.config.taumode = dict(laplacian=laplacian if isinstance(laplacian, str) else "tensor",
                                temperature_init=temperature_init, tau_init=tau_init, learn_tau=learn_tau,
                                recency=recency, eps=eps, backend=backend)
    model.set_attn_implementation(NAME)
    _use_taumode_cache(model)
    return model


def _use_taumode_cache(model) -> None:
    """Make `generate` start from a TaumodeCache where it would make a DynamicCache (a cache the user passes
    is kept: a DynamicCache still works, λk is then computed from its full keys each step)."""
    prepare = model._prepare_cache_for_generation

    def prepare_taumode_cache(self, generation_config, model_kwargs, *args, **kwargs):
        result = prepare(generation_config, model_kwargs, *args, **kwargs)
        _swap_default_cache(self, model_kwargs)
        return result

    model._prepare_cache_for_generation = types.MethodType(prepare_taumode_cache, model)


def _swap_default_cache(model, model_kwargs: dict) -> None:
    for name in CACHE_NAMES:
        cache = model_kwargs.get(name)
        if type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False):
            model_kwargs[name] = TaumodeCache(model)


@torch.no_grad()
def calibrate_tau(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[float]:
    """Set each layer's tau to the median E (xᵀLx / xᵀx, of the RMS-normed keys after RoPE) of the keys that
    layer sees over a batch, as TauGPT's trainer does with its first layer (here each layer its own);
    returns the taus."""
    global _key_energy
    _key_energy = {}
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        energies = _key_energy
    finally:
        _key_energy = None
    taus = []
    for m in _attention_modules(model):
        e = energies[m.layer_idx]
        if attention_mask is not None:  # the real tokens' keys only
            e = e.transpose(1, 2)[attention_mask.bool()]
        tau = float(e.median().clamp_min(1e-4))
        m.taumode.log_tau.fill_(math.log(tau))
        taus.append(tau)
    return taus


def load_taumode(path, **kwargs):
    """A taumode model saved by save_pretrained: the base model (AutoModelForCausalLM.from_pretrained(path,
    **kwargs)), enable_taumode with the settings in its config.taumode, then the taumode tensors (temperature,
    tau, slopes, Laplacian of every layer) from the saved weights."""
    path = pathlib.Path(path)
    config = AutoConfig.from_pretrained(path)
    settings = getattr(config, "taumode", None)
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: its config.json has no 'taumode' entry (not saved from a model that went "
                         "through enable_taumode)")
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    # the Laplacian is read back from the weights: the file it was built from need not exist here
    enable_taumode(model, **{**settings, "laplacian": "chain"})
    model.config.taumode = dict(settings)
    wanted = {name for name in model.state_dict() if ".taumode." in name}
    tensors = {name: t for name, t in _saved_tensors(path).items() if name in wanted}
    if wanted - set(tensors):
        raise ValueError(f"{path}: the saved weights lack taumode tensors {sorted(wanted - set(tensors))[:4]}")
    model.load_state_dict(tensors, strict=False)
    return model


def _saved_tensors(path: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    tensors = {}
    for name in files:
        tensors.update(load_file(str(path / name)))
    return tensors


# ---------------------------------------------------------------------------------------------------------
# TauGPT as a transformers model
# ---------------------------------------------------------------------------------------------------------

class TauGPTHFConfig(PretrainedConfig):
    """The transformers config of a TauGPT (model type "taugpt"): ``taugpt`` holds the fields of
    tauformer_model.TauGPTConfig (the training config, validated here); the names transformers reads
    (num_hidden_layers, hidden_size, ...) are views of them."""

    model_type = "taugpt"
    taugpt: dict | None = None
    tie_word_embeddings: bool = False
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        self.taugpt = TauGPTConfig.from_dict(self.taugpt or {}).to_dict()
        super().__post_init__(**kwargs)

    def model_config(self) -> TauGPTConfig:
        return TauGPTConfig.from_dict(self.taugpt)

    vocab_size = property(lambda self: self.taugpt["vocab_size"])
    hidden_size = property(lambda self: self.taugpt["n_embd"])
    num_hidden_layers = property(lambda self: self.taugpt["n_layer"])
    num_attention_heads = property(lambda self: self.taugpt["n_head"])
    num_key_value_heads = property(lambda self: self.taugpt["n_kv_head"])
    max_position_embeddings = property(lambda self: self.taugpt["block_size"])
    head_dim = property(lambda self: self.taugpt["n_embd"] // self.taugpt["n_head"])


class TauGPTForCausalLM(PreTrainedModel, GenerationMixin):
    """TauGPT (tauformer_model.model) behind transformers' causal-LM interface: logits and loss as
    transformers computes them (labels shifted inside), a TaumodeCache in `generate`, padding masks and
    position_ids as for any model with attn_implementation="taumode". The weights are the TauGPT's own, under
    ``transformer.``; `from_checkpoint` reads this package's training checkpoints."""

    config_class = TauGPTHFConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"

    def __init__(self, config: TauGPTHFConfig):
        super().__init__(config)
        cfg = config.model_config()
        if cfg.attention != "taumode" or cfg.dot_every or cfg.lambda_slices > 1:
            found = ("attention='dot'" if cfg.attention != "taumode" else f"dot layers (dot_every={cfg.dot_every})"
                     if cfg.dot_every else f"lambda_slices={cfg.lambda_slices}")
            raise ValueError(f"TauGPTForCausalLM runs taumode TauGPTs with one λ per head; this config has {found}")
        placeholder = None
        if cfg.laplacian != "chain" and not pathlib.Path(cfg.laplacian).exists():
            if cfg.learn_laplacian:  # its edge count fixes a parameter's shape
                raise ValueError(f"laplacian file {cfg.laplacian!r} is not here, and learn_laplacian needs it "
                                 "to size the model")
            placeholder = tk.chain_laplacian(cfg.head_dim)  # the saved Laplacian replaces it on loading
        self.transformer = TauGPT(cfg, laplacian=placeholder)
        self.post_init()

    def _init_weights(self, module):
        pass  # TauGPT initialises its own weights (TauGPT.reset_parameters)

    @classmethod
    def from_checkpoint(cls, path, device="cpu") -> "TauGPTForCausalLM":
        """A training checkpoint of this package (a run folder or a checkpoint folder) as a transformers model."""
        from .checkpoint import load_model
        model, _ = load_model(path, device)
        hf = cls(TauGPTHFConfig(taugpt=model.config.to_dict()))
        hf.transformer = model
        return hf.to(device)

    def get_input_embeddings(self):
        return self.transformer.wte

    def get_output_embeddings(self):
        return self.transformer.lm_head

    def attention_params(self) -> list[_TauGPTParams]:
        return [_TauGPTParams(block.attn, self.transformer) for block in self.transformer.blocks]

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        result = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        _swap_default_cache(self, model_kwargs)
        return result

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                use_cache=None, labels=None, logits_to_keep=0, **kwargs):
        """transformers' causal-LM forward; the cache as `cache` or (before transformers 5.2x) `past_key_values`."""
        tf = self.transformer
        B, T = input_ids.shape
        cache = past_key_values if cache is None else cache
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = TaumodeCache(self)
        past = 0 if cache is None else cache.get_seq_length()
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device)[None]
        position_ids = position_ids.expand(B, T)
        mask = None if attention_mask is None else taumode_mask(B, T, past + T, past, attention_mask=attention_mask.bool())
        x = tf.wte(input_ids)
        for layer, (block, params) in enumerate(zip(tf.blocks, self.attention_params())):
            q, k, v = block.attn.project(rms_norm(x), position_ids)
            if cache is not None:
                k, v = cache.update(k, v, layer)
            y = taumode_attend(params, q, k, v, mask, position_ids, **kwargs)
            x = x + block.attn.output(y, rms_norm(x))
            x = x + block.mlp(rms_norm(x))
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        cap = tf.config.logit_softcap
        logits = cap * torch.tanh(tf.lm_head(rms_norm(x)).float() / cap)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})


AutoConfig.register(TauGPTHFConfig.model_type, TauGPTHFConfig)
AutoModelForCausalLM.register(TauGPTHFConfig, TauGPTForCausalLM)
