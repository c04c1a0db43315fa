"""A request's life: prompt, progress, status machine and timestamps.

``num_computed_tokens`` is the single progress counter (as in vLLM v1): the scheduler
compares it with ``num_tokens`` to decide how many tokens a request computes this step, so
prefill, chunked prefill and decode are one code path.
"""
from __future__ import annotations

import enum
import math
from array import array

from core.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2  # recompute: blocks dropped, waits again at the queue front
    SWAPPED = 3  # swap: blocks copied to host memory, waits to be swapped back in
    FINISHED_LENGTH = 4  # max_tokens or max_model_len reached
    FINISHED_STOPPED = 5  # EOS or a stop token
    FINISHED_ABORTED = 6

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_LENGTH


class Request:
    """One generation request. Mutable; owned by the engine while it is live.

    Timestamps are in the backend's clock (simulated seconds or wall seconds since the
    run started). ``token_times`` holds one float per output token (an ``array('d')``, 8
    bytes a token) so ITL can be computed exactly after the run.
    """

    __slots__ = (
        "request_id", "prompt_token_ids", "sampling_params", "arrival_time", "priority",
        "deadline", "status", "num_computed_tokens", "output_token_ids", "all_token_ids",
        "first_scheduled_time", "first_token_time", "token_times", "finish_time",
        "num_preemptions", "num_cached_tokens", "num_recomputed_cached_tokens", "block_hashes",
        "expected_output_len", "stop_reason", "client_id", "swap_out_blocks", "cache_salt",
        "forced_output_token_ids", "replica", "stop_set", "max_num_tokens", "num_pending_tokens",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams | None = None,
        arrival_time: float = 0.0,
        priority: int = 0,
        deadline: float | None = None,
        expected_output_len: int | None = None,
        client_id: int | None = None,
        cache_salt: int | str | None = None,
        forced_output_token_ids: list[int] | None = None,
    ) -> None:
        if not isinstance(prompt_token_ids, list) or len(prompt_token_ids) == 0:
            raise ValueError(f"request {request_id!r}: prompt_token_ids must be a non-empty list of ints")
        if not isinstance(arrival_time, (int, float)) or not math.isfinite(arrival_time) or arrival_time < 0:
            raise ValueError(f"request {request_id!r}: arrival_time must be finite and >= 0, got {arrival_time!r}")
        if deadline is not None and (not math.isfinite(deadline) or deadline < 0):
            raise ValueError(f"request {request_id!r}: deadline must be finite and >= 0, got {deadline!r}")
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.sampling_params = sampling_params or SamplingParams()
        self.arrival_time = float(arrival_time)
        self.priority = priority  # lower value = more important (vLLM convention)
        self.deadline = deadline
        self.expected_output_len = expected_output_len  # known output length, for sjf on traces
        self.client_id = client_id  # closed-loop user / conversation id
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.token_times = array("d")
        self.finish_time: float | None = None
        self.num_preemptions = 0
        self.num_cached_tokens = 0  # prefix-cache hit at first admission (true reuse)
        self.num_recomputed_cached_tokens = 0  # hits on own blocks after a preemption
        self.block_hashes: list[int] = []  # chained hashes of full blocks, filled lazily
        self.stop_reason: int | None = None
        self.swap_out_blocks: list[int] = []  # host block ids while SWAPPED
        # Extra prefix-cache key (tenant, LoRA, ...): equal prompts with different salts never share.
        self.cache_salt = cache_salt
        # Output ids a simulated backend should emit (e.g. the earlier turn of a multi-turn
        # conversation that the workload already baked into the next prompt). Real backends ignore it.
        self.forced_output_token_ids = forced_output_token_ids
        self.replica = 0  # data-parallel replica that served it (set by the router's caller)
        # Set by the scheduler at admission, so the per-token finish check is two comparisons:
        # the ids that stop it (EOS unless ignored, plus stop ids; None if none) and the
        # total length (prompt + max_tokens, capped by max_model_len) at which it ends.
        self.stop_set: frozenset[int] | None = None
        self.max_num_tokens = 0
        # Trailing output tokens appended as placeholders whose ids the device has not returned
        # yet (async scheduling, ``core.async_engine``); the prefix cache never hashes them.
        self.num_pending_tokens = 0

    # --- derived sizes -------------------------------------------------------------
    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def max_tokens(self) -> int:
        return self.sampling_params.max_tokens

    @property
    def is_finished(self) -> bool:
        return self.status >= RequestStatus.FINISHED_LENGTH

    @property
    def is_prefill(self) -> bool:
        """True while some prompt tokens are not computed yet."""
        return self.num_computed_tokens < len(self.prompt_token_ids)

    def append_output_token(self, token_id: int, now: float) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        self.token_times.append(now)
        if self.first_token_time is None:
            self.first_token_time = now

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.name}, prompt={self.num_prompt_tokens}, "
                f"out={self.num_output_tokens}/{self.max_tokens}, computed={self.num_computed_tokens})")
