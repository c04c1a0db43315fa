"""SimBackend: the core's Backend, with a cost model in place of a GPU."""
from __future__ import annotations

from core.request import Request
from core.scheduler_output import SchedulerOutput, StepResult
from simulator.cost_model.base import BatchShape, CostModel

#: Token id the simulator "samples". Output content never matters to a cost model; a
#: fixed id keeps runs deterministic, and chained block hashes keep different requests'
#: output blocks apart even though the ids are equal.
SIM_TOKEN_ID = 1


class SimBackend:
    """Predicts each step's duration with a cost model and emits deterministic tokens.

    A request that carries ``forced_output_token_ids`` (a multi-turn conversation whose
    next turn already contains this turn's output) gets exactly those ids, so the next
    turn's prompt hits the prefix cache as it would on a real engine.
    """

    def __init__(self, cost_model: CostModel, swap_bytes_per_block: float = 0.0,
                 swap_bandwidth: float = 25e9) -> None:
        self.cost_model = cost_model
        self.requests: dict[str, Request] = {}
        self._one_token = [SIM_TOKEN_ID]
        self._no_token: list[int] = []
        self._has_forced = False  # any request with forced outputs seen (see note_request)
        self.swap_seconds_per_block = swap_bytes_per_block / swap_bandwidth if swap_bandwidth > 0 else 0.0

    def bind(self, requests: dict[str, Request]) -> None:
        """Share the scheduler's live request table (for forced output ids)."""
        self.requests = requests

    def note_request(self, request: Request) -> None:
        """Called as a request is added, so steps without forced outputs skip the per-request lookup."""
        if request.forced_output_token_ids:
            self._has_forced = True

    def execute(self, out: SchedulerOutput) -> StepResult:
        timing = self.cost_model.step_time(BatchShape.from_scheduler_output(out))
        requests = self.requests
        one, none = self._one_token, self._no_token  # shared, never mutated: the engine copies ids out
        sampled = [one if s else none for s in out.samples]
        if self._has_forced:
            for i, rid in enumerate(out.req_ids):
                forced = requests[rid].forced_output_token_ids
                if forced and out.samples[i]:
                    n = len(requests[rid].output_token_ids)
                    sampled[i] = [forced[n] if n < len(forced) else SIM_TOKEN_ID]
        duration = timing.total
        breakdown = timing.breakdown
        n_swap = len(out.blocks_to_swap_in) + len(out.blocks_to_swap_out)
        if n_swap:
            swap = n_swap * self.swap_seconds_per_block
            duration += swap
            breakdown = dict(breakdown)
            breakdown["swap"] = breakdown.get("swap", 0.0) + swap
        return StepResult(sampled, duration, breakdown)
