"""AsyncEngineCore (one step in flight, placeholder tokens) against the synchronous engine."""
from __future__ import annotations

import random

import core_fakes as fk
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.async_engine import PLACEHOLDER, AsyncEngineCore
from core.config import CacheConfig, SchedulerConfig
from core.request import Request, RequestStatus
from core.scheduler_output import SchedulerOutput, StepResult


class _Pending:
    def __init__(self, result: StepResult, log: list[str], step_id: int) -> None:
        self._result = result
        self._log = log
        self._step_id = step_id

    def result(self) -> StepResult:
        self._log.append(f"result {self._step_id}")
        return self._result


class AsyncFakeBackend(fk.FakeBackend):
    """``launch`` computes the tokens at once (from the token function of (request, output
    index), as ``FakeBackend``) and checks the placeholder contract: a PLACEHOLDER only as the
    single new token of a request that sampled in the previously launched step."""

    def __init__(self, token_fn: fk.TokenFn) -> None:
        super().__init__(token_fn)
        self.log: list[str] = []
        self.last_sampled: set[str] = set()
        self.placeholders_seen = 0

    def launch(self, out: SchedulerOutput) -> _Pending:
        for rid, ids in zip(out.req_ids, out.new_token_ids):
            if PLACEHOLDER in ids:
                assert ids == [PLACEHOLDER], (rid, ids)
                assert rid in self.last_sampled, f"{rid} has a placeholder but did not sample last step"
                self.placeholders_seen += 1
        self.last_sampled = {rid for rid, s in zip(out.req_ids, out.samples) if s}
        self.log.append(f"launch {out.step_id}")
        return _Pending(self.execute(out), self.log, out.step_id)


def _engines(sched_cfg: SchedulerConfig, cache_cfg: CacheConfig, token_fn: fk.TokenFn, eos: int | None):
    sync = fk.make_engine(sched_cfg, cache_cfg, token_fn, eos)
    backend = AsyncFakeBackend(token_fn)
    eng = AsyncEngineCore(sched_cfg, cache_cfg, backend, eos_token_id=eos)
    backend.bind(eng.scheduler.requests)
    return sync, eng


def _drive(engine, specs: list[fk.RequestSpec], check: bool = False, abort_every: int = 0) -> dict[str, Request]:
    pending = sorted(specs, key=lambda s: s.arrival)
    requests: dict[str, Request] = {}
    now = 0.0
    i = steps = 0
    while i < len(pending) or engine.has_unfinished():
        while i < len(pending) and pending[i].arrival <= now:
            req = pending[i].build()
            requests[req.request_id] = req
            engine.add_request(req)
            i += 1
        if not engine.has_unfinished():
            now = pending[i].arrival
            continue
        steps += 1
        if abort_every and steps % abort_every == 0 and engine.scheduler.running:
            engine.abort_request(engine.scheduler.running[0].request_id, now)
        out = engine.step(now)
        now += out.duration or 1e-3
        if check:
            fk.check_invariants(engine.scheduler)
        assert steps < 100_000
    return requests


def _final(requests: dict[str, Request]) -> dict[str, tuple]:
    return {rid: (r.status, list(r.output_token_ids), r.stop_reason) for rid, r in requests.items()}


def test_launch_before_result_and_placeholders_resolved() -> None:
    sched_cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256)
    cache_cfg = CacheConfig(block_size=4, num_gpu_blocks=64)
    sync, eng = _engines(sched_cfg, cache_cfg, fk.hashed_token(1, 50), None)
    specs = [fk.RequestSpec(f"r{i}", 0.0, list(range(3 + i, 13 + 2 * i)), 9 + i) for i in range(4)]
    a = _drive(sync, specs)
    b = _drive(eng, specs, check=True)
    assert _final(a) == _final(b)
    log = eng.backend.log
    # Every step's result is taken only after the next step was launched (except the last).
    firsts = {entry: n for n, entry in enumerate(log)}
    launched = [int(e.split()[1]) for e in log if e.startswith("launch")]
    for k, nxt in zip(launched, launched[1:]):
        assert firsts[f"launch {nxt}"] < firsts[f"result {k}"]
    assert eng.backend.placeholders_seen > 0
    for r in b.values():
        assert PLACEHOLDER not in r.all_token_ids and r.num_pending_tokens == 0
        assert len(r.token_times) == len(r.output_token_ids)
        assert r.finish_time is not None and r.finish_time >= r.first_token_time
    assert not eng.has_unfinished()


def test_stop_token_found_one_step_late_gives_the_same_output() -> None:
    sched_cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128)
    cache_cfg = CacheConfig(block_size=4, num_gpu_blocks=64)
    token_fn = lambda req, n: 5 if n == 3 else 10 + n  # noqa: E731 - 10, 11, 12, 5, 14, 15, ...
    specs = [fk.RequestSpec("s", 0.0, [1, 2, 3], 20, stop_token_ids=(5,)),
             fk.RequestSpec("e", 0.0, [4, 5, 6], 20),  # stops on EOS (14)
             fk.RequestSpec("l", 0.0, [7, 8], 6, ignore_eos=True)]
    sync, eng = _engines(sched_cfg, cache_cfg, token_fn, eos=14)
    a = _final(_drive(sync, specs))
    b = _final(_drive(eng, specs, check=True))
    assert a == b
    assert b["s"] == (RequestStatus.FINISHED_STOPPED, [10, 11, 12, 5], 5)
    assert b["e"] == (RequestStatus.FINISHED_STOPPED, [10, 11, 12, 5, 14], 14)
    assert b["l"] == (RequestStatus.FINISHED_LENGTH, [10, 11, 12, 5, 14, 15], None)


def test_length_finish_with_stop_token_reports_stopped() -> None:
    """The last allowed token is also a stop token: a sync step says STOPPED, so must async."""
    sched_cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128)
    cache_cfg = CacheConfig(block_size=4, num_gpu_blocks=32)
    specs = [fk.RequestSpec("x", 0.0, [1, 2, 3], 4, stop_token_ids=(7,))]
    token_fn = lambda req, n: 7 if n == 3 else 1  # noqa: E731
    sync, eng = _engines(sched_cfg, cache_cfg, token_fn, eos=None)
    assert _final(_drive(sync, specs)) == _final(_drive(eng, specs)) == {
        "x": (RequestStatus.FINISHED_STOPPED, [1, 1, 1, 7], 7)}


def test_prefix_cache_never_hashes_a_placeholder() -> None:
    sched_cfg = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128)
    cache_cfg = CacheConfig(block_size=4, num_gpu_blocks=64)
    sync, eng = _engines(sched_cfg, cache_cfg, fk.hashed_token(3, 40), None)
    specs = [fk.RequestSpec("a", 0.0, [1, 2, 3, 4, 5, 6], 14)]
    _drive(eng, specs, check=True)
    _drive(sync, specs)
    # Both engines registered the same blocks under the same hashes: the prompt's and the
    # outputs' full blocks (with the real tokens, never a placeholder).
    hashes_async = set(eng.scheduler.kv.block_pool.cached_blocks())
    hashes_sync = set(sync.scheduler.kv.block_pool.cached_blocks())
    assert hashes_async == hashes_sync and len(hashes_sync) == (6 + 14 - 1) // 4


def test_requires_a_launching_backend() -> None:
    with pytest.raises(TypeError, match="launch"):
        AsyncEngineCore(SchedulerConfig(), CacheConfig(block_size=4, num_gpu_blocks=8), fk.FakeBackend())


def _random_case(seed: int, block_size: int, swap: bool, caching: bool, chunking: bool, extra_blocks: int,
                 max_num_seqs: int, stops: bool):
    rng = random.Random(seed)
    max_len = 96
    specs = fk.random_workload(seed, 14, rate=rng.choice([5.0, 50.0, 500.0]), prompt_len=(1, 40),
                               max_tokens=(1, 40), vocab=6, stop_ids=(rng.randrange(40),) if stops else ())
    for s in specs:
        s.prompt = s.prompt[:max_len - s.max_tokens]
    num_blocks = -(-max_len // block_size) + 1 + extra_blocks
    sched_cfg = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=rng.choice([48, 64, 256]),
                                max_model_len=max_len, enable_chunked_prefill=chunking, watermark=0.0,
                                preemption_mode="swap" if swap else "recompute")
    cache_cfg = CacheConfig(block_size=block_size, num_gpu_blocks=num_blocks,
                            num_cpu_blocks=num_blocks if swap else 0, enable_prefix_caching=caching)
    if not chunking:
        specs = [s for s in specs if len(s.prompt) + s.max_tokens <= sched_cfg.max_num_batched_tokens]
    eos = rng.choice([None, 0]) if stops else None
    return specs, sched_cfg, cache_cfg, fk.hashed_token(seed, 40), eos


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), block_size=st.sampled_from([1, 4, 16]), swap=st.booleans(),
       caching=st.booleans(), chunking=st.booleans(), extra_blocks=st.integers(0, 40),
       max_num_seqs=st.sampled_from([2, 4, 16]), stops=st.booleans(), abort=st.sampled_from([0, 0, 7]))
def test_async_equals_sync_outputs(seed: int, block_size: int, swap: bool, caching: bool, chunking: bool,
                                   extra_blocks: int, max_num_seqs: int, stops: bool, abort: int) -> None:
    """Random workloads with preemption (recompute or swap), stop tokens, prefix caching,
    chunking and aborts: every request ends with the same tokens and status as in the sync
    engine, and the async engine's bookkeeping holds after every step."""
    specs, sched_cfg, cache_cfg, token_fn, eos = _random_case(seed, block_size, swap, caching, chunking,
                                                              extra_blocks, max_num_seqs, stops)
    sync, eng = _engines(sched_cfg, cache_cfg, token_fn, eos)
    a = _drive(sync, specs)
    b = _drive(eng, specs, check=True, abort_every=abort)
    for rid, r in b.items():  # only the async run aborts: every request it did not abort ends as in sync
        assert PLACEHOLDER not in r.output_token_ids and r.num_pending_tokens == 0
        if r.status != RequestStatus.FINISHED_ABORTED:
            assert (r.status, r.output_token_ids, r.stop_reason) == \
                (a[rid].status, a[rid].output_token_ids, a[rid].stop_reason)
    assert not eng.scheduler.requests
    assert eng.scheduler.kv.block_pool.num_free_blocks == cache_cfg.num_gpu_blocks


def test_async_equals_sync_under_preemption() -> None:
    """Fixed cases with a tight pool, so the comparison above certainly covers preemption."""
    preemptions = swaps = 0
    for seed in range(12):
        swap = seed % 2 == 0
        specs, sched_cfg, cache_cfg, token_fn, eos = _random_case(seed, 4, swap, seed % 3 != 0, True, 0, 16,
                                                                  False)
        sync, eng = _engines(sched_cfg, cache_cfg, token_fn, eos)
        assert _final(_drive(sync, specs)) == _final(_drive(eng, specs, check=True))
        preemptions += eng.scheduler.num_preemptions
        swaps += eng.scheduler.num_preemptions if swap else 0
    assert preemptions >= 10 and swaps >= 5, (preemptions, swaps)
