"""Data-parallel routing policies against fake replicas."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.request import Request
from core.router import ROUTERS, ReplicaView, Router, load_score, make_router, register_router


@dataclass
class FakeReplica:
    """A replica whose cache holds the given prompts' full prefixes."""

    num_waiting: int = 0
    num_running: int = 0
    cached_prompts: list[list[int]] = field(default_factory=list)

    def cached_prefix_tokens(self, prompt_token_ids: list[int]) -> int:
        best = 0
        for cached in self.cached_prompts:
            n = 0
            for a, b in zip(cached, prompt_token_ids):
                if a != b:
                    break
                n += 1
            best = max(best, n)
        return best


def req(tokens: list[int] | None = None, rid: str = "r") -> Request:
    return Request(rid, tokens or [1, 2, 3])


def test_fake_replica_satisfies_the_protocol() -> None:
    view: ReplicaView = FakeReplica()
    assert view.cached_prefix_tokens([1]) == 0


def test_registry_holds_the_builtin_policies() -> None:
    assert {"round_robin", "least_loaded", "prefix_aware"} <= set(ROUTERS)
    for name in ("round_robin", "least_loaded", "prefix_aware"):
        router = make_router(name, 2)
        assert isinstance(router, Router) and router.name == name


def test_unknown_name_lists_known_routers() -> None:
    with pytest.raises(ValueError, match="least_loaded.*prefix_aware.*round_robin"):
        make_router("random", 2)


@pytest.mark.parametrize("n", [0, -1])
def test_num_replicas_must_be_positive(n: int) -> None:
    with pytest.raises(ValueError, match="num_replicas"):
        make_router("round_robin", n)


def test_replica_count_must_match() -> None:
    router = make_router("least_loaded", 3)
    with pytest.raises(ValueError, match="3 replicas"):
        router.route(req(), [FakeReplica(), FakeReplica()])


def test_round_robin_cycles_regardless_of_load() -> None:
    router = make_router("round_robin", 3)
    replicas = [FakeReplica(num_waiting=100), FakeReplica(), FakeReplica()]
    assert [router.route(req(), replicas) for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_round_robin_instances_are_independent() -> None:
    a, b = make_router("round_robin", 2), make_router("round_robin", 2)
    replicas = [FakeReplica(), FakeReplica()]
    a.route(req(), replicas)
    assert b.route(req(), replicas) == 0


def test_least_loaded_weighs_waiting_four_times() -> None:
    router = make_router("least_loaded", 3)
    replicas = [
        FakeReplica(num_waiting=1, num_running=0),  # score 4
        FakeReplica(num_waiting=0, num_running=3),  # score 3
        FakeReplica(num_waiting=0, num_running=5),  # score 5
    ]
    assert router.route(req(), replicas) == 1
    assert [load_score(r) for r in replicas] == [4, 3, 5]


def test_least_loaded_ties_go_to_lowest_index() -> None:
    router = make_router("least_loaded", 3)
    replicas = [FakeReplica(num_running=5), FakeReplica(num_running=4), FakeReplica(num_waiting=1)]
    assert router.route(req(), replicas) == 1
    assert router.route(req(), [FakeReplica(), FakeReplica(), FakeReplica()]) == 0


def test_prefix_aware_prefers_longest_cached_prefix_over_load() -> None:
    router = make_router("prefix_aware", 3)
    prompt = [7, 8, 9, 10, 11]
    replicas = [
        FakeReplica(cached_prompts=[[7, 8]]),
        FakeReplica(num_waiting=10, cached_prompts=[[7, 8, 9, 10, 99]]),
        FakeReplica(cached_prompts=[[1, 2, 3, 4, 5]]),
    ]
    assert router.route(req(prompt), replicas) == 1


def test_prefix_aware_breaks_ties_by_load_then_index() -> None:
    router = make_router("prefix_aware", 3)
    prompt = [7, 8, 9]
    replicas = [
        FakeReplica(num_running=3, cached_prompts=[[7, 8]]),
        FakeReplica(num_running=1, cached_prompts=[[7, 8]]),
        FakeReplica(num_running=1, cached_prompts=[[7, 8]]),
    ]
    assert router.route(req(prompt), replicas) == 1
    # No replica has any of the prompt: plain least-loaded.
    cold = [FakeReplica(num_waiting=1), FakeReplica(num_running=2), FakeReplica(num_running=2)]
    assert router.route(req([42]), cold) == 1


def test_prefix_aware_only_sees_reported_cache() -> None:
    """Requests routed but not yet scheduled create no visible cache: a burst spreads."""
    router = make_router("prefix_aware", 2)
    replicas = [FakeReplica(), FakeReplica()]
    first = router.route(req([1, 2, 3]), replicas)
    replicas[first].num_waiting += 1  # routed, queued, nothing cached yet
    assert router.route(req([1, 2, 3]), replicas) == 1 - first


@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20), st.integers(0, 8)), min_size=1, max_size=8))
def test_routers_return_a_valid_index_and_respect_their_order(specs: list[tuple[int, int, int]]) -> None:
    prompt = list(range(8))
    replicas = [FakeReplica(w, r, [prompt[:c]]) for w, r, c in specs]
    n = len(replicas)
    for name in ROUTERS:
        assert 0 <= make_router(name, n).route(req(prompt), replicas) < n
    ll = make_router("least_loaded", n).route(req(prompt), replicas)
    assert load_score(replicas[ll]) == min(load_score(r) for r in replicas)
    pa = make_router("prefix_aware", n).route(req(prompt), replicas)
    assert replicas[pa].cached_prefix_tokens(prompt) == max(r.cached_prefix_tokens(prompt) for r in replicas)


def test_custom_router_registers_by_name() -> None:
    @register_router("test_last")
    class LastRouter(Router):
        def _choose(self, request: Request, replicas) -> int:
            return len(replicas) - 1

    try:
        assert make_router("test_last", 4).route(req(), [FakeReplica()] * 4) == 3
        with pytest.raises(ValueError, match="already registered"):
            register_router("test_last")(LastRouter)
    finally:
        del ROUTERS["test_last"]
