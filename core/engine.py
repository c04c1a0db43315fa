"""EngineCore: schedule -> backend.execute -> update, plus the records a run leaves.

The engine never reads a clock. ``step(now)`` is told when the step starts; the backend
says how long it took; sampled tokens are stamped at ``now + duration``. The simulator
passes ``env.now``, the real driver the wall clock since the run started.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain

import numpy as np

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
        self._pending_ops: tuple[str, ...] = ()  # the ops of the queued splits, in their order
        self._pending_rows: list[tuple[float, ...]] = []  # queued splits' values, one tuple per step

    @property
    def breakdown(self) -> dict[str, float]:
        """Total seconds per op, when the backend reports it.

        Steps only queue their split's values (see ``_add_breakdown``); they are summed here,
        in step order, by one numpy accumulate down each op's column: the same floats as
        adding each split into the totals at its step, without walking every queued dict once
        per op (scattered in memory, those walks were mostly cache misses).
        """
        self._sum_pending()
        return self._breakdown

    def _sum_pending(self) -> None:
        rows = self._pending_rows
        if not rows:
            return
        ops = self._pending_ops
        bd = self._breakdown
        start = [bd.get(op, 0.0) for op in ops]
        table = np.fromiter(chain(start, chain.from_iterable(rows)), np.float64,
                            len(ops) * (len(rows) + 1)).reshape(-1, len(ops))
        self._pending_rows = []
        bd.update(zip(ops, np.add.accumulate(table, axis=0)[-1].tolist()))

    def add_breakdown(self, split: dict[str, float]) -> None:
        """Add seconds per op that no step reported (a simulator's fast-forwarded stretches)."""
        self._add_breakdown(split)

    def _add_breakdown(self, split: dict[str, float]) -> None:
        """Queue a step's split as a tuple of its values, while the ops (and their order) stay
        those of the queued ones; else the queued ones are summed first."""
        if not split:
            return
        ops = tuple(split)
        if ops != self._pending_ops:
            self._sum_pending()
            self._pending_ops = ops
        rows = self._pending_rows
        rows.append(tuple(split.values()))
        if len(rows) >= 1024:  # summed while still in cache (and bounded memory)
            self._sum_pending()

    def use_lazy_decode(self, default_token_id: int, through_finishes: bool = False) -> None:
        """Swap in a ``LazyDecodeScheduler`` (same configs; only before any request).

        Only for backends that emit known decode tokens: each request's
        ``forced_output_token_ids``, then ``default_token_id`` (the simulator's backend).
        ``through_finishes``: its fast-forward runs may go on past finishes while nobody waits
        (only for a caller that needs no finish before the run is applied, see
        ``LazyDecodeScheduler.decode_segments``).
        """
        old = self.scheduler
        if old.requests or old.step_id:
            raise RuntimeError("use_lazy_decode() must be called before the engine gets requests")
        if isinstance(old, LazyDecodeScheduler):
            return
        self.scheduler = LazyDecodeScheduler(old.config, old.cache_config, old.eos_token_id, default_token_id,
                                             through_finishes)

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
                           ends: list[float] | None = None) -> list[Request]:
        """Apply ``len(durations)`` decode steps starting at ``now`` in one go.

        ``token_ids[i]`` are the tokens of ``scheduler.running[i]``, one per step (None for a
        ``LazyDecodeScheduler``, which knows them). Equal to calling ``step`` that many
        times; recorded as StepStats rows with ``num_steps``, one per stretch with one batch (a
        ``LazyDecodeScheduler`` run may go on past finishes). ``ends``, if given, are the
        steps' end times as the caller already summed them (``now`` plus the durations, one
        by one, in order: the same floats). The run's per-op split is the caller's to add
        (``add_breakdown``): a simulator sums many runs' in one go.
        """
        sched = self.scheduler
        if ends is None:
            ends = []
            t = now
            for d in durations:
                t += d
                ends.append(t)
        first_step = sched.step_id + 1
        finished = sched.apply_decode_steps(len(durations), ends, token_ids)
        self.finished.extend(finished)
        if self.record_steps:
            self._record_run(first_step, now, ends)
        return finished

    def _record_run(self, first_step: int, now: float, ends: list[float]) -> None:
        """One ``StepStats`` row per stretch of the run with one batch (``run_segments``): the
        rows the same stretches run as separate fast-forward runs would leave."""
        sched = self.scheduler
        segments = sched.run_segments
        waiting = len(sched.waiting)
        i, start = 0, now
        for j, (n, batch, usage) in enumerate(segments):
            running = segments[j + 1][1] if j + 1 < len(segments) else len(sched.running)
            end = ends[i + n - 1]
            self.steps.append(StepStats(first_step + i, start, end - start, n, batch, 0, batch * n, waiting, running,
                                        0, usage, 0, self.replica_id))
            i += n
            start = end
