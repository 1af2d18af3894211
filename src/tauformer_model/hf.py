"""Taumode attention inside Hugging Face transformers (5.x): ``pip install "tauformer[hf]"``.

Importing this module registers the attention implementation "taumode" (and its mask function) with
transformers. Then

    model = AutoModelForCausalLM.from_config(LlamaConfig(...))   # random init: taumode is trained from scratch
    enable_taumode(model)                                        # per-head temperature, tau, slopes, Laplacian
    ... train ...; model.generate(...)                           # keeps (V, λk) per layer, not (K, V)
    model.save_pretrained(path); model = load_taumode(path)

What happens where (docs/math.md has the math; the taumode layer itself is tauformer_model.model's):
  taumode_mask                the mask function: a padding mask becomes a model.Packing, built once per forward
                              and handed to every layer (left / right padding, no holes).
  taumode_attention_forward   the function transformers calls in each attention module, after q/k/v
                              projections and RoPE: weightless RMS norm of q and k, then model.taumode_attend with
                              the module's TaumodeParams. cu_seq_lens of padding-free collators and restarting
                              position_ids become packed sequences too.
  TaumodeCache / TaumodeLayer a Cache whose layers hold V and one fp32 scalar λk per key and head: (F + 1) / 2F of
                              the bytes of (K, V) in fp32. enable_taumode makes `generate` use it by default.
  TauGPTHFConfig / TauGPTForCausalLM
                              this package's TauGPT as a transformers model (Auto classes "taugpt"): a head over
                              TauGPT's own forward, every TauGPT option served, loading its training checkpoints
                              (`from_checkpoint`) and its own save_pretrained output.
"""

from __future__ import annotations

import contextlib
import json
import math
import pathlib
import types

import numpy as np
import torch
import torch.nn as nn

try:
    import transformers
    from transformers import (
        AttentionInterface,
        AutoConfig,
        AutoModelForCausalLM,
        GenerationMixin,
        PretrainedConfig,
        PreTrainedModel,
    )
    from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError as e:  # the package itself needs no transformers
    raise ImportError("tauformer_model.hf needs Hugging Face transformers 5.4 or later: "
                      "pip install \"tauformer[hf]\"") from e

import tauformer_kernels as tk

from .config import RECENCIES, TauGPTConfig
from .model import (
    Packing,
    TauGPT,
    TaumodeAttention,
    TaumodeParams,
    build_laplacian,
    key_energy,
    pack_padding,
    pack_restarting_positions,
    rms_norm,
    taumode_attend,
)

NAME = "taumode"
# The cache's keyword: "past_key_values" until transformers 5.2x renamed it "cache" (the old name still works)
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
CACHE_NAMES = ("cache", "past_key_values")
# The mask function's keyword calling convention and the Cache layers it relies on: tested 5.4 to 5.25
if tuple(int(n) for n in transformers.__version__.split(".")[:2]) < (5, 4):
    raise ImportError(f"tauformer_model.hf needs transformers 5.4 or later, found {transformers.__version__}")


# ---------------------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------------------

class TaumodeLayer(DynamicLayer):
    """A DynamicLayer that stores λk (B, Hkv, T, m) in fp32 as its "keys" and V as its values. With ``params``
    (a layer of an enable_taumode model, whose attention module hands the cache its keys after RoPE) `update`
    turns each new key into its λ; without (a TauGPT layer, which hands its λk itself) it stores them as given.
    Cropping, beam reordering and batch selection are DynamicLayer's (they slice the token dim, which both
    tensors share)."""

    def __init__(self, params: TaumodeParams | None = None):
        super().__init__()
        self.params = params

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)  # here key_states are λk (fp32)
        self.values = self.values.to(value_states.dtype)

    def update(self, key_states, value_states, *args, **kwargs):
        if self.params is not None:
            key_states = self.params.key_lambda(rms_norm(key_states), self.params.laplacian)[..., None]
        return super().update(key_states, value_states)


class TaumodeCache(DynamicCache):
    """The (V, λk) cache of a taumode model: ``TaumodeCache(model)``, one TaumodeLayer per taumode layer (a
    plain DynamicLayer for a TauGPT's dot layers). `generate` on a model that went through enable_taumode, or
    a TauGPTForCausalLM, makes one itself; pass one as the `cache` (`past_key_values` before transformers 5.2x)
    for a decode loop of your own."""

    def __init__(self, model):
        if isinstance(model, TauGPTForCausalLM):
            layers = [TaumodeLayer() if isinstance(block.attn, TaumodeAttention) else DynamicLayer()
                      for block in model.transformer.blocks]
        else:
            layers = [TaumodeLayer(p) for p in _taumode_params(model)]
        Cache.__init__(self, layers=layers)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached tensors, all layers."""
        return sum(t.nbytes for layer in self.layers if layer.is_initialized for t in (layer.keys, layer.values))


def _taumode_params(model) -> list[TaumodeParams]:
    found = [m.taumode for m in _attention_modules(model)
             if isinstance(getattr(m, "taumode", None), TaumodeParams)]
    if not found:
        raise ValueError(f"{type(model).__name__} has no taumode attention: call enable_taumode(model) first")
    return found


# ---------------------------------------------------------------------------------------------------------
# The mask function and the attention function transformers calls
# ---------------------------------------------------------------------------------------------------------

def pack_offsets(cu_q: torch.Tensor, cu_k: torch.Tensor | None, max_q, max_k, Tq: int, Tk: int) -> Packing:
    """The Packing of one flattened row of Tq queries / Tk keys cut by a padding-free collator's cu_seq_lens_q/k
    (any integer dtype). Outside torch.compile the offsets are checked on the host (they start at 0, never
    decrease and end at the row's end: a token in no sequence would get no defined output); under compile they
    are trusted as flash-attention's are (the kernels keep every access inside the tensors)."""
    cu_k = cu_q if cu_k is None else cu_k
    if not torch.compiler.is_compiling():
        for name, cu, rows in (("cu_seq_lens_q", cu_q, Tq), ("cu_seq_lens_k", cu_k, Tk)):
            if cu.dim() != 1 or cu.numel() < 2 or cu.dtype.is_floating_point:
                raise ValueError(f"{name} must be 1-D integer offsets (number of sequences + 1), got "
                                 f"{cu.dtype} of shape {tuple(cu.shape)}")
            host = cu.tolist()
            if host[0] != 0 or host[-1] != rows or any(b < a for a, b in zip(host, host[1:])):
                raise ValueError(f"{name} must rise from 0 to the row's {rows} tokens without decreasing, got "
                                 f"{host if len(host) <= 8 else host[:4] + ['...'] + host[-2:]}")
        if cu_q.numel() != cu_k.numel():
            raise ValueError(f"cu_seq_lens_q and cu_seq_lens_k count different numbers of sequences "
                             f"({cu_q.numel() - 1} and {cu_k.numel() - 1})")
    max_q = Tq if max_q is None else int(max_q)
    max_k = Tk if max_k is None else int(max_k)
    return Packing(cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k, Tk, Tk)


def _call_packing(attention_mask, position_ids, B: int, Tq: int, Tk: int, kwargs: dict) -> Packing | None:
    """The Packing of one attention call: taumode_mask's (the forward's padding), the cu_seq_lens of a
    padding-free collator, or restarting position_ids (eager: a host read per layer, as transformers' own
    flash-attention path makes), else None (dense causal)."""
    if isinstance(attention_mask, Packing):
        return attention_mask
    if attention_mask is not None:
        raise ValueError(f"taumode attention takes a 2D padding mask through its mask function; got an "
                         f"attention_mask of shape {tuple(attention_mask.shape)} (a 4D or custom mask is not "
                         f"supported)")
    cu_q = kwargs.get("cu_seq_lens_q")
    if cu_q is not None:
        if B != 1:
            raise ValueError(f"cu_seq_lens_q/k describe one flattened row (batch 1, no attention_mask); "
                             f"got batch {B}")
        return pack_offsets(cu_q, kwargs.get("cu_seq_lens_k"), kwargs.get("max_length_q"),
                            kwargs.get("max_length_k"), Tq, Tk)
    if position_ids is None or Tq != Tk or torch.compiler.is_compiling():
        return None
    return pack_restarting_positions(position_ids, B, Tq)


def taumode_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                              sliding_window=None, position_ids=None, **kwargs):
    """The AttentionInterface function "taumode" (transformers' calling convention): returns (output
    (B, Tq, H, Dv), None). `scaling` is unused (the logits are -|λq - λk| / temperature). ``key`` holds the
    keys after RoPE, or their λ (B, Hkv, Tk, 1) when a TaumodeCache stored them."""
    params = getattr(module, "taumode", None)
    if not isinstance(params, TaumodeParams):
        raise ValueError(f"{type(module).__name__} has no taumode parameters: attn_implementation='taumode' "
                         "needs tauformer_model.hf.enable_taumode(model); a model saved after enable_taumode "
                         "loads with tauformer_model.hf.load_taumode(path)")
    if dropout:
        raise ValueError(f"attention dropout {dropout}: taumode attention has none; set the config's "
                         "attention_dropout to 0")
    if sliding_window is not None and key.shape[2] > sliding_window:
        raise ValueError(f"sliding_window={sliding_window} with {key.shape[2]} keys: taumode attention has no "
                         "sliding window; build the model with config.sliding_window=None")
    B, H, Tq, F = query.shape
    packing = _call_packing(attention_mask, position_ids, B, Tq, key.shape[2], kwargs)
    q, L = rms_norm(query), params.laplacian
    if key.shape[-1] == 1 and F != 1:  # a TaumodeCache's λk
        y = taumode_attend(params, q, None, value, L, packing, lam_k=key[..., 0])
    else:
        k = rms_norm(key)
        if params.key_energies is not None:  # calibrate_tau is listening
            params.key_energies.append(key_energy(k, L, params.eps))
        y = taumode_attend(params, q, k, value, L, packing)
    return y.transpose(1, 2), None


def taumode_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
                 **kwargs):
    """The AttentionMaskInterface function "taumode": the forward's Packing (built once, handed to every layer)
    from the 2D padding mask of the attention's last kv_length keys; None when it has no padding (the dense
    path). Under torch.compile the mask is not looked at (a data-dependent branch): the packed path then runs,
    which gives the same attention."""
    if isinstance(q_offset, torch.Tensor) or kv_offset != 0 or kv_length != q_offset + q_length:
        # a static (preallocated) or sliding cache: its keys are not the causal prefix taumode attends over
        raise ValueError(f"taumode attention needs a cache that holds exactly the past tokens (DynamicCache or "
                         f"TaumodeCache, the default); got kv_length {kv_length} for {q_length} queries at offset "
                         f"{q_offset} (a static cache: drop cache_implementation='static')")
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if not torch.compiler.is_compiling() and bool(attention_mask.all()):
        return None
    return pack_padding(attention_mask, q_length)


AttentionInterface.register(NAME, taumode_attention_forward)
# Without its own entry, create_causal_mask would hand the attention a silent None mask.
AttentionMaskInterface.register(NAME, taumode_mask)


# ---------------------------------------------------------------------------------------------------------
# Turning a transformers model into a taumode model
# ---------------------------------------------------------------------------------------------------------

class HFTaumodeParams(TaumodeParams):
    """TaumodeParams as enable_taumode hangs them on a transformers attention module (``.taumode``): with their
    own Laplacian buffer, and a list calibrate_tau fills with the key energies the layer sees (None: off)."""

    key_energies: list | None = None


def _attention_modules(model) -> list[nn.Module]:
    """The model's self-attention modules, by layer: the modules with a layer_idx and q/k/v projections."""
    found = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)
             and all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj"))]
    return sorted(found, key=lambda m: m.layer_idx)


def _laplacian_tensor(laplacian, F: int) -> torch.Tensor:
    """The (F, F) Laplacian of enable_taumode's ``laplacian`` argument, validated as load_laplacian validates
    a file (square, finite, symmetric, zero row sums, PSD)."""
    if isinstance(laplacian, str):
        return build_laplacian(laplacian, F)
    if isinstance(laplacian, np.ndarray):
        laplacian = torch.from_numpy(laplacian)
    if not isinstance(laplacian, torch.Tensor):
        raise TypeError(f"laplacian must be 'chain', a file path, a tensor or a numpy array, got "
                        f"{type(laplacian).__name__}")
    try:
        tk.validate_laplacian(laplacian.detach().cpu().double(), F)
    except ValueError as e:
        raise ValueError(f"laplacian: {e}") from None
    return laplacian.detach().to(torch.float32)


def _refuse_sliding_windows(config) -> None:
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    uses_window = window is not None and (getattr(config, "use_sliding_window", True) is not False)
    if uses_window or any("sliding" in str(t) for t in layer_types):
        raise ValueError(f"{type(config).__name__} has sliding-window layers (sliding_window={window}, "
                         f"layer_types={sorted(set(map(str, layer_types))) or None}): taumode attention has no "
                         "window; build the model with sliding_window=None and full-attention layers")


def enable_taumode(model, *, laplacian="chain", temperature_init: float = 0.1, tau_init: float = 1.0,
                   learn_tau: bool = False, recency: str = "learned", eps: float = 1e-6, backend: str = "auto"):
    """Turn a causal LM of transformers (one whose attention goes through its AttentionInterface: Llama,
    Qwen2, Mistral, ...) into a taumode model, in place; returns it.

    Args:
        model: a transformers causal LM.
        laplacian: "chain", a file written by tauformer_kernels.save_laplacian, or an (F, F) tensor / numpy
            array (validated: symmetric, zero row sums, PSD).
        temperature_init: initial per-head temperature (> 0).
        tau_init: initial per-kv-head tau (> 0; see calibrate_tau); learn_tau: learn it.
        recency: "learned", "fixed" or "none", as TauGPT's.
        eps, backend: of the tauformer_kernels calls.

    Returns:
        The model, each attention module with a TaumodeParams (``.taumode``). The settings go into
        config.taumode (so save_pretrained writes them and load_taumode rebuilds the model), the attention
        implementation becomes "taumode" (saved too: a plain from_pretrained of the folder then refuses to load
        it as another attention), and `generate` keeps a TaumodeCache. The q/k/v weights stay as they are:
        taumode is trained from scratch.
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
    if not modules or len(modules) != config.num_hidden_layers:
        raise ValueError(f"found {len(modules)} attention modules with q/k/v projections and a layer_idx in "
                         f"{type(model).__name__}, its config has {config.num_hidden_layers} layers")
    if getattr(config, "attention_dropout", 0.0):
        raise ValueError(f"config.attention_dropout={config.attention_dropout}: taumode attention has no dropout")
    _refuse_sliding_windows(config)
    H = config.num_attention_heads
    Hkv = getattr(config, "num_key_value_heads", None) or H
    F = modules[0].head_dim
    L = _laplacian_tensor(laplacian, F)
    ref = next(model.parameters())
    for m in modules:
        m.taumode = HFTaumodeParams(H, Hkv, temperature_init=temperature_init, tau_init=tau_init,
                                    learn_tau=learn_tau, recency=recency, eps=eps, backend=backend,
                                    laplacian=L).to(ref.device)
    model.config.taumode = dict(laplacian=laplacian if isinstance(laplacian, str) else "tensor",
                                temperature_init=temperature_init, tau_init=tau_init, learn_tau=learn_tau,
                                recency=recency, eps=eps, backend=backend)
    model.set_attn_implementation(NAME)
    # saved in config.json: from_pretrained reads it back, and without this module imported refuses it loudly
    model.config.attn_implementation = NAME
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


@contextlib.contextmanager
def _recording_key_energies(params: list[HFTaumodeParams]):
    for p in params:
        p.key_energies = []
    try:
        yield
    finally:
        for p in params:
            p.key_energies = None


@torch.no_grad()
def calibrate_tau(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[float]:
    """Set each layer's tau to the median E (xᵀLx / xᵀx, of the RMS-normed keys after RoPE) of the keys that
    layer sees over a batch, as TauGPT's trainer does with its first layer (here each layer its own);
    returns the taus. A batch with no real token is an error (its median is undefined)."""
    real = input_ids.numel() if attention_mask is None else int(attention_mask.bool().sum())
    if real == 0:
        raise ValueError(f"calibrate_tau needs at least one real token; input_ids {tuple(input_ids.shape)} "
                         f"{'is empty' if attention_mask is None else 'has an all-zero attention_mask'}")
    params = _taumode_params(model)
    with _recording_key_energies(params):
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        energies = [p.key_energies[0] for p in params]
    taus = []
    for p, e in zip(params, energies):
        if attention_mask is not None:  # the real tokens' keys only
            e = e.transpose(1, 2)[attention_mask.bool()]
        tau = float(e.median().clamp_min(1e-4))
        p.log_tau.fill_(math.log(tau))
        taus.append(tau)
    return taus


def load_taumode(path, **kwargs):
    """A taumode model saved by save_pretrained: the base model (AutoModelForCausalLM.from_pretrained(path,
    **kwargs)), enable_taumode with the settings in its config.taumode, then the taumode tensors (temperature,
    tau, slopes, Laplacian of every layer) from the saved weights. transformers' load report is replaced by
    this function's own check: any key of the files that is neither the base model's nor taumode's, or any
    weight of the base model missing from them, is an error."""
    path = pathlib.Path(path)
    config = AutoConfig.from_pretrained(path)
    settings = getattr(config, "taumode", None)
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: its config.json has no 'taumode' entry (not saved from a model that went "
                         "through enable_taumode)")
    saved = _saved_tensors(path)
    report = transformers.utils.logging.get_logger("transformers.modeling_utils")
    level = report.level
    report.setLevel("ERROR")  # it would list the taumode tensors as unexpected: they are loaded below
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    finally:
        report.setLevel(level)
    unexpected = [name for name in info["unexpected_keys"] if ".taumode." not in name]
    if unexpected or info["missing_keys"] or info.get("mismatched_keys"):
        raise ValueError(f"{path}: the saved weights do not fit {type(model).__name__}: unexpected "
                         f"{sorted(unexpected)[:4]}, missing {sorted(info['missing_keys'])[:4]}, mismatched "
                         f"{list(info.get('mismatched_keys') or [])[:4]}")
    # the Laplacian is read back from the weights: the file it was built from need not exist here
    enable_taumode(model, **{**settings, "laplacian": "chain"})
    model.config.taumode = dict(settings)
    wanted = {name for name in model.state_dict() if ".taumode." in name}
    tensors = {name: t for name, t in saved.items() if name in wanted}
    if wanted - set(tensors):
        raise ValueError(f"{path}: the saved weights lack taumode tensors {sorted(wanted - set(tensors))[:4]}")
    model.load_state_dict(tensors, strict=False)
    return model


def _saved_tensors(path: pathlib.Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    index = path / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    tensors = {}
    for name in files:
        try:
            tensors.update(load_file(str(path / name)))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path / name}: cannot read the saved weights ({e}); the file is missing, truncated "
                             "or not safetensors") from None
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
    """TauGPT (tauformer_model.model) behind transformers' causal-LM interface: a head over TauGPT's own
    forward (every TauGPT option: taumode, dot, hybrid stacks, λ slices), logits and loss as transformers
    computes them (labels shifted inside), a TaumodeCache in `generate`, padding masks and position_ids as for
    any model with attn_implementation="taumode". The weights are the TauGPT's own, under ``transformer.``;
    `from_checkpoint` reads this package's training checkpoints."""

    config_class = TauGPTHFConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"

    def __init__(self, config: TauGPTHFConfig):
        super().__init__(config)
        cfg = config.model_config()
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
    def from_checkpoint(cls, path, device="cpu") -> TauGPTForCausalLM:
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

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        result = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        _swap_default_cache(self, model_kwargs)
        return result

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                use_cache=None, labels=None, logits_to_keep=0, **kwargs):
        """transformers' causal-LM forward; the cache as `cache` or (before transformers 5.2x) `past_key_values`."""
        B, T = input_ids.shape
        cache = past_key_values if cache is None else cache
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = TaumodeCache(self)
        packing = None
        if kwargs.get("cu_seq_lens_q") is not None:  # a padding-free collator's flattened row
            if B != 1 or attention_mask is not None:
                raise ValueError("cu_seq_lens_q/k describe one flattened row (batch 1, no attention_mask)")
            packing = pack_offsets(kwargs["cu_seq_lens_q"], kwargs.get("cu_seq_lens_k"),
                                   kwargs.get("max_length_q"), kwargs.get("max_length_k"), T, T)
        mask = None if attention_mask is None else attention_mask.bool()
        x = self.transformer.hidden_states(input_ids, cache, attention_mask=mask, position_ids=position_ids,
                                           packing=packing)
        logits = self.transformer.logits(x[:, -logits_to_keep:] if logits_to_keep else x)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                               ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})


AutoConfig.register(TauGPTHFConfig.model_type, TauGPTHFConfig)
AutoModelForCausalLM.register(TauGPTHFConfig, TauGPTForCausalLM)
