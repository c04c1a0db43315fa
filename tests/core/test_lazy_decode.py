"""LazyDecodeScheduler: equal to the plain Scheduler, step for step and with fast-forward."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import core_fakes as fk
from core.config import CacheConfig, SchedulerConfig
from core.lazy_decode import LazyDecodeScheduler
from core.request import Request
from core.sampling_params import SamplingParams
from core.scheduler_output import StepResult
from test_engine import assert_same_run


def _cfg(policy="fcfs", batching="continuous", mode="recompute", bs=16, blocks=64, chunking=True, budget=64,
         watermark=0.0, threshold=0, prefix=True, max_model_len=128):
    sc = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=budget, max_model_len=max_model_len,
                         enable_chunked_prefill=chunking, policy=policy, batching=batching, preemption_mode=mode,
                         watermark=watermark, long_prefill_token_threshold=threshold)
    return sc, CacheConfig(bs, blocks, blocks if mode == "swap" else 0, prefix)


def _pool_state(sched):
    kv = sched.kv
    pool = kv.block_pool
    cached = pool.cached_blocks()  # first: applies a lazy scheduler's deferred registrations
    return (dict(kv.req_to_block_ids), pool.free_block_queue.block_ids(), cached, pool.num_evictions,
            dict(kv.num_cached_blocks))


def _lockstep(specs, sc, cc, token_fn, eos=None):
    """Step a plain and a lazy engine side by side; after every step their KV state and step
    shapes must be equal, and every request's progress too (the lazy one's as it would be
    written back)."""
    plain = fk.make_engine(sc, cc, token_fn, eos)
    lazy = fk.make_engine(sc, cc, token_fn, eos)
    lazy.use_lazy_decode(default_token_id=-1)
    lazy.backend.bind(lazy.scheduler.requests)
    pending = sorted(specs, key=lambda s: (s.arrival, s.rid))
    now, pi, lazy_steps = 0.0, 0, 0
    for _ in range(20_000):
        while pi < len(pending) and pending[pi].arrival <= now:
            a, b = pending[pi].build(), pending[pi].build()
            b.forced_output_token_ids = [token_fn(b, n) for n in range(b.max_tokens)]
            pi += 1
            for eng, r in ((plain, a), (lazy, b)):
                try:
                    eng.add_request(r)
                except ValueError:
                    pass
        if not plain.has_unfinished():
            assert not lazy.has_unfinished()
            if pi == len(pending):
                break
            now = pending[pi].arrival
            continue
        sa, sb = plain.step(now), lazy.step(now)
        oa, ob = sa.scheduler_output, sb.scheduler_output
        lazy_steps += ob.num_lazy_decodes > 0
        assert (oa.num_reqs, oa.total_num_scheduled_tokens, oa.num_prefill_tokens, oa.preempted_req_ids) == \
               (ob.num_reqs, ob.total_num_scheduled_tokens, ob.num_prefill_tokens, ob.preempted_req_ids)
        assert sa.duration == sb.duration
        assert [r.request_id for r in sa.finished] == [r.request_id for r in sb.finished]
        assert _pool_state(plain.scheduler) == _pool_state(lazy.scheduler)
        ls = lazy.scheduler
        for rid, r in plain.scheduler.requests.items():
            assert r.num_computed_tokens == ls._num_computed(ls.requests[rid]), rid
        fk.check_invariants(ls)
        now += sa.duration
    else:
        raise AssertionError("did not drain")
    for ra in plain.finished:
        rb = next(r for r in lazy.finished if r.request_id == ra.request_id)
        assert (ra.status, ra.output_token_ids, list(ra.token_times), ra.first_token_time, ra.finish_time) == \
               (rb.status, rb.output_token_ids, list(rb.token_times), rb.first_token_time, rb.finish_time)
        assert rb.all_token_ids == ra.all_token_ids
    return lazy_steps


@settings(max_examples=60, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(policy=st.sampled_from(["fcfs", "priority", "sjf", "lpm"]),
       batching=st.sampled_from(["continuous", "continuous", "orca", "static"]),
       mode=st.sampled_from(["recompute", "swap"]), bs=st.sampled_from([1, 4, 16]),
       blocks_factor=st.sampled_from([1.0, 1.5, 3.0, 50.0]), chunking=st.booleans(),
       budget=st.sampled_from([16, 64, 256]), watermark=st.sampled_from([0.0, 0.1]), prefix=st.booleans(),
       stops=st.booleans(), seed=st.integers(0, 10_000))
def test_lazy_equals_plain_step_by_step(policy, batching, mode, bs, blocks_factor, chunking, budget, watermark,
                                        prefix, stops, seed):
    blocks = int(blocks_factor * 128 / bs) + 1
    sc, cc = _cfg(policy, batching, mode, bs, blocks, chunking, max(budget, bs), watermark, prefix=prefix)
    specs = fk.random_workload(seed, n=20, rate=60.0, prompt_len=(1, 60), max_tokens=(1, 60), vocab=3,
                               stop_ids=(3,) if stops else ())
    token_fn = fk.hashed_token(seed, 6) if stops else fk.fixed_token(1)
    _lockstep(specs, sc, cc, token_fn, eos=5 if stops else None)


def test_lazy_steps_happen_and_preemption_falls_back_exactly():
    """A small pool: parked requests are written back before every step that may preempt."""
    specs = fk.random_workload(7, n=60, rate=80.0, prompt_len=(16, 64), max_tokens=(20, 100), vocab=2,
                               shared_prefixes=2)
    for mode in ("recompute", "swap"):
        sc, cc = _cfg(mode=mode, blocks=20, budget=64)
        assert _lockstep(specs, sc, cc, fk.fixed_token(0)) > 50
    sc, cc = _cfg(blocks=400, budget=256)
    assert _lockstep(specs, sc, cc, fk.fixed_token(0)) > 200


@pytest.mark.parametrize("mode,blocks,policy", [("recompute", 24, "fcfs"), ("swap", 20, "priority"),
                                                ("recompute", 400, "sjf"), ("recompute", 30, "lpm")])
@pytest.mark.parametrize("tokens", ["fixed", "hashed"])
def test_lazy_fast_forward_equals_plain_step_by_step(mode, blocks, policy, tokens):
    specs = fk.random_workload(11, n=40, rate=60.0, prompt_len=(8, 60), max_tokens=(10, 70), vocab=3,
                               stop_ids=(3,) if tokens == "hashed" else ())
    sc, cc = _cfg(policy, mode=mode, blocks=blocks, budget=64)
    token_fn = fk.fixed_token(2) if tokens == "fixed" else fk.hashed_token(11, 6)
    eos = 5 if tokens == "hashed" else None
    a = fk.run_workload(specs, sc, cc, token_fn, eos=eos, check=True)
    b = fk.run_workload(specs, sc, cc, token_fn, eos=eos, check=True, lazy=True, fast_forward=True)
    assert_same_run(a, b)
    assert b.ff_steps > 0 and b.step_calls + b.ff_steps == a.step_calls


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_aborting_parked_requests_equals_plain(mode):
    specs = fk.random_workload(5, n=40, rate=60.0, prompt_len=(8, 60), max_tokens=(10, 70), vocab=3)
    sc, cc = _cfg(mode=mode, blocks=40, budget=64)
    a = fk.run_workload(specs, sc, cc, fk.fixed_token(1), check=True, abort_every=7)
    b = fk.run_workload(specs, sc, cc, fk.fixed_token(1), check=True, abort_every=7, lazy=True)
    assert_same_run(a, b)
    assert sum(r.status.name == "FINISHED_ABORTED" for r in b.requests.values()) >= 5


def test_stop_among_forced_outputs_and_default_token():
    """The finish step comes from the first stop id among known outputs, or the default id."""
    sc, cc = _cfg(blocks=64, budget=64)
    sched = LazyDecodeScheduler(sc, cc, eos_token_id=9, default_token_id=9)
    a = Request("a", list(range(20, 40)), SamplingParams(max_tokens=50), forced_output_token_ids=[1] * 30 + [9])
    b = Request("b", list(range(40, 60)), SamplingParams(max_tokens=50), forced_output_token_ids=[1, 1, 1])
    c = Request("c", list(range(60, 80)), SamplingParams(max_tokens=50, ignore_eos=True))
    for r in (a, b, c):
        sched.add_request(r)
    now, finished = 0.0, []
    while sched.has_unfinished():
        out = sched.schedule()
        sampled = [[sched._oracle(sched.requests[rid], len(sched.requests[rid].output_token_ids),
                                  len(sched.requests[rid].output_token_ids) + 1)[0]] if s else []
                   for rid, s in zip(out.req_ids, out.samples)]
        now += 1.0
        finished += sched.update_from_output(out, StepResult(sampled, 1.0), now)
    assert [r.request_id for r in finished] == ["b", "a", "c"]
    assert len(a.output_token_ids) == 31 and a.stop_reason == 9
    assert b.output_token_ids == [1, 1, 1, 9] and b.finish_time == 4.0
    assert c.output_token_ids == [9] * 50 and c.status.name == "FINISHED_LENGTH"
    assert list(c.token_times) == [float(t) for t in range(1, 51)]


def test_use_lazy_decode_only_on_a_fresh_engine():
    sc, cc = _cfg()
    eng = fk.make_engine(sc, cc)
    eng.add_request(fk.make_request("x", 8))
    with pytest.raises(RuntimeError, match="before the engine gets requests"):
        eng.use_lazy_decode(1)


@pytest.mark.parametrize("bs,blocks", [(4, 60), (4, 400), (16, 40)])
def test_lazy_fast_forward_runs_leave_the_plain_kv_state(bs, blocks):
    """Every request arrives at once; the lazy engine fast-forwards whenever it can (taking a
    run's blocks in one go, deferring lazy chains' registrations) while the plain one steps:
    after each run the KV state (tables, free order, index, evictions) is the same."""
    specs = fk.random_workload(3, n=30, rate=1e9, prompt_len=(4, 60), max_tokens=(10, 60), vocab=3)
    sc, cc = _cfg(bs=bs, blocks=blocks, budget=64)
    plain, lazy = fk.make_engine(sc, cc, fk.fixed_token(1)), fk.make_engine(sc, cc, fk.fixed_token(1))
    lazy.use_lazy_decode(default_token_id=1)
    lazy.backend.bind(lazy.scheduler.requests)
    for s in specs:
        plain.add_request(s.build())
        lazy.add_request(s.build())
    now, runs = 0.0, 0
    while plain.has_unfinished():
        k = lazy.decode_horizon()
        if k >= 2:
            durations = []
            for _ in range(k):
                durations.append(plain.step(now + sum(durations)).duration)
            lazy.apply_decode_steps(now, durations, None)
            now += sum(durations)
            runs += 1
        else:
            sa, sb = plain.step(now), lazy.step(now)
            assert sa.duration == sb.duration
            now += sa.duration
        assert _pool_state(plain.scheduler) == _pool_state(lazy.scheduler)
    assert not lazy.has_unfinished() and runs > 5


@pytest.mark.parametrize("bs,blocks,prefix,rate", [(4, 2000, True, 1e9), (16, 400, True, 1e9), (4, 2000, False, 1e9),
                                                   (4, 60, True, 1e9), (16, 30, True, 1e9), (4, 2000, True, 300.0)])
def test_runs_through_finishes_equal_plain_steps(bs, blocks, prefix, rate):
    """With ``through_finishes`` and nobody waiting, a run planned by ``decode_segments`` goes
    on past finishes, the batch shrinking at each. The plain engine stepping through it gives,
    after every run, the same KV state (tables, free order, index, evictions) and finishes, and
    the same shape at each segment's first step; the run leaves one StepStats row per segment,
    each what the plain engine's rows of those steps add up to."""
    specs = fk.random_workload(5, n=16 if rate > 1e6 else 40, rate=rate, prompt_len=(4, 60), max_tokens=(5, 60),
                               vocab=3)  # all at once: as many as run at once (max_num_seqs)
    sc, cc = _cfg(bs=bs, blocks=blocks, budget=256, prefix=prefix)
    plain, lazy = fk.make_engine(sc, cc, fk.fixed_token(1)), fk.make_engine(sc, cc, fk.fixed_token(1))
    lazy.use_lazy_decode(default_token_id=1, through_finishes=True)
    lazy.backend.bind(lazy.scheduler.requests)
    pending = sorted(specs, key=lambda s: (s.arrival, s.rid))
    now, pi, through = 0.0, 0, 0
    while plain.has_unfinished() or pi < len(pending):
        while pi < len(pending) and pending[pi].arrival <= now:
            plain.add_request(pending[pi].build())
            lazy.add_request(pending[pi].build())
            pi += 1
        if not plain.has_unfinished():
            now = pending[pi].arrival
            continue
        segments = list(lazy.scheduler.decode_segments())
        if sum(k for k, *_ in segments) < 2:
            sa, sb = plain.step(now), lazy.step(now)
            assert sa.duration == sb.duration
            assert [r.request_id for r in sa.finished] == [r.request_id for r in sb.finished]
            now += sa.duration
        else:
            first_row, t, durations, finished = len(plain.steps), now, [], []
            for k, batch, ctx, longest in segments:
                for j in range(k):
                    step = plain.step(t)
                    if j == 0:  # the segment's shape is its first step's
                        out = step.scheduler_output
                        assert (out.num_reqs, sum(out.num_computed_tokens) + out.num_reqs,
                                max(out.num_computed_tokens) + 1) == (batch, ctx, longest)
                    durations.append(step.duration)
                    finished += [r.request_id for r in step.finished]
                    t += step.duration
            lazy_rows = len(lazy.steps)
            assert [r.request_id for r in lazy.apply_decode_steps(now, durations, None)] == finished
            rows, i = lazy.steps[lazy_rows:], first_row
            assert len(rows) == len(segments)
            for row, (k, batch, _, _) in zip(rows, segments):
                steps = plain.steps[i:i + k]
                assert (row.step_id, row.time, row.num_steps, row.batch_size, row.num_decode_tokens) == \
                       (steps[0].step_id, steps[0].time, k, batch, sum(s.num_decode_tokens for s in steps))
                assert {s.batch_size for s in steps} == {batch}
                assert (row.num_running, row.num_waiting, row.kv_usage) == \
                       (steps[-1].num_running, steps[-1].num_waiting, steps[-1].kv_usage)
                i += k
            through += len(segments) - 1  # finishes the run went past
            now = t
        assert _pool_state(plain.scheduler) == _pool_state(lazy.scheduler)
        fk.check_invariants(lazy.scheduler)
    assert not lazy.has_unfinished()
    assert through >= (2 if blocks < 100 else 10)
    for ra in plain.finished:
        rb = next(r for r in lazy.finished if r.request_id == ra.request_id)
        assert (ra.status, ra.output_token_ids, list(ra.token_times), ra.first_token_time, ra.finish_time) == \
               (rb.status, rb.output_token_ids, list(rb.token_times), rb.first_token_time, rb.finish_time)


def test_catch_up_inside_the_merged_loop_equals_plain(monkeypatch):
    """Inside ``schedule``'s merged loop of active and parked requests, parked ``a``'s first
    block registration materializes the lazy chain of ``b`` (same root, later in running
    order) in the very step ``b`` fills its block 2: the catch-up registers that block before
    ``b``'s own edge comes in order (see ``_catch_up``). Step for step, the KV state still
    equals the plain scheduler's."""
    calls = []
    catch_up = LazyDecodeScheduler._catch_up

    def spy(self, request, end):
        calls.append((self.step_id, request.request_id, bool(self._active)))
        catch_up(self, request, end)

    monkeypatch.setattr(LazyDecodeScheduler, "_catch_up", spy)
    specs = [fk.RequestSpec("a", 0.0, [7, 7], 20),  # block 0 = [7, 7, 1, 1] fills in step 3
             fk.RequestSpec("b", 0.0, [7, 7, 1, 1, 5, 5, 5, 5, 5, 5], 20),  # its block 2 fills in step 3
             fk.RequestSpec("c", 5e-4, list(range(100, 200)), 5)]  # admitted in step 2, prefilling in step 3
    sc, cc = _cfg(bs=4, blocks=400, budget=64, max_model_len=256)
    _lockstep(specs, sc, cc, fk.fixed_token(1))
    assert (3, "b", True) in calls
