"""KV-cache sizing and allocation for the model runner.

The arithmetic is vLLM's (and ``simulator.memory``'s, with a measured activation peak in
place of its fixed reserve)::

    block_bytes = 2 (K, V) * num_layers * block_size * num_kv_heads * head_dim * dtype_bytes
    num_blocks  = (total_gpu_memory * gpu_memory_utilization - used_after_profile) // block_bytes

where ``used_after_profile`` is the torch allocator's peak during a profiling forward at
``max_num_batched_tokens`` (weights + activations + logits and sampling of
``max_num_seqs`` rows) plus the memory other than torch's (CUDA context, cuBLAS
workspaces) that ``cudaMemGetInfo`` sees. On the CPU there is nothing to profile: a
configured number of blocks is used.

The pool is one tensor ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``,
so each layer's K and V are contiguous ``[num_blocks, block_size, num_kv_heads,
head_dim]`` views (the layout the kernels take) and swapping a block moves every layer's
copy with one gather.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from executor.config import ModelConfig

GiB = 2**30
#: Blocks on a CPU "device" when none are configured, capped by ``DEFAULT_CPU_KV_BYTES``.
DEFAULT_CPU_KV_BLOCKS = 4096
DEFAULT_CPU_KV_BYTES = 2 * GiB


#: ``kv_cache_dtype`` names: "auto" keeps the model dtype; "fp8" (= "fp8_e4m3") stores K and V as
#: float8 e4m3 with a unit scale (vLLM's default without calibrated scales): half the bytes of
#: bf16, so twice the blocks and half the attention traffic; values are rounded to 3 mantissa bits.
KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
                   "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_kv_cache_dtype(name: str | torch.dtype, model_dtype: torch.dtype) -> torch.dtype:
    """The torch dtype of the KV pool for a ``kv_cache_dtype`` name (or dtype)."""
    if isinstance(name, torch.dtype):
        return name
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"unknown kv_cache_dtype {name!r}; choose one of {sorted(KV_CACHE_DTYPES)}")
    return KV_CACHE_DTYPES[name] or model_dtype


def kv_block_bytes(config: ModelConfig, block_size: int, dtype: torch.dtype | None = None) -> int:
    """Bytes one KV block takes over all layers (K and V)."""
    itemsize = (dtype or config.dtype).itemsize
    return 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * config.head_dim * itemsize


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype | None = None) -> int:
    return kv_block_bytes(config, 1, dtype)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters (tied embeddings counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


@dataclass
class MemoryProfile:
    """What the profiling pass measured (bytes)."""

    total: int
    weights: int
    peak_torch: int
    non_torch: int
    budget: int  # total * gpu_memory_utilization
    kv_budget: int
    block_bytes: int
    num_blocks: int

    def describe(self) -> str:
        return (f"GPU memory {self.total / GiB:.2f} GiB x utilization = {self.budget / GiB:.2f} GiB; "
                f"weights {self.weights / GiB:.2f} GiB, profile peak {self.peak_torch / GiB:.2f} GiB, "
                f"non-torch {self.non_torch / GiB:.2f} GiB -> KV {self.kv_budget / GiB:.2f} GiB = "
                f"{self.num_blocks} blocks of {self.block_bytes / 2**20:.2f} MiB")


def num_blocks_from_profile(device: torch.device, gpu_memory_utilization: float, block_bytes: int,
                            weights: int, peak_torch: int) -> MemoryProfile:
    """vLLM's formula from a finished profiling pass (call right after it, before freeing)."""
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
    free, total = torch.cuda.mem_get_info(device)
    non_torch = max(0, (total - free) - torch.cuda.memory_reserved(device))
    budget = int(total * gpu_memory_utilization)
    kv_budget = budget - peak_torch - non_torch
    num_blocks = max(0, kv_budget // block_bytes)
    return MemoryProfile(total, weights, peak_torch, non_torch, budget, kv_budget, block_bytes, num_blocks)


def default_cpu_num_blocks(block_bytes: int, min_blocks: int) -> int:
    """Blocks for a CPU run without ``num_gpu_blocks``: a fixed count, capped in bytes, but
    always enough for one request of ``min_blocks``."""
    return max(min_blocks, min(DEFAULT_CPU_KV_BLOCKS, DEFAULT_CPU_KV_BYTES // block_bytes))


def num_cpu_blocks_for(swap_space_gb: float, block_bytes: int) -> int:
    """Host blocks for swap preemption from a size in GiB (vLLM's ``swap_space``)."""
    if swap_space_gb < 0:
        raise ValueError(f"swap_space must be >= 0 GiB, got {swap_space_gb!r}")
    return int(swap_space_gb * GiB // block_bytes)


def allocate_kv_pool(config: ModelConfig, num_blocks: int, block_size: int, device: torch.device,
                     dtype: torch.dtype | None = None, pin_memory: bool = False) -> torch.Tensor:
    """``[layers, 2, num_blocks, block_size, kv_heads, head_dim]``, zero-filled (a padded
    CUDA-graph row reads block 0, so it must hold finite values)."""
    shape = (config.num_hidden_layers, 2, num_blocks, block_size, config.num_key_value_heads, config.head_dim)
    dtype = dtype or config.dtype
    if pin_memory:
        return torch.zeros(shape, dtype=dtype, pin_memory=True)
    return torch.zeros(shape, dtype=dtype, device=device)


def layer_views(pool: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(k_cache, v_cache)`` views of a pool from ``allocate_kv_pool``."""
    return [(pool[i, 0], pool[i, 1]) for i in range(pool.shape[0])]
