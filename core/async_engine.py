"""AsyncEngineCore: schedule step k+1 while the device still runs step k.

A synchronous engine leaves the GPU idle while the host applies step k's tokens,
schedules step k+1 and prepares its inputs (about 1 ms a step for 256 requests, ~15% of a
small model's decode step). Here every step is *launched* (``AsyncBackend.launch``), and
its sampled tokens are collected only after the next step has been launched behind it, so
host work overlaps device work (vLLM's async scheduling).

To schedule step k+1 before step k's tokens exist, each request that samples in step k
gets a placeholder output token (``PLACEHOLDER``) right after the launch: its progress
advances as if the token were known, so the scheduler sees a one-token decode as usual.
The backend reads that token's id from its own device copy of step k's samples. When step
k's tokens arrive, the placeholders are overwritten and stop tokens are checked:

* A request that reaches ``max_tokens`` (or ``max_model_len``) is finished as soon as its
  last token is launched: its length is known without the token's id. It is reported
  when that token arrives.
* A request that samples a stop token (EOS, stop ids) is found one step late: it was
  already scheduled into the next step, whose token for it is discarded (vLLM does the
  same). Its output is identical to a synchronous run's.
* The prefix cache never hashes a placeholder (``Request.num_pending_tokens``); a block
  whose last token was pending is registered when the token arrives.

Token times are the wall clock when the tokens reach the host (``clock``), or, without a
clock, the step's start plus its measured duration.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from core.config import CacheConfig, SchedulerConfig
from core.engine import EngineCore, EngineStepOutput
from core.request import Request, RequestStatus
from core.scheduler_output import SchedulerOutput, StepResult

#: Token id of an output token that is sampled but not yet known on the host.
PLACEHOLDER = -1


class PendingStep(Protocol):
    def result(self) -> StepResult: ...


@runtime_checkable
class AsyncBackend(Protocol):
    """A backend that can start a step and hand its result over later.

    ``launch`` must accept ``PLACEHOLDER`` as the last new token of a one-token request
    that sampled in the previously launched step, and use the id it sampled there.
    """

    def launch(self, scheduler_output: SchedulerOutput) -> PendingStep: ...


@dataclass
class _InFlight:
    """A launched step whose tokens have not been applied yet."""

    out: SchedulerOutput
    pending: PendingStep
    now: float
    # (index in the step, request, index of its placeholder in output_token_ids)
    entries: list[tuple[int, Request, int]] = field(default_factory=list)
    finished_by_length: list[Request] = field(default_factory=list)


class AsyncEngineCore(EngineCore):
    """``EngineCore`` with one step in flight; same results as the synchronous engine."""

    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig, backend: AsyncBackend,
                 eos_token_id: int | None = None, replica_id: int = 0, record_steps: bool = True,
                 clock: Callable[[], float] | None = None) -> None:
        if not isinstance(backend, AsyncBackend):
            raise TypeError(f"{type(backend).__name__} has no launch(): async scheduling needs an AsyncBackend")
        super().__init__(scheduler_config, cache_config, backend, eos_token_id, replica_id, record_steps)
        self.clock = clock
        self._inflight: _InFlight | None = None

    def use_lazy_decode(self, default_token_id: int, through_finishes: bool = False) -> None:
        raise RuntimeError("the lazy decode scheduler is for simulation; it has no async mode")

    def has_unfinished(self) -> bool:
        return self._inflight is not None or self.scheduler.has_unfinished()

    def step(self, now: float) -> EngineStepOutput:
        """Launch the next step (if there is one), then apply the previous step's tokens.

        The returned output describes the step whose tokens were applied (the previous
        one): what finished, its duration, its scheduler output and result.
        """
        out = self.scheduler.schedule()
        launched = None
        if not out.is_empty:
            self._stamp_first_scheduled(out, now)
            launched = self.backend.launch(out)
        previous = self._inflight
        self._inflight = None
        done = self._resolve(previous) if previous is not None else EngineStepOutput(scheduler_output=out)
        if launched is not None:
            self._inflight = self._advance(out, launched, now)
        elif previous is None:
            self._check_idle()
        return done

    def drain(self) -> EngineStepOutput | None:
        """Apply the step in flight, if any (e.g. before reading results mid-run)."""
        previous, self._inflight = self._inflight, None
        return self._resolve(previous) if previous is not None else None

    # --- right after a launch ------------------------------------------------------------
    def _advance(self, out: SchedulerOutput, pending: PendingStep, now: float) -> _InFlight:
        """Advance the launched requests as if their tokens were known (placeholders)."""
        sched = self.scheduler
        flight = _InFlight(out, pending, now)
        running = RequestStatus.RUNNING
        kv = sched.kv
        bs = kv.block_size
        caching = kv.enable_prefix_caching
        for i, (req, n, samples) in enumerate(zip(sched._scheduled_reqs, out.num_new_tokens, out.samples)):
            if req.status is not running:
                continue
            c = req.num_computed_tokens = req.num_computed_tokens + n
            if not samples:
                continue
            flight.entries.append((i, req, len(req.output_token_ids)))
            req.output_token_ids.append(PLACEHOLDER)
            req.all_token_ids.append(PLACEHOLDER)
            req.num_pending_tokens += 1
            if caching and c % bs == 0:
                # The block this step filled ends with the token that was pending when it was
                # scheduled (known now): register it, as a synchronous schedule would have.
                kv.cache_blocks(req, c)
            if len(req.all_token_ids) >= req.max_num_tokens and sched._check_stop(req, PLACEHOLDER):
                flight.finished_by_length.append(req)
        if flight.finished_by_length:
            sched._finish(flight.finished_by_length)
        return flight

    # --- when the tokens arrive ----------------------------------------------------------
    def _resolve(self, flight: _InFlight) -> EngineStepOutput:
        """Write the step's sampled tokens over its placeholders; finish stopped requests."""
        out = flight.out
        result = flight.pending.result()
        self._check_result(out, result)
        stamp = self.clock() if self.clock is not None else flight.now + result.duration
        sched = self.scheduler
        sampled = result.sampled_token_ids
        length_done = {id(r) for r in flight.finished_by_length}
        finished: list[Request] = []
        stopped_running: list[Request] = []
        for i, req, idx in flight.entries:
            token = sampled[i][0]
            outputs = req.output_token_ids
            outputs[idx] = token
            req.all_token_ids[len(req.all_token_ids) - len(outputs) + idx] = token
            req.num_pending_tokens -= 1
            status = req.status
            if status is RequestStatus.FINISHED_ABORTED:
                continue
            req.token_times.append(stamp)
            if req.first_token_time is None:
                req.first_token_time = stamp
            stops = req.stop_set
            if id(req) in length_done:
                if stops is not None and token in stops:
                    sched._check_stop(req, token)  # a stop token outranks the length, as in a sync step
                req.finish_time = stamp
                finished.append(req)
            elif stops is not None and token in stops and sched._check_stop(req, token):
                req.finish_time = stamp
                finished.append(req)
                if status is RequestStatus.RUNNING:
                    stopped_running.append(req)
                else:  # preempted after this step was launched: it waits in the queue
                    self._finish_waiting(req)
        if stopped_running:
            sched._finish(stopped_running)
        self.finished.extend(finished)
        self._record(out, result, flight.now)
        return EngineStepOutput(finished, result.duration, out, result)

    def _finish_waiting(self, req: Request) -> None:
        sched = self.scheduler
        sched.waiting.remove(req)
        if req.swap_out_blocks:
            sched.kv.host_pool.free(req.swap_out_blocks)
            req.swap_out_blocks = []
        sched.kv.free(req)
        del sched.requests[req.request_id]
        sched.finished_req_ids.append(req.request_id)
