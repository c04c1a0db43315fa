"""SwiGLU activation of the fused gate/up projection: ``silu(gate) * up`` in one pass.

The MLP's gate/up GEMM writes ``[T, 2I]`` (gate in the first ``I`` columns, up in the
last ``I``). Unfused, torch runs two kernels (``silu`` writes a ``[T, I]`` temporary, the
multiply reads it back); this kernel reads each input element once and writes the
``[T, I]`` result once, with the same roundings as torch in the model dtype: ``silu``
computed in fp32 and rounded to the input dtype, then the product computed in fp32 and
rounded again (what ``F.silu(gate) * up`` does for bf16 / fp16).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from executor.kernels._dispatch import use_triton
from executor.kernels.reference import silu_mul_ref

BLOCK_COLS = 1024


@triton.jit
def _silu_mul_kernel(out_ptr, x_ptr, stride_x, stride_out, inter, BLOCK: tl.constexpr):
    """Program (row, column block): ``out[row, c] = round(round(silu(g)) * u)``."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + offs, mask=mask, other=0.0)
    dtype = x_ptr.dtype.element_ty
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype)
    out = act.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, out.to(dtype), mask=mask)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :I]) * x[..., I:]`` for ``x`` ``[..., 2I]``; returns a new ``[..., I]``."""
    if not use_triton(x):
        return silu_mul_ref(x)
    assert x.shape[-1] % 2 == 0 and x.stride(-1) == 1, "the last dim must be even and contiguous"
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.empty(x2.shape[0], inter, dtype=x.dtype, device=x.device)
    if x2.shape[0] > 0 and inter > 0:
        block = min(BLOCK_COLS, triton.next_power_of_2(inter))
        _silu_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](
            out, x2, x2.stride(0), out.stride(0), inter, BLOCK=block,
            num_warps=4 if block >= 512 else 1,
        )
    return out.view(*x.shape[:-1], inter)
