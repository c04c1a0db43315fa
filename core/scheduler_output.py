"""The plain data a scheduler step hands to a backend, and what the backend hands back.

Both backends read only these objects: the simulator's cost model needs ``num_new_tokens``
and ``num_computed_tokens`` per request; the executor also needs the token ids, the block
tables and the swap / copy instructions. Lists are parallel (index ``i`` is one request)
because that is what both backends iterate over, and it is cheap to build.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(slots=True)
class SchedulerOutput:
    """One engine step.

    For request ``i`` the backend computes tokens ``[num_computed_tokens[i],
    num_computed_tokens[i] + num_new_tokens[i])`` of that request, whose ids are
    ``new_token_ids[i]``; their KV goes to the slots given by ``block_tables[i]``
    (``block_tables[i][pos // block_size] * block_size + pos % block_size``). A request
    samples a token this step iff ``samples[i]`` (its last scheduled token is the last
    known token, i.e. its prefill is complete or it is decoding). ``new_token_ids`` is
    empty from a scheduler whose ``emits_token_ids`` is False (the simulator's
    ``LazyDecodeScheduler``: its backend knows the ids and never reads them).
    """

    step_id: int
    req_ids: list[str] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)
    new_token_ids: list[list[int]] = field(default_factory=list)
    # Live references to the KV cache manager's tables (``array('q')`` of block ids): do not mutate.
    block_tables: list[Sequence[int]] = field(default_factory=list)
    samples: list[bool] = field(default_factory=list)
    # Requests first scheduled (or rescheduled after recompute-preemption) this step, with
    # their prefix-cache hits in tokens.
    new_req_ids: list[str] = field(default_factory=list)
    num_cached_tokens: dict[str, int] = field(default_factory=dict)
    preempted_req_ids: list[str] = field(default_factory=list)
    finished_req_ids: list[str] = field(default_factory=list)  # finished since the last step
    # Swap instructions: (gpu_block, host_block) pairs to copy before the forward pass.
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)
    total_num_scheduled_tokens: int = 0
    block_size: int = 16
    # Decode requests that a ``LazyDecodeScheduler`` advances without listing them (one token
    # each, included in ``total_num_scheduled_tokens``): their count, the sum of their
    # computed tokens and the largest. Always 0 for the executor's scheduler.
    num_lazy_decodes: int = 0
    lazy_computed_sum: int = 0
    lazy_computed_max: int = 0

    @property
    def num_reqs(self) -> int:
        return len(self.req_ids) + self.num_lazy_decodes

    @property
    def is_empty(self) -> bool:
        return not self.req_ids and not self.blocks_to_swap_out and not self.num_lazy_decodes

    @property
    def num_prefill_tokens(self) -> int:
        """Tokens of requests that are not in pure decode (num_new > 1 or still prefilling)."""
        return sum(n for n, s, c in zip(self.num_new_tokens, self.samples, self.num_computed_tokens)
                   if not (s and n == 1 and c > 0))

    @property
    def num_decode_tokens(self) -> int:
        return self.total_num_scheduled_tokens - self.num_prefill_tokens


@dataclass(slots=True)
class StepResult:
    """What a backend returns for one step.

    ``sampled_token_ids[i]`` belongs to ``SchedulerOutput.req_ids[i]``: a list with one
    token for a request that samples (more for speculative decoding later), empty for a
    partial prefill chunk. ``duration`` is seconds: predicted by a cost model or measured.
    ``breakdown`` optionally splits the duration by op (seconds), for plots.
    """

    sampled_token_ids: list[list[int]]
    duration: float
    breakdown: dict[str, float] | None = None
