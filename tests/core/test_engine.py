"""EngineCore: stepping, records, and decode fast-forward equal to step-by-step execution."""
from __future__ import annotations

import copy
import sys
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import core_fakes as fk
from core.config import CacheConfig, SchedulerConfig
from core.request import RequestStatus
from core.scheduler_output import StepResult

BS = 16


def cfgs(policy="fcfs", batching="continuous", mode="recompute", blocks=1024, chunking=True, prefix=True,
         budget=256, max_model_len=256, max_num_seqs=64, watermark=0.0, threshold=0):
    sc = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=max_model_len,
                         enable_chunked_prefill=chunking, policy=policy, batching=batching, preemption_mode=mode,
                         watermark=watermark, long_prefill_token_threshold=threshold)
    cc = CacheConfig(BS, blocks, 64 if mode == "swap" else 0, prefix)
    return sc, cc


# --- plain stepping ------------------------------------------------------------------------
def test_step_stamps_times_and_records_stats():
    sc, cc = cfgs()
    eng = fk.make_engine(sc, cc)
    r = fk.make_request("a", 20, max_tokens=3, arrival=0.5)
    eng.add_request(r)
    t = 1.0
    ends = []
    while eng.has_unfinished():
        out = eng.step(t)
        t = t + out.duration
        ends.append(t)
    assert r.first_scheduled_time == 1.0
    assert r.first_token_time == ends[0] == 1.0 + fk.step_duration(20)
    assert list(r.token_times) == ends and r.finish_time == ends[-1]
    assert eng.finished == [r]
    assert [s.num_prefill_tokens for s in eng.steps] == [20, 0, 0]
    assert [s.num_decode_tokens for s in eng.steps] == [0, 1, 1]
    assert [s.time for s in eng.steps] == [1.0] + ends[:-1]
    assert all(s.num_steps == 1 and s.batch_size == 1 for s in eng.steps)
    out = eng.step(t)
    assert out.scheduler_output.is_empty and out.duration == 0.0 and len(eng.steps) == 3


def test_abort_through_engine_stamps_finish():
    sc, cc = cfgs()
    eng = fk.make_engine(sc, cc)
    eng.add_request(fk.make_request("a", 20, max_tokens=10))
    eng.step(0.0)
    r = eng.abort_request("a", 0.25)
    assert r.status == RequestStatus.FINISHED_ABORTED and r.finish_time == 0.25 and eng.finished == [r]
    assert eng.abort_request("a", 0.3) is None and eng.finished == [r]
    assert not eng.has_unfinished()


def test_backend_returning_wrong_number_of_token_lists_is_an_error():
    sc, cc = cfgs()

    class Bad:
        def execute(self, out):
            return StepResult([], 0.1)

    from core.engine import EngineCore
    eng = EngineCore(sc, cc, Bad())
    eng.add_request(fk.make_request("a", 4))
    with pytest.raises(RuntimeError, match="0 token lists for 1 scheduled"):
        eng.step(0.0)


def test_cached_prefix_tokens_for_routers():
    sc, cc = cfgs()
    eng = fk.make_engine(sc, cc)
    prompt = list(range(40))
    eng.add_request(fk.make_request("a", prompt, max_tokens=1))
    eng.step(0.0)
    assert eng.cached_prefix_tokens(prompt) == 32
    assert eng.cached_prefix_tokens(prompt[:32]) == 16


def test_decode_horizon_zero_until_the_batch_is_pure_decode():
    sc, cc = cfgs()
    eng = fk.make_engine(sc, cc)
    eng.add_request(fk.make_request("a", 20, max_tokens=10))
    assert eng.decode_horizon() == 0  # nothing ran yet
    eng.step(0.0)
    assert eng.decode_horizon() == 9  # bounded by max_tokens (the finishing step included)
    eng.add_request(fk.make_request("b", 20, max_tokens=10))
    assert eng.decode_horizon() == 0  # the newcomer must be tried first


def test_decode_horizon_bounded_by_free_blocks():
    sc, cc = cfgs(blocks=8)
    eng = fk.make_engine(sc, cc)
    eng.add_request(fk.make_request("a", 16, max_tokens=40))
    eng.add_request(fk.make_request("b", 16, max_tokens=40))
    eng.step(0.0)
    assert eng.decode_horizon() == 39  # 2 x 4 blocks fit: bounded by max_tokens
    sc, cc = cfgs(blocks=6)
    eng = fk.make_engine(sc, cc)
    eng.add_request(fk.make_request("a", 16, max_tokens=40))
    eng.add_request(fk.make_request("b", 16, max_tokens=40))
    eng.step(0.0)
    assert eng.decode_horizon() == 32  # 4 free blocks: positions 16..47 of both requests


def test_apply_decode_steps_refuses_a_stop_token_inside_the_run():
    sc, cc = cfgs()
    eng = fk.make_engine(sc, cc, eos=2)
    eng.add_request(fk.make_request("a", 20, max_tokens=10))
    eng.step(0.0)
    with pytest.raises(RuntimeError, match="stop token"):
        eng.apply_decode_steps(1.0, [0.1] * 3, [[5, 2, 5]])
    eng2 = fk.make_engine(sc, cc, eos=2)
    eng2.add_request(fk.make_request("a", 20, max_tokens=10))
    eng2.step(0.0)
    finished = eng2.apply_decode_steps(1.0, [0.1] * 3, [[5, 5, 2]])  # a stop at the end is fine
    assert [r.request_id for r in finished] == ["a"] and finished[0].status == RequestStatus.FINISHED_STOPPED
    assert eng2.steps[-1].num_steps == 3 and eng2.steps[-1].num_decode_tokens == 3


# --- fast-forward equals step-by-step --------------------------------------------------------
FF_CASES = [
    # policy, batching, mode, blocks, chunking, budget, tokens
    ("fcfs", "continuous", "recompute", 1024, True, 256, "fixed"),
    ("fcfs", "continuous", "recompute", 24, True, 256, "fixed"),
    ("fcfs", "continuous", "swap", 24, True, 128, "hashed"),
    ("priority", "continuous", "recompute", 20, True, 64, "hashed"),
    ("priority", "continuous", "swap", 20, False, 256, "fixed"),
    ("sjf", "continuous", "recompute", 32, True, 256, "fixed"),
    ("sjf", "continuous", "swap", 1024, False, 128, "hashed"),
    ("lpm", "continuous", "recompute", 24, True, 256, "fixed"),
    ("lpm", "continuous", "swap", 1024, True, 256, "hashed"),
    ("fcfs", "orca", "recompute", 48, True, 256, "fixed"),
    ("priority", "orca", "recompute", 1024, True, 256, "hashed"),
    ("lpm", "orca", "recompute", 40, True, 256, "fixed"),
    ("fcfs", "static", "recompute", 1024, True, 512, "fixed"),
    ("sjf", "static", "recompute", 40, True, 256, "hashed"),
    ("priority", "static", "swap", 24, True, 256, "fixed"),
    ("fcfs", "continuous", "recompute", 24, False, 128, "hashed"),
]


def _token_fn(kind: str, seed: int):
    return fk.fixed_token(1) if kind == "fixed" else fk.hashed_token(seed, 6)


def assert_same_run(a: fk.RunResult, b: fk.RunResult) -> None:
    assert a.rejected == b.rejected
    assert set(a.requests) == set(b.requests)
    assert a.num_preemptions == b.num_preemptions
    assert a.stats == b.stats
    assert a.finished_order == b.finished_order
    for rid, ra in a.requests.items():
        rb = b.requests[rid]
        assert ra.status == rb.status, rid
        assert ra.output_token_ids == rb.output_token_ids, rid
        assert ra.num_preemptions == rb.num_preemptions, rid
        assert ra.num_cached_tokens == rb.num_cached_tokens, rid
        assert ra.num_recomputed_cached_tokens == rb.num_recomputed_cached_tokens, rid
        assert ra.first_scheduled_time == pytest.approx(rb.first_scheduled_time, rel=1e-9), rid
        assert ra.first_token_time == pytest.approx(rb.first_token_time, rel=1e-9), rid
        assert ra.finish_time == pytest.approx(rb.finish_time, rel=1e-9), rid
        assert len(ra.token_times) == len(rb.token_times), rid
        assert list(ra.token_times) == pytest.approx(list(rb.token_times), rel=1e-9), rid


@pytest.mark.parametrize("policy,batching,mode,blocks,chunking,budget,tokens", FF_CASES)
def test_fast_forward_matches_step_by_step(policy, batching, mode, blocks, chunking, budget, tokens):
    seed = zlib.crc32(f"{policy}-{batching}-{mode}-{blocks}-{chunking}".encode()) % 1000
    specs = fk.random_workload(seed, n=40, rate=40.0, prompt_len=(1, 90), max_tokens=(1, 80), vocab=4,
                               stop_ids=(3,) if tokens == "hashed" else ())
    sc, cc = cfgs(policy, batching, mode, blocks, chunking, budget=budget)
    eos = 5 if tokens == "hashed" else None
    a, b = _both(specs, sc, cc, _token_fn(tokens, seed), eos=eos)
    assert len(a.requests) >= 30
    assert b.ff_steps > 0 and b.step_calls + b.ff_steps == a.step_calls
    assert b.step_calls + b.ff_calls < a.step_calls


def test_fast_forward_matches_with_preemption_and_sharing():
    """Tiny pool, many identical prompts and a fixed output token: duplicate blocks, evictions, preemptions."""
    for mode in ("recompute", "swap"):
        specs = fk.random_workload(7, n=60, rate=80.0, prompt_len=(16, 64), max_tokens=(20, 100), vocab=2,
                                   shared_prefixes=2)
        sc, cc = cfgs("fcfs", "continuous", mode, blocks=20, budget=64)
        a = fk.run_workload(specs, sc, cc, fk.fixed_token(0), fast_forward=False, check=True)
        b = fk.run_workload(specs, sc, cc, fk.fixed_token(0), fast_forward=True, check=True)
        assert a.num_preemptions > 0
        assert_same_run(a, b)
        assert b.ff_steps > 0


def _small(blocks: int, watermark: float = 0.0, chunking: bool = True) -> tuple[SchedulerConfig, CacheConfig]:
    sc = SchedulerConfig(max_num_batched_tokens=64 if chunking else 16, max_model_len=64, watermark=watermark,
                         enable_chunked_prefill=chunking)
    return sc, CacheConfig(4, blocks, 0, True)


def _both(specs, sc, cc, token_fn, **kw):
    """Step by step vs fast-forward, with the plain and with the lazy-decode scheduler."""
    a = fk.run_workload(specs, sc, cc, token_fn, fast_forward=False, check=True, **kw)
    b = fk.run_workload(specs, sc, cc, token_fn, fast_forward=True, check=True, **kw)
    c = fk.run_workload(specs, sc, cc, token_fn, fast_forward=True, check=True, lazy=True, **kw)
    assert_same_run(a, b)
    assert_same_run(a, c)
    return a, b


def test_fast_forward_registers_duplicate_blocks_in_step_order():
    """y recomputes x's output blocks (same prompt, same fixed output token) while x's copies are
    free but still indexed; x's copies are reused during y's decode run. Step by step the index
    keeps x's entry until the free copy is reused, so z finds only one cached block."""
    P = [10, 11, 12, 13, 14]
    specs = [fk.RequestSpec("x", 0.0, P, 9), fk.RequestSpec("y", 0.1, P, 9),
             fk.RequestSpec("z", 0.2, P + [1, 1, 1, 1], 2)]
    a, b = _both(specs, *_small(4), fk.fixed_token(1))
    assert a.requests["z"].num_cached_tokens == b.requests["z"].num_cached_tokens == 4
    assert b.ff_steps >= 10


@pytest.mark.parametrize("chunking", [True, False])
def test_fast_forward_stops_where_a_running_request_extends_the_blocked_heads_prefix_hit(chunking):
    """Multi-turn style: the waiting prompt is a running request's prompt + its coming output.

    b is blocked by the watermark; when a fills the block that extends b's cached prefix,
    b needs one block less and is admitted in that very step, which fast-forward must not skip.
    """
    P = [10, 11, 12, 13]
    specs = [fk.RequestSpec("a", 0.0, P, 12), fk.RequestSpec("b", 0.0015, P + [1] * 8 + [9], 2)]
    x, y = _both(specs, *_small(8, watermark=0.5, chunking=chunking), fk.fixed_token(1))
    assert x.requests["b"].num_cached_tokens == 8
    assert x.requests["b"].first_scheduled_time < x.requests["a"].finish_time
    assert y.ff_steps > 0


def test_fast_forward_after_admission_used_up_the_budget():
    """Chunking off: x takes the whole leftover budget, so y is not even sized in that step.
    y needs 3 tokens and joins in the next step; a stale "needs 31 tokens" must not let
    fast-forward skip it."""
    sc = SchedulerConfig(max_num_batched_tokens=32, max_model_len=64, watermark=0.0, enable_chunked_prefill=False)
    cc = CacheConfig(4, 64, 0, True)
    specs = [fk.RequestSpec("r0", 0.0, [1, 2, 3, 4], 50), fk.RequestSpec("r1", 0.0, [5, 6, 7, 8], 3),
             fk.RequestSpec("x", 0.0015, list(range(100, 131)), 5), fk.RequestSpec("y", 0.0016, [9, 9, 9], 5)]
    a, b = _both(specs, sc, cc, fk.fixed_token(1))
    assert a.requests["y"].first_scheduled_time < a.requests["x"].finish_time
    assert b.ff_steps > 0


def test_fast_forward_when_a_waiting_prompt_extends_a_running_sequence_larger():
    base = list(range(100, 116))
    specs = [fk.RequestSpec("a", 0.0, base, 60), fk.RequestSpec("b", 0.0005, base + [1] * 48 + [9], 4),
             fk.RequestSpec("c", 0.0007, base + [1] * 20 + [9], 4)]
    for blocks in (6, 7, 8, 12):
        for wm in (0.0, 0.25, 0.4):
            sc, cc = cfgs("fcfs", "continuous", "recompute", blocks=blocks, budget=256, max_model_len=128,
                          watermark=wm)
            _both(specs, sc, cc, fk.fixed_token(1))  # requests the pool can never hold are rejected alike


def _snapshot(eng) -> dict:
    s = eng.scheduler
    kv = s.kv
    pool = kv.block_pool
    return dict(
        running=[r.request_id for r in s.running],
        waiting=[r.request_id for r in s.waiting],
        tables={rid: list(ids) for rid, ids in kv.req_to_block_ids.items()},
        computed={rid: r.num_computed_tokens for rid, r in s.requests.items()},
        outputs={rid: list(r.output_token_ids) for rid, r in s.requests.items()},
        times={rid: list(r.token_times) for rid, r in s.requests.items()},
        status={rid: r.status for rid, r in s.requests.items()},
        free_queue=pool.free_block_queue.block_ids(),
        index=pool.cached_blocks(),
        block_hashes=pool.block_hash.tolist(),
        ref=pool.ref_cnt.nonzero()[0].tolist(),
        evictions=pool.num_evictions,
        finished=[r.request_id for r in eng.finished],
        step_id=s.step_id,
    )


@pytest.mark.parametrize("mode,blocks,policy", [("recompute", 24, "fcfs"), ("swap", 20, "priority"),
                                                ("recompute", 64, "sjf"), ("recompute", 30, "lpm")])
def test_each_fast_forward_equals_plain_steps_on_a_copy(mode, blocks, policy):
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 20_000))  # deepcopy walks the free queue's linked list
    checked = []
    pending: list[dict] = []

    def before(eng, now, durations, toks):
        twin = copy.deepcopy(eng)
        t = now
        for d in durations:
            step = twin.step(t)
            out = step.scheduler_output
            assert not out.new_req_ids and not out.preempted_req_ids and not out.blocks_to_swap_in
            assert out.num_decode_tokens == out.total_num_scheduled_tokens == len(out.req_ids)
            assert step.duration == d
            t = t + step.duration
        pending.append(_snapshot(twin))

    def after(eng):
        assert _snapshot(eng) == pending.pop()
        checked.append(1)

    try:
        specs = fk.random_workload(11, n=30, rate=60.0, prompt_len=(8, 60), max_tokens=(10, 70), vocab=3)
        sc, cc = cfgs(policy, "continuous", mode, blocks=blocks, budget=64)
        res = fk.run_workload(specs, sc, cc, fk.fixed_token(2), fast_forward=True, check=True,
                              on_fast_forward=before, after_fast_forward=after)
    finally:
        sys.setrecursionlimit(old)
    assert len(checked) == res.ff_calls >= 5


def test_fast_forward_is_deterministic():
    specs = fk.random_workload(3, n=30, rate=50.0, prompt_len=(1, 60), max_tokens=(1, 50))
    sc, cc = cfgs("lpm", "continuous", "swap", blocks=24, budget=64)
    runs = [fk.run_workload(specs, sc, cc, fk.hashed_token(3, 5), eos=4, fast_forward=ff) for ff in (True, True)]
    assert_same_run(*runs)
    assert runs[0].step_calls == runs[1].step_calls


@settings(max_examples=80, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(policy=st.sampled_from(["fcfs", "priority", "sjf", "lpm"]),
       batching=st.sampled_from(["continuous", "continuous", "orca", "static"]),
       mode=st.sampled_from(["recompute", "swap"]), bs=st.sampled_from([4, 8, 16]),
       blocks_factor=st.sampled_from([1.0, 1.5, 3.0, 50.0]), chunking=st.booleans(),
       budget=st.sampled_from([32, 64, 256]), watermark=st.sampled_from([0.0, 0.1]),
       tokens=st.sampled_from(["fixed", "hashed"]), seed=st.integers(0, 10_000))
def test_fast_forward_matches_step_by_step_random_configs(policy, batching, mode, bs, blocks_factor, chunking,
                                                          budget, watermark, tokens, seed):
    max_model_len = 128
    blocks = int(blocks_factor * max_model_len / bs) + 1
    sc = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=budget, max_model_len=max_model_len,
                         enable_chunked_prefill=chunking, policy=policy, batching=batching, preemption_mode=mode,
                         watermark=watermark)
    cc = CacheConfig(bs, blocks, blocks if mode == "swap" else 0, True)
    specs = fk.random_workload(seed, n=25, rate=60.0, prompt_len=(1, 60), max_tokens=(1, 60), vocab=3,
                               stop_ids=(3,) if tokens == "hashed" else ())
    eos = 5 if tokens == "hashed" else None
    a, b = _both(specs, sc, cc, _token_fn(tokens, seed), eos=eos)
    assert b.step_calls + b.ff_steps == a.step_calls


# --- op breakdown --------------------------------------------------------------------------
@pytest.mark.parametrize("splits", [
    [{"a": 0.1, "b": 0.2}, {"a": 0.3, "b": 1e-17}, {"a": 0.7, "b": 0.11}],  # same ops: the per-op fold
    [{"a": 0.1, "b": 0.2}, {"b": 0.3, "a": 0.4}],  # same ops, another order
    [{"a": 0.1}, {"a": 0.2, "c": 0.5}, {"b": 0.3}],  # ops differ: the plain loop
    [{"a": 0.1, "b": 0.2}, {"a": 0.2, "c": 0.5}],  # same count, different ops
    [{}, {"a": 0.1}],
])
def test_breakdown_sums_queued_splits_in_step_order(splits):
    """EngineCore.breakdown equals adding every split into the totals one step at a time
    (bit for bit, keys in first-seen order), whichever summing path it takes."""
    sc, cc = cfgs()
    eng = fk.make_engine(sc, cc)
    eng._add_breakdown({"a": 1.0})
    assert eng.breakdown == {"a": 1.0}
    want = {"a": 1.0}
    for split in splits:
        eng._add_breakdown(split)
        for op, t in split.items():
            want[op] = want.get(op, 0.0) + t
    got = eng.breakdown
    assert list(got.items()) == list(want.items())
    assert eng.breakdown is got and list(got.items()) == list(want.items())  # nothing left to add
