"""Structured configs: the typed schema every ``conf/`` YAML file is merged into.

Hydra checks each override against these dataclasses when it composes the config, so a
typo (``scheduler.max_num_seq=8``), a wrong type (``workload.qps=fast``) or an unknown group
option fails before anything runs, naming the full key. The scheduler and parallel nodes
*are* the core and simulator records (``core.config.SchedulerConfig``,
``simulator.runner.ParallelSpec``), so a field added there is configurable here without an
edit, and their own ``__post_init__`` checks (ranges, allowed names) run when a node is
turned into an object. The workload node mirrors ``core.workloads.config.WorkloadConfig``
field for field, except that the arrival rate is called ``qps``, the name sweeps use
(``-m workload.qps=1,2,4,8``); ``to_workload_config`` maps it back to ``rate``.

``to_simulation_config`` and ``to_workload_config`` are the only bridge from a composed
config to ``simulator.runner.run_simulation``; run, search and tests all go through them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from core.config import SchedulerConfig
from core.workloads.config import WorkloadConfig
from simulator.runner import ParallelSpec, SimulationConfig

# Requests per run under ``quick=true``: enough for every code path (prefill, decode,
# prefix hits, the result files) and fast enough to run every preset in a test.
QUICK_NUM_REQUESTS = 24


@dataclass
class ModelConf:
    """``name``: a catalog entry (``simulator.model_spec.MODELS``, HF ids like
    ``Qwen/Qwen3-8B`` work) or the path of an HF ``config.json`` / checkpoint directory."""

    name: str = "Llama-3.1-8B"


@dataclass
class HardwareConf:
    """``name``: a ``simulator.hardware.HARDWARE`` entry or alias (``H100-SXM``, ``h100``)."""

    name: str = "H100-SXM"


@dataclass
class WorkloadConf:
    """``core.workloads.config.WorkloadConfig`` with ``rate`` renamed ``qps`` (requests/s).

    ``qps`` drives the synthetic arrival processes (poisson, gamma, fixed); a trace replay
    runs at its own timestamps scaled by ``speed``, and a closed loop at the pace its users
    set. See ``WorkloadConfig`` for every field's meaning.
    """

    kind: str = "sharegpt"
    trace_path: Optional[str] = None
    arrival: Optional[str] = None
    qps: float = 4.0
    cv: float = 1.0
    speed: float = 1.0
    num_users: int = 1
    think_time_s: float = 0.0
    num_requests: Optional[int] = 500
    duration_s: Optional[float] = None
    lengths: Optional[str] = None
    input_len: int = 1024
    output_len: int = 128
    input_range: List[int] = field(default_factory=lambda: [1, 1024])
    output_range: List[int] = field(default_factory=lambda: [1, 256])
    seed: int = 0
    vocab_size: int = 32000
    system_prompt_lens: List[int] = field(default_factory=list)
    num_turns: int = 1
    num_priorities: int = 1
    deadline_s: Optional[float] = None
    max_model_len: Optional[int] = 8192
    burstgpt_model: Optional[str] = None
    burstgpt_log_type: Optional[str] = None


@dataclass
class CacheConf:
    """KV cache: ``num_gpu_blocks`` = 0 sizes the pool from memory (weights, utilization);
    ``swap_space_gb`` is host memory per replica for swap preemption
    (``scheduler.preemption_mode=swap``); ``kv_cache_dtype: fp8`` stores K/V in one byte
    (the executor's float8 cache): twice the blocks, half the attention bytes."""

    block_size: int = 16
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks: int = 0
    swap_space_gb: float = 0.0
    kv_cache_dtype: str = "auto"


@dataclass
class BackendConf:
    """The simulated backend: which cost model prices a step, and its options
    (roofline: ``cpu_overhead``; calibrated: ``profile``, a JSON path). ``fast_forward``
    advances runs of pure-decode steps in one event (results are identical)."""

    cost_model: str = "roofline"
    cost_model_options: Dict[str, Any] = field(default_factory=dict)
    fast_forward: bool = True


@dataclass
class SLOConf:
    """Per-request latency bounds in ms (None = no bound); they define ``request_goodput``
    and ``slo_attainment`` in metrics.json. Defaults follow the usual chat SLO."""

    ttft_ms: Optional[float] = 2000.0
    tpot_ms: Optional[float] = 100.0
    e2el_ms: Optional[float] = None


@dataclass
class RunConf:
    """One simulated run. ``quick`` caps the run at ``QUICK_NUM_REQUESTS`` requests and
    turns the progress bar off (smoke tests); ``progress`` None = automatic (see run.py)."""

    model: ModelConf = field(default_factory=ModelConf)
    hardware: HardwareConf = field(default_factory=HardwareConf)
    workload: WorkloadConf = field(default_factory=WorkloadConf)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cache: CacheConf = field(default_factory=CacheConf)
    parallel: ParallelSpec = field(default_factory=ParallelSpec)
    backend: BackendConf = field(default_factory=BackendConf)
    slo: SLOConf = field(default_factory=SLOConf)
    quick: bool = False
    progress: Optional[bool] = None


@dataclass
class SearchConf:
    """Capacity search grid and bisection settings (see experiments/search.py).

    Each grid point is one configuration: ``tp`` x ``scheduler`` preset x
    ``max_num_batched_tokens`` (the chunk size) x ``max_num_seqs``; a None entry keeps the
    scheduler preset's own value. A probe runs ``num_requests`` requests, or as many as
    arrive in ``min_probe_s`` seconds if that is more.
    """

    tp: List[int] = field(default_factory=lambda: [1, 2, 4, 8])
    scheduler: List[str] = field(default_factory=lambda: ["vllm", "sarathi"])
    max_num_batched_tokens: List[Optional[int]] = field(default_factory=lambda: [None])
    max_num_seqs: List[Optional[int]] = field(default_factory=lambda: [None])
    num_requests: int = 300
    min_probe_s: float = 60.0
    start_qps: float = 1.0
    percentile: int = 99
    rel_tol: float = 0.05
    max_probes: int = 20
    workers: int = 2


@dataclass
class SearchRunConf(RunConf):
    search: SearchConf = field(default_factory=SearchConf)


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (``conf/config.yaml`` and ``conf/search.yaml``
    name them first in their defaults lists). Idempotent."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=RunConf)
    cs.store(name="base_search", node=SearchRunConf)


def _to_object(node: DictConfig, cls: type) -> Any:
    """Instantiate a dataclass from a composed node (runs its ``__post_init__`` checks)."""
    values = OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
    return cls(**values)


def to_workload_config(cfg: DictConfig) -> WorkloadConfig:
    """The run's ``WorkloadConfig``: ``qps`` becomes ``rate``; ``quick`` caps the request count."""
    spec = OmegaConf.to_container(cfg.workload, resolve=True, throw_on_missing=True)
    spec["rate"] = spec.pop("qps")
    if cfg.quick:
        spec["num_requests"] = min(spec["num_requests"] or QUICK_NUM_REQUESTS, QUICK_NUM_REQUESTS)
    return WorkloadConfig.from_dict(spec)


def slo_bounds(cfg: DictConfig) -> dict[str, float]:
    """The SLO bounds that are set, as ``core.metrics.summarize`` takes them (ms)."""
    return {k: float(v) for k, v in OmegaConf.to_container(cfg.slo, resolve=True).items() if v is not None}


def to_simulation_config(cfg: DictConfig) -> SimulationConfig:
    """The run's ``SimulationConfig`` (the scheduler and parallel records validate themselves)."""
    cache = _to_object(cfg.cache, CacheConf)
    backend = _to_object(cfg.backend, BackendConf)
    return SimulationConfig(
        model=cfg.model.name,
        hardware=cfg.hardware.name,
        parallel=_to_object(cfg.parallel, ParallelSpec),
        scheduler=_to_object(cfg.scheduler, SchedulerConfig),
        cost_model=backend.cost_model,
        cost_model_options=dict(backend.cost_model_options),
        fast_forward=backend.fast_forward,
        slo=slo_bounds(cfg) or None,
        **dataclasses.asdict(cache),
    )


register_configs()
