"""EngineCore: schedule -> backend.execute -> update, plus the records a run leaves.

The engine never reads a clock. ``step(now)`` is told when the step starts; the backend
says how long it took; sampled tokens are stamped at ``now + duration``. The simulator
passes ``env.now``, the real driver the wall clock since the run started.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import reduce
from operator import add, itemgetter

from core.backend import Backend
from core.config import CacheConfig, SchedulerConfig
from core.lazy_decode import LazyDecodeScheduler
from core.request import Request
from core.scheduler import Scheduler
from core.scheduler_output import SchedulerOutput, StepResult
from core.stats import StepStats


@dataclass
class EngineStepOutput:
    finished: list[Request] = field(default_factory=list)
    duration: float = 0.0
    scheduler_output: SchedulerOutput | None = None
    result: StepResult | None = None


class EngineCore:
    """One replica: a scheduler (with its KV cache manager) and a backend."""

    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig, backend: Backend,
                 eos_token_id: int | None = None, replica_id: int = 0, record_steps: bool = True) -> None:
        self.scheduler = Scheduler(scheduler_config, cache_config, eos_token_id)
        self.backend = backend
        self.replica_id = replica_id
        self.record_steps = record_steps
        self.finished: list[Request] = []  # every request that ended here, in finish order
        self.steps: list[StepStats] = []
        self._breakdown: dict[str, float] = {}
        self._pending_breakdowns: list[dict[str, float]] = []  # per-step splits not summed yet

    @property
    def breakdown(self) -> dict[str, float]:
        """Total seconds per op, when the backend reports it.

        Steps only queue their split; it is summed here, in step order (the same floats as
        summing at every step), so a simulated step does not pay ten dict updates.
        """
        bd = self._breakdown
        pending = self._pending_breakdowns
        if not pending:
            return bd
        ops = list(pending[0])
        sums = {}
        try:  # the common case, every split with the same ops: one C-level left fold per op
            if sum(map(len, pending)) == len(ops) * len(pending):
                for op in ops:
                    sums[op] = reduce(add, map(itemgetter(op), pending), bd.get(op, 0.0))
        except KeyError:  # some split lacks an op of the first
            sums = {}
        if len(sums) == len(ops) and ops:
            bd.update(sums)
        else:
            for split in pending:
                for op, t in split.items():
                    bd[op] = bd.get(op, 0.0) + t
        pending.clear()
        return bd

    def _add_breakdown(self, split: dict[str, float]) -> None:
        pending = self._pending_breakdowns
        pending.append(split)
        if len(pending) >= 4096:  # bounded memory
            self.breakdown

    def use_lazy_decode(self, default_token_id: int) -> None:
        """Swap in a ``LazyDecodeScheduler`` (same configs; only before any request).

        Only for backends that emit known decode tokens: each request's
        ``forced_output_token_ids``, then ``default_token_id`` (the simulator's backend).
        """
        old = self.scheduler
        if old.requests or old.step_id:
            raise RuntimeError("use_lazy_decode() must be called before the engine gets requests")
        if isinstance(old, LazyDecodeScheduler):
            return
        self.scheduler = LazyDecodeScheduler(old.config, old.cache_config, old.eos_token_id, default_token_id)

    # --- requests --------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort_request(self, request_id: str, now: float) -> Request | None:
        req = self.scheduler.abort_request(request_id)
        if req is not None:
            req.finish_time = now
            self.finished.append(req)
        return req

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # --- what a router sees -----------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    def cached_prefix_tokens(self, prompt_token_ids: list[int]) -> int:
        return self.scheduler.kv.cached_prefix_tokens(prompt_token_ids)

    # --- stepping ----------------------------------------------------------------------
    def step(self, now: float) -> EngineStepOutput:
        """Run one step starting at ``now``; returns what finished and how long it took."""
        sched = self.scheduler
        out = sched.schedule()
        if out.is_empty:
            self._check_idle()
            return EngineStepOutput(scheduler_output=out)
        self._stamp_first_scheduled(out, now)
        result = self.backend.execute(out)
        self._check_result(out, result)
        end = now + result.duration
        finished = sched.update_from_output(out, result, end)
        self.finished.extend(finished)
        self._record(out, result, now)
        return EngineStepOutput(finished, result.duration, out, result)

    def _check_idle(self) -> None:
        sched = self.scheduler
        if sched.has_unfinished():
            # add_request admits only requests an empty engine can run, so this is a bug, not load.
            raise RuntimeError(f"replica {self.replica_id}: {len(sched.waiting)} waiting and "
                               f"{len(sched.running)} running requests, but nothing could be scheduled")

    def _check_result(self, out: SchedulerOutput, result: StepResult) -> None:
        if len(result.sampled_token_ids) != len(out.req_ids):
            raise RuntimeError(f"backend returned {len(result.sampled_token_ids)} token lists for "
                               f"{len(out.req_ids)} scheduled requests")

    def _stamp_first_scheduled(self, out: SchedulerOutput, now: float) -> None:
        requests = self.scheduler.requests
        for rid in out.new_req_ids:
            req = requests[rid]
            if req.first_scheduled_time is None:
                req.first_scheduled_time = now

    def _record(self, out: SchedulerOutput, result: StepResult, now: float) -> None:
        """Add the step's op breakdown and (when recording) its ``StepStats`` row."""
        if result.breakdown:
            self._add_breakdown(result.breakdown)
        if self.record_steps:
            sched = self.scheduler
            prefill = out.num_prefill_tokens
            self.steps.append(StepStats(
                out.step_id, now, result.duration, 1, out.num_reqs, prefill,
                out.total_num_scheduled_tokens - prefill, len(sched.waiting), len(sched.running),
                len(out.preempted_req_ids), sched.kv.usage(), sum(out.num_cached_tokens.values()),
                self.replica_id))

    def decode_horizon(self) -> int:
        """Upcoming steps that are guaranteed identical pure-decode steps (0 = none)."""
        return self.scheduler.decode_horizon()

    def apply_decode_steps(self, now: float, durations: list[float], token_ids: list[list[int]] | None,
                           breakdown: dict[str, float] | None = None,
                           ends: list[float] | None = None) -> list[Request]:
        """Apply ``len(durations)`` decode steps starting at ``now`` in one go.

        ``token_ids[i]`` are the tokens of ``scheduler.running[i]``, one per step (None for a
        ``LazyDecodeScheduler``, which knows them). Equal to calling ``step`` that many
        times; recorded as one StepStats row with ``num_steps``. ``ends``, if given, are the
        steps' end times as the caller already summed them (``now`` plus the durations, one
        by one, in order: the same floats).
        """
        sched = self.scheduler
        k = len(durations)
        if ends is None:
            ends = []
            t = now
            for d in durations:
                t += d
                ends.append(t)
        else:
            t = ends[-1]
        batch = len(sched.running)
        first_step = sched.step_id + 1
        finished = sched.apply_decode_steps(k, ends, token_ids)
        self.finished.extend(finished)
        if breakdown:
            self._add_breakdown(breakdown)
        if self.record_steps:
            self.steps.append(StepStats(first_step, now, t - now, k, batch, 0, batch * k, len(sched.waiting),
                                        len(sched.running), 0, sched.kv.usage(), 0, self.replica_id))
        return finished
