"""The cost-model interface: a step's batch reduced to a few sums, and its predicted time.

The simulator asks for one step time per engine step (tens of thousands per run), so a
batch is summarised once into the aggregates every per-op formula needs (tokens, decode
requests and their context, the prefill chunks' token pairs) and ``step_time`` is O(1) in
the batch size. Attention work is linear in these sums; its *time* is not always (a decode
kernel that does not split keys runs as long as its longest request), so the shape also
carries the longest decode context, which is as cheap to collect as the sums.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from core.scheduler_output import SchedulerOutput

# Breakdown keys, in plotting order. MoE expert GEMMs and the router count as "mlp";
# embedding gather, RMSNorm, rotary, residual adds and the MLP activation as "norm_rotary".
OPS: tuple[str, ...] = ("qkv_proj", "o_proj", "mlp", "attn_prefill", "attn_decode", "lm_head",
                        "norm_rotary", "sampling", "communication", "cpu_overhead")


@dataclass(slots=True)
class BatchShape:
    """What a cost model needs from one step, as sums over its requests (a value: not to be
    changed once built; not frozen only because a frozen dataclass takes ~6x longer to build,
    and the simulator builds one per step).

    A request computes ``n`` new tokens after ``c`` cached ones; its context length is
    ``L = c + n``. Requests with ``n == 1`` are *decode* requests (one query row, the
    memory-bound decode kernel); all others are *prefill* (chunks, whole prompts,
    speculative verification). Attention work is counted in causal query-key pairs:
    a chunk's new token ``i`` sees ``c + i + 1`` keys, so it contributes
    ``n * c + n * (n + 1) / 2`` pairs; a decode request contributes ``L``.
    """

    num_reqs: int
    num_tokens: int  # all new tokens of the step
    num_sampling: int  # requests that sample (rows through the LM head)
    num_decode: int
    decode_context: int  # sum of L over decode requests (= their KV tokens read)
    prefill_tokens: int  # sum of n over prefill requests
    prefill_context: int  # sum of L over prefill requests (KV tokens read)
    prefill_pairs: int  # sum of causal query-key pairs over prefill requests
    # Longest decode context (max L over decode requests; 0 without decode requests). The
    # default keeps eight-argument construction working; ``decode`` and the builders fill it.
    max_decode_context: int = 0

    @classmethod
    def from_scheduler_output(cls, out: SchedulerOutput) -> BatchShape:
        """From the step's parallel lists plus its lazily advanced decodes (``num_lazy_decodes``);
        sampling rows are exact (``out.samples``)."""
        n = out.num_lazy_decodes
        return cls._build(out.num_new_tokens, out.num_computed_tokens, out.samples.count(True) + n,
                          n, out.lazy_computed_sum, out.lazy_computed_max)

    @classmethod
    def from_lists(cls, num_new_tokens: Sequence[int], context_lens: Sequence[int],
                   num_sampling: int | None = None) -> BatchShape:
        """From per-request new-token counts and context lengths (``L = c + n``).

        Without ``num_sampling`` every request is assumed to sample (the usual case:
        only an unfinished prefill chunk does not).
        """
        if len(num_new_tokens) != len(context_lens):
            raise ValueError(f"num_new_tokens has {len(num_new_tokens)} entries, context_lens {len(context_lens)}")
        computed = [L - n for n, L in zip(num_new_tokens, context_lens)]
        if any(c < 0 for c in computed):
            raise ValueError("context_lens must be >= num_new_tokens for every request")
        return cls._build(num_new_tokens, computed,
                          len(num_new_tokens) if num_sampling is None else num_sampling)

    @classmethod
    def decode(cls, batch_size: int, sum_context: int, max_context: int | None = None) -> BatchShape:
        """A pure-decode step: ``batch_size`` requests, context lengths summing to ``sum_context``,
        the longest ``max_context`` (default: equal contexts, ``ceil(sum_context / batch_size)``)."""
        if max_context is None:
            max_context = -(-sum_context // batch_size) if batch_size else 0
        return cls(batch_size, batch_size, batch_size, batch_size, sum_context, 0, 0, 0, max_context)

    @classmethod
    def _build(cls, new: Sequence[int], computed: Sequence[int], num_sampling: int,
               num_lazy: int = 0, lazy_computed_sum: int = 0, lazy_computed_max: int = -1) -> BatchShape:
        # Decode requests dominate big batches, so they are summed with C-level list.count
        # and sum(); the Python loop runs only when some request is not decoding, and does
        # arithmetic only for those (few) requests. A simulator step budget is ~10 us.
        # ``num_lazy`` more decode requests are given by their count, computed-token sum and
        # largest computed count (a ``LazyDecodeScheduler``'s parked requests).
        num_listed = len(new)
        num_decode = new.count(1)
        sum_computed = sum(computed)
        if num_decode == num_listed:
            if num_listed and max(computed) > lazy_computed_max:
                lazy_computed_max = max(computed)
            num_reqs = num_listed + num_lazy
            return cls(num_reqs, num_reqs, num_sampling, num_reqs, sum_computed + lazy_computed_sum + num_reqs,
                       0, 0, 0, lazy_computed_max + 1 if num_reqs else 0)
        p_tokens = p_computed = p_pairs = other_computed = 0
        max_dec = lazy_computed_max if num_lazy else -1
        for n, c in zip(new, computed):
            if n != 1:
                other_computed += c
                if n:
                    p_tokens += n
                    p_computed += c
                    p_pairs += n * c + n * (n + 1) // 2
            elif c > max_dec:
                max_dec = c
        num_decode += num_lazy
        return cls(num_listed + num_lazy, num_decode + p_tokens, num_sampling, num_decode,
                   sum_computed - other_computed + lazy_computed_sum + num_decode, p_tokens, p_computed + p_tokens,
                   p_pairs, max_dec + 1 if num_decode else 0)


@dataclass(slots=True)
class StepTiming:
    """Predicted duration of one step (seconds) and its split by op (keys from ``OPS``); a value,
    as ``BatchShape``."""

    total: float
    breakdown: dict[str, float]


class CostModel(ABC):
    """Predicts step durations from ``BatchShape`` aggregates."""

    @abstractmethod
    def step_time(self, batch: BatchShape) -> StepTiming:
        """Duration of one engine step running ``batch``; O(1) in the batch size."""

    def note_idle(self, seconds: float) -> None:
        """The replica sat idle (nothing to run) for ``seconds`` before its next step.

        The simulator reports every idle gap; a stateless model ignores it, a calibrated one
        may charge the first step after idling more (cold caches, clocks ramping up).
        """

    def decode_step_timing(self, batch_size: int, sum_context: int, max_context: int | None = None) -> StepTiming:
        """``step_time(BatchShape.decode(batch_size, sum_context, max_context))``; a subclass may
        answer it faster (the simulator asks once per fast-forward run) but must agree exactly."""
        return self.step_time(BatchShape.decode(batch_size, sum_context, max_context))

    def decode_step_split(self, batch_size: int, sum_context: int, max_context: int | None,
                          total: float) -> dict[str, float]:
        """``decode_step_timing``'s split scaled to ``total`` seconds (the simulator's per-op
        split of a fast-forwarded stretch: its middle step's, scaled to its exact time); a
        subclass may answer it faster but must agree exactly."""
        mid = self.decode_step_timing(batch_size, sum_context, max_context)
        scale = total / mid.total if mid.total > 0 else 0.0
        return {op: t * scale for op, t in mid.breakdown.items()}

    def decode_splits_sum(self, batch_sizes: Sequence[int], sum_contexts: Sequence[int],
                          max_contexts: Sequence[int], totals: Sequence[float]) -> dict[str, float]:
        """The sum over stretches ``i`` of ``decode_step_split(batch_sizes[i], sum_contexts[i],
        max_contexts[i], totals[i])``, op by op (the simulator's per-op time of its fast-forwarded
        stretches, summed in bulk); a subclass may vectorise it (to rounding)."""
        out: dict[str, float] = {}
        for b, ctx, longest, total in zip(batch_sizes, sum_contexts, max_contexts, totals):
            for op, t in self.decode_step_split(b, ctx, longest, total).items():
                out[op] = out.get(op, 0.0) + t
        return out

    def decode_step_times_list(self, batch_size: int, sum_context: int, k: int,
                               max_context: int | None = None) -> list[float]:
        """``decode_step_times(...).tolist()``; a subclass may build the list directly."""
        return self.decode_step_times(batch_size, sum_context, k, max_context).tolist()

    def decode_step_times(self, batch_size: int, sum_context: int, k: int,
                          max_context: int | None = None) -> np.ndarray:
        """Durations of ``k`` consecutive pure-decode steps of ``batch_size`` requests.

        Step ``j`` has context lengths summing to ``sum_context + j * batch_size`` (every
        request's context grows by one token a step) and its longest context is
        ``max_context + j`` (default: equal contexts, as ``BatchShape.decode``). The simulator
        uses this to jump over stretches where the batch composition does not change. This
        reference version calls ``step_time``; subclasses vectorise it and must agree with it.
        """
        if max_context is None:
            max_context = -(-sum_context // batch_size) if batch_size else 0
        return np.array([self.step_time(BatchShape.decode(batch_size, sum_context + j * batch_size,
                                                          max_context + j if batch_size else 0)).total
                         for j in range(k)], dtype=float)
