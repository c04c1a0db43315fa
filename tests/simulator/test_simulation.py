"""End-to-end simulator behaviour: fast-forward equivalence, determinism, routing, preemption."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from core.config import SchedulerConfig
from core.workloads.config import WorkloadConfig, build_workload
from simulator.runner import ParallelSpec, SimulationConfig, run_simulation


def _run(workload: WorkloadConfig, **kw):
    cfg = SimulationConfig(**kw)
    return run_simulation(cfg, build_workload(workload))


def _per_request(out):
    rows = {}
    for r in out.result.requests:
        rows[r.request_id] = (r.arrival_time, r.first_scheduled_time, r.first_token_time, r.finish_time,
                              r.num_preemptions, r.num_cached_tokens, list(r.token_times), r.replica)
    return rows


def _assert_same(a, b):
    ra, rb = _per_request(a), _per_request(b)
    assert ra.keys() == rb.keys()
    for rid in ra:
        xa, xb = ra[rid], rb[rid]
        for va, vb in zip(xa, xb):
            if isinstance(va, list):
                assert len(va) == len(vb)
                assert all(math.isclose(p, q, rel_tol=1e-9, abs_tol=1e-12) for p, q in zip(va, vb)), rid
            elif isinstance(va, float):
                assert math.isclose(va, vb, rel_tol=1e-9, abs_tol=1e-12), (rid, va, vb)
            else:
                assert va == vb, (rid, va, vb)


SHAREGPT = WorkloadConfig(kind="sharegpt", rate=12.0, num_requests=150, seed=3, max_model_len=4096)

CASES = {
    "sharegpt_poisson": (SHAREGPT, {}),
    "tiny_kv_preemption": (dataclasses.replace(SHAREGPT, rate=30.0),
                           {"num_gpu_blocks": 400, "scheduler": SchedulerConfig(max_model_len=4096)}),
    "swap_preemption": (dataclasses.replace(SHAREGPT, rate=30.0),
                        {"num_gpu_blocks": 400, "swap_space_gb": 4.0,
                         "scheduler": SchedulerConfig(max_model_len=4096, preemption_mode="swap")}),
    "closed_loop_multiturn": (WorkloadConfig(kind="synthetic", arrival="closed_loop", num_users=8, think_time_s=0.5,
                                             num_requests=80, num_turns=4, lengths="uniform",
                                             input_range=(16, 400), output_range=(4, 120),
                                             system_prompt_lens=(256,), seed=1), {}),
    "dp2_prefix_aware": (WorkloadConfig(kind="synthetic", rate=20.0, num_requests=120, lengths="uniform",
                                        input_range=(32, 600), output_range=(8, 200),
                                        system_prompt_lens=(512, 256), seed=2),
                         {"parallel": ParallelSpec(dp=2, router="prefix_aware")}),
    "orca_gamma": (WorkloadConfig(kind="synthetic", arrival="gamma", rate=8.0, cv=3.0, num_requests=100,
                                  lengths="uniform", input_range=(16, 800), output_range=(8, 300), seed=4),
                   {"scheduler": SchedulerConfig(batching="orca", enable_chunked_prefill=False,
                                                 max_model_len=2048, max_num_batched_tokens=2048)}),
    "calibrated_v2": (dataclasses.replace(SHAREGPT, rate=25.0),
                      {"model": "Qwen3-0.6B", "hardware": "H200", "cost_model": "calibrated",
                       "cost_model_options": {"profile": str(Path(__file__).parents[2] / "experiments" / "profiles"
                                                             / "qwen3_0_6b_h200_v2_fused.json")}}),
    "priority_tp2": (dataclasses.replace(SHAREGPT, num_priorities=3),
                     {"scheduler": SchedulerConfig(policy="priority", max_model_len=4096), "num_gpu_blocks": 600,
                      "parallel": ParallelSpec(tp=2)}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_forward_equals_step_by_step(case):
    workload, kw = CASES[case]
    fast = _run(workload, fast_forward=True, **kw)
    slow = _run(workload, fast_forward=False, **kw)
    _assert_same(fast, slow)
    assert fast.metrics["completed"] == slow.metrics["completed"] == len(build_workload(workload))
    assert fast.metrics["num_preemptions"] == slow.metrics["num_preemptions"]
    for key in ("median_ttft_ms", "p99_tpot_ms", "mean_e2el_ms", "output_throughput"):
        assert math.isclose(fast.metrics[key], slow.metrics[key], rel_tol=1e-9)
    assert fast.result.num_events < slow.result.num_events  # it did skip steps


def test_preemption_cases_really_preempt():
    _, kw = CASES["tiny_kv_preemption"]
    out = _run(CASES["tiny_kv_preemption"][0], **kw)
    assert out.metrics["num_preemptions"] > 0
    assert out.metrics["completed"] == 150  # no request lost


def test_deterministic_per_seed():
    a = _run(SHAREGPT)
    b = _run(SHAREGPT)
    _assert_same(a, b)
    c = _run(dataclasses.replace(SHAREGPT, seed=4))
    assert _per_request(c) != _per_request(a)


@pytest.mark.parametrize("router", ["round_robin", "least_loaded", "prefix_aware"])
def test_router_spreads_load(router):
    out = _run(dataclasses.replace(SHAREGPT, num_requests=200, rate=40.0), parallel=ParallelSpec(dp=4, router=router))
    counts = [0] * 4
    for r in out.result.requests:
        counts[r.replica] += 1
    assert sum(counts) == 200
    assert min(counts) >= 25, counts


def test_continuous_batching_doubles_static_throughput():
    mixed = WorkloadConfig(kind="synthetic", rate=200.0, num_requests=300, lengths="uniform",
                           input_range=(16, 1024), output_range=(4, 512), seed=5)
    cont = _run(mixed, scheduler=SchedulerConfig(max_model_len=4096))
    static = _run(mixed, scheduler=SchedulerConfig(batching="static", enable_chunked_prefill=False,
                                                   max_model_len=4096, max_num_batched_tokens=4096))
    ratio = cont.metrics["request_throughput"] / static.metrics["request_throughput"]
    assert ratio >= 2.0, ratio


def test_result_files_written(tmp_path):
    out = run_simulation(SimulationConfig(), build_workload(dataclasses.replace(SHAREGPT, num_requests=30)),
                         out_dir=tmp_path)
    for name in ("metrics.json", "requests.parquet", "steps.parquet", "breakdown.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert out.metrics["completed"] == 30


def test_model_that_does_not_fit_is_a_clear_error():
    with pytest.raises(ValueError, match="does not fit"):
        _run(dataclasses.replace(SHAREGPT, num_requests=5), model="Llama-3.1-70B")


def test_tp_must_divide_heads():
    with pytest.raises(ValueError, match="tensor parallel size 3 does not divide"):
        _run(dataclasses.replace(SHAREGPT, num_requests=5), parallel=ParallelSpec(tp=3))


def test_closed_loop_duration_cutoff_stops_issuing():
    wl = WorkloadConfig(kind="synthetic", arrival="closed_loop", num_users=4, think_time_s=1.0,
                        num_requests=400, duration_s=20.0, lengths="fixed", input_len=128, output_len=64, seed=0)
    out = _run(wl)
    issued = out.metrics["completed"]
    assert 0 < issued < 400
    assert out.metrics["num_not_issued"] == 400 - issued
    assert max(r.arrival_time for r in out.result.requests) < 20.0


def test_alone_replica_changes_no_event(monkeypatch):
    """One replica, open loop: the replica issues its arrivals itself, and runs are cut at the
    next arrival, applied back to back and slept through without interrupts. The same run on
    the general path (an arrival process that syncs and wakes the replica, as with several
    replicas or a closed loop) gives the very same requests and steps."""
    import simulator.simulation as simulation

    wl = WorkloadConfig(kind="synthetic", rate=20.0, num_requests=150, lengths="uniform", input_range=(32, 600),
                        output_range=(8, 200), system_prompt_lens=(512,), num_turns=2, seed=4)
    quiet = _run(wl, num_gpu_blocks=600)
    monkeypatch.setattr(simulation.Simulation, "_alone_when_possible", False)
    loud = _run(wl, num_gpu_blocks=600)
    assert _per_request(quiet) == _per_request(loud)
    assert [dataclasses.astuple(s) for s in quiet.result.steps] == [dataclasses.astuple(s) for s in loud.result.steps]
    assert quiet.metrics["num_events"] == loud.metrics["num_events"]


@pytest.mark.parametrize("case", ["sharegpt_poisson", "tiny_kv_preemption", "dp2_prefix_aware", "calibrated_v2"])
def test_runs_through_finishes_change_no_result(case, monkeypatch):
    """Open loop: a fast-forward run goes on past finishes while nobody waits, each stretch
    between finishes costed as a run of its own. Stopping every run at its first finish
    instead (the closed loop's way) gives the very same requests, steps (one row per stretch)
    and op breakdown, in fewer events."""
    from core.engine import EngineCore

    workload, kw = CASES[case]
    through = _run(workload, **kw)
    use_lazy_decode = EngineCore.use_lazy_decode
    monkeypatch.setattr(EngineCore, "use_lazy_decode", lambda self, token, through_finishes=False:
                        use_lazy_decode(self, token, through_finishes=False))
    stopping = _run(workload, **kw)
    assert _per_request(through) == _per_request(stopping)
    assert [dataclasses.astuple(s) for s in through.result.steps] == \
           [dataclasses.astuple(s) for s in stopping.result.steps]
    assert through.result.breakdown == stopping.result.breakdown
    assert through.result.num_events < stopping.result.num_events


@pytest.mark.parametrize("dp", [1, 2])
def test_requests_given_out_of_arrival_order_run_in_arrival_order(monkeypatch, dp):
    """The simulation sorts the arrivals it is given (one replica issues them itself, several
    get them from an arrival process): a shuffled request list gives the same results."""
    import random

    import simulator.runner as runner

    wl = WorkloadConfig(kind="synthetic", rate=30.0, num_requests=120, lengths="uniform", input_range=(16, 300),
                        output_range=(4, 80), seed=11)
    kw = dict(parallel=ParallelSpec(dp=dp), num_gpu_blocks=400)
    ordered = _run(wl, **kw)
    real = runner.build_requests

    def shuffled(workload):
        requests, sessions = real(workload)
        random.Random(3).shuffle(requests)
        return requests, sessions

    monkeypatch.setattr(runner, "build_requests", shuffled)
    out = _run(wl, **kw)
    assert _per_request(out) == _per_request(ordered)
    assert [dataclasses.astuple(s) for s in out.result.steps] == [dataclasses.astuple(s) for s in ordered.result.steps]
