"""Configuration records for the scheduler and the KV cache (validated on construction)."""
from __future__ import annotations

from dataclasses import dataclass


def _is_power_of_two(n: int) -> bool:
    return isinstance(n, int) and n > 0 and (n & (n - 1)) == 0


@dataclass
class CacheConfig:
    """KV cache geometry.

    ``num_gpu_blocks`` comes from the backend's memory arithmetic (simulator: model size
    and hardware; executor: a profiling forward). ``num_cpu_blocks`` is the host pool
    used by swap preemption (0 disables swapping).
    """

    block_size: int = 16
    num_gpu_blocks: int = 4096
    num_cpu_blocks: int = 0
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if not _is_power_of_two(self.block_size):
            raise ValueError(f"CacheConfig.block_size must be a power of two, got {self.block_size!r}")
        if not isinstance(self.num_gpu_blocks, int) or self.num_gpu_blocks < 1:
            raise ValueError(f"CacheConfig.num_gpu_blocks must be >= 1, got {self.num_gpu_blocks!r}")
        if not isinstance(self.num_cpu_blocks, int) or self.num_cpu_blocks < 0:
            raise ValueError(f"CacheConfig.num_cpu_blocks must be >= 0, got {self.num_cpu_blocks!r}")


@dataclass
class SchedulerConfig:
    """Knobs of the token-budget loop (names follow vLLM's).

    ``policy`` orders the waiting queue and picks preemption victims (``fcfs``,
    ``priority``, ``sjf``, ``lpm``); ``batching`` selects the batching discipline
    (``continuous`` = vLLM v1, ``orca`` = iteration-level without chunking and with
    max-length KV reservation, ``static`` = the batch drains before a new one forms).
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 8192
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 0  # 0 = no per-request cap beyond the budget
    policy: str = "fcfs"
    batching: str = "continuous"
    preemption_mode: str = "recompute"  # or "swap"
    watermark: float = 0.01  # fraction of blocks kept free when admitting new requests
    truncate_prompt: bool = False  # truncate over-long prompts instead of rejecting them

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"SchedulerConfig.{name} must be an int >= 1, got {v!r}")
        if self.long_prefill_token_threshold < 0:
            raise ValueError("SchedulerConfig.long_prefill_token_threshold must be >= 0, "
                             f"got {self.long_prefill_token_threshold!r}")
        if not (0.0 <= self.watermark < 1.0):
            raise ValueError(f"SchedulerConfig.watermark must be in [0, 1), got {self.watermark!r}")
        if self.preemption_mode not in ("recompute", "swap"):
            raise ValueError(f"SchedulerConfig.preemption_mode must be 'recompute' or 'swap', "
                             f"got {self.preemption_mode!r}")
