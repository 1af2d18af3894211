"""Taumode models inside vLLM: the model classes the plugin registers.

- TauGPTForVLLM, for the architecture "TauGPTForCausalLM" (what TauGPTForCausalLM.save_pretrained writes;
  `python -m tauformer_model.export` turns a training run into one). The weights live in a TauGPT (the model
  of tauformer_model.model: its projections, norms and head); only the attention call is vLLM's.
- TaumodeLlamaForCausalLM / TaumodeQwen2ForCausalLM / TaumodeMistralForCausalLM: vLLM's own Llama, Qwen2 and
  Mistral with each attention call replaced by the taumode one, for folders saved after
  tauformer_model.hf.enable_taumode (serve them with hf_overrides={"architectures": ["TaumodeLlamaForCausalLM"]}:
  the folder says LlamaForCausalLM, and vLLM's own Llama refuses its taumode tensors).

Each taumode layer hands its λq, λk and V to a vLLM `Attention` on the taumode backend (vllm_backend.py: the
(V, λk) paged cache); a hybrid TauGPT's dot layers hand q, k, v to vLLM's own backend (a (K, V) cache, their
recency slopes as ALiBi's).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from .model import TauGPT, TaumodeAttention, TaumodeParams, rms_norm
from .vllm_backend import TaumodeAttentionBackend, as_cache_values, lambda_slots


class PagedTaumode(nn.Module):
    """One taumode layer's attention in vLLM: λq and λk of the (RMS-normed) q (N, H, F) and k (N, Hkv, F) with
    the layer's TaumodeParams, then vLLM's Attention on the taumode backend, which keeps (λk, V) in its paged
    cache. The params are held by reference (the host module owns and saves them)."""

    def __init__(self, params: TaumodeParams, n_head: int, n_kv_head: int, head_dim: int, cache_config, prefix: str):
        super().__init__()
        self._params = [params]  # a list: not registered as a submodule a second time
        self.attn = Attention(n_head, lambda_slots(torch.get_default_dtype()), 1.0, n_kv_head,
                              cache_config=cache_config, prefix=prefix, attn_backend=TaumodeAttentionBackend,
                              head_size_v=head_dim, taumode=params, backend=params.backend)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, laplacian: torch.Tensor) -> torch.Tensor:
        """(N, H·F) in v's dtype."""
        params = self._params[0]
        lam_q = params.query_lambda(q.transpose(0, 1)[None], laplacian)[0].T  # (N, H)
        lam_k = params.key_lambda(k.transpose(0, 1)[None], laplacian)[0].T  # (N, Hkv)
        return self.attn(as_cache_values(lam_q, v.dtype), as_cache_values(lam_k, v.dtype), v, output_dtype=v.dtype)


def served_config(hf_config):
    """The TauGPTConfig of a checkpoint's config, or a clear error for what vLLM serving does not run."""
    cfg = hf_config.model_config()
    if cfg.lambda_slices > 1:
        raise ValueError(f"lambda_slices={cfg.lambda_slices}: vLLM serving runs one λ per head (the λ-slices "
                         "experiment runs in TauGPT's own generate)")
    return cfg


def single_rank(vllm_config: VllmConfig) -> None:
    if vllm_config.parallel_config.tensor_parallel_size != 1:
        raise ValueError("taumode models are served with tensor_parallel_size=1 (their per-head temperatures and "
                         "slopes are not sharded yet)")


class TauGPTForVLLM(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        single_rank(vllm_config)
        cfg = served_config(vllm_config.model_config.hf_config)
        self.transformer = TauGPT(cfg)
        H, Hkv, F = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        cache_config = vllm_config.cache_config
        layers = []
        for i, block in enumerate(self.transformer.blocks):
            name = f"{prefix}transformer.blocks.{i}.attn.paged"
            if isinstance(block.attn, TaumodeAttention):
                layers.append(PagedTaumode(block.attn, H, Hkv, F, cache_config, name))
            else:  # a dot layer: vLLM's own attention, the recency slopes set as ALiBi's once loaded
                slopes = None if block.attn.log_slopes is None else [0.0] * H
                layers.append(Attention(H, F, F ** -0.5, Hkv, alibi_slopes=slopes, cache_config=cache_config,
                                        prefix=name))
        self.paged = nn.ModuleList(layers)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.transformer.wte(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Hidden states (tokens, n_embd) of the flattened batch vLLM schedules (positions: each token's own)."""
        x = (self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds)[None]  # (1, N, C)
        for block, paged in zip(self.transformer.blocks, self.paged):
            h = rms_norm(x)
            attn = block.attn
            q, k, v = (t[0].transpose(0, 1) for t in attn.project(h, positions[None]))  # (N, heads, F)
            if isinstance(paged, PagedTaumode):
                y = paged(q, k, v, self.laplacian)
            else:
                y = paged(q.flatten(1), k.flatten(1), v.flatten(1))
            y = y.view(1, q.size(0), attn.n_head, attn.head_dim).transpose(1, 2)
            x = x + attn.output(y, h)
            x = x + block.mlp(rms_norm(x))
        return x[0]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.transformer.logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The TauGPT's tensors (saved under ``transformer.``); then the Laplacian the heads use, folded once
        (a learned one included), and the dot layers' slopes handed to vLLM's attention."""
        state = {}
        for name, tensor in weights:
            if not name.startswith("transformer."):
                raise ValueError(f"unexpected weight {name!r}: a TauGPTForCausalLM checkpoint holds transformer.*")
            state[name.removeprefix("transformer.")] = tensor
        missing, unexpected = self.transformer.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"the checkpoint does not fit this TauGPT: missing {missing[:4]}, unexpected "
                             f"{unexpected[:4]}")
        with torch.no_grad():
            self.register_buffer("laplacian", self.transformer.attention_laplacian().detach().clone(),
                                 persistent=False)
            for block, paged in zip(self.transformer.blocks, self.paged):
                if not isinstance(block.attn, TaumodeAttention) and block.attn.log_slopes is not None:
                    paged.impl.alibi_slopes = block.attn.slopes().float()
        return {f"transformer.{name}" for name in state}


class TaumodeAttentionCall(nn.Module):
    """Stands where vLLM's Llama-family attention module calls ``self.attn(q, k, v)`` with flat (N, heads·F)
    q, k, v after RoPE: the weightless RMS norm taumode takes, then PagedTaumode with the module's own
    TaumodeParams (``self_attn.taumode``, as enable_taumode saved them) and Laplacian."""

    def __init__(self, params: TaumodeParams, n_head: int, n_kv_head: int, head_dim: int, cache_config, prefix: str):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self._params = [params]
        self.paged = PagedTaumode(params, n_head, n_kv_head, head_dim, cache_config, prefix)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        N = q.size(0)
        q = rms_norm(q.view(N, self.n_head, self.head_dim))
        k = rms_norm(k.view(N, self.n_kv_head, self.head_dim))
        return self.paged(q, k, v.view(N, self.n_kv_head, self.head_dim), self._params[0].laplacian)


def taumode_model_class(base: type[nn.Module]) -> type[nn.Module]:
    """vLLM's ``base`` causal LM with every attention call made taumode (settings from config.taumode)."""

    class TaumodeForCausalLM(base):
        def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            single_rank(vllm_config)
            config = vllm_config.model_config.hf_config
            settings = getattr(config, "taumode", None)
            if not isinstance(settings, dict):
                raise ValueError(f"{type(self).__name__} serves folders saved after tauformer_model.hf."
                                 "enable_taumode; this config.json has no 'taumode' entry")
            forward_context = get_current_vllm_config().compilation_config.static_forward_context
            for layer in self.model.layers:
                sa = layer.self_attn
                sa.taumode = TaumodeParams(
                    sa.num_heads, sa.num_kv_heads, temperature_init=settings["temperature_init"],
                    tau_init=settings["tau_init"], learn_tau=settings["learn_tau"], recency=settings["recency"],
                    eps=settings["eps"], backend=settings["backend"],
                    laplacian=torch.zeros(sa.head_dim, sa.head_dim))  # the saved one replaces it
                name = sa.attn.layer_name
                forward_context.pop(name)  # the dot-product Attention it replaces keeps no cache
                sa.attn = TaumodeAttentionCall(sa.taumode, sa.num_heads, sa.num_kv_heads, sa.head_dim,
                                               vllm_config.cache_config, name)

        def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
            taumode, rest = {}, []
            for name, tensor in weights:
                if ".taumode." in name:
                    taumode[name] = tensor
                else:
                    rest.append((name, tensor))
            loaded = super().load_weights(rest)
            own = {name: t for name, t in self.named_parameters()} | {name: t for name, t in self.named_buffers()}
            wanted = {name for name in own if ".taumode." in name}
            if set(taumode) != wanted:
                raise ValueError(f"the folder's taumode tensors do not fit: missing "
                                 f"{sorted(wanted - set(taumode))[:4]}, unexpected {sorted(set(taumode) - wanted)[:4]}")
            with torch.no_grad():
                for name, tensor in taumode.items():
                    own[name].copy_(tensor)
            return loaded | set(taumode)

    TaumodeForCausalLM.__name__ = TaumodeForCausalLM.__qualname__ = "Taumode" + base.__name__
    return TaumodeForCausalLM


TaumodeLlamaForCausalLM = taumode_model_class(LlamaForCausalLM)
TaumodeQwen2ForCausalLM = taumode_model_class(Qwen2ForCausalLM)
TaumodeMistralForCausalLM = taumode_model_class(MistralForCausalLM)
