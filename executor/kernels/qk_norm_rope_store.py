"""The attention prologue in one kernel: per-head q/k RMSNorm (Qwen3), rotary embedding
of q and k, and the store of this step's k/v into the paged KV cache.

Unfused, a Qwen3 layer runs four kernels between the QKV GEMM and attention (q-norm,
k-norm, rotary, KV store), each reading and writing its slice of the GEMM output again and
each costing a launch (at decode batch 256, ~2-3 us each, 28 layers). Here one program per
token reads its q/k/v rows of the fused QKV output once, normalises and rotates q and k in
registers, writes q and k back in place (attention reads q from there) and writes k/v to
the token's cache slot (a negative slot -- CUDA-graph padding -- writes no KV).

Roundings are those of the unfused path, so both give the same bits up to fp32 summation
order: the norm's statistics in fp32, the normalised head rounded to the input dtype, times
the weight in fp32 rounded again (HF ``weight * h.to(dtype)``), then the rotation in fp32
rounded once, and the cache store casting to the cache dtype. Without norm weights
(Llama / Qwen2) it is rotary + KV store.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from executor.kernels._dispatch import use_triton
from executor.kernels.reference import qk_norm_rope_store_ref


@triton.jit
def _norm_rope_heads(x_ptr, stride_h, num_heads, w_ptr, cos, sin, offs_d, mask_d, eps,
                     HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                     HAS_NORM: tl.constexpr):
    """Normalise (optionally) and rotate every head of one token in place; returns the two
    rotated halves ``[BLOCK_H, BLOCK_HALF]`` in the input dtype and their mask."""
    offs_h = tl.arange(0, BLOCK_H)
    mask = (offs_h < num_heads)[:, None] & mask_d[None, :]
    first = x_ptr + offs_h[:, None] * stride_h + offs_d[None, :]
    dtype = x_ptr.dtype.element_ty
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        variance = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / HEAD_DIM
        inv = tl.rsqrt(variance + eps)[:, None]
        w1 = tl.load(w_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + HALF + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        x1 = (w1 * (x1 * inv).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        x2 = (w2 * (x2 * inv).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    o1 = (x1 * cos - x2 * sin).to(dtype)
    o2 = (x2 * cos + x1 * sin).to(dtype)
    tl.store(first, o1, mask=mask)
    tl.store(first + HALF, o2, mask=mask)
    return o1, o2, mask


@triton.jit
def _qk_norm_rope_store_kernel(
    q_ptr, k_ptr, v_ptr, q_w_ptr, k_w_ptr, cos_ptr, sin_ptr, positions_ptr, slot_mapping_ptr,
    k_cache_ptr, v_cache_ptr,
    stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_v_t, stride_v_h,
    stride_cos, stride_sin,
    stride_kc_b, stride_kc_s, stride_kc_h, stride_vc_b, stride_vc_s, stride_vc_h,
    num_q_heads, num_kv_heads, eps,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HAS_NORM: tl.constexpr,
):
    """One program per token."""
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask_d = offs_d < HALF
    cos = tl.load(cos_ptr + pos * stride_cos + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + pos * stride_sin + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    _norm_rope_heads(q_ptr + token * stride_q_t, stride_q_h, num_q_heads, q_w_ptr, cos, sin,
                     offs_d, mask_d, eps, HEAD_DIM, HALF, BLOCK_HQ, HAS_NORM)
    k1, k2, mask_k = _norm_rope_heads(k_ptr + token * stride_k_t, stride_k_h, num_kv_heads,
                                      k_w_ptr, cos, sin, offs_d, mask_d, eps, HEAD_DIM, HALF,
                                      BLOCK_HK, HAS_NORM)

    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_HK)
    # The write flag as a per-head vector (the interpreter rejects a scalar in a mask).
    write = (tl.zeros([BLOCK_HK], tl.int64) + slot) >= 0
    store_mask = mask_k & write[:, None]
    slot = tl.maximum(slot, 0)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    k_dst = (k_cache_ptr + block * stride_kc_b + offset * stride_kc_s
             + offs_h[:, None] * stride_kc_h + offs_d[None, :])
    tl.store(k_dst, k1.to(k_cache_ptr.dtype.element_ty), mask=store_mask)
    tl.store(k_dst + HALF, k2.to(k_cache_ptr.dtype.element_ty), mask=store_mask)
    v_src = v_ptr + token * stride_v_t + offs_h[:, None] * stride_v_h + offs_d[None, :]
    v1 = tl.load(v_src, mask=store_mask, other=0.0)
    v2 = tl.load(v_src + HALF, mask=store_mask, other=0.0)
    v_dst = (v_cache_ptr + block * stride_vc_b + offset * stride_vc_s
             + offs_h[:, None] * stride_vc_h + offs_d[None, :])
    tl.store(v_dst, v1.to(v_cache_ptr.dtype.element_ty), mask=store_mask)
    tl.store(v_dst + HALF, v2.to(v_cache_ptr.dtype.element_ty), mask=store_mask)


def qk_norm_rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                       cos: torch.Tensor, sin: torch.Tensor, q_weight: torch.Tensor | None,
                       k_weight: torch.Tensor | None, eps: float, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, slot_mapping: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of ``q`` ``[T, Hq, D]`` and ``k`` ``[T, Hk, D]`` (when the weights
    ``[D]`` are given; both or neither), neox rotary at ``positions`` (``cos``/``sin`` fp32
    ``[max_pos, D/2]``), then ``k``/``v`` stored into the caches ``[blocks, block_size, Hk,
    D]`` at ``slot_mapping`` (-1 skips). Returns ``(q, k)`` normalised and rotated: on the
    Triton path the inputs themselves, modified in place (they may be views of a fused QKV
    output); the reference returns new tensors."""
    assert (q_weight is None) == (k_weight is None), "pass both q/k norm weights or neither"
    half = q.shape[-1] // 2
    assert cos.shape[-1] == half and k.shape[-1] == q.shape[-1] == v.shape[-1]
    for t in (q, k, v, cos, sin, k_cache, v_cache):
        assert t.stride(-1) == 1, "the last dim must be contiguous"
    same_dtype = q_weight is None or (q_weight.dtype == q.dtype and k_weight.dtype == k.dtype)
    if not use_triton(q) or not same_dtype:
        # (A norm weight of another dtype promotes the normed q/k in torch; keep that exact.)
        return qk_norm_rope_store_ref(q, k, v, positions, cos, sin, q_weight, k_weight, eps,
                                      k_cache, v_cache, slot_mapping)
    num_tokens = q.shape[0]
    if num_tokens > 0:
        has_norm = q_weight is not None
        _qk_norm_rope_store_kernel[(num_tokens,)](
            q, k, v, q_weight if has_norm else q, k_weight if has_norm else k, cos, sin,
            positions, slot_mapping, k_cache, v_cache,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            cos.stride(0), sin.stride(0),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            q.shape[1], k.shape[1], eps,
            HEAD_DIM=q.shape[-1], HALF=half, BLOCK_HALF=triton.next_power_of_2(half),
            BLOCK_HQ=triton.next_power_of_2(q.shape[1]),
            BLOCK_HK=triton.next_power_of_2(k.shape[1]),
            BLOCK_SIZE=k_cache.shape[1], HAS_NORM=has_norm,
        )
    return q, k
