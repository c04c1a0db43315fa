"""Data parallelism on real hardware: N engine replicas behind the core's router.

``run_online_dp(replicas, requests, router=...)`` is ``run_online`` for several replicas: it
replays arrival times in wall-clock time, routes each request at its arrival with a
``core.router`` policy (``round_robin``, ``least_loaded``, ``prefix_aware`` or a ``Router``
instance) that sees every replica through ``num_waiting`` / ``num_running`` /
``cached_prefix_tokens``, stamps ``request.replica``, and returns every request and every
step (``StepStats.replica``) for ``core.metrics.summarize`` / ``write_results``.

Two kinds of replica, mixable in one list:

* an ``EngineCore`` (``create_engine(...)``): stepped in this process, in turn with the others
  (simple and deterministic; on GPUs the replicas' steps do not overlap, so use it for tests
  and for CPU studies);
* a ``ProcessReplica(engine_factory, index)``: its own process (``spawn``) that builds its
  engine with ``engine_factory(index)`` on ``cuda:index`` (when there are GPUs) and runs its
  own step loop, so replicas run concurrently, one GPU each. Requests go to it over a queue;
  after every step it publishes ``num_waiting`` / ``num_running`` in shared memory (what the
  router reads); ``cached_prefix_tokens`` is answered from a driver-side index of the prompt
  blocks routed to it (an upper bound of its cache: it ignores eviction). At the end it sends
  back its finished requests and steps. All processes use one time axis: seconds since every
  replica reported ready (``time.time()``-based, shared across processes on a host), so
  loading the models is not part of the run.

    from functools import partial
    factory = partial(create_engine, model_dir, SchedulerConfig(max_num_seqs=64))
    result = run_online_dp([ProcessReplica(factory, i) for i in range(2)], requests,
                           router="least_loaded")
    metrics = summarize(result.requests, result.steps)
"""
from __future__ import annotations

import queue as queue_mod
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from core.engine import EngineCore
from core.request import Request
from core.router import Router, make_router
from core.stats import StepStats
from executor.online import add_or_reject


@dataclass
class DPResult:
    requests: list[Request]  # every request of the run, with ``replica`` set
    finished: list[Request]  # those that finished (incl. aborted), by replica then finish order
    steps: list[StepStats]  # every replica's steps (``StepStats.replica``)
    rejected: list[Request] = field(default_factory=list)
    duration: float = 0.0  # seconds from start to the last step's end
    num_steps: int = 0
    per_replica: list[int] = field(default_factory=list)  # requests routed to each replica


class _InProcess:
    """An ``EngineCore`` replica stepped by the driver."""

    def __init__(self, engine: EngineCore, index: int) -> None:
        self.engine = engine
        self.index = index
        engine.replica_id = index
        bind = getattr(engine.backend, "bind", None)
        if bind is not None:
            bind(engine.scheduler.requests)
        self.first_finished = len(engine.finished)
        self.first_step = len(engine.steps)
        self.num_steps = 0
        self.end = 0.0

    @property
    def num_waiting(self) -> int:
        return self.engine.num_waiting

    @property
    def num_running(self) -> int:
        return self.engine.num_running

    def cached_prefix_tokens(self, prompt_token_ids: list[int]) -> int:
        return self.engine.cached_prefix_tokens(prompt_token_ids)

    def add(self, req: Request) -> None:
        self.engine.add_request(req)

    def busy(self) -> bool:
        return self.engine.has_unfinished()

    def step(self, now: float) -> None:
        out = self.engine.step(now)
        self.num_steps += 1
        self.end = max(self.end, now + out.duration)

    def abort_all(self, now: float) -> None:
        for req in list(self.engine.scheduler.requests.values()):
            self.engine.abort_request(req.request_id, now)

    def results(self) -> tuple[list[Request], list[StepStats]]:
        return self.engine.finished[self.first_finished:], self.engine.steps[self.first_step:]


# --- process replicas --------------------------------------------------------------------
class EngineFactory:
    """A picklable ``index -> EngineCore``: ``create_engine(model, scheduler_config, **kwargs)``
    in the replica's process (on its GPU)."""

    def __init__(self, model: str, scheduler_config: Any = None, **kwargs: Any) -> None:
        self.model = str(model)
        self.scheduler_config = scheduler_config
        self.kwargs = kwargs

    def __call__(self, index: int) -> EngineCore:
        from executor.backend import create_engine

        return create_engine(self.model, self.scheduler_config, **self.kwargs)


def _replica_main(factory: Callable[[int], EngineCore], index: int, t0: Any, inbox: Any, outbox: Any,
                  counts: Any, threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    if torch.cuda.is_available():
        torch.cuda.set_device(index % torch.cuda.device_count())
    try:
        engine = factory(index)
        engine.replica_id = index
        bind = getattr(engine.backend, "bind", None)
        if bind is not None:
            bind(engine.scheduler.requests)
    except BaseException as e:  # report, so the driver does not wait forever
        outbox.put(("error", index, repr(e)))
        raise
    outbox.put(("ready", index))
    done = False
    rejected: list[Request] = []
    num_steps = 0
    end = 0.0
    while True:
        block = not engine.has_unfinished() and not done
        while True:  # drain the inbox (block while idle)
            try:
                msg = inbox.get(block=block, timeout=0.5 if block else None) if block else inbox.get_nowait()
            except queue_mod.Empty:
                break
            block = False
            if msg is None:
                done = True
                continue
            add_or_reject(engine.add_request, msg, rejected)
        if engine.has_unfinished():
            out = engine.step(time.time() - t0.value)
            num_steps += 1
            end = engine.steps[-1].time + out.duration if engine.steps else end
        counts[2 * index] = engine.num_waiting
        counts[2 * index + 1] = engine.num_running
        if done and not engine.has_unfinished():
            break
    outbox.put(("result", index, engine.finished, engine.steps, rejected, num_steps, end))


class ProcessReplica:
    """A replica in its own process: ``engine_factory(index) -> EngineCore`` runs there
    (it must be picklable: a module-level function or a ``functools.partial`` of one)."""

    def __init__(self, engine_factory: Callable[[int], EngineCore], index: int, threads: int | None = None,
                 block_size: int = 16) -> None:
        self.factory = engine_factory
        self.index = index
        self.threads = threads
        self.block_size = block_size
        self._routed: set[tuple[int, ...]] = set()  # prompt prefixes (whole blocks) routed here
        self.proc = None

    # router view
    @property
    def num_waiting(self) -> int:
        return int(self._counts[2 * self.index])

    @property
    def num_running(self) -> int:
        return int(self._counts[2 * self.index + 1])

    def cached_prefix_tokens(self, prompt_token_ids: list[int]) -> int:
        bs = self.block_size
        n = 0
        # Like the engine's prefix cache: whole blocks only, never the last prompt token.
        for end in range(bs, len(prompt_token_ids), bs):
            if tuple(prompt_token_ids[:end]) not in self._routed:
                break
            n = end
        return n

    # lifecycle (driven by run_online_dp)
    def start(self, ctx: Any, t0: float, outbox: Any, counts: Any) -> None:
        self._counts = counts
        self.inbox = ctx.Queue()
        self.proc = ctx.Process(target=_replica_main, args=(self.factory, self.index, t0, self.inbox, outbox,
                                                             counts, self.threads), daemon=True)
        self.proc.start()

    def add(self, req: Request) -> None:
        bs = self.block_size
        p = req.prompt_token_ids
        for end in range(bs, len(p), bs):
            self._routed.add(tuple(p[:end]))
        self._counts[2 * self.index] += 1  # counted as waiting until the replica reports
        self.inbox.put(req)

    def finish(self) -> None:
        self.inbox.put(None)


def _as_router(router: str | Router, n: int) -> Router:
    return make_router(router, n) if isinstance(router, str) else router


def run_online_dp(replicas: Sequence[EngineCore | ProcessReplica], requests: Iterable[Request],
                  router: str | Router = "least_loaded", *, clock: Callable[[], float] = time.perf_counter,
                  sleep: Callable[[float], None] = time.sleep, reject_invalid: bool = True,
                  max_duration: float | None = None) -> DPResult:
    """Serve ``requests`` (fresh core Requests with ``arrival_time``) on the replicas.

    In-process replicas are stepped in turn (each step at the wall-clock time it starts);
    process replicas run their own loops. ``max_duration`` (in-process replicas only) aborts
    what is left after that many seconds. Returns requests with ``replica`` set, and the steps
    of every replica (``StepStats.replica`` = position in ``replicas``)."""
    pending = sorted(requests, key=lambda r: r.arrival_time)
    n = len(replicas)
    if n == 0:
        raise ValueError("run_online_dp needs at least one replica")
    rt = _as_router(router, n)
    procs = [r for r in replicas if isinstance(r, ProcessReplica)]
    views: list[Any] = []
    for i, r in enumerate(replicas):
        if isinstance(r, ProcessReplica):
            if r.index != i:
                raise ValueError(f"ProcessReplica at position {i} has index {r.index}")
            views.append(r)
        else:
            views.append(_InProcess(r, i))
    local = [v for v in views if isinstance(v, _InProcess)]
    per_replica = [0] * n
    rejected: list[Request] = []

    outbox = None
    if procs:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        outbox = ctx.Queue()
        counts = ctx.Array("i", 2 * n, lock=False)
        t_start = ctx.Value("d", 0.0, lock=False)  # the run's time origin, set once all are ready
        for p in procs:
            p.start(ctx, t_start, outbox, counts)
        ready = 0
        while ready < len(procs):  # engines load before the clock starts
            msg = outbox.get()
            if msg[0] == "error":
                raise RuntimeError(f"replica {msg[1]} failed to start: {msg[2]}")
            ready += 1
        base = time.time()
        t_start.value = base
        wall = lambda: time.time() - base  # one time axis with the replica processes
    else:
        t0 = clock()
        wall = lambda: clock() - t0

    i = 0
    total = len(pending)
    end = 0.0
    while i < total or any(v.busy() for v in local):
        now = wall()
        if max_duration is not None and now > max_duration and local:
            for v in local:
                v.abort_all(now)
            break
        while i < total and pending[i].arrival_time <= now:
            req = pending[i]
            i += 1
            idx = rt.route(req, views)
            req.replica = idx
            per_replica[idx] += 1
            add_or_reject(views[idx].add, req, rejected, reject_invalid)
        busy = [v for v in local if v.busy()]
        if not busy:
            if i < total:
                wait = pending[i].arrival_time - wall()
                if wait > 0:
                    sleep(wait if not procs else min(wait, 0.05))
            continue
        for v in busy:
            v.step(wall())

    finished: list[Request] = []
    steps: list[StepStats] = []
    num_steps = 0
    results: dict[int, tuple] = {}
    for p in procs:
        p.finish()
    while len(results) < len(procs):
        msg = outbox.get()
        if msg[0] == "error":
            raise RuntimeError(f"replica {msg[1]} failed: {msg[2]}")
        if msg[0] == "result":
            results[msg[1]] = msg[2:]
    for p in procs:
        p.proc.join(timeout=30)
    by_id: dict[str, Request] = {}
    for idx, v in enumerate(views):
        if isinstance(v, _InProcess):
            fin, st = v.results()
            num_steps += v.num_steps
            end = max(end, v.end)
        else:
            fin, st, rej, k, e = results[idx]
            rejected.extend(rej)
            num_steps += k
            end = max(end, e)
            for r in fin + rej:
                r.replica = idx
        finished.extend(fin)
        steps.extend(st)
        for r in fin:
            by_id[r.request_id] = r
    # Process replicas return copies: report those (they carry the run's timestamps).
    all_requests = [by_id.get(r.request_id, r) for r in pending]
    if procs:
        rej_by_id = {r.request_id: r for r in rejected}
        all_requests = [rej_by_id.get(r.request_id, r) for r in all_requests]
    return DPResult(requests=all_requests, finished=finished, steps=steps, rejected=rejected, duration=end,
                    num_steps=num_steps, per_replica=per_replica)
