"""Build and run a whole simulation from plain configs; write the standard result files.

This is the one function both the Hydra entry point and the benchmarks call, so a
``python -m experiments.run`` study and ``experiments/bench_sim.py`` run identical code.
"""
from __future__ import annotations

import dataclasses
import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from core.config import CacheConfig, SchedulerConfig
from core.engine import EngineCore
from core.metrics import summarize
from core.request import Request
from core.results import write_results
from core.workloads.workload import Workload
from simulator.cost_model import make_cost_model
from simulator.hardware import get_hardware
from simulator.memory import kv_block_bytes, num_kv_blocks
from simulator.model_spec import ModelSpec, get_model
from simulator.sim_backend import SimBackend
from simulator.simulation import SimResult, Simulation


@dataclass
class ParallelSpec:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    router: str = "round_robin"
    num_microbatches: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp", "num_microbatches"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"parallel.{name} must be an int >= 1, got {v!r}")


@dataclass
class SimulationConfig:
    """Everything a simulated run needs besides the workload.

    ``num_gpu_blocks`` = 0 derives the KV pool from memory arithmetic (the executor's
    formula); ``swap_space_gb`` sizes the host pool per replica for swap preemption.
    """

    model: str | ModelSpec = "Llama-3.1-8B"
    hardware: str = "H100"
    parallel: ParallelSpec = field(default_factory=ParallelSpec)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    block_size: int = 16
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks: int = 0
    swap_space_gb: float = 0.0
    cost_model: str = "roofline"
    cost_model_options: dict[str, Any] = field(default_factory=dict)
    fast_forward: bool = True
    record_steps: bool = True
    slo: dict[str, float] | None = None
    think_time_s: float = 0.0
    swap_bandwidth: float = 25e9  # host <-> GPU bytes/s for swap preemption (PCIe Gen4 x16, achieved)
    kv_cache_dtype: str = "auto"  # "fp8": a float8 KV cache (the executor's kv_cache_dtype)


@dataclass
class RunOutput:
    result: SimResult
    metrics: dict[str, Any]
    num_gpu_blocks: int
    wall_seconds: float


def _model(spec: str | ModelSpec, kv_cache_dtype: str = "auto") -> ModelSpec:
    if isinstance(spec, ModelSpec):
        model = spec
    elif str(spec).endswith(".json") or Path(str(spec)).is_dir():
        model = ModelSpec.from_hf_config(spec)
    else:
        model = get_model(str(spec))
    return model if kv_cache_dtype == "auto" else dataclasses.replace(model, kv_cache_dtype=kv_cache_dtype)


def build_requests(workload: Workload) -> tuple[list[Request], list[list[Request]]]:
    """Open-loop requests, or closed-loop per-user sequences (see ``Workload.core_requests``)."""
    return workload.core_requests()


def run_simulation(cfg: SimulationConfig, workload: Workload, out_dir: str | Path | None = None,
                   on_progress: Callable[[int], None] | None = None) -> RunOutput:
    """Simulate ``workload`` under ``cfg``; write result files to ``out_dir`` when given."""
    t0 = time.perf_counter()
    model = _model(cfg.model, cfg.kv_cache_dtype)
    hw = get_hardware(cfg.hardware)
    par = cfg.parallel
    blocks = cfg.num_gpu_blocks or num_kv_blocks(model, hw, par.tp, par.pp, cfg.block_size,
                                                 cfg.gpu_memory_utilization)
    if blocks < 1:
        raise ValueError(f"num_gpu_blocks must be >= 1, got {blocks}")
    block_bytes = kv_block_bytes(model, par.tp, par.pp, cfg.block_size)
    cpu_blocks = int(cfg.swap_space_gb * 1e9 // block_bytes)
    cache = CacheConfig(cfg.block_size, blocks, cpu_blocks, cfg.enable_prefix_caching)
    engines = []
    for i in range(par.dp):
        cost = make_cost_model(cfg.cost_model, model, hw, par.tp, par.pp,
                               num_microbatches=par.num_microbatches, **cfg.cost_model_options)
        backend = SimBackend(cost, swap_bytes_per_block=block_bytes, swap_bandwidth=cfg.swap_bandwidth)
        engines.append(EngineCore(dataclasses.replace(cfg.scheduler), cache, backend, replica_id=i,
                                  record_steps=cfg.record_steps))
    requests, sessions = build_requests(workload)
    # The requests' token lists (tens of millions of references for 10k long prompts) live
    # through the run: frozen, the cyclic collector stops re-walking them (~0.3 s per 10k).
    gc.freeze()
    try:
        sim = Simulation(engines, requests, router=par.router, fast_forward=cfg.fast_forward,
                         closed_loop=sessions, think_time=cfg.think_time_s if workload.closed_loop is None
                         else workload.closed_loop.think_time_s,
                         stop_issuing_at=workload.duration_s if workload.is_closed_loop else None,
                         on_progress=on_progress)
        result = sim.run()
        metrics = summarize(result.requests, result.steps, slo=cfg.slo)
    finally:
        gc.unfreeze()
    metrics["num_gpu_blocks"] = blocks
    metrics["num_cpu_blocks"] = cpu_blocks
    metrics["num_events"] = result.num_events
    metrics["num_not_issued"] = sim.num_not_issued
    metrics["simulated_seconds"] = result.duration
    wall = time.perf_counter() - t0
    if out_dir is not None:
        write_results(out_dir, result.requests, result.steps, metrics, result.breakdown)
    return RunOutput(result, metrics, blocks, wall)
