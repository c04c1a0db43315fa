"""The SimPy model: arrivals, a router and N engine replicas, one event per engine step.

Each replica is a core ``EngineCore`` with a ``SimBackend``. A replica process runs a
step, then sleeps for the step's predicted duration. When the batch is pure decode and
nothing can change it (``EngineCore.decode_horizon``), the replica sleeps once over k
steps instead ("fast-forward"). With open-loop arrivals a run goes on past finishes while
nobody waits, the batch shrinking at each (``LazyDecodeScheduler.decode_segments``; each
stretch between finishes is costed as a run of its own, so the times are the same floats
as stopping at every finish; in a closed loop a finish issues the user's next request,
so a run stops there). The k steps are applied lazily: an arrival that lands
in the middle first syncs the replica (applies the steps that started before it) and
interrupts its sleep, so results equal step-by-step simulation exactly, whatever the
arrival process (open loop, trace, closed loop with think times). With fast-forward on, each
engine runs ``core.lazy_decode.LazyDecodeScheduler``, so steps cost O(what changes), not
O(batch); with it off, the plain ``Scheduler``, one event per step: the reference.

Arrivals are scheduled with URGENT priority, so a request that arrives at time t is
visible to a step that starts at t, in both modes. With one replica and an open loop
("alone") there is no arrival process: nothing but a known arrival can reach the replica,
so it adds the requests due (arrived at or before now) itself, before each step, and
sleeps through runs cut at the next arrival without being woken; the same engine calls in
the same order, with fewer events.
"""
from __future__ import annotations

import gc
import heapq
import math
from bisect import bisect_left
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Callable, Sequence

import simpy
from simpy.core import URGENT

from core.engine import EngineCore
from core.request import Request
from core.router import make_router
from core.stats import StepStats
from simulator.sim_backend import SIM_TOKEN_ID, SimBackend


@dataclass
class SimResult:
    requests: list[Request]
    steps: list[StepStats]
    duration: float  # simulated seconds from 0 to the last event
    breakdown: dict[str, float] = field(default_factory=dict)  # seconds per op, all replicas
    num_events: int = 0  # engine steps + fast-forward runs actually simulated


class Replica:
    """One engine replica as a SimPy process."""

    def __init__(self, sim: "Simulation", index: int, engine: EngineCore, backend: SimBackend) -> None:
        self.sim = sim
        self.index = index
        self.engine = engine
        self.backend = backend
        backend.bind(engine.scheduler.requests)
        self.wake: simpy.Event | None = None
        self._ff: tuple[float, list[float], list[float]] | None = None  # start, durations, ends
        # The last planned run's segments: (index of its first step, batch, total context, longest context).
        self._ff_segments: list[tuple[int, int, int, int]] = []
        # Applied stretches whose per-op split is not summed yet: (batch, context, longest, seconds).
        self._split_queue: list[tuple[int, int, int, float]] = []
        self._busy_until = 0.0
        self.process = sim.env.process(self._run())

    def add(self, request: Request) -> None:
        self.sync(self.sim.env.now)
        self.engine.add_request(request)
        self.backend.note_request(request)
        if self.wake is not None and not self.wake.triggered:
            self.wake.succeed()

    def sync(self, now: float) -> None:
        """Apply the pending fast-forward steps that started before ``now``."""
        if self._ff is None:
            return
        start, durations, ends = self._ff
        self._ff = None
        # Step i starts at ends[i-1] (step 0 at start); apply those that started before now.
        m = 1 + bisect_left(ends, now, 0, len(ends) - 1) if now > start else 0
        if m:
            self._apply(start, durations[:m], ends[:m])
        self._busy_until = ends[m - 1] if m else start
        self.process.interrupt()

    def _apply(self, start: float, durations: list[float], ends: list[float]) -> None:
        eng = self.engine
        # The engine's LazyDecodeScheduler knows the decode tokens (forced ids, else SIM_TOKEN_ID).
        finished = eng.apply_decode_steps(start, durations, None, ends)
        self._queue_splits(durations)
        self.sim._on_finished(finished)

    def _queue_splits(self, durations: list[float]) -> None:
        """Queue the per-op split of the planned run's first ``len(durations)`` steps, one per
        segment: its middle step's split, scaled to the segment's exact total (only the plot of
        where time goes reads it; timings are exact). ``flush_splits`` sums them in bulk."""
        segments = self._ff_segments
        queued = self._split_queue
        k = len(durations)
        for i, (first, batch, ctx, longest) in enumerate(segments):
            if first >= k:
                break
            stop = min(segments[i + 1][0], k) if i + 1 < len(segments) else k
            j = (stop - first) // 2
            queued.append((batch, ctx + j * batch, longest + j, sum(durations[first:stop])))
        if len(queued) >= 4096:
            self.flush_splits()

    def flush_splits(self) -> None:
        """Add the queued stretches' splits to the engine's breakdown (one vectorised call)."""
        if self._split_queue:
            batch, ctx, longest, total = zip(*self._split_queue)
            self._split_queue = []
            self.engine.add_breakdown(self.backend.cost_model.decode_splits_sum(batch, ctx, longest, total))

    def _run(self):
        env = self.sim.env
        eng = self.engine
        cost = self.backend.cost_model
        ff = self.sim.fast_forward
        alone = self.sim.alone
        issue_due = self.sim.issue_due
        while True:
            issued = alone and issue_due(env.now)
            if not eng.has_unfinished():
                idle_from = env.now
                if alone:
                    arrival = self.sim.next_arrival()
                    if arrival == math.inf:
                        return
                    yield env.timeout(arrival - env.now)
                else:
                    self.wake = env.event()
                    yield self.wake
                    self.wake = None
                cost.note_idle(env.now - idle_from)
                continue
            if ff and not issued:  # (a request just added waits for a step: no run can start now)
                durations, ends = self._plan(env.now)
                if durations:
                    yield from self._fast_forward(env.now, durations, ends)
                    continue
            out = eng.step(env.now)
            self.sim.num_events += 1
            self.sim._on_finished(out.finished)
            end = env.now + out.duration
            if ff and self.sim.next_arrival() > end and eng.has_unfinished():
                # What the replica will do at the end of this step is already known (nothing can
                # reach it before then): when that is a fast-forward run, plan it now and sleep
                # once through both.
                durations, ends = self._plan(end)
                if durations:
                    yield from self._fast_forward(end, durations, ends)
                    continue
            yield env.timeout(out.duration)

    def _plan(self, start: float) -> tuple[list[float], list[float]]:
        """Durations and end times of the next fast-forward run from ``start`` (both empty if
        there is none), segment by segment up to the first step that ends at or after the next
        known arrival (the rest could not run: the arrival cuts the run there)."""
        decode_times = self.backend.cost_model.decode_step_times_list
        arrival = self.sim.next_arrival()
        durations: list[float] = []
        ends: list[float] = []
        segments = self._ff_segments = []
        t = start
        for k, batch, ctx, longest in self.engine.scheduler.decode_segments():
            segments.append((len(durations), batch, ctx, longest))
            times = decode_times(batch, ctx, k, longest)
            durations += times
            sums = accumulate(times, initial=t)  # t + d, one step at a time: the same floats
            next(sums)
            ends += sums
            t = ends[-1]
            if t >= arrival:
                break
        return durations, ends

    def _fast_forward(self, start: float, durations: list[float], ends: list[float]):
        """Sleep through a planned run of decode steps from ``start`` (now, or the end of the
        step in flight), applied when it ends or, up to an arrival, by that arrival's ``sync``.

        Alone (one replica, open loop) nothing but a known arrival can reach the replica, so
        runs that end before the next arrival are applied at once, back to back (the same
        calls in the same order as waking at each run's end), and the replica sleeps once
        until the last of them ends; the run in flight at the next arrival is applied when it
        ends (the replica adds the arrival then).
        """
        env = self.sim.env
        eng = self.engine
        arrival = self.sim.next_arrival()
        alone = self.sim.alone
        while True:
            self.sim.num_events += 1
            if not (alone and ends[-1] < arrival):
                break
            self._apply(start, durations, ends)
            start = ends[-1]
            durations, ends = self._plan(start) if eng.has_unfinished() else ([], [])
            if not durations:
                yield env.timeout(start - env.now)
                return
        # Steps that start after the next known arrival cannot run as planned (the arrival joins
        # the batch after the step in flight then; its sync would discard them): end the run there.
        if start < arrival < ends[-1]:
            m = 1 + bisect_left(ends, arrival, 0, len(ends) - 1)
            del durations[m:], ends[m:]
        if alone:
            yield env.timeout(ends[-1] - env.now)
            self._apply(start, durations, ends)
            return
        self._ff = (start, durations, ends)
        try:
            yield env.timeout(ends[-1] - env.now)
            if self._ff is not None:  # else an arrival's sync applied the run
                self._ff = None
                self._apply(start, durations, ends)
        except simpy.Interrupt:
            if self._busy_until > env.now:
                yield env.timeout(self._busy_until - env.now)


class Simulation:
    """Runs requests through ``len(engines)`` replicas behind a router.

    ``requests``: open-loop requests with arrival times. ``closed_loop``: per-user request
    sequences (user u's request i+1 arrives ``think_time`` after its request i finished;
    each user's first request arrives at its own arrival_time; nothing is issued at or
    after ``stop_issuing_at``, the closed loop's duration cut-off).
    """

    #: Whether one replica in an open loop issues its arrivals itself (False: the general path
    #: with an arrival process, as with several replicas; tests compare the two).
    _alone_when_possible = True

    def __init__(self, engines: Sequence[EngineCore], requests: Sequence[Request] = (),
                 router: str = "round_robin", fast_forward: bool = True,
                 closed_loop: Sequence[Sequence[Request]] = (), think_time: float = 0.0,
                 stop_issuing_at: float | None = None,
                 on_progress: Callable[[int], None] | None = None) -> None:
        if not engines:
            raise ValueError("Simulation needs at least one engine replica")
        if think_time < 0 or not math.isfinite(think_time):
            raise ValueError(f"Simulation.think_time must be finite and >= 0, got {think_time!r}")
        self.env = simpy.Environment()
        self.fast_forward = fast_forward
        if fast_forward:  # steady decoders cost nothing per step, and fast-forward reads their shape in O(1)
            for e in engines:  # in a closed loop a finish issues a request: runs stop there
                e.use_lazy_decode(SIM_TOKEN_ID, through_finishes=not closed_loop)
        self.num_events = 0
        self.replicas = [Replica(self, i, e, e.backend) for i, e in enumerate(engines)]
        self.router = make_router(router, len(engines))
        self._engines = list(engines)
        self.think_time = think_time
        self.stop_issuing_at = stop_issuing_at  # closed loop: users issue nothing at or after this time
        self.num_not_issued = 0
        self.on_progress = on_progress
        # Known arrivals, (time, sequence number, request), popped in that order: those known at
        # the start in a sorted list read from ``_start_at`` on (O(1) a pop: they are most or
        # all of them), and a heap of those issued during the run (a closed loop's next turns).
        self._at_start: list[tuple[float, int, Request]] = []
        self._start_at = 0
        self._arrivals: list[tuple[float, int, Request]] = []
        self._next_time = math.inf  # time of the next known arrival
        # One replica and no closed loop: the replica issues the arrivals itself (see the module
        # docstring); with several, an arrival process wakes them and keeps same-instant order.
        self.alone = self._alone_when_possible and len(engines) == 1 and not closed_loop
        self._seq = 0
        self._next_in_session: dict[str, Request] = {}
        self._idle_event: simpy.Event | None = None  # arrival process waits here when no arrival is known
        self._sleeping_until: float | None = None  # arrival process sleeps until this time
        self._total = len(requests) + sum(len(s) for s in closed_loop)
        self._done = 0
        firsts = list(requests)
        for session in closed_loop:  # a user's later requests are pushed when the previous one finishes
            if not session:
                continue
            for a, b in zip(session, session[1:]):
                self._next_in_session[a.request_id] = b
            firsts.append(session[0])
        self._at_start = sorted((r.arrival_time, seq, r) for seq, r in enumerate(firsts))  # seq: unique
        self._seq = len(firsts)
        self._next_time = self._at_start[0][0] if self._at_start else math.inf
        if not self.alone:
            self._arrival_proc = self.env.process(self._arrival_process())

    def _push(self, request: Request, t: float) -> None:
        request.arrival_time = t
        heapq.heappush(self._arrivals, (t, self._seq, request))
        self._seq += 1
        if t < self._next_time:
            self._next_time = t
        if self._idle_event is not None and not self._idle_event.triggered:
            self._idle_event.succeed()
        elif self._sleeping_until is not None and t < self._sleeping_until:
            self._arrival_proc.interrupt()  # a closed-loop user came back before the awaited arrival

    def next_arrival(self) -> float:
        """Time of the next known arrival (inf if none is known yet)."""
        return self._next_time

    def _pop_arrival(self) -> Request:
        """The next known arrival (the earliest; the first known among equal times)."""
        i = self._start_at
        start = self._at_start
        heap = self._arrivals
        if i < len(start) and not (heap and heap[0][:2] < start[i][:2]):
            req = start[i][2]
            self._start_at = i = i + 1
        else:
            req = heapq.heappop(heap)[2]
        t = start[i][0] if i < len(start) else math.inf
        self._next_time = heap[0][0] if heap and heap[0][0] < t else t
        return req

    def issue_due(self, now: float) -> bool:
        """Alone: route and add the arrivals due at ``now`` (arrived at or before it), in order;
        whether there were any."""
        if self._next_time > now:
            return False
        while self._next_time <= now:
            req = self._pop_arrival()
            idx = self.router.route(req, self._engines)
            req.replica = idx
            self.replicas[idx].add(req)
        return True

    def _arrival_process(self):
        env = self.env
        replicas = self.replicas
        inf = math.inf
        while True:
            t = self._next_time
            if t == inf:  # no arrival known
                if self._done >= self._total:
                    return
                self._idle_event = env.event()
                yield self._idle_event
                self._idle_event = None
                continue
            if t > env.now:
                # Yield the urgent timeout itself (not a condition on it): a condition would
                # resume this process at normal priority, after a replica step of the same instant.
                self._sleeping_until = t
                try:
                    yield _UrgentTimeout(env, t - env.now)
                except simpy.Interrupt:
                    pass
                self._sleeping_until = None
                continue
            req = self._pop_arrival()
            for rep in replicas:
                rep.sync(env.now)
            idx = self.router.route(req, self._engines)  # EngineCore is the router's ReplicaView
            req.replica = idx
            replicas[idx].add(req)

    def _on_finished(self, finished: list[Request]) -> None:
        if not finished:
            return
        self._done += len(finished)
        for req in finished:
            nxt = self._next_in_session.pop(req.request_id, None)
            if nxt is None:
                continue
            t = req.finish_time + self.think_time
            if self.stop_issuing_at is not None and t >= self.stop_issuing_at:
                while nxt is not None:  # the user's remaining requests are never issued
                    self._total -= 1
                    self.num_not_issued += 1
                    nxt = self._next_in_session.pop(nxt.request_id, None)
                continue
            self._push(nxt, t)
        if self.on_progress is not None:
            self.on_progress(len(finished))

    def run(self) -> SimResult:
        # The event loop makes no reference cycles the cyclic collector would need to find
        # (events, requests and blocks are freed by reference counting), but it allocates
        # enough young objects to trigger it ~100 times per 10k requests (4% of the loop):
        # it is paused for the run and resumed after, when it can collect anything left.
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            self.env.run()
        finally:
            if was_enabled:
                gc.enable()
        requests: list[Request] = []
        steps: list[StepStats] = []
        breakdown: dict[str, float] = {}
        for rep in self.replicas:
            rep.flush_splits()
            requests.extend(rep.engine.finished)
            steps.extend(rep.engine.steps)
            for op, t in rep.engine.breakdown.items():
                breakdown[op] = breakdown.get(op, 0.0) + t
        lost = self._total - len(requests)
        if lost:
            raise RuntimeError(f"simulation ended with {lost} of {self._total} requests unfinished")
        return SimResult(requests, steps, self.env.now, breakdown, self.num_events)



class _UrgentTimeout(simpy.Event):
    """A timeout processed before normal events of the same instant (arrivals before steps)."""

    def __init__(self, env: simpy.Environment, delay: float) -> None:
        super().__init__(env)
        self._ok = True
        self._value = None
        env.schedule(self, URGENT, delay)
