"""Workloads: who sends which prompts when.

Arrival processes (``arrivals``), length distributions (``lengths``), prompt token
content (``prompts``), readers for the shared public traces (``traces``), the request
records a run replays (``workload``) and the flat config that builds them (``config``).
Seeded and clock-free: the same config gives the same requests in the simulator and on
the GPU executor.
"""
from core.workloads.arrivals import (ArrivalProcess, ClosedLoopSpec, FixedIntervalArrivals, GammaArrivals,
                                     PoissonArrivals, TraceArrivals)
from core.workloads.config import (ARRIVAL_KINDS, LENGTH_KINDS, TIMED_KINDS, WORKLOAD_KINDS, WorkloadConfig,
                                   build_workload)
from core.workloads.lengths import EmpiricalLengths, FixedLengths, LengthDistribution, UniformLengths
from core.workloads.prompts import (HashBlockTokens, SystemPromptGroups, TokenSegments, conversation_prompts,
                                    random_token_segments, segments_len, segments_to_list, truncate_segments)
from core.workloads.traces import (DEFAULT_TRACE_FILES, MOONCAKE_BLOCK_SIZE, TRACE_KINDS, TRACES_ENV_VAR,
                                   TraceData, locate_traces_dir, read_azure_trace, read_burstgpt_trace,
                                   read_mooncake_trace, read_sharegpt_lengths, resolve_trace_path)
from core.workloads.workload import Workload, WorkloadRequest

__all__ = [
    "ArrivalProcess", "ClosedLoopSpec", "FixedIntervalArrivals", "GammaArrivals", "PoissonArrivals", "TraceArrivals",
    "ARRIVAL_KINDS", "LENGTH_KINDS", "TIMED_KINDS", "WORKLOAD_KINDS", "WorkloadConfig", "build_workload",
    "EmpiricalLengths", "FixedLengths", "LengthDistribution", "UniformLengths",
    "HashBlockTokens", "SystemPromptGroups", "TokenSegments", "conversation_prompts", "random_token_segments",
    "segments_len", "segments_to_list", "truncate_segments",
    "DEFAULT_TRACE_FILES", "MOONCAKE_BLOCK_SIZE", "TRACE_KINDS", "TRACES_ENV_VAR", "TraceData",
    "locate_traces_dir", "read_azure_trace", "read_burstgpt_trace", "read_mooncake_trace",
    "read_sharegpt_lengths", "resolve_trace_path",
    "Workload", "WorkloadRequest",
]
