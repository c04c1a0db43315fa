"""KV-cache sizing: how many blocks fit next to the weights on one GPU.

The same arithmetic as vLLM's, and as our executor's: the executor measures the activation
peak with a profiling forward pass and passes it as ``activation_reserve_bytes``; the
simulator cannot run one, so it reserves a fixed default. Both then compute::

    blocks = (memory_bytes * gpu_memory_utilization - weights / (tp * pp) - activation_reserve)
             // block_bytes_per_gpu
    block_bytes_per_gpu = 2 (K, V) * block_size * kv_heads_per_gpu * head_dim * kv_dtype_bytes
                          * layers_per_stage

Weights are assumed to split evenly over the ``tp * pp`` GPUs (embedding and LM head are
vocab-parallel; replicated K/V projections when ``tp > num_kv_heads`` are ignored).
"""
from __future__ import annotations

from simulator.cost_model.parallel import ParallelConfig
from simulator.hardware import HardwareSpec
from simulator.model_spec import ModelSpec

# CUDA context, NCCL buffers, CUDA graphs and the activation peak of a max_num_batched_tokens
# forward: about 2 GiB for the models of our catalog on one GPU.
DEFAULT_ACTIVATION_RESERVE_BYTES = 2 * 2**30


def kv_block_bytes(model: ModelSpec, tp: int, pp: int, block_size: int) -> int:
    """Bytes one KV block takes on each GPU."""
    parallel = ParallelConfig(tp=tp, pp=pp)
    return (2 * block_size * parallel.kv_heads_per_gpu(model) * model.head_dim * model.kv_dtype_bytes
            * parallel.layers_per_stage(model))


def num_kv_blocks(model: ModelSpec, hardware: HardwareSpec, tp: int = 1, pp: int = 1, block_size: int = 16,
                  gpu_memory_utilization: float = 0.9,
                  activation_reserve_bytes: int = DEFAULT_ACTIVATION_RESERVE_BYTES) -> int:
    """KV blocks per GPU (every GPU of the group holds the same number); ValueError if none fit."""
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size!r}")
    ParallelConfig(tp=tp, pp=pp).validate(model)
    budget = hardware.memory_bytes * gpu_memory_utilization
    weights = model.weight_bytes / (tp * pp)
    free = budget - weights - activation_reserve_bytes
    gib = 2**30
    if free <= 0:
        raise ValueError(
            f"{model.name} does not fit on {hardware.name} at tp={tp}, pp={pp}: weights per GPU "
            f"{weights / gib:.2f} GiB + activation reserve {activation_reserve_bytes / gib:.2f} GiB exceed "
            f"the {budget / gib:.2f} GiB available ({hardware.memory_bytes / gib:.2f} GiB x "
            f"{gpu_memory_utilization})")
    block = kv_block_bytes(model, tp, pp, block_size)
    blocks = int(free // block)
    if blocks < 1:
        raise ValueError(f"no KV block fits for {model.name} on {hardware.name}: {free / gib:.3f} GiB left "
                         f"after weights, a block takes {block / 2**20:.2f} MiB")
    return blocks
