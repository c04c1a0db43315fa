"""Per-step records written by the engine (one row of steps.parquet each)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class StepStats:
    """One engine step, or ``num_steps`` identical decode steps applied in bulk.

    ``time`` is the step's start in the backend's clock, ``duration`` its length in
    seconds (for a bulk record: the sum over its steps). Token counts are per step for a
    single step and summed for a bulk record.
    """

    step_id: int
    time: float
    duration: float
    num_steps: int
    batch_size: int
    num_prefill_tokens: int
    num_decode_tokens: int
    num_waiting: int
    num_running: int
    num_preempted: int
    kv_usage: float  # fraction of GPU KV blocks in use after scheduling
    num_prefix_hit_tokens: int = 0
    replica: int = 0
