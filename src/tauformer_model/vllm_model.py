"""TauGPT inside vLLM: the model class the plugin registers for the architecture "TauGPTForCausalLM" (what
TauGPTForCausalLM.save_pretrained writes; `python -m tauformer_model.export` turns a training run into one).

The weights live in a TauGPT (the model of tauformer_model.model, its projections, norms and head); only the
attention call is vLLM's: each taumode layer hands its λq, λk and V to a vLLM `Attention` on the taumode
backend (vllm_backend.py: the (V, λk) paged cache), each dot layer of a hybrid stack its q, k, v to a vLLM
`Attention` on vLLM's own backend (a (K, V) cache, its recency slopes as ALiBi's).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import Attention

from .model import TauGPT, TaumodeAttention, rms_norm
from .vllm_backend import TaumodeAttentionBackend, as_cache_values, lambda_slots


def served_config(hf_config):
    """The TauGPTConfig of a checkpoint's config, or a clear error for what vLLM serving does not run."""
    cfg = hf_config.model_config()
    if cfg.lambda_slices > 1:
        raise ValueError(f"lambda_slices={cfg.lambda_slices}: vLLM serving runs one λ per head (the λ-slices "
                         "experiment runs in TauGPT's own generate)")
    return cfg


class TauGPTForVLLM(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        cfg = served_config(vllm_config.model_config.hf_config)
        dtype = vllm_config.model_config.dtype
        self.transformer = TauGPT(cfg)
        self.slots = lambda_slots(dtype)
        H, Hkv, F = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        cache_config = vllm_config.cache_config
        layers = []
        for i, block in enumerate(self.transformer.blocks):
            name = f"{prefix}transformer.blocks.{i}.attn.paged"
            if isinstance(block.attn, TaumodeAttention):
                layers.append(Attention(H, self.slots, 1.0, Hkv, cache_config=cache_config, prefix=name,
                                        attn_backend=TaumodeAttentionBackend, head_size_v=F,
                                        taumode=block.attn, backend=cfg.backend))
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
        laplacian = self.laplacian
        for block, paged in zip(self.transformer.blocks, self.paged):
            h = rms_norm(x)
            attn = block.attn
            q, k, v = attn.project(h, positions[None])  # (1, heads, N, F)
            if isinstance(attn, TaumodeAttention):
                lam_q, lam_k = attn.query_lambda(q, laplacian), attn.key_lambda(k, laplacian)  # (1, heads, N)
                y = paged(as_cache_values(lam_q[0].T, v.dtype), as_cache_values(lam_k[0].T, v.dtype),
                          v[0].transpose(0, 1), output_dtype=v.dtype)
            else:
                y = paged(q[0].transpose(0, 1).reshape(q.size(2), -1), k[0].transpose(0, 1).reshape(k.size(2), -1),
                          v[0].transpose(0, 1).reshape(v.size(2), -1))
            y = y.view(1, q.size(2), attn.n_head, attn.head_dim).transpose(1, 2)
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
