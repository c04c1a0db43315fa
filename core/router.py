"""Data-parallel routing: which replica an arriving request joins.

A router sees each replica only through ``ReplicaView`` (queue lengths and a prefix-cache
probe), so the same policy object drives simulated replicas and real engines. Policies
register by name; ``make_router`` builds one from a config string, and a researcher adds a
policy by subclassing ``Router`` under ``@register_router("name")``.

Routers decide at arrival time from what the replicas report at that moment. In
particular ``prefix_aware`` only sees prefixes a replica has already cached: requests that
were routed to a replica but not yet scheduled there will create cache later, but are
invisible until then. A burst of requests sharing a new prefix can therefore spread over
replicas (least-loaded tie-breaking) before the first of them is cached anywhere. That
is a real effect of cache-aware routing and is left visible rather than modelled away.
"""
from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Protocol

from core.request import Request


class ReplicaView(Protocol):
    """What a router may know about one replica (implemented by the engine)."""

    @property
    def num_waiting(self) -> int: ...

    @property
    def num_running(self) -> int: ...

    def cached_prefix_tokens(self, prompt_token_ids: list[int]) -> int:
        """Leading prompt tokens whose KV this replica holds in its prefix cache now."""
        ...


def load_score(replica: ReplicaView) -> int:
    """vLLM's data-parallel load score: ``4 * waiting + running``.

    A waiting request still has its whole prefill ahead and takes a batch slot later, so
    it weighs more than one already decoding.
    """
    return 4 * replica.num_waiting + replica.num_running


class Router(abc.ABC):
    """Chooses a replica index in ``[0, num_replicas)`` for each arriving request.

    Routers may keep state across calls (``round_robin`` does), so use one instance per
    run; calls must come in arrival order for results to be deterministic.
    """

    name: str = ""

    def __init__(self, num_replicas: int) -> None:
        if not isinstance(num_replicas, int) or num_replicas < 1:
            raise ValueError(f"router needs num_replicas >= 1, got {num_replicas!r}")
        self.num_replicas = num_replicas

    def route(self, request: Request, replicas: Sequence[ReplicaView]) -> int:
        """The index of the replica that takes ``request``."""
        if len(replicas) != self.num_replicas:
            raise ValueError(f"{type(self).__name__} built for {self.num_replicas} replicas, "
                             f"got views of {len(replicas)}")
        return self._choose(request, replicas)

    @abc.abstractmethod
    def _choose(self, request: Request, replicas: Sequence[ReplicaView]) -> int: ...


ROUTERS: dict[str, type[Router]] = {}


def register_router(name: str) -> Callable[[type[Router]], type[Router]]:
    """Class decorator that makes a ``Router`` subclass available to ``make_router``."""

    def register(cls: type[Router]) -> type[Router]:
        if name in ROUTERS:
            raise ValueError(f"router {name!r} is already registered ({ROUTERS[name].__name__})")
        cls.name = name
        ROUTERS[name] = cls
        return cls

    return register


def make_router(name: str, num_replicas: int) -> Router:
    """Build the router registered as ``name`` for ``num_replicas`` replicas."""
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; known routers: {sorted(ROUTERS)}")
    return ROUTERS[name](num_replicas)


@register_router("round_robin")
class RoundRobinRouter(Router):
    """Replicas in turn, ignoring load: the baseline that every load-aware policy must beat."""

    def __init__(self, num_replicas: int) -> None:
        super().__init__(num_replicas)
        self._next = 0

    def _choose(self, request: Request, replicas: Sequence[ReplicaView]) -> int:
        index = self._next
        self._next = (index + 1) % self.num_replicas
        return index


@register_router("least_loaded")
class LeastLoadedRouter(Router):
    """The replica with the lowest ``load_score``; ties go to the lowest index."""

    def _choose(self, request: Request, replicas: Sequence[ReplicaView]) -> int:
        scores = [load_score(r) for r in replicas]
        return min(range(len(replicas)), key=lambda i: (scores[i], i))


@register_router("prefix_aware")
class PrefixAwareRouter(Router):
    """The replica holding the longest cached prefix of the prompt.

    Ties (including "no replica has any of it") fall back to least-loaded, then to the
    lowest index. It trades load balance for cache reuse without a load cap, so a hot
    prefix can pile onto one replica: studying that trade-off is the point of having it.
    """

    def _choose(self, request: Request, replicas: Sequence[ReplicaView]) -> int:
        keys = [(-r.cached_prefix_tokens(request.prompt_token_ids), load_score(r), i)
                for i, r in enumerate(replicas)]
        return min(keys)[2]
