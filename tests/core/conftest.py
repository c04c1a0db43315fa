"""Shared fakes and checkers for the core tests (no torch, no simpy).

Test modules import these helpers as ``import core_fakes as fk``: this conftest registers
itself under that name, because several test folders have a ``conftest.py`` outside a
package and ``import conftest`` would be ambiguous.

* ``FakeBackend``: one token per sampling request, from a token function of (request,
  output index) so step-by-step and fast-forwarded runs see the same tokens; duration
  ``1e-3 + 1e-6 * scheduled tokens``.
* ``check_invariants``: block pool / KV manager / scheduler bookkeeping after any step.
* ``run_workload``: drives arrivals through an ``EngineCore`` step by step, or with
  ``decode_horizon`` / ``apply_decode_steps`` between arrivals.
"""
from __future__ import annotations

import math
import random
import sys
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from core.block_pool import IN_INDEX, NO_HASH
from core.config import CacheConfig, SchedulerConfig
from core.engine import EngineCore
from core.request import Request, RequestStatus
from core.sampling_params import SamplingParams
from core.scheduler import Scheduler
from core.scheduler_output import SchedulerOutput, StepResult

sys.modules.setdefault("core_fakes", sys.modules[__name__])

TokenFn = Callable[[Request, int], int]


# --- requests and tokens ------------------------------------------------------------------
def make_request(rid: str, prompt: list[int] | int, max_tokens: int = 4, arrival: float = 0.0,
                 priority: int = 0, **kw) -> Request:
    """A request; an int ``prompt`` means that many distinct-ish tokens derived from ``rid``."""
    sp_kw = {k: kw.pop(k) for k in ("ignore_eos", "stop_token_ids") if k in kw}
    if isinstance(prompt, int):
        base = zlib.crc32(rid.encode()) % 100_000
        prompt = [1000 + base + i for i in range(prompt)]
    return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens, **sp_kw), arrival_time=arrival,
                   priority=priority, **kw)


def fixed_token(token: int = 7) -> TokenFn:
    return lambda req, n: token


def hashed_token(seed: int, vocab: int) -> TokenFn:
    """A pseudo-random token that depends only on (seed, request id, output index)."""
    def fn(req: Request, n: int) -> int:
        return zlib.crc32(f"{seed}:{req.request_id}:{n}".encode()) % vocab
    return fn


def step_duration(num_tokens: int) -> float:
    return 1e-3 + 1e-6 * num_tokens


class FakeBackend:
    def __init__(self, token_fn: TokenFn | None = None) -> None:
        self.token_fn = token_fn or fixed_token()
        self.requests: dict[str, Request] = {}
        self.outputs: list[SchedulerOutput] = []
        self.keep_outputs = False
        self.on_execute: Callable[[SchedulerOutput], None] | None = None

    def bind(self, requests: dict[str, Request]) -> None:
        self.requests = requests

    def execute(self, out: SchedulerOutput) -> StepResult:
        if self.keep_outputs:
            self.outputs.append(out)
        if self.on_execute is not None:
            self.on_execute(out)
        sampled = []
        for rid, s in zip(out.req_ids, out.samples):
            if s:
                req = self.requests[rid]
                sampled.append([self.token_fn(req, len(req.output_token_ids))])
            else:
                sampled.append([])
        return StepResult(sampled, step_duration(out.total_num_scheduled_tokens))


def make_engine(sched_cfg: SchedulerConfig, cache_cfg: CacheConfig, token_fn: TokenFn | None = None,
                eos: int | None = None) -> EngineCore:
    backend = FakeBackend(token_fn)
    eng = EngineCore(sched_cfg, cache_cfg, backend, eos_token_id=eos)
    backend.bind(eng.scheduler.requests)
    return eng


# --- scheduler-level stepping (no engine) --------------------------------------------------
def sched_step(sched: Scheduler, now: float = 0.0, token_fn: TokenFn | None = None,
               before_update: Callable[[SchedulerOutput, Scheduler], None] | None = None,
               ) -> tuple[SchedulerOutput, list[Request]]:
    """One schedule + update round with one token per sampling request."""
    token_fn = token_fn or fixed_token()
    out = sched.schedule()
    if before_update is not None:
        before_update(out, sched)
    sampled = []
    for rid, s in zip(out.req_ids, out.samples):
        req = sched.requests[rid]
        sampled.append([token_fn(req, len(req.output_token_ids))] if s else [])
    finished = sched.update_from_output(out, StepResult(sampled, step_duration(out.total_num_scheduled_tokens)),
                                        now)
    return out, finished


def scheduled(out: SchedulerOutput) -> dict[str, int]:
    return dict(zip(out.req_ids, out.num_new_tokens))


# --- invariants ----------------------------------------------------------------------------
def check_invariants(sched: Scheduler) -> None:
    kv = sched.kv
    pool = kv.block_pool
    # Who holds which block: only live running requests hold GPU blocks.
    holders: Counter[int] = Counter()
    for rid, blocks in kv.req_to_block_ids.items():
        assert rid in sched.requests, f"dead request {rid} still holds blocks"
        assert sched.requests[rid].status == RequestStatus.RUNNING, f"{rid} holds blocks but is not running"
        assert len(set(blocks)) == len(blocks), f"{rid} holds a block twice"
        assert kv.num_cached_blocks[rid] <= len(blocks)
        run = kv.req_to_run.get(rid)
        assert run is None or (run.blocks is blocks and run.num_blocks == kv.num_cached_blocks[rid])
        for b in blocks:
            holders[b] += 1
    assert set(kv.req_to_block_ids) == set(kv.num_cached_blocks) >= set(kv.req_to_run)
    ref = pool.ref_cnt.tolist()
    for b, n in enumerate(ref):
        assert n == holders[b], f"block {b}: ref_cnt {n} != holders {holders[b]}"
    zero = [b for b, n in enumerate(ref) if n == 0]
    queue = pool.free_block_queue.block_ids()
    assert len(queue) == len(zero) == pool.num_free_blocks
    assert sorted(queue) == zero
    assert ((pool.run_of == IN_INDEX) == (pool.block_hash != NO_HASH)).all()
    for h, b in pool.cached_blocks().items():  # lazily indexed blocks have no block_hash yet
        assert pool.block_hash[b] == h or (pool.block_hash[b] == NO_HASH and pool.run_of[b] > 0)
    # Running requests own enough blocks for what they computed.
    for r in sched.running:
        assert r.status == RequestStatus.RUNNING
        assert r.request_id in kv.req_to_block_ids
        assert len(kv.req_to_block_ids[r.request_id]) * kv.block_size >= r.num_computed_tokens
        assert r.num_computed_tokens <= r.num_tokens
    # Queues partition the live requests.
    live = {r.request_id for r in sched.running} | {r.request_id for r in sched.waiting}
    assert len(live) == len(sched.running) + len(sched.waiting)
    assert live == set(sched.requests)
    host_held = []
    for r in sched.waiting:
        assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED, RequestStatus.SWAPPED)
        assert r.request_id not in kv.req_to_block_ids
        if r.status == RequestStatus.SWAPPED:
            assert r.swap_out_blocks
            assert r.num_computed_tokens > 0
        else:
            assert not r.swap_out_blocks
            assert r.num_computed_tokens == 0
        host_held.extend(r.swap_out_blocks)
    host = kv.host_pool
    assert len(set(host_held)) == len(host_held)
    assert len(host_held) + host.num_free_blocks == host.num_blocks
    assert set(host_held).isdisjoint(host._free)
    # A prefix hit never covers a request's last prompt token.
    for r in list(sched.running) + list(sched.waiting):
        assert r.num_cached_tokens <= r.num_prompt_tokens - 1
        assert r.num_output_tokens <= r.max_tokens


def check_output(out: SchedulerOutput, sched: Scheduler) -> None:
    """Checks on one schedule() result; call it before the step's update."""
    cfg = sched.config
    assert out.total_num_scheduled_tokens == sum(out.num_new_tokens) + out.num_lazy_decodes \
        <= cfg.max_num_batched_tokens
    assert len(out.req_ids) == len(set(out.req_ids)) <= cfg.max_num_seqs
    assert all(n >= 1 for n in out.num_new_tokens)
    if cfg.long_prefill_token_threshold:
        assert all(n <= cfg.long_prefill_token_threshold for n in out.num_new_tokens)
    for rid, hit in out.num_cached_tokens.items():
        req = sched.requests[rid]
        assert hit % sched.kv.block_size == 0
        assert hit <= req.num_tokens - 1
    if out.preempted_req_ids:
        assert not out.new_req_ids and not out.blocks_to_swap_in


# --- workload driver -------------------------------------------------------------------------
@dataclass
class RequestSpec:
    rid: str
    arrival: float
    prompt: list[int]
    max_tokens: int
    priority: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()

    def build(self) -> Request:
        return Request(self.rid, list(self.prompt),
                       SamplingParams(max_tokens=self.max_tokens, ignore_eos=self.ignore_eos,
                                      stop_token_ids=self.stop_token_ids),
                       arrival_time=self.arrival, priority=self.priority)


def random_workload(seed: int, n: int, rate: float, prompt_len: tuple[int, int], max_tokens: tuple[int, int],
                    vocab: int = 4, shared_prefixes: int = 3, stop_ids: tuple[int, ...] = ()) -> list[RequestSpec]:
    """Poisson-ish arrivals; prompts start with one of a few shared prefixes, then random tokens."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(vocab) for _ in range(rng.randint(8, 48))] for _ in range(shared_prefixes)]
    t = 0.0
    specs = []
    for i in range(n):
        t += rng.expovariate(rate)
        plen = rng.randint(*prompt_len)
        head = list(rng.choice(prefixes)) if rng.random() < 0.7 else []
        prompt = (head + [rng.randrange(vocab) for _ in range(plen)])[:max(plen, 1)]
        specs.append(RequestSpec(f"r{i}", t, prompt, rng.randint(*max_tokens), priority=rng.randrange(3),
                                 stop_token_ids=stop_ids if rng.random() < 0.5 else ()))
    return specs


@dataclass
class RunResult:
    requests: dict[str, Request]
    finished_order: list[str]
    step_calls: int = 0
    ff_calls: int = 0
    ff_steps: int = 0
    num_preemptions: int = 0
    rejected: list[str] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)


def _stop_set(req: Request, eos: int | None) -> set[int]:
    stops = set(req.sampling_params.stop_token_ids)
    if eos is not None and not req.sampling_params.ignore_eos:
        stops.add(eos)
    return stops


def run_workload(specs: list[RequestSpec], sched_cfg: SchedulerConfig, cache_cfg: CacheConfig,
                 token_fn: TokenFn, eos: int | None = None, fast_forward: bool = False,
                 check: bool = False, max_iters: int = 200_000,
                 on_fast_forward: Callable[[EngineCore, float, list[float], list[list[int]]], None] | None = None,
                 after_fast_forward: Callable[[EngineCore], None] | None = None,
                 lazy: bool = False, abort_every: int = 0,
                 ) -> RunResult:
    """Arrivals at ``spec.arrival`` are added before any step that starts at or after them.

    ``lazy``: the engine runs a ``LazyDecodeScheduler``; every request then carries its
    outputs as ``forced_output_token_ids`` (the token function's values), as in simulation.
    ``abort_every``: abort the oldest running request before every n-th engine step.
    """
    eng = make_engine(sched_cfg, cache_cfg, token_fn, eos)
    if lazy:
        eng.use_lazy_decode(default_token_id=-1)  # never used: forced ids cover max_tokens
        eng.backend.bind(eng.scheduler.requests)
    sched = eng.scheduler
    if check:
        eng.backend.on_execute = lambda out: check_output(out, sched)
    pending = sorted(specs, key=lambda s: (s.arrival, s.rid))
    built: dict[str, Request] = {}
    res = RunResult(built, [])
    now = 0.0
    empty_in_a_row = 0
    pi = 0
    for _ in range(max_iters):
        while pi < len(pending) and pending[pi].arrival <= now:
            req = pending[pi].build()
            pi += 1
            if lazy:
                req.forced_output_token_ids = [token_fn(req, n) for n in range(req.max_tokens)]
            try:
                eng.add_request(req)
            except ValueError:
                res.rejected.append(req.request_id)
                continue
            built[req.request_id] = req
        if not eng.has_unfinished():
            if pi == len(pending):
                break
            now = max(now, pending[pi].arrival)
            continue
        next_arrival = pending[pi].arrival if pi < len(pending) else math.inf
        if fast_forward:
            k = eng.decode_horizon()
            if k >= 1:
                running = sched.running
                d = step_duration(len(running))
                t, kk = now, 0
                while kk < k and t < next_arrival:  # every fast-forwarded step starts before the arrival
                    kk += 1
                    t += d
                toks = [[token_fn(r, r.num_output_tokens + j) for j in range(kk)] for r in running]
                for r, ts in zip(running, toks):
                    stops = _stop_set(r, eos)
                    for j, tok in enumerate(ts):
                        if tok in stops:
                            kk = min(kk, j + 1)
                            break
                if kk >= 1:
                    toks = [ts[:kk] for ts in toks]
                    durations = [d] * kk
                    if on_fast_forward is not None:
                        on_fast_forward(eng, now, durations, toks)
                    finished = eng.apply_decode_steps(now, durations, toks)
                    res.finished_order.extend(r.request_id for r in finished)
                    if after_fast_forward is not None:
                        after_fast_forward(eng)
                    for x in durations:
                        now += x
                    res.ff_calls += 1
                    res.ff_steps += kk
                    if check:
                        check_invariants(sched)
                    continue
        if abort_every and (res.step_calls + 1) % abort_every == 0 and sched.running:
            victim = sched.running[0]
            eng.abort_request(victim.request_id, now)
            res.finished_order.append(victim.request_id)
            if check:
                check_invariants(sched)
            if not eng.has_unfinished():
                continue
        step = eng.step(now)
        res.step_calls += 1
        out = step.scheduler_output
        if check:
            if out.is_empty:
                check_output(out, sched)
            check_invariants(sched)
        res.finished_order.extend(r.request_id for r in step.finished)
        if out.is_empty:
            empty_in_a_row += 1
            assert empty_in_a_row <= 2, f"engine hangs: {sched.num_waiting} waiting, {sched.num_running} running"
        else:
            empty_in_a_row = 0
            now = now + step.duration
    else:
        raise AssertionError("workload did not drain")
    res.num_preemptions = sched.num_preemptions
    kv = sched.kv
    res.stats = dict(prefix_query_tokens=kv.prefix_query_tokens, prefix_hit_tokens=kv.prefix_hit_tokens,
                     recompute_hit_tokens=kv.recompute_hit_tokens, evictions=kv.block_pool.num_evictions)
    # Everything that was accepted ended exactly once, and the engine drained.
    assert not eng.has_unfinished() and not sched.requests
    ended = [r.request_id for r in eng.finished]
    assert len(ended) == len(set(ended)) == len(built)
    assert set(ended) == set(built)
    for r in built.values():
        assert r.is_finished
        check_finished(r, eos)
    return res


def check_finished(r: Request, eos: int | None) -> None:
    assert r.num_output_tokens <= r.max_tokens
    assert r.num_prompt_tokens + r.num_output_tokens == r.num_tokens
    if r.status == RequestStatus.FINISHED_LENGTH:
        assert r.num_output_tokens == r.max_tokens
        assert not (_stop_set(r, eos) & set(r.output_token_ids))
    elif r.status == RequestStatus.FINISHED_STOPPED:
        assert r.output_token_ids[-1] in _stop_set(r, eos)
        assert r.stop_reason == r.output_token_ids[-1]
        assert not (_stop_set(r, eos) & set(r.output_token_ids[:-1]))
    if r.status != RequestStatus.FINISHED_ABORTED:
        assert len(r.token_times) == r.num_output_tokens
        assert r.first_token_time == r.token_times[0]
        assert r.finish_time == r.token_times[-1]
        assert list(r.token_times) == sorted(r.token_times)
        assert r.first_scheduled_time is not None and r.first_scheduled_time < r.first_token_time
        assert r.first_scheduled_time >= r.arrival_time
