"""Online serving on the real backend: replay a workload's arrival times in wall-clock time.

``run_online(engine, requests)`` is the real-hardware twin of the simulator's arrival
process: before each engine step it admits every request whose ``arrival_time`` (seconds
from the start of the run) has passed, and when nothing is left to run it sleeps until the
next arrival. The engine's ``now`` is the wall clock since the start, so request and step
records are on the same time axis as a simulation's, and ``core.metrics.summarize`` /
``core.results.write_results`` apply unchanged::

    engine = create_engine(model_dir, sched_cfg)
    result = run_online(engine, workload_requests)
    metrics = summarize(result.requests, result.steps)
    write_results(out_dir, result.requests, result.steps, metrics, engine.breakdown)
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from core.engine import EngineCore
from core.request import Request, RequestStatus
from core.stats import StepStats


@dataclass
class OnlineResult:
    requests: list[Request]  # every request of the run: finished, aborted, rejected, unfinished
    finished: list[Request]  # those that finished (incl. aborted), in finish order
    steps: list[StepStats]
    rejected: list[Request] = field(default_factory=list)  # refused by add_request (bad length, ...)
    duration: float = 0.0  # wall seconds from start to the last step's end
    num_steps: int = 0


def add_or_reject(add: Callable[[Request], None], req: Request, rejected: list[Request],
                  reject_invalid: bool = True) -> None:
    """Add ``req``; a request the core refuses (ValueError) is marked aborted at its arrival and
    listed in ``rejected`` instead of stopping the run, unless ``reject_invalid`` is False."""
    try:
        add(req)
    except ValueError:
        if not reject_invalid:
            raise
        req.status = RequestStatus.FINISHED_ABORTED
        req.finish_time = req.arrival_time
        rejected.append(req)


def run_online(engine: EngineCore, requests: Iterable[Request], *,
               clock: Callable[[], float] = time.perf_counter, sleep: Callable[[float], None] = time.sleep,
               reject_invalid: bool = True, max_duration: float | None = None,
               on_step: Callable[[float, object], None] | None = None) -> OnlineResult:
    """Serve ``requests`` (fresh core Requests with ``arrival_time`` set) on ``engine``.

    A request that ``add_request`` refuses (prompt over ``max_model_len``, larger than the
    KV pool, ...) is marked aborted at its arrival and listed in ``rejected`` when
    ``reject_invalid``; otherwise the ``ValueError`` propagates. ``max_duration`` (seconds)
    stops the run early, aborting what is left. ``clock``/``sleep`` are injectable for tests.
    """
    pending = sorted(requests, key=lambda r: r.arrival_time)
    bind = getattr(engine.backend, "bind", None)
    if bind is not None:
        bind(engine.scheduler.requests)
    first_finished = len(engine.finished)
    first_step = len(engine.steps)
    rejected: list[Request] = []
    t0 = clock()
    i = 0
    n = len(pending)
    num_steps = 0
    end = 0.0
    while i < n or engine.has_unfinished():
        now = clock() - t0
        if max_duration is not None and now > max_duration:
            for req in list(engine.scheduler.requests.values()):
                engine.abort_request(req.request_id, now)
            break
        while i < n and pending[i].arrival_time <= now:
            req = pending[i]
            i += 1
            add_or_reject(engine.add_request, req, rejected, reject_invalid)
        if not engine.has_unfinished():
            if i < n:
                wait = pending[i].arrival_time - (clock() - t0)
                if wait > 0:
                    sleep(wait)
            continue
        out = engine.step(now)
        num_steps += 1
        end = now + out.duration
        if on_step is not None:
            on_step(now, out)
    return OnlineResult(requests=pending, finished=engine.finished[first_finished:],
                        steps=engine.steps[first_step:], rejected=rejected, duration=end, num_steps=num_steps)
