"""Fused RMSNorm with an optional residual add, numerically matching HF Llama.

HF's decoder layer does ``residual + hidden`` in the model dtype, then ``RMSNorm``:
``h = x.float(); h * rsqrt(mean(h^2) + eps); weight * h.to(input_dtype)``. The kernel does
the same roundings in one pass over each row, so the sum is read once instead of three
times. Rows are the last dim of a 2-D or 3-D view; the 3-D form takes strides for both
leading dims so Qwen3's per-head q/k norm can run on ``qkv[:, :q_size].view(T, H, D)``
without a copy.
"""
from __future__ import annotations

from typing import overload

import torch
import triton
import triton.language as tl

from executor.kernels._dispatch import use_triton
from executor.kernels.reference import rms_norm_ref


@triton.jit
def _rms_norm_kernel(out_ptr, residual_out_ptr, x_ptr, residual_ptr, weight_ptr,
                     inner_rows, stride_x_outer, stride_x_inner,
                     stride_r_outer, stride_r_inner, hidden, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per row; outputs are contiguous ``[rows, hidden]``."""
    row = tl.program_id(0).to(tl.int64)
    outer = row // inner_rows
    inner = row % inner_rows
    offs = tl.arange(0, BLOCK_N)
    mask = offs < hidden
    x = tl.load(x_ptr + outer * stride_x_outer + inner * stride_x_inner + offs, mask=mask,
                other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + outer * stride_r_outer + inner * stride_r_inner
                           + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * hidden + offs, x, mask=mask)
    h = x.to(tl.float32)
    variance = tl.sum(h * h, axis=0) / hidden
    normed = (h * tl.rsqrt(variance + eps)).to(x_ptr.dtype.element_ty)
    weight = tl.load(weight_ptr + offs, mask=mask, other=0.0)
    out = weight.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * hidden + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _as_3d(t: torch.Tensor) -> torch.Tensor:
    """``[outer, inner, hidden]`` view of ``t``; copies only if the leading dims do not merge."""
    if t.dim() == 2:
        return t.unsqueeze(1)
    if t.dim() == 3:
        return t
    return t.reshape(-1, t.shape[-2], t.shape[-1])


@overload
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: None = None) -> torch.Tensor: ...


@overload
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of ``x`` over its last dim (``weight`` is ``[hidden]``).

    Without ``residual`` returns the normed tensor; with it, returns ``(normed,
    new_residual)`` where ``new_residual = x + residual`` (in x's dtype) and ``normed`` is
    its norm. Outputs are new contiguous tensors shaped like ``x``; ``normed`` has the dtype
    ``weight * x`` has in torch.
    """
    assert x.stride(-1) == 1, "the normalised dim must be contiguous"
    if not use_triton(x):
        return rms_norm_ref(x, weight, eps, residual)
    hidden = x.shape[-1]
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype),
                      device=x.device)
    x3 = _as_3d(x)
    if residual is None:
        residual_out, r3 = out, x3  # placeholders: HAS_RESIDUAL=False never touches them
    else:
        assert residual.shape == x.shape and residual.dtype == x.dtype
        assert residual.stride(-1) == 1
        residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        r3 = _as_3d(residual)
    rows = x3.shape[0] * x3.shape[1]
    if rows > 0:
        block_n = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(rows,)](
            out, residual_out, x3, r3, weight, x3.shape[1],
            x3.stride(0), x3.stride(1), r3.stride(0), r3.stride(1), hidden, eps,
            HAS_RESIDUAL=residual is not None, BLOCK_N=block_n,
            num_warps=min(max(block_n // 256, 1), 16),
        )
    return out if residual is None else (out, residual_out)
