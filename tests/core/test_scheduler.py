"""Scheduler scenarios, written from vLLM's documented behaviour, and input validation."""
from __future__ import annotations

import math

import pytest

import core_fakes as fk
from core.config import CacheConfig, SchedulerConfig
from core.policies import BATCHING_POLICIES, QUEUE_POLICIES
from core.request import Request, RequestStatus
from core.sampling_params import SamplingParams
from core.scheduler import Scheduler
from core.scheduler_output import StepResult

mkreq = fk.make_request


def mk(block_size: int = 16, num_gpu_blocks: int = 64, num_cpu_blocks: int = 0, prefix: bool = True,
       eos: int | None = None, **kw) -> Scheduler:
    kw.setdefault("watermark", 0.0)
    return Scheduler(SchedulerConfig(**kw), CacheConfig(block_size, num_gpu_blocks, num_cpu_blocks, prefix), eos)


def step(s: Scheduler, token_fn=None, check: bool = True):
    out, finished = fk.sched_step(s, token_fn=token_fn, before_update=fk.check_output if check else None)
    if check:
        fk.check_invariants(s)
    return out, finished


def run_to_end(s: Scheduler, max_steps: int = 1000, token_fn=None) -> list:
    outs = []
    for _ in range(max_steps):
        if not s.has_unfinished():
            return outs
        out, _ = step(s, token_fn)
        assert not out.is_empty or out.preempted_req_ids, "scheduler stalled"
        outs.append(out)
    raise AssertionError("did not drain")


# --- chunked prefill ---------------------------------------------------------------------
def test_chunked_prefill_runs_alongside_decodes():
    s = mk(max_num_batched_tokens=64)
    s.add_request(mkreq("a", 10, max_tokens=20))
    out, _ = step(s)
    assert fk.scheduled(out) == {"a": 10} and out.samples == [True]
    s.add_request(mkreq("b", 150, max_tokens=2))
    chunks = []
    for _ in range(3):
        out, _ = step(s)
        assert out.req_ids[0] == "a" and out.num_new_tokens[0] == 1  # the decode goes first
        assert out.samples[0]
        chunks.append((out.num_new_tokens[1], out.num_computed_tokens[1], out.samples[1]))
        assert out.total_num_scheduled_tokens <= 64
    assert chunks == [(63, 0, False), (63, 63, False), (24, 126, True)]
    b = s.requests["b"]
    assert b.num_computed_tokens == 150 and b.num_output_tokens == 1
    assert s.requests["a"].num_output_tokens == 4
    assert out.new_token_ids[1] == b.prompt_token_ids[126:150]


def test_long_prefill_token_threshold_caps_chunks():
    s = mk(max_num_batched_tokens=64, long_prefill_token_threshold=20)
    s.add_request(mkreq("a", 50, max_tokens=2))
    sizes = [step(s)[0].num_new_tokens[0] for _ in range(3)]
    assert sizes == [20, 20, 10]


def test_threshold_also_caps_a_request_swapped_in_during_its_prefill():
    s = mk(max_num_batched_tokens=40, long_prefill_token_threshold=8, block_size=4, num_gpu_blocks=16,
           num_cpu_blocks=32, preemption_mode="swap")
    s.add_request(mkreq("a", 8, max_tokens=40))
    step(s)
    s.add_request(mkreq("b", 60, max_tokens=2))
    resumed = None
    for _ in range(100):
        out, _ = step(s)  # check_output asserts every chunk <= the threshold
        if out.blocks_to_swap_out:
            assert out.preempted_req_ids == ["b"] and s.requests["b"].num_computed_tokens == 48
        if out.blocks_to_swap_in:
            resumed = fk.scheduled(out)["b"]
        if not s.has_unfinished():
            break
    assert resumed == 8  # 12 prompt tokens were left


def test_chunking_off_schedules_whole_prompts_only():
    s = mk(max_num_batched_tokens=64, enable_chunked_prefill=False)
    with pytest.raises(ValueError, match="max_num_batched_tokens=64"):
        s.add_request(mkreq("huge", 65))
    assert not s.requests and not s.waiting
    for i in range(5):
        s.add_request(mkreq(f"d{i}", 1, max_tokens=3))
    out, _ = step(s)
    assert len(out.req_ids) == 5
    s.add_request(mkreq("big", 62, max_tokens=2))
    out, _ = step(s)  # 5 decodes leave 59 < 62: it waits rather than being chunked
    assert "big" not in out.req_ids and s.requests["big"].status == RequestStatus.WAITING
    out, finished = step(s)  # the decodes finish in this step
    assert {r.request_id for r in finished} == {f"d{i}" for i in range(5)}
    out, _ = step(s)
    assert fk.scheduled(out) == {"big": 62}


def test_max_num_seqs():
    s = mk(max_num_seqs=2)
    for i in range(3):
        s.add_request(mkreq(f"r{i}", 4, max_tokens=2, arrival=i))
    out, _ = step(s)
    assert out.req_ids == ["r0", "r1"]
    out, finished = step(s)
    assert out.req_ids == ["r0", "r1"] and len(finished) == 2
    out, _ = step(s)
    assert out.req_ids == ["r2"]


def test_budget_caps_decodes_too():
    s = mk(max_num_batched_tokens=16)
    for i in range(20):
        s.add_request(mkreq(f"r{i}", 1, max_tokens=5, arrival=i))
    out, _ = step(s)
    assert out.total_num_scheduled_tokens == 16 and out.req_ids == [f"r{i}" for i in range(16)]
    out, _ = step(s)  # the 16 running decodes use the whole budget
    assert out.req_ids == [f"r{i}" for i in range(16)]
    assert s.num_waiting == 4


# --- preemption ----------------------------------------------------------------------------
def _tiny_pool_three(policy: str) -> tuple[Scheduler, list]:
    s = mk(block_size=4, num_gpu_blocks=3, policy=policy)
    s.add_request(mkreq("a", 4, max_tokens=8, arrival=0.0, priority=2))
    s.add_request(mkreq("b", 4, max_tokens=8, arrival=1.0, priority=0))
    s.add_request(mkreq("c", 4, max_tokens=8, arrival=2.0, priority=1))
    out, _ = step(s)
    assert sorted(out.req_ids) == ["a", "b", "c"] and s.kv.num_free_blocks == 0
    out, _ = step(s)  # every request needs a second block now
    return s, out


def test_fcfs_preempts_most_recently_admitted():
    s, out = _tiny_pool_three("fcfs")
    assert out.preempted_req_ids == ["c", "b"]
    assert out.req_ids == ["a"]
    assert [r.request_id for r in s.waiting] == ["b", "c"]  # arrival order
    assert s.requests["b"].status == RequestStatus.PREEMPTED
    assert s.requests["b"].num_computed_tokens == 0 and s.requests["b"].num_preemptions == 1
    assert s.num_preemptions == 2


def test_priority_preempts_least_important():
    s, out = _tiny_pool_three("priority")
    assert out.preempted_req_ids == ["a", "c"]  # priority 2 first, then priority 1
    assert out.req_ids == ["b"]
    assert [r.request_id for r in s.waiting] == ["c", "a"]  # by (priority, arrival)


def test_fcfs_victim_is_the_last_admitted_not_the_last_arrived():
    s = mk(block_size=4, num_gpu_blocks=4)
    s.add_request(mkreq("late", 4, max_tokens=12, arrival=5.0))
    step(s)  # "late" runs alone first
    s.add_request(mkreq("early", 4, max_tokens=12, arrival=1.0))
    step(s)  # admitted after "late"
    assert [r.request_id for r in s.running] == ["late", "early"]
    preempted = []
    for _ in range(8):
        out, _ = step(s)
        preempted += out.preempted_req_ids
        if preempted:
            break
    assert preempted == ["early"]


def test_priority_ties_broken_by_arrival():
    s = mk(block_size=4, num_gpu_blocks=2, policy="priority")
    s.add_request(mkreq("first", 4, max_tokens=4, arrival=0.0, priority=1))
    s.add_request(mkreq("second", 4, max_tokens=4, arrival=1.0, priority=1))
    step(s)
    out, _ = step(s)
    assert out.preempted_req_ids == ["second"] and out.req_ids == ["first"]


def _preempt_scenario(mode: str) -> Scheduler:
    """a (12-token prompt) and c (8) fill a 6-block pool; c is preempted when both grow."""
    kw = dict(preemption_mode="swap", num_cpu_blocks=8) if mode == "swap" else {}
    s = mk(block_size=4, num_gpu_blocks=6, **kw)
    s.add_request(mkreq("a", 12, max_tokens=3, arrival=0.0))
    s.add_request(mkreq("c", 8, max_tokens=6, arrival=1.0))
    out, _ = step(s)
    assert out.req_ids == ["a", "c"] and s.kv.num_free_blocks == 1
    s.add_request(mkreq("d", 4, max_tokens=2, arrival=2.0))
    return s


def test_recompute_preemption_requeues_ahead_and_restarts_from_prefix_hit():
    s = _preempt_scenario("recompute")
    out, _ = step(s)
    assert out.preempted_req_ids == ["c"] and out.req_ids == ["a"]
    assert out.new_req_ids == []  # no admission in a step with preemption
    c = s.requests["c"]
    assert c.status == RequestStatus.PREEMPTED and c.num_computed_tokens == 0
    assert [r.request_id for r in s.waiting] == ["c", "d"]  # c arrived before d
    out, finished = step(s)  # c's two cached prompt blocks are free; the pool is otherwise full
    assert [r.request_id for r in finished] == ["a"]
    assert out.new_req_ids == []
    out, _ = step(s)
    assert out.new_req_ids == ["c", "d"]
    assert out.num_cached_tokens == {"c": 8, "d": 0}
    i = out.req_ids.index("c")
    assert out.num_computed_tokens[i] == 8 and out.num_new_tokens[i] == 1  # 8 prompt + 1 output token
    assert c.num_recomputed_cached_tokens == 8 and c.num_cached_tokens == 0
    assert s.kv.recompute_hit_tokens == 8 and s.kv.prefix_hit_tokens == 0
    run_to_end(s)
    assert c.status == RequestStatus.FINISHED_LENGTH and c.num_output_tokens == 6 and c.num_preemptions == 1


def test_swap_preemption_swaps_out_then_in_without_recompute():
    s = _preempt_scenario("swap")
    c = s.requests["c"]
    c_blocks = list(s.kv.block_ids("c"))
    out, _ = step(s)
    assert out.preempted_req_ids == ["c"] and out.new_req_ids == [] and out.blocks_to_swap_in == []
    assert [g for g, _ in out.blocks_to_swap_out] == c_blocks
    host = [h for _, h in out.blocks_to_swap_out]
    assert c.status == RequestStatus.SWAPPED and c.num_computed_tokens == 8 and c.swap_out_blocks == host
    assert s.kv.host_pool.num_free_blocks == 6
    assert [r.request_id for r in s.waiting] == ["c", "d"]
    out, finished = step(s)
    assert [r.request_id for r in finished] == ["a"] and out.blocks_to_swap_in == []
    out, _ = step(s)
    assert [h for _, h in out.blocks_to_swap_in] == host
    assert [g for g, _ in out.blocks_to_swap_in] == list(s.kv.block_ids("c")[:2])
    assert out.new_req_ids == ["d"]  # a swapped-in request is resumed, not new
    i = out.req_ids.index("c")
    assert out.num_computed_tokens[i] == 8 and out.num_new_tokens[i] == 1  # no recomputation
    assert s.kv.host_pool.num_free_blocks == 8 and c.swap_out_blocks == []
    run_to_end(s)
    assert c.status == RequestStatus.FINISHED_LENGTH and c.num_output_tokens == 6
    assert c.num_preemptions == 1 and c.num_recomputed_cached_tokens == 0


def test_swap_falls_back_to_recompute_when_host_is_full():
    s = mk(block_size=4, num_gpu_blocks=6, preemption_mode="swap", num_cpu_blocks=1)
    s.add_request(mkreq("a", 12, max_tokens=3, arrival=0.0))
    s.add_request(mkreq("c", 8, max_tokens=6, arrival=1.0))
    step(s)
    out, _ = step(s)
    assert out.preempted_req_ids == ["c"] and out.blocks_to_swap_out == []
    assert s.requests["c"].status == RequestStatus.PREEMPTED
    run_to_end(s)


def test_no_admission_in_a_step_with_preemption_even_if_room_is_left():
    s = mk(block_size=4, num_gpu_blocks=5)
    s.add_request(mkreq("a", 12, max_tokens=6, arrival=0.0))
    s.add_request(mkreq("c", 8, max_tokens=6, arrival=1.0))
    step(s)
    s.add_request(mkreq("d", 3, max_tokens=1, arrival=2.0, priority=-1))
    out, _ = step(s)
    assert out.preempted_req_ids == ["c"]
    assert s.kv.num_free_blocks >= 1  # d (one block) would have fit
    assert out.new_req_ids == [] and s.requests["d"].status == RequestStatus.WAITING


# --- batching baselines --------------------------------------------------------------------
def test_static_batching_waits_for_the_batch_to_drain():
    s = mk(batching="static", max_num_batched_tokens=256, max_model_len=256)
    s.add_request(mkreq("a", 20, max_tokens=3))
    s.add_request(mkreq("b", 20, max_tokens=6))
    out, _ = step(s)
    assert out.new_req_ids == ["a", "b"]
    assert len(s.kv.block_ids("a")) == 2 and len(s.kv.block_ids("b")) == 2  # ceil((20+3)/16), ceil(26/16)
    s.add_request(mkreq("c", 10, max_tokens=2))
    joined_at = None
    for n in range(2, 12):
        out, _ = step(s)
        if "c" in out.req_ids:
            joined_at = n
            break
        assert out.new_req_ids == []
    # b produces its 6th (last) token in step 6; c forms the next batch in step 7.
    assert joined_at == 7 and s.requests.get("b") is None


def test_static_batching_reserves_prompt_plus_max_tokens():
    s = mk(batching="static", num_gpu_blocks=8, max_num_batched_tokens=256, max_model_len=512)
    s.add_request(mkreq("a", 10, max_tokens=100))  # 110 tokens: 7 blocks
    s.add_request(mkreq("b", 10, max_tokens=6))    # 16 tokens: the 1 block left
    out, _ = step(s)
    assert len(s.kv.block_ids("a")) == 7 and len(s.kv.block_ids("b")) == 1
    s2 = mk(batching="static", num_gpu_blocks=8, max_num_batched_tokens=256, max_model_len=512)
    s2.add_request(mkreq("a", 10, max_tokens=100))
    s2.add_request(mkreq("b", 10, max_tokens=20))  # 2 blocks: does not fit next to a
    out, _ = step(s2)
    assert out.new_req_ids == ["a"]
    outs = run_to_end(s2)
    assert sum(1 for o in outs if o.preempted_req_ids) == 0
    assert [o.new_req_ids for o in outs if o.new_req_ids] == [["b"]]


def test_static_batch_is_whole_prompts_within_budget():
    s = mk(batching="static", max_num_batched_tokens=32, max_model_len=128)
    with pytest.raises(ValueError, match="exceeds max_num_batched_tokens"):
        s.add_request(mkreq("big", 33))
    s.add_request(mkreq("a", 20, max_tokens=2))
    s.add_request(mkreq("b", 20, max_tokens=2))
    out, _ = step(s)
    assert out.req_ids == ["a"]  # b does not fit the budget, and may not join a running batch
    out, _ = step(s)
    assert out.req_ids == ["a"]
    out, _ = step(s)
    assert out.req_ids == ["b"]


def test_orca_reserves_max_model_len_and_joins_any_step():
    s = mk(batching="orca", num_gpu_blocks=8, max_model_len=64, max_num_batched_tokens=64)
    s.add_request(mkreq("a", 5, max_tokens=10))
    out, _ = step(s)
    assert len(s.kv.block_ids("a")) == 4  # 64 / 16
    s.add_request(mkreq("b", 5, max_tokens=10))
    out, _ = step(s)
    assert out.new_req_ids == ["b"] and "a" in out.req_ids  # joins while a decodes
    s.add_request(mkreq("c", 5, max_tokens=10))
    out, _ = step(s)
    assert out.new_req_ids == [] and s.kv.num_free_blocks == 0  # the reservation, not the prompt, blocks c
    s2 = mk(batching="orca", max_model_len=128, max_num_batched_tokens=32)
    with pytest.raises(ValueError):
        s2.add_request(mkreq("x", 40, max_tokens=1))  # whole prompts only, even with chunking "on"
    outs = run_to_end(s)
    assert not any(o.preempted_req_ids for o in outs)


# --- queue policies --------------------------------------------------------------------------
def test_sjf_orders_waiting_by_job_size():
    s = mk(policy="sjf", max_num_seqs=1)
    s.add_request(mkreq("long", 60, max_tokens=1, arrival=0.0))
    s.add_request(mkreq("short", 5, max_tokens=1, arrival=1.0))
    s.add_request(mkreq("mid", 30, max_tokens=1, arrival=2.0))
    s.add_request(mkreq("known", 50, max_tokens=1, arrival=3.0, expected_output_len=1))
    order = [o.new_req_ids[0] for o in run_to_end(s) if o.new_req_ids]
    assert order == ["known", "short", "mid", "long"]


def test_lpm_admits_longest_cached_prefix_first():
    P = list(range(100, 200))
    s = mk(policy="lpm", max_num_seqs=1)
    s.add_request(mkreq("warm", P[:64], max_tokens=1))
    run_to_end(s)
    s.add_request(mkreq("none", list(range(900, 950)), max_tokens=1, arrival=1.0))
    s.add_request(mkreq("short", P[:16] + [1] * 30, max_tokens=1, arrival=2.0))
    s.add_request(mkreq("longest", P[:48] + [2] * 5, max_tokens=1, arrival=3.0))
    outs = run_to_end(s)
    order = [o.new_req_ids[0] for o in outs if o.new_req_ids]
    assert order == ["longest", "short", "none"]
    hits = {rid: h for o in outs for rid, h in o.num_cached_tokens.items()}
    assert hits == {"longest": 48, "short": 16, "none": 0}


def test_fcfs_head_of_line_blocks_later_requests():
    s = mk(block_size=16, num_gpu_blocks=4)
    s.add_request(mkreq("a", 40, max_tokens=2))
    step(s)
    s.add_request(mkreq("big", 30, max_tokens=2, arrival=1.0))  # 2 blocks, 1 free
    s.add_request(mkreq("small", 5, max_tokens=2, arrival=2.0))  # would fit
    out, _ = step(s)
    assert out.new_req_ids == []


def test_watermark_blocks_admission_but_not_growth():
    s = mk(num_gpu_blocks=10, watermark=0.2)  # 2 blocks kept free for running requests
    assert s.watermark_blocks == 2
    s.add_request(mkreq("x", 15, max_tokens=10, arrival=0.0))  # 1 block, a 2nd at position 16
    s.add_request(mkreq("a", 112, max_tokens=16, arrival=1.0))  # 7 blocks, an 8th at position 112
    out, _ = step(s)
    assert out.new_req_ids == ["x", "a"] and s.kv.num_free_blocks == 2
    s.add_request(mkreq("b", 10, max_tokens=2, arrival=2.0))
    out, _ = step(s)
    assert out.new_req_ids == []  # free blocks exist, but they are the watermark
    assert len(s.kv.block_ids("a")) == 8 and s.kv.num_free_blocks == 1  # growth may use them
    out, _ = step(s)
    assert len(s.kv.block_ids("x")) == 2 and s.kv.num_free_blocks == 0 and out.new_req_ids == []
    with pytest.raises(ValueError, match="watermark of 2"):
        s.add_request(mkreq("c", 120, max_tokens=10))  # 9 blocks > 10 - 2
    run_to_end(s)


# --- finishing -------------------------------------------------------------------------------
def test_finish_reasons():
    s = mk(eos=2)
    seq = {"eos": [5, 6, 2, 7], "ign": [2, 2, 2, 2, 2], "stop": [5, 9, 8], "len": [5, 6, 7], "first": [2]}
    s.add_request(mkreq("eos", 4, max_tokens=4))
    s.add_request(mkreq("ign", 4, max_tokens=5, ignore_eos=True))
    s.add_request(mkreq("stop", 4, max_tokens=3, stop_token_ids=(9,)))
    s.add_request(mkreq("len", 4, max_tokens=3))
    s.add_request(mkreq("first", 4, max_tokens=3))
    done = {}
    while s.has_unfinished():
        _, finished = step(s, token_fn=lambda r, n: seq[r.request_id][n])
        for r in finished:
            done[r.request_id] = r
    assert done["eos"].status == RequestStatus.FINISHED_STOPPED and done["eos"].output_token_ids == [5, 6, 2]
    assert done["eos"].stop_reason == 2
    assert done["ign"].status == RequestStatus.FINISHED_LENGTH and done["ign"].num_output_tokens == 5
    assert done["stop"].status == RequestStatus.FINISHED_STOPPED and done["stop"].output_token_ids == [5, 9]
    assert done["stop"].stop_reason == 9
    assert done["len"].status == RequestStatus.FINISHED_LENGTH and done["len"].output_token_ids == [5, 6, 7]
    assert done["first"].status == RequestStatus.FINISHED_STOPPED and done["first"].output_token_ids == [2]
    assert all(r.finish_time == r.token_times[-1] for r in done.values())
    assert s.kv.num_free_blocks == s.kv.num_gpu_blocks
    out = s.schedule()
    assert out.finished_req_ids == ["ign"] and out.is_empty  # the last to finish


def test_finished_ids_are_reported_in_the_next_output():
    s = mk()
    s.add_request(mkreq("a", 4, max_tokens=1))
    s.add_request(mkreq("b", 4, max_tokens=2))
    out, finished = step(s)
    assert [r.request_id for r in finished] == ["a"]
    out, _ = step(s)
    assert out.finished_req_ids == ["a"]


# --- abort -------------------------------------------------------------------------------------
def test_abort_waiting_running_swapped_frees_everything():
    s = mk(block_size=4, num_gpu_blocks=6, preemption_mode="swap", num_cpu_blocks=8)
    s.add_request(mkreq("a", 12, max_tokens=10, arrival=0.0))
    s.add_request(mkreq("c", 8, max_tokens=10, arrival=1.0))
    step(s)
    s.add_request(mkreq("w", 4, max_tokens=2, arrival=2.0))
    out, _ = step(s)
    assert s.requests["c"].status == RequestStatus.SWAPPED
    assert s.kv.host_pool.num_free_blocks == 6
    assert s.abort_request("nope") is None
    c = s.abort_request("c")
    assert c.status == RequestStatus.FINISHED_ABORTED and c.swap_out_blocks == []
    assert s.kv.host_pool.num_free_blocks == 8
    w = s.abort_request("w")
    assert w.status == RequestStatus.FINISHED_ABORTED
    a = s.abort_request("a")
    assert a.status == RequestStatus.FINISHED_ABORTED
    assert s.abort_request("a") is None  # already gone
    fk.check_invariants(s)
    assert not s.has_unfinished() and s.kv.num_free_blocks == 6 and s.kv.req_to_block_ids == {}
    out = s.schedule()
    assert out.finished_req_ids == ["c", "w", "a"] and out.is_empty


def test_abort_between_schedule_and_update():
    s = mk()
    s.add_request(mkreq("a", 20, max_tokens=5))
    s.add_request(mkreq("b", 20, max_tokens=5))
    out = s.schedule()
    s.abort_request("a")
    finished = s.update_from_output(out, StepResult([[1], [1]], 0.1), 1.0)
    assert finished == []
    assert s.requests["b"].num_output_tokens == 1
    fk.check_invariants(s)
    assert list(s.kv.block_ids("a")) == []


def test_finished_request_id_can_be_reused_but_live_one_cannot():
    s = mk()
    s.add_request(mkreq("a", 4, max_tokens=1))
    with pytest.raises(ValueError, match="'a' is already live"):
        s.add_request(mkreq("a", 8, max_tokens=1))
    assert len(s.waiting) == 1 and s.requests["a"].num_prompt_tokens == 4
    step(s)
    s.add_request(mkreq("a", 8, max_tokens=1))
    assert s.requests["a"].num_prompt_tokens == 8


def test_adding_a_used_request_object_is_rejected():
    s = mk()
    r = mkreq("a", 4, max_tokens=1)
    s.add_request(r)
    step(s)
    with pytest.raises(ValueError, match="not a fresh request"):
        s.add_request(r)


# --- bad input -----------------------------------------------------------------------------
def _snapshot(s: Scheduler):
    return (dict(s.requests), [r.request_id for r in s.waiting], [r.request_id for r in s.running],
            s.kv.num_free_blocks, s._blocked)


def test_bad_request_fields():
    with pytest.raises(ValueError, match="prompt_token_ids"):
        Request("x", [])
    with pytest.raises(ValueError, match="prompt_token_ids"):
        Request("x", (1, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"arrival_time .*-1"):
        Request("x", [1], arrival_time=-1)
    with pytest.raises(ValueError, match=r"arrival_time .*nan"):
        Request("x", [1], arrival_time=math.nan)
    with pytest.raises(ValueError, match=r"arrival_time .*inf"):
        Request("x", [1], arrival_time=math.inf)
    with pytest.raises(ValueError, match=r"max_tokens must be an int >= 1, got 0"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match=r"max_tokens.*-3"):
        SamplingParams(max_tokens=-3)


def test_bad_configs():
    with pytest.raises(ValueError, match=r"block_size must be a power of two, got 12"):
        CacheConfig(block_size=12)
    with pytest.raises(ValueError, match=r"block_size.*got 0"):
        CacheConfig(block_size=0)
    with pytest.raises(ValueError, match=r"max_num_batched_tokens must be an int >= 1, got 0"):
        SchedulerConfig(max_num_batched_tokens=0)
    with pytest.raises(ValueError, match=r"max_num_seqs.*got 0"):
        SchedulerConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(8\) must be >= block_size \(16\)"):
        mk(max_num_batched_tokens=8, enable_chunked_prefill=False)
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(8\)"):
        mk(max_num_batched_tokens=8, batching="static")  # static never chunks
    mk(max_num_batched_tokens=8)  # fine with chunking
    with pytest.raises(ValueError, match="num_cpu_blocks"):
        mk(preemption_mode="swap")
    with pytest.raises(ValueError, match="preemption_mode"):
        SchedulerConfig(preemption_mode="drop")
    with pytest.raises(ValueError, match="watermark"):
        SchedulerConfig(watermark=1.0)


def test_unknown_policy_names_list_the_known_ones():
    with pytest.raises(ValueError) as e:
        mk(policy="lifo")
    assert "'lifo'" in str(e.value)
    assert all(name in str(e.value) for name in QUEUE_POLICIES)
    with pytest.raises(ValueError) as e:
        mk(batching="dynamic")
    assert "'dynamic'" in str(e.value)
    assert all(name in str(e.value) for name in BATCHING_POLICIES)


def test_prompt_plus_max_tokens_over_max_model_len_is_rejected():
    s = mk(max_model_len=100)
    s.add_request(mkreq("ok", 90, max_tokens=10))
    before = _snapshot(s)
    r = mkreq("x", 91, max_tokens=10)
    with pytest.raises(ValueError, match=r"'x'.*101 exceeds max_model_len=100"):
        s.add_request(r)
    assert _snapshot(s) == before and r.num_prompt_tokens == 91
    with pytest.raises(ValueError, match=r"max_tokens=100 leaves no room"):
        s.add_request(mkreq("y", 1, max_tokens=100))
    assert _snapshot(s) == before


def test_truncate_prompt_keeps_the_tail():
    s = mk(max_model_len=100, truncate_prompt=True)
    r = mkreq("x", list(range(150)), max_tokens=10)
    s.add_request(r)
    assert r.prompt_token_ids == list(range(60, 150)) and r.all_token_ids == r.prompt_token_ids
    run_to_end(s)
    assert r.num_tokens == 100 and r.status == RequestStatus.FINISHED_LENGTH


def test_truncation_is_not_applied_when_the_request_is_rejected_anyway():
    s = mk(max_model_len=100, truncate_prompt=True, enable_chunked_prefill=False, max_num_batched_tokens=64)
    r = mkreq("x", list(range(150)), max_tokens=10)  # truncated to 90 > budget 64
    with pytest.raises(ValueError, match="exceeds max_num_batched_tokens"):
        s.add_request(r)
    assert r.prompt_token_ids == list(range(150)) and r.num_tokens == 150
    assert not s.requests


def test_pool_that_can_never_hold_a_request_is_an_error_not_a_hang():
    s = mk(num_gpu_blocks=2)
    with pytest.raises(ValueError, match=r"needs 3 KV blocks .*could never run"):
        s.add_request(mkreq("x", 20, max_tokens=20))
    assert not s.requests and not s.waiting
    s.add_request(mkreq("fits", 20, max_tokens=12))  # 32 tokens: 2 blocks
    run_to_end(s)
    s2 = mk(num_gpu_blocks=3, batching="orca", max_model_len=64, max_num_batched_tokens=64)
    with pytest.raises(ValueError, match="could never run"):
        s2.add_request(mkreq("x", 4, max_tokens=1))  # orca reserves 64 tokens: 4 blocks


def test_chunking_off_recompute_of_a_request_longer_than_the_budget_does_not_hang():
    """A preempted request recomputes prompt + outputs, which may exceed the budget."""
    s = mk(num_gpu_blocks=5, max_num_batched_tokens=32, enable_chunked_prefill=False, prefix=False,
           max_model_len=128)
    s.add_request(mkreq("a", 30, max_tokens=40, arrival=0.0))
    s.add_request(mkreq("b", 30, max_tokens=40, arrival=1.0))
    outs = run_to_end(s, max_steps=500)
    assert any(o.preempted_req_ids for o in outs)
