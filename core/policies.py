"""Pluggable scheduling policies: queue order / preemption victim, and batching discipline.

A ``QueuePolicy`` answers two questions with one ordering: which waiting request goes
next (smallest key first) and which running request is preempted when memory runs out
(largest key first, i.e. the least important). A ``BatchingPolicy`` says whether prompts
may be chunked, how much KV a request reserves at admission and when new requests may
join the batch; vLLM's continuous batching and the Orca / static baselines are three
instances, so a study compares them by changing one config string.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from core.request import Request

if TYPE_CHECKING:
    from core.kv_cache_manager import KVCacheManager


class QueuePolicy:
    name = "base"
    #: True when keys depend on mutable state (the prefix cache) and the queue must be re-sorted each step.
    dynamic = False

    def key(self, request: Request) -> tuple:
        raise NotImplementedError

    def refresh(self, kv: "KVCacheManager") -> None:
        """Update state that ``key`` reads (dynamic policies only)."""

    def victim_index(self, running: list[Request]) -> int:
        """Index in ``running`` of the request to preempt: the least important by ``key``."""
        key = self.key
        return max(range(len(running)), key=lambda i: key(running[i]))


class FCFS(QueuePolicy):
    """First come, first served; the latest arrival is preempted first (vLLM's default)."""
    name = "fcfs"

    def key(self, request: Request) -> tuple:
        return (request.arrival_time,)

    def victim_index(self, running: list[Request]) -> int:
        return len(running) - 1  # the most recently admitted request


class Priority(QueuePolicy):
    """Lower ``priority`` value first, then arrival; the least important running request is the victim."""
    name = "priority"

    def key(self, request: Request) -> tuple:
        return (request.priority, request.arrival_time)


class ShortestJobFirst(QueuePolicy):
    """Shortest job first: known output length when the workload gives one, else prompt length."""
    name = "sjf"

    def key(self, request: Request) -> tuple:
        size = request.expected_output_len
        if size is None:
            size = request.num_prompt_tokens
        return (size, request.arrival_time)


class LongestPrefixMatch(QueuePolicy):
    """Longest cached prefix first (SGLang's LPM): maximises reuse before blocks get evicted."""
    name = "lpm"
    dynamic = True

    def __init__(self) -> None:
        self._kv: "KVCacheManager | None" = None

    def refresh(self, kv: "KVCacheManager") -> None:
        self._kv = kv

    def key(self, request: Request) -> tuple:
        hit = 0
        if self._kv is not None and request.num_computed_tokens == 0:
            hit = self._kv.get_computed_blocks(request)[1]  # reuses the request's memoised hashes
        return (-hit, request.arrival_time)


QUEUE_POLICIES: dict[str, Callable[[], QueuePolicy]] = {
    p.name: p for p in (FCFS, Priority, ShortestJobFirst, LongestPrefixMatch)
}


def make_queue_policy(name: str) -> QueuePolicy:
    try:
        return QUEUE_POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown scheduling policy {name!r}; known: {sorted(QUEUE_POLICIES)}") from None


class BatchingPolicy:
    """Continuous batching (vLLM v1): chunking allowed, KV allocated step by step, join any step."""
    name = "continuous"
    allow_chunking = True

    def reserve_tokens(self, request: Request, max_model_len: int) -> int:
        """Total slots to reserve at admission (0 = grow on demand)."""
        return 0

    def can_admit(self, num_running: int, admitted_this_step: int) -> bool:
        """May another waiting request join, given the running count (including this step's admissions)?"""
        return True


class OrcaBatching(BatchingPolicy):
    """Orca: iteration-level scheduling, whole prompts only, KV reserved for max_model_len.

    Without paging a system must reserve the longest possible sequence per request; this
    baseline shows the memory waste PagedAttention removes.
    """
    name = "orca"
    allow_chunking = False

    def reserve_tokens(self, request: Request, max_model_len: int) -> int:
        return max_model_len


class StaticBatching(BatchingPolicy):
    """HF-pipeline style: a batch forms only when the previous one has fully drained.

    KV is reserved for prompt + max_tokens at admission, whole prompts only.
    """
    name = "static"
    allow_chunking = False

    def reserve_tokens(self, request: Request, max_model_len: int) -> int:
        return min(request.num_prompt_tokens + request.max_tokens, max_model_len)

    def can_admit(self, num_running: int, admitted_this_step: int) -> bool:
        # Joining is allowed only while every running request joined in this very step,
        # i.e. the batch is being formed from an empty engine.
        return num_running == admitted_this_step


BATCHING_POLICIES: dict[str, Callable[[], BatchingPolicy]] = {
    p.name: p for p in (BatchingPolicy, OrcaBatching, StaticBatching)
}


def make_batching_policy(name: str) -> BatchingPolicy:
    try:
        return BATCHING_POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown batching policy {name!r}; known: {sorted(BATCHING_POLICIES)}") from None


__all__ = ["QueuePolicy", "BatchingPolicy", "make_queue_policy", "make_batching_policy",
           "QUEUE_POLICIES", "BATCHING_POLICIES"]
