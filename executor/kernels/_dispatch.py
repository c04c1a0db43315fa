"""Which implementation a kernel call runs: the Triton kernel or its torch reference.

CUDA tensors always take the Triton path. CPU tensors take the torch reference (exact and
fast enough for CPU-only tests of the model code) unless ``TRITON_INTERPRET=1`` was set
when this package was imported: then the Triton interpreter runs the kernels' own code on
CPU, which is how the kernels are tested on machines with no GPU. The variable is read
once, at import, because that is also when ``triton.jit`` decides between compiling and
interpreting a kernel; reading it later could send CPU tensors to compiled kernels.
"""
from __future__ import annotations

import os

import torch

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(tensor: torch.Tensor) -> bool:
    """True when a kernel given ``tensor`` should launch Triton rather than the reference."""
    return tensor.is_cuda or TRITON_INTERPRET
