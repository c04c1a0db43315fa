"""RealBackend: the core's ``Backend`` on a GPU (or, slowly, the CPU).

It wraps a ``ModelRunner``; the duration of each step is measured (CUDA events on the GPU,
``perf_counter`` on the CPU), so the engine's timeline is the wall clock. The KV pool size
comes from the runner's memory profiling, so build the backend first and the engine with
its ``cache_config``::

    backend = RealBackend.from_pretrained(model_dir, scheduler_config=sched_cfg)
    engine = EngineCore(sched_cfg, backend.cache_config, backend, eos_token_id=backend.eos_token_id)
    backend.bind(engine.scheduler.requests)   # the runner reads sampling params from it

or in one call: ``engine = create_engine(model_dir, sched_cfg)``.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from core.config import CacheConfig, SchedulerConfig
from core.async_engine import AsyncEngineCore
from core.engine import EngineCore
from core.request import Request
from core.scheduler_output import SchedulerOutput, StepResult
from executor import memory
from executor.loader import LoadedModel, load_model
from executor.model_runner import ModelRunner, PendingStep

#: Host swap space (GiB) used when swap preemption is on and no size is given (vLLM's default).
DEFAULT_SWAP_SPACE_GB = 4.0


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but torch sees no CUDA device")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"unsupported device {device}; use 'cuda' or 'cpu'")
    return device


class RealBackend:
    """Executes scheduler steps on the model; ``execute(SchedulerOutput) -> StepResult``."""

    def __init__(self, runner: ModelRunner, loaded: LoadedModel | None = None,
                 enable_prefix_caching: bool = True) -> None:
        self.runner = runner
        self.loaded = loaded
        self.enable_prefix_caching = enable_prefix_caching

    @classmethod
    def from_pretrained(cls, model: str | Path | LoadedModel, *, scheduler_config: SchedulerConfig | None = None,
                        dtype: str | torch.dtype | None = None, device: str | torch.device | None = None,
                        block_size: int = 16, gpu_memory_utilization: float = 0.9,
                        num_gpu_blocks: int | None = None, num_cpu_blocks: int | None = None,
                        swap_space: float | None = None, enforce_eager: bool = False,
                        cuda_graph_sizes: list[int] | None = None, enable_prefix_caching: bool = True,
                        seed: int | None = 0, tp: Any | None = None, kv_cache_dtype: str | torch.dtype = "auto",
                        **runner_options: Any) -> RealBackend:
        """Load ``model`` (a directory, or an already loaded model) and size its KV cache.

        The host pool for swap preemption holds ``num_cpu_blocks`` blocks, or ``swap_space``
        GiB; with neither, it is sized only when ``scheduler_config.preemption_mode ==
        'swap'`` (``DEFAULT_SWAP_SPACE_GB``, at most as many blocks as the GPU pool).
        ``runner_options`` go to ``ModelRunner`` (``emulate_cuda_graphs``: run the CUDA-graph
        path's padded layout eagerly on a CPU, a testing aid; ``attention_num_splits``: force
        the decode graphs' split-K factor). ``kv_cache_dtype``: "auto" (the model dtype) or
        "fp8" (float8 e4m3, unit scale: twice the blocks, half the attention bytes). ``tp``: a tensor-parallel group
        (``executor.parallel``): load this rank's shard only; use ``create_engine`` /
        ``LLM`` on rank 0, which also start the other ranks' shards.
        """
        sched = scheduler_config or SchedulerConfig()
        if isinstance(model, LoadedModel):
            loaded = model
        else:
            loaded = load_model(model, dtype=dtype, device=resolve_device(device), tp=tp)
        kv_dtype = memory.resolve_kv_cache_dtype(kv_cache_dtype, loaded.config.dtype)
        block_bytes = memory.kv_block_bytes(loaded.config, block_size, kv_dtype)
        runner = ModelRunner(loaded, block_size=block_size, max_num_seqs=sched.max_num_seqs,
                             max_num_batched_tokens=sched.max_num_batched_tokens,
                             max_model_len=sched.max_model_len, gpu_memory_utilization=gpu_memory_utilization,
                             num_gpu_blocks=num_gpu_blocks,
                             num_cpu_blocks=_host_blocks(num_cpu_blocks, swap_space, sched, block_bytes,
                                                         num_gpu_blocks),
                             enforce_eager=enforce_eager, cuda_graph_sizes=cuda_graph_sizes, seed=seed,
                             kv_cache_dtype=kv_dtype, **runner_options)
        if sched.preemption_mode == "swap" and runner.num_cpu_blocks == 0:
            runner.num_cpu_blocks = min(memory.num_cpu_blocks_for(DEFAULT_SWAP_SPACE_GB, block_bytes),
                                        runner.num_gpu_blocks)
            runner.host_pool = memory.allocate_kv_pool(loaded.config, runner.num_cpu_blocks, block_size,
                                                       torch.device("cpu"), kv_dtype, pin_memory=runner.is_cuda)
        return cls(runner, loaded, enable_prefix_caching)

    # --- what the engine needs ------------------------------------------------------------
    @property
    def cache_config(self) -> CacheConfig:
        r = self.runner
        return CacheConfig(block_size=r.block_size, num_gpu_blocks=r.num_gpu_blocks,
                           num_cpu_blocks=r.num_cpu_blocks, enable_prefix_caching=self.enable_prefix_caching)

    @property
    def eos_token_id(self) -> int | None:
        """The config's (first) EOS id, for ``EngineCore(eos_token_id=...)``."""
        ids = self.runner.config.eos_token_ids
        return int(ids[0]) if ids else None

    @property
    def extra_eos_token_ids(self) -> tuple[int, ...]:
        """Further EOS ids of configs that list several (callers add them as stop tokens)."""
        return tuple(int(t) for t in self.runner.config.eos_token_ids[1:])

    def bind(self, requests: dict[str, Request]) -> None:
        """Share the scheduler's live request table (``engine.scheduler.requests``)."""
        self.runner.bind(requests)

    def execute(self, scheduler_output: SchedulerOutput) -> StepResult:
        return self.runner.execute(scheduler_output)

    def launch(self, scheduler_output: SchedulerOutput) -> PendingStep:
        """Queue the step on the device; ``.result()`` waits for it (``core.async_engine``)."""
        return self.runner.launch(scheduler_output)

    def describe(self) -> dict[str, Any]:
        from executor.model_runner import kv_cache_summary

        return {"device": str(self.runner.device), "dtype": str(self.runner.config.dtype),
                "weight_bytes": self.runner.weight_bytes, **kv_cache_summary(self.runner)}


def _host_blocks(num_cpu_blocks: int | None, swap_space: float | None, sched: SchedulerConfig,
                 block_bytes: int, num_gpu_blocks: int | None) -> int:
    if num_cpu_blocks is not None:
        if num_cpu_blocks < 0:
            raise ValueError(f"num_cpu_blocks must be >= 0, got {num_cpu_blocks!r}")
        return int(num_cpu_blocks)
    if swap_space is not None:
        return memory.num_cpu_blocks_for(swap_space, block_bytes)
    if sched.preemption_mode == "swap" and num_gpu_blocks is not None:
        return min(memory.num_cpu_blocks_for(DEFAULT_SWAP_SPACE_GB, block_bytes), num_gpu_blocks)
    return 0  # swap with a profiled pool: sized after profiling (from_pretrained)


def create_engine(model: str | Path | LoadedModel, scheduler_config: SchedulerConfig | None = None,
                  record_steps: bool = True, tensor_parallel_size: int | None = None,
                  async_scheduling: bool = False, clock: Callable[[], float] | None = None,
                  **backend_kwargs: Any) -> EngineCore:
    """A core ``EngineCore`` driving a ``RealBackend`` (already bound to its request table).

    ``tensor_parallel_size``: shard the model over that many processes (this one is rank 0;
    start them with ``python -m executor.parallel.launch --tp N -- ...`` or torchrun). None:
    the launcher's group when there is one, else a single process. The backend is then an
    ``executor.parallel.worker.TPDriverBackend``. ``async_scheduling``: an
    ``AsyncEngineCore``, which schedules each step while the device runs the previous one
    (single process only); ``clock`` then stamps tokens when they reach the host."""
    sched = scheduler_config or SchedulerConfig()
    from executor.parallel.state import resolve_tp_group

    tp = resolve_tp_group(tensor_parallel_size)
    if tp is not None:
        if async_scheduling:
            raise ValueError("async_scheduling is not supported with tensor parallelism")
        from executor.parallel.worker import make_tp_backend

        backend = make_tp_backend(model, sched, tp, **backend_kwargs)
    else:
        backend = RealBackend.from_pretrained(model, scheduler_config=sched, **backend_kwargs)
    if async_scheduling:
        engine: EngineCore = AsyncEngineCore(sched, backend.cache_config, backend,
                                             eos_token_id=backend.eos_token_id, record_steps=record_steps,
                                             clock=clock)
    else:
        engine = EngineCore(sched, backend.cache_config, backend, eos_token_id=backend.eos_token_id,
                            record_steps=record_steps)
    backend.bind(engine.scheduler.requests)
    return engine
