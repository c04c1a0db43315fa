"""Analytic roofline cost model: each op costs max(FLOPs / achievable FLOP/s, bytes / achievable B/s).

Per op and per layer (all layers of a stage are identical, so one layer is costed and
multiplied):

* GEMMs (``qkv_proj``, ``o_proj``, ``mlp``): ``2 * tokens * in * out`` FLOPs; bytes are the
  weights, read once per step (per micro-batch), plus the input and output activations.
  MoE: the router, then each token's ``top_k`` experts; the weights read are those of the
  experts touched at least once, ``E * (1 - (1 - k / E) ** tokens)`` in expectation when
  tokens pick experts uniformly, so a batch of 1 reads ``k`` experts and a large batch all.
* Attention, split into prefill and decode because one is compute bound and the other
  memory bound: FLOPs ``4 * head_dim * heads`` per causal query-key pair (QK^T and PV);
  bytes are the K/V actually read, ``context tokens * 2 * kv_heads * head_dim * kv dtype``
  (GQA aware: only K/V heads are stored and read), plus Q, O and the new K/V.
* ``norm_rotary``: the memory-bound elementwise kernels by bytes: 2 fused residual-add +
  RMSNorm (read x and residual, write both), rotary on Q/K (and q/k-norm where present),
  the MLP activation, the embedding gather and the final norm.
* ``lm_head``: only rows that sample; ``sampling``: a few passes over their fp32 logits.
* ``communication``: the tensor-parallel all-reduces and pipeline sends (see ``parallel``).
* ``cpu_overhead``: a fixed per-step time for the engine's Python work (scheduling, input
  preparation, launch), which the GPU-side roofline cannot see.

FP8 checkpoints (``ModelSpec.quantization == "fp8"``) read 1-byte weights and run their
GEMMs at the FP8 peak (W8A8, as vLLM does on Hopper); attention stays in ``dtype_bytes``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from simulator.cost_model.base import BatchShape, CostModel, StepTiming
from simulator.cost_model.parallel import ParallelConfig, p2p_send_time, ring_allreduce_time
from simulator.hardware import HardwareSpec
from simulator.model_spec import ModelSpec

# A Python serving engine spends a few ms per step outside the GPU (vLLM without async
# scheduling is in this range); the calibrated model replaces it with our executor's own.
DEFAULT_CPU_OVERHEAD_S = 2e-3
# Sampling passes over each sampled row's fp32 logits: cast/temperature, softmax,
# top-k/top-p selection, draw.
_SAMPLING_PASSES = 4
_LOGIT_BYTES = 4
# Fast-forward runs up to this many steps are costed in plain Python (bench_sim's average 3).
_SHORT_RUN = 32


def _summed(head: float, attn: float, tail: tuple[float, ...]) -> float:
    """A decode step's total from its memo (``_decode_base``): the split's additions in its order."""
    total = head + attn
    for t in tail:
        total += t
    return total


class RooflineCostModel(CostModel):
    """Roofline step time of ``model`` on ``hardware`` split by ``parallel``.

    Everything that does not depend on the batch is folded into per-token / per-pair /
    fixed coefficients (already divided by the achievable rate) at construction, so a
    step costs a few multiplications per op.
    """

    def __init__(self, model: ModelSpec, hardware: HardwareSpec, parallel: ParallelConfig | None = None,
                 cpu_overhead: float = DEFAULT_CPU_OVERHEAD_S) -> None:
        parallel = parallel or ParallelConfig()
        parallel.validate(model)
        if cpu_overhead < 0:
            raise ValueError(f"cpu_overhead must be >= 0 seconds, got {cpu_overhead!r}")
        self.model, self.hardware, self.parallel = model, hardware, parallel
        self.cpu_overhead = cpu_overhead
        # batch size -> (cpu_overhead, then what _decode_base returns)
        self._decode_memo: dict[int, tuple[float, dict[str, float], int, int, float, tuple[float, ...]]] = {}
        self._tp, self._pp, self._m = parallel.tp, parallel.pp, parallel.num_microbatches

        flops = hardware.achievable_flops(fp8=model.quantization == "fp8")
        bw = hardware.achievable_bandwidth
        wb, ab = model.weight_bytes_per_param, model.dtype_bytes
        tp, layers = parallel.tp, parallel.layers_per_stage(model)
        h, hd = model.hidden_size, model.head_dim
        q = model.q_dim / tp
        kv = parallel.kv_heads_per_gpu(model) * hd

        def gemm(in_dim: float, out_dim: float) -> tuple[float, float, float]:
            """(s per token of FLOPs, s of weight reads, s per token of activation bytes) for L layers."""
            return (layers * 2 * in_dim * out_dim / flops, layers * in_dim * out_dim * wb / bw,
                    layers * (in_dim + out_dim) * ab / bw)

        self._qkv = gemm(h, q + 2 * kv)
        self._o = gemm(q, h)
        if model.is_moe:
            e, k, ie = model.num_experts, model.num_experts_per_tok, model.moe_intermediate_size / tp
            self._mlp = (layers * 2 * h * (e + 3 * k * ie) / flops,
                         layers * h * e * wb / bw,  # router weights (replicated)
                         layers * (h + k * (2 * h + 3 * ie)) * ab / bw)
            self._expert_weight = layers * 3 * h * ie * wb / bw  # one expert's weights, s
            self._num_experts, self._no_pick = float(e), 1.0 - k / e
            act_elems = k * 3 * ie  # SiLU(gate) * up: read 2 x ie, write ie, per expert
        else:
            mats = 3 if model.gated_mlp else 2
            i = model.intermediate_size / tp
            self._mlp = (layers * 2 * h * i * mats / flops, layers * h * i * mats * wb / bw,
                         layers * (2 * h + mats * i) * ab / bw)
            self._expert_weight = 0.0
            act_elems = mats * i
        # Attention: per causal pair, per context token read, per new token (Q, O, new K/V).
        self._attn_pair = layers * 4 * hd * (model.num_heads / tp) / flops
        self._attn_ctx = layers * 2 * kv * model.kv_dtype_bytes / bw
        self._attn_tok = layers * (2 * q + 2 * kv) * ab / bw
        rotary = 2 * (q + kv) * (2 if model.qk_norm else 1)
        self._norm_tok = layers * (2 * 4 * h + rotary + act_elems) * ab / bw
        self._embed_tok = h * (wb + ab) / bw
        self._final_norm_tok = 2 * h * ab / bw
        vocab = model.vocab_size / tp
        self._lm = (2 * h * vocab / flops, h * vocab * wb / bw, (h * ab + vocab * _LOGIT_BYTES) / bw)
        self._sampling_row = _SAMPLING_PASSES * model.vocab_size * _LOGIT_BYTES / bw
        self._act_bytes_tok = h * ab  # one all-reduce / pipeline send, per token
        self._allreduces = 2 * layers

    def _attn_decode(self, num_decode: Any, context: Any, mx: Callable[[Any, Any], Any]) -> Any:
        """Decode attention time; ``mx`` is ``max`` for floats, ``np.maximum`` for arrays."""
        return mx(self._attn_pair * context, self._attn_ctx * context + self._attn_tok * num_decode)

    def _microbatches(self, num_reqs: int) -> int:
        return self._m if num_reqs >= self._m else max(num_reqs, 1)

    def step_time(self, batch: BatchShape) -> StepTiming:
        m = self._m
        if m > 1:
            m = self._microbatches(batch.num_reqs)
        # One micro-batch's aggregates (the batch is split evenly).
        t = batch.num_tokens / m
        s = batch.num_sampling / m
        if t:
            f, w, a = self._qkv
            qkv = max(f * t, w + a * t)
            f, w, a = self._o
            o = max(f * t, w + a * t)
            f, w, a = self._mlp
            if self._expert_weight:
                touched = self._num_experts * (1.0 - self._no_pick ** t)
                mlp = max(f * t, w + self._expert_weight * touched + a * t)
            else:
                mlp = max(f * t, w + a * t)
            norm = self._norm_tok * t
            comm = (self._allreduces * ring_allreduce_time(t * self._act_bytes_tok, self._tp, self.hardware)
                    if self._tp > 1 else 0.0)
        else:
            qkv = o = mlp = norm = comm = 0.0
        attn_p = (max(self._attn_pair * batch.prefill_pairs / m,
                      self._attn_ctx * batch.prefill_context / m + self._attn_tok * batch.prefill_tokens / m)
                  if batch.prefill_tokens else 0.0)
        attn_d = self._attn_decode(batch.num_decode / m, batch.decode_context / m, max) if batch.num_decode else 0.0
        embed, final_norm = self._embed_tok * t, self._final_norm_tok * t
        if s:
            f, w, a = self._lm
            lm = max(f * s, w + a * s)
        else:
            lm = 0.0
        samp = self._sampling_row * s

        # Pipeline composition (parallel.py): stages share the layer block, the first adds
        # the embedding (and a send), the last the final norm, LM head and sampling.
        pp, rep = self._pp, m - 1
        c = pp + rep
        if pp == 1:
            ex_norm, ex_comm, ex_lm, ex_samp = m * (embed + final_norm), 0.0, m * lm, m * samp
        else:
            send = p2p_send_time(t * self._act_bytes_tok, self.hardware)
            ex_norm, ex_comm, ex_lm, ex_samp = embed + final_norm, (pp - 1) * send, lm, samp
            if rep:
                if embed + send >= final_norm + lm + samp:
                    ex_norm += rep * embed
                    ex_comm += rep * send
                else:
                    ex_norm += rep * final_norm
                    ex_lm += rep * lm
                    ex_samp += rep * samp
        breakdown = {
            "qkv_proj": c * qkv, "o_proj": c * o, "mlp": c * mlp,
            "attn_prefill": c * attn_p, "attn_decode": c * attn_d, "lm_head": ex_lm,
            "norm_rotary": c * norm + ex_norm, "sampling": ex_samp,
            "communication": c * comm + ex_comm, "cpu_overhead": self.cpu_overhead,
        }
        return StepTiming(sum(breakdown.values()), breakdown)

    def _decode_base(self, batch_size: int) -> tuple[dict[str, float], int, int, float, tuple[float, ...]]:
        """Per batch size: ``step_time``'s split of a decode step with no context (every op but
        decode attention is exact), micro-batches, pipeline slots, and the split's running sum
        up to decode attention and the values after it (``sum`` of the split, re-associated
        nowhere: the same float additions in the same order)."""
        memo = self._decode_memo.get(batch_size)
        if memo is None or memo[0] != self.cpu_overhead:
            m = self._microbatches(batch_size)
            base = self.step_time(BatchShape.decode(batch_size, 0)).breakdown
            ops = list(base)
            at = ops.index("attn_decode")
            head = sum(base[op] for op in ops[:at])
            memo = (self.cpu_overhead, base, m, self._pp + m - 1, head, tuple(base[op] for op in ops[at + 1:]))
            self._decode_memo[batch_size] = memo
        return memo[1:]

    def _decode_total(self, batch_size: int, sum_context: int) -> tuple[float, float]:
        """(total, decode attention) of a decode step: ``decode_step_timing(...).total`` exactly."""
        _, m, c, head, tail = self._decode_base(batch_size)
        attn = c * self._attn_decode(batch_size / m, sum_context / m, max)
        return _summed(head, attn, tail), attn

    def decode_step_timing(self, batch_size: int, sum_context: int, max_context: int | None = None) -> StepTiming:
        """``step_time`` of a pure-decode step, from a per-batch-size memo of every op but decode
        attention (the only one that depends on the context): the same floats, summed the same way."""
        if not batch_size:
            return self.step_time(BatchShape.decode(batch_size, sum_context, max_context))
        base, m, c, _, _ = self._decode_base(batch_size)
        breakdown = base.copy()  # same keys in the same order as step_time's
        breakdown["attn_decode"] = c * self._attn_decode(batch_size / m, sum_context / m, max)
        return StepTiming(sum(breakdown.values()), breakdown)

    def decode_step_split(self, batch_size: int, sum_context: int, max_context: int | None,
                          total: float) -> dict[str, float]:
        """The base class's scaled split from the memo, without building the step's timing first."""
        if not batch_size:
            return super().decode_step_split(batch_size, sum_context, max_context, total)
        mid, attn = self._decode_total(batch_size, sum_context)
        scale = total / mid if mid > 0 else 0.0
        split = {op: t * scale for op, t in self._decode_base(batch_size)[0].items()}
        split["attn_decode"] = attn * scale
        return split

    def decode_splits_sum(self, batch_sizes: Sequence[int], sum_contexts: Sequence[int],
                          max_contexts: Sequence[int], totals: Sequence[float]) -> dict[str, float]:
        """Vectorised over the stretches: each stretch's split is ``decode_step_split``'s (the same
        float operations, element by element); only the sums over stretches may round differently."""
        if not len(batch_sizes) or not all(batch_sizes):
            return super().decode_splits_sum(batch_sizes, sum_contexts, max_contexts, totals)
        sizes, inverse = np.unique(np.asarray(batch_sizes, dtype=np.int64), return_inverse=True)
        memos = [self._decode_base(int(b)) for b in sizes.tolist()]
        ops = list(memos[0][0])
        at = ops.index("attn_decode")
        per_size = np.array([[base[op] for op in ops] + [m, c, head] for base, m, c, head, _ in memos])[inverse]
        m, c, head = per_size[:, len(ops)], per_size[:, len(ops) + 1], per_size[:, len(ops) + 2]
        batch = np.asarray(batch_sizes, dtype=np.int64)
        context = np.asarray(sum_contexts, dtype=np.int64)
        attn = c * self._attn_decode(batch / m, context / m, np.maximum)
        mid = head + attn  # _decode_total's additions, in its order
        for j in range(at + 1, len(ops)):
            mid = mid + per_size[:, j]
        total = np.asarray(totals, dtype=np.float64)
        scale = np.divide(total, mid, out=np.zeros_like(total), where=mid > 0)
        sums = (per_size[:, :len(ops)] * scale[:, None]).sum(axis=0)
        sums[at] = (attn * scale).sum()
        return dict(zip(ops, sums.tolist()))

    def _short_run(self, batch_size: int, sum_context: int, k: int) -> list[float]:
        """``decode_step_times`` of a short run (``0 < k <= _SHORT_RUN``, ``batch_size > 0``) in plain
        Python: the same float operations as the array version, ``_attn_decode`` inlined (a call
        per step was most of the cost), the first step's total summed as ``_decode_total`` sums it
        (its decode attention is ``attn[0]``)."""
        _, m, stages, head, tail = self._decode_base(batch_size)
        pair, per_ctx, per_req = self._attn_pair, self._attn_ctx, self._attn_tok * (batch_size / m)
        attn = []
        for j in range(k):
            context = (sum_context + batch_size * float(j)) / m
            attn.append(stages * max(pair * context, per_ctx * context + per_req))
        rest = _summed(head, attn[0], tail) - attn[0]
        return [rest + a for a in attn]

    def decode_step_times_list(self, batch_size: int, sum_context: int, k: int,
                               max_context: int | None = None) -> list[float]:
        """``decode_step_times(...).tolist()``, with no array for a short run (the same floats)."""
        if batch_size and 0 < k <= _SHORT_RUN:
            return self._short_run(batch_size, sum_context, k)
        return self.decode_step_times(batch_size, sum_context, k, max_context).tolist()

    def decode_step_times(self, batch_size: int, sum_context: int, k: int,
                          max_context: int | None = None) -> np.ndarray:
        """Vectorised: in a pure-decode run only decode attention changes from step to step.

        ``max_context`` is accepted for the interface and unused: the roofline's attention
        reads every request's KV, so only the total context matters."""
        if k <= 0:
            return np.empty(0)
        if batch_size and k <= _SHORT_RUN:  # numpy's per-call cost dominates a short run
            return np.array(self._short_run(batch_size, sum_context, k))
        first = self.decode_step_timing(batch_size, sum_context)
        if batch_size == 0:
            return np.full(k, first.total)
        m = self._microbatches(batch_size)
        stages = self._pp + m - 1
        context = (sum_context + batch_size * np.arange(k, dtype=float)) / m
        attn = stages * self._attn_decode(batch_size / m, context, np.maximum)
        return (first.total - attn[0]) + attn
