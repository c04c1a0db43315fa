"""The workload a run replays: an ordered list of request records plus how to issue them."""
from __future__ import annotations

import contextlib
import functools
import gc
import math
from dataclasses import dataclass, field
from typing import Iterator

from core.request import Request
from core.sampling_params import SamplingParams
from core.workloads.arrivals import ClosedLoopSpec
from core.workloads.prompts import TokenSegments, segments_len, segments_to_list


@functools.lru_cache(maxsize=None, typed=True)
def _sampling_params(max_tokens: int) -> SamplingParams:
    """One shared ``SamplingParams`` per output length: they are frozen, and building one
    per request (its ``__post_init__`` checks) was a visible cost of large workloads.
    ``typed`` keeps e.g. ``numpy.int64`` keys apart, so those are still rejected."""
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Suspend the cyclic garbage collector while ``Request`` objects are built.

    A collection walks every list it tracks item by item, and a large workload's prompt
    lists hold 10^7 token references: the collections the allocations trigger re-walked
    the growing lists again and again and took half of the construction time. What is
    built here forms no reference cycles, so they could free nothing; after the pause, the
    next collection walks the new objects once (a caller that ``gc.freeze()``s them right
    away never pays even that).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass(slots=True, eq=False)
class WorkloadRequest:
    """One request as the workload defines it, before any backend touches it.

    ``arrival_time`` is seconds from the run start (open loop) or None (closed loop: the
    driver decides when the user issues it). ``prompt_segments`` concatenate to the prompt
    (see ``core.workloads.prompts`` for why prompts are held as shared segments);
    ``prompt_token_ids`` builds the list. ``max_tokens`` is the output length: requests run
    with ``ignore_eos`` so the simulator and the executor produce the same number of
    tokens. ``deadline_s`` is relative to the arrival. ``client_id`` is the closed-loop
    user (or, open loop, the conversation of a multi-turn request); ``conversation_id`` and
    ``turn`` place the request in its conversation (a single-turn request is turn 0 of its own).
    """

    request_id: str
    arrival_time: float | None
    prompt_segments: TokenSegments
    max_tokens: int
    priority: int = 0
    deadline_s: float | None = None
    client_id: int | None = None
    conversation_id: int = 0
    turn: int = 0

    @property
    def prompt_token_ids(self) -> list[int]:
        """The prompt as a fresh list of ints (built on each call; keep it if you need it twice)."""
        return segments_to_list(self.prompt_segments)

    @property
    def num_prompt_tokens(self) -> int:
        return segments_len(self.prompt_segments)

    def to_request(self, arrival_time: float | None = None) -> Request:
        """A ``core.request.Request`` arriving at ``arrival_time`` (default: the record's own).

        Closed-loop records have no arrival of their own, so the driver passes the time it
        issues them.
        """
        when = self.arrival_time if arrival_time is None else arrival_time
        if when is None:
            raise ValueError(f"request {self.request_id!r} is closed-loop (arrival_time None): "
                             "pass the issue time to to_request(arrival_time)")
        if not math.isfinite(when) or when < 0:
            raise ValueError(f"request {self.request_id!r}: arrival_time must be finite and >= 0, got {when!r}")
        return Request(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            sampling_params=_sampling_params(self.max_tokens),
            arrival_time=when,
            priority=self.priority,
            deadline=None if self.deadline_s is None else when + self.deadline_s,
            expected_output_len=self.max_tokens,
            client_id=self.client_id,
        )


@dataclass(eq=False)
class Workload:
    """Requests to replay, in arrival order (open loop) or per-user issue order (closed loop).

    ``duration_s`` is the run's time cut-off. Open-loop arrivals already respect it; in a
    closed loop the driver must stop issuing requests at that time. ``skipped`` counts
    trace rows left out on purpose (e.g. BurstGPT failures), by reason.
    """

    requests: list[WorkloadRequest]
    closed_loop: ClosedLoopSpec | None = None
    duration_s: float | None = None
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self) -> Iterator[WorkloadRequest]:
        return iter(self.requests)

    @property
    def is_closed_loop(self) -> bool:
        return self.closed_loop is not None

    def user_queues(self) -> list[list[WorkloadRequest]]:
        """Closed loop: each user's requests in the order the user issues them."""
        if self.closed_loop is None:
            raise ValueError("user_queues() is for closed-loop workloads; this one is open loop")
        queues: list[list[WorkloadRequest]] = [[] for _ in range(self.closed_loop.num_users)]
        for req in self.requests:
            queues[req.client_id].append(req)
        return queues

    def forced_outputs(self) -> dict[str, list[int]]:
        """Output ids each multi-turn request must produce so that its next turn's prompt,
        built as prompt + output + new user tokens, hits the prefix cache (a simulator emits
        them; a real engine samples its own and only the shared history is reused)."""
        by_conv: dict[int, list[WorkloadRequest]] = {}
        for r in self.requests:
            if r.turn > 0 or r.conversation_id in by_conv:
                by_conv.setdefault(r.conversation_id, []).append(r)
        forced: dict[str, list[int]] = {}
        for turns in by_conv.values():
            turns.sort(key=lambda r: r.turn)
            for a, b in zip(turns, turns[1:]):
                pa, pb = a.prompt_token_ids, b.prompt_token_ids
                if pb[:len(pa)] == pa:
                    forced[a.request_id] = pb[len(pa):len(pa) + a.max_tokens]
        return forced

    def core_requests(self) -> tuple[list[Request], list[list[Request]]]:
        """``Request`` objects for a driver: open-loop requests at their arrival times, or
        closed-loop per-user sequences (each first arrival at 0; a driver re-times the rest),
        with ``forced_output_token_ids`` set for multi-turn conversations."""
        with _gc_paused():
            forced = self.forced_outputs()

            def make(wr: WorkloadRequest, t: float) -> Request:
                req = wr.to_request(t)
                req.forced_output_token_ids = forced.get(wr.request_id)
                return req

            if self.closed_loop is not None:
                return [], [[make(wr, 0.0) for wr in queue] for queue in self.user_queues()]
            return [make(wr, wr.arrival_time) for wr in self.requests], []

    def to_requests(self) -> list[Request]:
        """Open loop: every record as a ``Request`` at its own arrival time."""
        if self.closed_loop is not None:
            raise ValueError("to_requests() needs arrival times; a closed-loop workload is issued per user "
                             "(user_queues() and WorkloadRequest.to_request(arrival_time))")
        with _gc_paused():
            return [r.to_request() for r in self.requests]


__all__ = ["WorkloadRequest", "Workload"]
