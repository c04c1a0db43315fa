"""Write the new tokens' keys and values into the paged KV cache.

Cache layout per layer: ``k_cache``/``v_cache`` are ``[num_blocks, block_size,
num_kv_heads, head_dim]`` and token ``t`` goes to slot ``slot_mapping[t] = block_id *
block_size + offset``. A slot of -1 skips the token, so a batch padded to a CUDA-graph size
can pass its padding rows through unchanged.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from executor.kernels._dispatch import use_triton
from executor.kernels.reference import store_kv_ref


@triton.jit
def _store_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
                     stride_key_t, stride_key_h, stride_value_t, stride_value_h,
                     stride_kc_b, stride_kc_s, stride_kc_h,
                     stride_vc_b, stride_vc_s, stride_vc_h,
                     num_kv_heads, head_dim,
                     BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per token: copy its [num_kv_heads, head_dim] key and value to its slot."""
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < num_kv_heads)[:, None] & (offs_d < head_dim)[None, :]
    key = tl.load(key_ptr + token * stride_key_t + offs_h[:, None] * stride_key_h
                  + offs_d[None, :], mask=mask)
    value = tl.load(value_ptr + token * stride_value_t + offs_h[:, None] * stride_value_h
                    + offs_d[None, :], mask=mask)
    k_dst = (k_cache_ptr + block * stride_kc_b + offset * stride_kc_s
             + offs_h[:, None] * stride_kc_h + offs_d[None, :])
    v_dst = (v_cache_ptr + block * stride_vc_b + offset * stride_vc_s
             + offs_h[:, None] * stride_vc_h + offs_d[None, :])
    tl.store(k_dst, key.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, value.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
             v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter ``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]`` into the caches.

    ``slot_mapping`` is int32 or int64 ``[num_tokens]``; -1 entries are skipped. The head
    dim of every tensor must be contiguous (views such as a slice of a fused QKV output are
    fine). Values are cast to the cache dtype.
    """
    for t in (key, value, k_cache, v_cache):
        assert t.stride(-1) == 1, "head_dim must be contiguous"
    if not use_triton(key):
        store_kv_ref(key, value, k_cache, v_cache, slot_mapping)
        return
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        num_kv_heads, head_dim,
        BLOCK_SIZE=k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
    )
