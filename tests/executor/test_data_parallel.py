"""Data parallelism on the CPU: two engine replicas behind the core's routers.

Every request finishes, each on the replica the router chose, with the greedy tokens a
single engine produces (a request's tokens do not depend on its batch), and the result
feeds ``core.metrics.summarize``. In-process replicas for both routers, and one run with
each replica in its own process (``ProcessReplica``).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from core.config import SchedulerConfig
from core.metrics import summarize
from core.request import Request, RequestStatus
from core.sampling_params import SamplingParams
from executor import create_engine
from executor.dp import EngineFactory, ProcessReplica, run_online_dp

SCHED = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=128, max_model_len=256)
ENGINE_KW = {"num_gpu_blocks": 64, "device": "cpu"}
LENGTHS = [6, 9, 4, 7, 5, 8, 3, 6]


@pytest.fixture(scope="module")
def model_dir(make_tiny_model: Callable[..., Path]) -> Path:
    return make_tiny_model("Qwen3ForCausalLM")


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, 500, (int(n),), generator=g).tolist() for n in (5, 20, 33, 8, 17, 40, 12, 26)]


def _requests(spacing: float = 0.002) -> list[Request]:
    return [Request(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True),
                    arrival_time=i * spacing) for i, (p, n) in enumerate(zip(_prompts(), LENGTHS))]


@pytest.fixture(scope="module")
def single(model_dir: Path) -> dict[str, list[int]]:
    engine = create_engine(model_dir, SCHED, **ENGINE_KW)
    for r in _requests():
        engine.add_request(r)
    now = 0.0
    while engine.has_unfinished():
        now += engine.step(now).duration
    return {r.request_id: r.output_token_ids for r in engine.finished}


@pytest.mark.parametrize("router", ["round_robin", "least_loaded"])
def test_two_replicas_in_process(model_dir: Path, single: dict[str, list[int]], router: str) -> None:
    engines = [create_engine(model_dir, SCHED, **ENGINE_KW) for _ in range(2)]
    result = run_online_dp(engines, _requests(), router=router)
    assert len(result.finished) == len(LENGTHS) and not result.rejected
    assert all(r.status == RequestStatus.FINISHED_LENGTH for r in result.requests)
    assert {r.request_id: r.output_token_ids for r in result.requests} == single
    assert sum(result.per_replica) == len(LENGTHS) and min(result.per_replica) > 0
    if router == "round_robin":
        assert [r.replica for r in result.requests] == [i % 2 for i in range(len(LENGTHS))]
    for idx, engine in enumerate(engines):  # each request ran where it was routed
        assert {r.request_id for r in engine.finished} == {r.request_id for r in result.requests
                                                           if r.replica == idx}
    assert {s.replica for s in result.steps} == {0, 1}
    metrics = summarize(result.requests, result.steps)
    assert metrics["completed"] == len(LENGTHS)


def test_two_replicas_in_processes(model_dir: Path, single: dict[str, list[int]]) -> None:
    factory = EngineFactory(str(model_dir), SCHED, **ENGINE_KW)
    replicas = [ProcessReplica(factory, i, threads=1) for i in range(2)]
    result = run_online_dp(replicas, _requests(spacing=0.01), router="round_robin")
    assert len(result.finished) == len(LENGTHS) and not result.rejected
    assert {r.request_id: r.output_token_ids for r in result.requests} == single
    assert [r.replica for r in result.requests] == [i % 2 for i in range(len(LENGTHS))]
    assert {s.replica for s in result.steps} == {0, 1}
    assert all(r.first_token_time is not None and r.finish_time >= r.arrival_time for r in result.requests)
    assert summarize(result.requests, result.steps)["completed"] == len(LENGTHS)


def test_prefix_view_of_process_replica() -> None:
    rep = ProcessReplica(EngineFactory("unused"), 0, block_size=4)
    rep._counts = [0, 0]
    rep.inbox = type("Q", (), {"put": lambda self, x: None})()
    rep.add(Request("a", list(range(10))))
    assert rep.cached_prefix_tokens(list(range(10))) == 8  # two whole blocks, not the last token
    assert rep.cached_prefix_tokens(list(range(6)) + [99, 98, 97]) == 4
    assert rep.num_waiting == 1
