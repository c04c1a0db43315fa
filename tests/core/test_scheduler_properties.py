"""Property tests: random add / step / abort sequences through EngineCore, invariants after every step."""
from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import core_fakes as fk
from core.config import CacheConfig, SchedulerConfig
from core.request import Request, RequestStatus
from core.sampling_params import SamplingParams

MAX_MODEL_LEN = 64
VOCAB = 16  # sampled ids; 0 is the eos id in configs that have one
STOP = 3  # the stop id some requests carry
BASES = ([0] * 48, [1, 2] * 24, [2, 0, 1] * 16)  # shared prompt heads: prefixes repeat across requests

SETTINGS = settings(max_examples=100, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def configs(draw, modes=("recompute", "swap")):
    bs = draw(st.sampled_from([2, 4, 8, 16]))
    batching = draw(st.sampled_from(["continuous", "continuous", "orca", "static"]))
    chunking = draw(st.booleans()) and batching == "continuous"
    budget = draw(st.integers(1, 96)) if chunking else draw(st.integers(bs, 96))
    mode = draw(st.sampled_from(modes))
    per_req = -(-MAX_MODEL_LEN // bs)
    sc = SchedulerConfig(
        max_num_seqs=draw(st.integers(1, 8)), max_num_batched_tokens=budget, max_model_len=MAX_MODEL_LEN,
        enable_chunked_prefill=chunking, long_prefill_token_threshold=draw(st.sampled_from([0, 0, 4, 16])),
        policy=draw(st.sampled_from(["fcfs", "priority", "sjf", "lpm"])), batching=batching,
        preemption_mode=mode, watermark=draw(st.sampled_from([0.0, 0.0, 0.1, 0.3])),
        truncate_prompt=draw(st.booleans()))
    cc = CacheConfig(bs, draw(st.integers(1, 3 * per_req)),
                     draw(st.integers(1, 2 * per_req)) if mode == "swap" else 0, draw(st.booleans()))
    eos = draw(st.sampled_from([None, 0]))
    return sc, cc, eos


add_op = st.tuples(st.just("add"), st.integers(0, len(BASES)), st.integers(0, 48), st.integers(0, 12),
                   st.integers(1, 40), st.integers(0, 2), st.booleans(), st.booleans(), st.integers(0, 3))
step_op = st.tuples(st.just("step"), st.integers(1, 8))
abort_op = st.tuples(st.just("abort"), st.integers(0, 50))
ops_strategy = st.lists(st.one_of(add_op, add_op, step_op, step_op, abort_op), min_size=10, max_size=50)


def make_prompt(base: int, head: int, tail: int, rid_seed: int) -> list[int]:
    rng = random.Random(rid_seed)
    prompt = list(BASES[base][:head]) if base < len(BASES) else []
    prompt += [rng.randrange(4) for _ in range(tail)]
    return prompt or [rng.randrange(4)]


def snapshot(eng) -> tuple:
    s = eng.scheduler
    return (sorted(s.requests), [r.request_id for r in s.waiting], [r.request_id for r in s.running],
            s.kv.num_free_blocks, s.kv.host_pool.num_free_blocks)


def run_ops(cfg, ops, seed: int) -> tuple[list, dict]:
    """Runs the ops, checks invariants after every step and at the end; returns a trace for determinism."""
    sc, cc, eos = cfg
    rng = random.Random(seed)
    eng = fk.make_engine(sc, cc, lambda req, n: rng.randrange(VOCAB), eos)
    sched = eng.scheduler
    eng.backend.on_execute = lambda out: fk.check_output(out, sched)
    trace: list = []
    added: dict[str, Request] = {}
    now = 0.0
    empty = 0

    def do_step():
        nonlocal now, empty
        out = eng.step(now)
        so = out.scheduler_output
        fk.check_invariants(sched)
        trace.append((so.req_ids, so.num_new_tokens, so.preempted_req_ids, so.new_req_ids,
                      so.blocks_to_swap_out, so.blocks_to_swap_in, [r.request_id for r in out.finished]))
        if so.is_empty:
            empty += 1
            assert empty <= 2 or not eng.has_unfinished(), "engine hangs"
        else:
            empty = 0
            now = now + out.duration

    for i, op in enumerate(ops):
        if op[0] == "add":
            _, base, head, tail, max_tokens, prio, stop, ignore_eos, extra = op
            rid = f"r{i}"
            prompt = make_prompt(base, head, tail, i)
            r = Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos,
                                                          stop_token_ids=(STOP,) if stop else ()),
                        arrival_time=now, priority=prio, expected_output_len=None if extra else max_tokens,
                        cache_salt="s" if extra == 3 else None)
            before = snapshot(eng)
            try:
                eng.add_request(r)
            except ValueError as e:
                assert rid in str(e)
                assert snapshot(eng) == before and r.prompt_token_ids == prompt
                assert r.status == RequestStatus.WAITING and r.num_computed_tokens == 0
                trace.append(("rejected", rid))
                continue
            added[rid] = r
            trace.append(("added", rid, r.num_prompt_tokens))
        elif op[0] == "step":
            for _ in range(op[1]):
                do_step()
        else:
            ids = sorted(added)
            if not ids:
                continue
            rid = ids[op[1] % len(ids)]
            live = rid in sched.requests
            got = eng.abort_request(rid, now)
            assert (got is not None) == live
            fk.check_invariants(sched)
            trace.append(("abort", rid, live))
    assert eng.abort_request("never-added", now) is None
    for _ in range(20_000):
        if not eng.has_unfinished():
            break
        do_step()
    else:
        raise AssertionError("did not drain")

    # Every accepted request ended exactly once; nothing is held any more.
    ended = [r.request_id for r in eng.finished]
    assert len(ended) == len(set(ended)) and set(ended) == set(added)
    assert not sched.requests and not sched.waiting and not sched.running
    kv = sched.kv
    assert kv.num_free_blocks == kv.num_gpu_blocks and kv.host_pool.num_free_blocks == kv.host_pool.num_blocks
    assert kv.req_to_block_ids == {}
    assert not kv.block_pool.ref_cnt.any()
    fk.check_invariants(sched)
    for r in added.values():
        assert r.is_finished
        assert r.num_cached_tokens <= r.num_prompt_tokens - 1
        fk.check_finished(r, eos)
        assert r.num_prompt_tokens + r.max_tokens <= MAX_MODEL_LEN
    final = {rid: (r.status, list(r.output_token_ids), list(r.token_times), r.num_preemptions, r.num_cached_tokens,
                   r.num_recomputed_cached_tokens) for rid, r in added.items()}
    return trace, final


@SETTINGS
@given(cfg=configs(), ops=ops_strategy, seed=st.integers(0, 2**16))
def test_random_operations_keep_invariants(cfg, ops, seed):
    run_ops(cfg, ops, seed)


@SETTINGS
@given(cfg=configs(), ops=ops_strategy, seed=st.integers(0, 2**16))
def test_same_seed_same_run(cfg, ops, seed):
    assert run_ops(cfg, ops, seed) == run_ops(cfg, ops, seed)


@st.composite
def tiny_pool_configs(draw):
    """Continuous batching with a pool of a few requests' worth of blocks: preemption is common."""
    bs = draw(st.sampled_from([2, 4, 8]))
    mode = draw(st.sampled_from(["recompute", "swap"]))
    per_req = -(-MAX_MODEL_LEN // bs)
    chunking = draw(st.booleans())
    sc = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=draw(st.integers(bs, 64)) if not chunking
                         else draw(st.integers(1, 64)), max_model_len=MAX_MODEL_LEN, enable_chunked_prefill=chunking,
                         policy=draw(st.sampled_from(["fcfs", "priority", "sjf", "lpm"])), preemption_mode=mode,
                         watermark=0.0)
    cc = CacheConfig(bs, draw(st.integers(per_req, per_req * 3 // 2)),
                     draw(st.integers(1, per_req)) if mode == "swap" else 0, draw(st.booleans()))
    return sc, cc, draw(st.sampled_from([None, 0]))


burst = st.lists(st.tuples(st.just("add"), st.integers(0, len(BASES)), st.integers(8, 32), st.integers(0, 8),
                           st.integers(16, 30), st.integers(0, 2), st.booleans(), st.booleans(), st.integers(0, 3)),
                 min_size=4, max_size=10)


@SETTINGS
@given(cfg=tiny_pool_configs(), adds=burst, more=ops_strategy, seed=st.integers(0, 2**16))
def test_preemption_heavy_runs_keep_invariants(cfg, adds, more, seed):
    trace, _ = run_ops(cfg, adds + [("step", 3)] + more, seed)
    assert trace


def test_properties_do_preempt_and_swap():
    """The generators reach the interesting paths (not a property: a guard on the generators)."""
    seen = {"preempt": 0, "swap_in": 0, "recompute_hit": 0}
    rng = random.Random(0)
    for i in range(30):
        mode = "swap" if i % 2 else "recompute"
        sc = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=32, max_model_len=MAX_MODEL_LEN,
                             preemption_mode=mode, watermark=0.0)
        cc = CacheConfig(4, 20, 10 if mode == "swap" else 0, True)
        ops = [("add", rng.randrange(4), rng.randrange(8, 40), rng.randrange(8), rng.randrange(8, 24), 0,
                False, False, 1) for _ in range(6)] + [("step", 5)]
        trace, final = run_ops((sc, cc, None), ops, i)
        for entry in trace:
            if len(entry) == 7:
                seen["preempt"] += bool(entry[2])
                seen["swap_in"] += bool(entry[5])
        seen["recompute_hit"] += sum(1 for v in final.values() if v[5])
    assert all(v > 0 for v in seen.values()), seen
