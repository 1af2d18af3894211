"""Taumode attention as a vLLM attention backend: the (V, λk) paged cache inside the engine.

vLLM gives each taumode layer its own `Attention(num_heads=H, head_size=s, head_size_v=F, num_kv_heads=Hkv)`,
so its KV cache is vLLM's own FullAttentionSpec: per layer a (num_blocks, Hkv, block_size, s + F) tensor
holding λk in the first s slots and V after it, s = 4 / itemsize of the cache dtype (1 in fp32, 2 in bf16 /
fp16: λk keeps its fp32 bits in a 16-bit cache, since rounding it to bf16 changes the attention). The
layer hands this backend λq and λk (fp32 bits viewed as s values of the cache dtype) and V.

Per step each layer runs one tauformer_kernels.paged_attention_from_lambda call for the whole batch, with vLLM's
block table and seq_lens: the queries of request i are its newest query_len_i tokens over its seq_len_i keys,
bottom-right aligned (chunked prefill and prefix caching are the same case: λk depends only on the prefix). On
CUDA the paged Triton kernel reads λk and V through the block table; on CPU the keys are gathered into a pack
and the packed op runs (the same numbers as before the paged kernel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)

import tauformer_kernels as tk

NAME = "TAUMODE"


def lambda_slots(dtype: torch.dtype) -> int:
    """Cache slots per λk: its fp32 bits in as many values of the cache dtype."""
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"taumode serving keeps λk's fp32 bits in the KV cache; cache dtype {dtype} cannot hold "
                         "them (fp32, bf16 or fp16 only; no fp8 KV cache)")
    return 4 // dtype.itemsize


def as_cache_values(lam: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """λ (N, heads) fp32 -> (N, heads, slots) in the cache dtype, the same bits."""
    return lam.float().contiguous().unsqueeze(-1).view(dtype)


def as_lambda(values: torch.Tensor) -> torch.Tensor:
    """The inverse of as_cache_values: (N, heads, slots) -> (N, heads) fp32."""
    return values.contiguous().view(torch.float32).squeeze(-1)


class TaumodeAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float32, torch.bfloat16, torch.float16]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(1)]

    @staticmethod
    def get_name() -> str:
        return NAME

    @staticmethod
    def get_impl_cls() -> type[TaumodeAttentionImpl]:
        return TaumodeAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[TaumodeMetadataBuilder]:
        return TaumodeMetadataBuilder

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size in (1, 2)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_non_causal(cls) -> bool:
        return False


@dataclass
class TaumodeMetadata:
    """One step's batch: query_start_loc (R + 1,) int32; the longest query and key run (host ints); block_table
    (R, width) and seq_lens (R,), int32, vLLM's own; slot_mapping: where the new tokens go."""

    num_actual_tokens: int
    query_start_loc: torch.Tensor
    max_query_len: int
    max_seq_len: int
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    slot_mapping: torch.Tensor


class TaumodeMetadataBuilder(AttentionMetadataBuilder[TaumodeMetadata]):
    # Eager only: no CUDA graph has captured this backend. A decode graph would need the step's shapes fixed
    # (the paged kernel's grid is sized by max_query_len and the request count, host ints that vary per step,
    # and the CPU path gathers a batch-dependent number of keys) and has not been built or tested.
    _cudagraph_support = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):  # abstract in vLLM's base class
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> TaumodeMetadata:
        m = common_attn_metadata
        return TaumodeMetadata(num_actual_tokens=m.num_actual_tokens,
                               query_start_loc=m.query_start_loc[:m.num_reqs + 1].to(torch.int32),
                               max_query_len=m.max_query_len, max_seq_len=m.max_seq_len,
                               block_table=m.block_table_tensor[:m.num_reqs].to(torch.int32),
                               seq_lens=m.seq_lens[:m.num_reqs].to(torch.int32), slot_mapping=m.slot_mapping)


class TaumodeAttentionImpl(AttentionImpl):
    """One taumode layer's attention in vLLM. ``taumode``: the layer's TaumodeParams (temperatures and slopes
    are read at each step, so they are the loaded weights'); ``backend``: the tauformer_kernels backend."""

    def __init__(self, num_heads, head_size, scale, num_kv_heads=None, alibi_slopes=None, sliding_window=None,
                 kv_cache_dtype="auto", logits_soft_cap=None, attn_type=AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, *, taumode=None, backend="auto"):
        refused = {"sliding_window": sliding_window, "alibi_slopes (the recency slopes are the layer's own)":
                   alibi_slopes, "logits_soft_cap": logits_soft_cap,
                   "kv_sharing_target_layer_name": kv_sharing_target_layer_name}
        given = [name for name, value in refused.items() if value is not None]
        if kv_cache_dtype != "auto":
            given.append(f"kv_cache_dtype={kv_cache_dtype!r} (λk is kept as fp32 bits)")
        if attn_type != AttentionType.DECODER:
            given.append(f"attn_type={attn_type!r} (decoder self-attention only)")
        if taumode is None:
            given.append("no taumode parameters (the layer must pass taumode=its TaumodeParams)")
        if given:
            raise NotImplementedError(f"the taumode attention backend does not implement: {', '.join(given)}")
        self.num_heads, self.num_kv_heads, self.head_size = num_heads, num_kv_heads or num_heads, head_size
        self.kv_cache_dtype = kv_cache_dtype
        self.taumode, self.backend = taumode, backend

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        """Write the new tokens' λk (in its slots) and V into their cache places (padding tokens have slot -1)."""
        n = slot_mapping.numel()
        keep = slot_mapping >= 0
        slots = slot_mapping[keep].long()
        block_size = kv_cache.shape[2]
        rows = torch.cat([key[:n][keep], value[:n][keep]], dim=-1).to(kv_cache.dtype)  # (n, Hkv, s + F)
        kv_cache[slots // block_size, :, slots % block_size] = rows

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        """query (tokens, H, s): λq's bits; output (tokens, H, F) written."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("the taumode attention backend has no fused output quantization")
        if attn_metadata is None:  # a profiling run
            return output.fill_(0)
        m = attn_metadata
        n = m.num_actual_tokens
        y = tk.paged_attention_from_lambda(
            as_lambda(query[:n]), kv_cache, m.block_table, m.seq_lens, m.query_start_loc,
            temperature=self.taumode.temperature(), alibi_slopes=self.taumode.slopes(), lambda_slots=self.head_size,
            max_seqlen_q=m.max_query_len, max_seqlen_k=m.max_seq_len, backend=self.backend)
        output[:n].copy_(y)
        return output
