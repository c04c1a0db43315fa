"""Rotary position embedding (neox / HF ``rotate_half`` style) and its cos/sin cache.

The cache is built once per model in fp32, exactly as HF transformers computes
``inv_freq`` and ``cos(position * inv_freq)``, including Llama 3.x's ``llama3`` frequency
scaling, so logits can be compared with HF. The kernel rotates q and k in place, one
program per token, reading that token's cos/sin row once for all of its heads.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl

from executor.kernels._dispatch import use_triton
from executor.kernels.reference import rotary_ref


def rope_inv_freq(head_dim: int, base: float,
                  rope_scaling: dict[str, Any] | None = None) -> torch.Tensor:
    """HF's fp32 inverse frequencies ``[head_dim // 2]`` for ``default`` or ``llama3`` RoPE.

    ``rope_scaling`` is the HF config dict (``rope_type`` or legacy ``type``); None or
    ``{"rope_type": "default"}`` gives plain RoPE. Other types raise NotImplementedError
    rather than silently producing wrong positions.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64)
                               .to(dtype=torch.float) / head_dim))
    rope_type = "default" if rope_scaling is None else rope_scaling.get(
        "rope_type", rope_scaling.get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type != "llama3":
        raise NotImplementedError(f"rope_type {rope_type!r} is not supported")
    factor = rope_scaling["factor"]
    low_freq_factor = rope_scaling["low_freq_factor"]
    high_freq_factor = rope_scaling["high_freq_factor"]
    old_context_len = rope_scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed down by `factor`, short ones kept, the band between
    # interpolated smoothly (same operation order as HF, so the fp32 results are identical).
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin_cache(head_dim: int, max_position: int, base: float,
                       rope_scaling: dict[str, Any] | None = None,
                       device: torch.device | str = "cpu"
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(cos, sin)``, each ``[max_position, head_dim // 2]``, for ``apply_rotary``.

    Computed on CPU (HF's own fp32 formula, bit for bit) and then moved to ``device``.
    """
    positions = torch.arange(max_position, dtype=torch.float32)
    freqs = positions[:, None] * rope_inv_freq(head_dim, base, rope_scaling)[None, :]
    return freqs.cos().to(device), freqs.sin().to(device)


@triton.jit
def _rotate_heads(base_ptr, stride_head, num_heads, cos, sin, offs_d, mask_d,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rotate every head of one token in place: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s)."""
    offs_h = tl.arange(0, BLOCK_H)
    mask = (offs_h < num_heads)[:, None] & mask_d[None, :]
    first = base_ptr + offs_h[:, None] * stride_head + offs_d[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    dtype = base_ptr.dtype.element_ty
    tl.store(first, (x1 * cos - x2 * sin).to(dtype), mask=mask)
    tl.store(first + HALF, (x2 * cos + x1 * sin).to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, positions_ptr,
                   stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_cos, stride_sin,
                   num_q_heads, num_k_heads,
                   HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                   BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr):
    """One program per token: load its cos/sin row, rotate all its q and k heads."""
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask_d = offs_d < HALF
    cos = tl.load(cos_ptr + pos * stride_cos + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_sin + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + token * stride_q_t, stride_q_h, num_q_heads, cos, sin, offs_d,
                  mask_d, HALF, BLOCK_HQ)
    _rotate_heads(k_ptr + token * stride_k_t, stride_k_h, num_k_heads, cos, sin, offs_d,
                  mask_d, HALF, BLOCK_HK)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` ``[T, num_heads, head_dim]`` and ``k`` ``[T, num_kv_heads, head_dim]``
    in place at ``positions`` (int ``[T]``, each < ``cos.shape[0]``); returns ``(q, k)``.

    ``cos``/``sin`` come from ``rope_cos_sin_cache``. Math is fp32, rounded once to the
    input dtype. The head dim must be contiguous; q and k may be views of a fused QKV.
    """
    half = q.shape[-1] // 2
    assert cos.shape[-1] == half and k.shape[-1] == q.shape[-1]
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos.stride(-1) == 1
    assert sin.stride(-1) == 1
    if not use_triton(q):
        return rotary_ref(q, k, positions, cos, sin)
    num_tokens = q.shape[0]
    if num_tokens > 0:
        _rotary_kernel[(num_tokens,)](
            q, k, cos, sin, positions,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
            q.shape[1], k.shape[1],
            HALF=half, BLOCK_HALF=triton.next_power_of_2(half),
            BLOCK_HQ=triton.next_power_of_2(q.shape[1]),
            BLOCK_HK=triton.next_power_of_2(k.shape[1]),
        )
    return q, k
