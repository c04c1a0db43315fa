"""Cost model fitted to our executor's own profiles (the sim-vs-real validation fills them).

A profile is one JSON file measured for one (model, GPU, tp, pp). Every time is seconds
for the whole step on the critical path (all layers), i.e. exactly one ``OPS`` entry::

    {
      "format": "servelab-profile-v1",
      "model": "Llama-3.1-8B", "hardware": "H100-measured", "tp": 1, "pp": 1,
      "per_token_ops": {                      # vs the step's new tokens
        "num_tokens": [1, 64, 512, 4096],
        "qkv_proj": [...], "o_proj": [...], "mlp": [...],
        "norm_rotary": [...], "communication": [...]          # these two optional
      },
      "lm_head":  {"num_rows": [...], "seconds": [...]},     # vs rows that sample
      "sampling": {"num_rows": [...], "seconds": [...]},
      "attn_decode":  {"batch": [...], "total_context": [...], "seconds": [...]},
      "attn_prefill": {"chunk_tokens": [...], "context_len": [...], "seconds": [...]},
      "overhead": {"eager_s": 0.004, "graph_s": 0.001, "graph_max_batch": 256}
    }

1-D tables are interpolated piecewise-linearly (``numpy.interp`` inside the measured range,
the end segments' slopes outside it, because a GEMM keeps growing past the largest size
measured). The 2-D attention tables are reduced to a least-squares linear fit in the
aggregates that ``BatchShape`` carries: decode ``a + b * batch + c * total_context`` (the
decode kernel streams K/V, so it is linear in the context read); prefill
``a + b * tokens + c * context + d * causal_pairs`` (one prefill point is one request's chunk
of ``chunk_tokens`` ending at ``context_len``). Attention points may therefore be any
scatter, not only a grid, and several prefill chunks in one step sum correctly.

The fixed per-step overhead is ``graph_s`` for a pure-decode step of at most
``graph_max_batch`` requests (replayed as a CUDA graph) and ``eager_s`` otherwise.
"""
from __future__ import annotations

import bisect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from simulator.cost_model.base import BatchShape, CostModel, StepTiming

PROFILE_FORMAT = "servelab-profile-v1"
_REQUIRED_TOKEN_OPS = ("qkv_proj", "o_proj", "mlp")
_OPTIONAL_TOKEN_OPS = ("norm_rotary", "communication")


class PiecewiseLinear:
    """y(x) through measured points; linear extrapolation past both ends, never below 0.

    Scalar lookups use ``bisect`` on Python lists: the same values as ``numpy.interp``
    inside the range, without numpy's per-call overhead on scalars.
    """

    def __init__(self, xs: Sequence[float], ys: Sequence[float], what: str) -> None:
        if len(xs) != len(ys) or not xs:
            raise ValueError(f"{what}: need equally long, non-empty x and y lists, got {len(xs)} and {len(ys)}")
        if any(b <= a for a, b in zip(xs, xs[1:])):
            raise ValueError(f"{what}: x values must be strictly increasing, got {list(xs)}")
        self.xs = [float(x) for x in xs]
        self.ys = [float(y) for y in ys]
        self._slopes = [(y1 - y0) / (x1 - x0) for x0, x1, y0, y1
                        in zip(self.xs, self.xs[1:], self.ys, self.ys[1:])] or [0.0]

    def __call__(self, x: float) -> float:
        i = min(max(bisect.bisect_right(self.xs, x) - 1, 0), len(self._slopes) - 1)
        y = self.ys[i] + self._slopes[i] * (x - self.xs[i])
        return y if y > 0.0 else 0.0


def _fit_linear(columns: Sequence[Sequence[float]], seconds: Sequence[float], what: str) -> tuple[float, ...]:
    """Least-squares coefficients of ``seconds ~ 1 + columns``."""
    design = np.column_stack([np.ones(len(seconds))] + [np.asarray(c, dtype=float) for c in columns])
    if design.shape[0] < design.shape[1]:
        raise ValueError(f"{what}: need at least {design.shape[1]} points for the linear fit, got {design.shape[0]}")
    coef, *_ = np.linalg.lstsq(design, np.asarray(seconds, dtype=float), rcond=None)
    return tuple(float(v) for v in coef)


def _section(profile: dict[str, Any], key: str, fields: Sequence[str]) -> dict[str, Any]:
    sec = profile.get(key)
    if not isinstance(sec, dict):
        raise ValueError(f"profile lacks the {key!r} table")
    missing = [f for f in fields if f not in sec]
    if missing:
        raise ValueError(f"profile table {key!r} lacks {missing}")
    lengths = {f: len(sec[f]) for f in fields}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"profile table {key!r} has columns of different lengths {lengths}")
    return sec


class CalibratedCostModel(CostModel):
    """Step times interpolated from a measured profile (see the module docstring)."""

    def __init__(self, profile: dict[str, Any]) -> None:
        if profile.get("format") != PROFILE_FORMAT:
            raise ValueError(f"profile format must be {PROFILE_FORMAT!r}, got {profile.get('format')!r}")
        self.model_name: str | None = profile.get("model")
        self.hardware_name: str | None = profile.get("hardware")
        self.tp, self.pp = int(profile.get("tp", 1)), int(profile.get("pp", 1))

        tok = _section(profile, "per_token_ops", ("num_tokens", *_REQUIRED_TOKEN_OPS))
        self._token_ops = {op: PiecewiseLinear(tok["num_tokens"], tok[op], f"per_token_ops.{op}")
                           for op in (*_REQUIRED_TOKEN_OPS, *_OPTIONAL_TOKEN_OPS) if op in tok}
        lm = _section(profile, "lm_head", ("num_rows", "seconds"))
        self._lm_head = PiecewiseLinear(lm["num_rows"], lm["seconds"], "lm_head")
        smp = _section(profile, "sampling", ("num_rows", "seconds"))
        self._sampling = PiecewiseLinear(smp["num_rows"], smp["seconds"], "sampling")

        dec = _section(profile, "attn_decode", ("batch", "total_context", "seconds"))
        self._decode = _fit_linear([dec["batch"], dec["total_context"]], dec["seconds"], "attn_decode")
        pre = _section(profile, "attn_prefill", ("chunk_tokens", "context_len", "seconds"))
        n = np.asarray(pre["chunk_tokens"], dtype=float)
        ctx = np.asarray(pre["context_len"], dtype=float)
        if np.any(ctx < n):
            raise ValueError("attn_prefill: context_len must be >= chunk_tokens (it includes the chunk)")
        pairs = n * ctx - n * (n - 1) / 2
        self._prefill = _fit_linear([n, ctx, pairs], pre["seconds"], "attn_prefill")

        over = profile.get("overhead") or {}
        if "eager_s" not in over:
            raise ValueError("profile lacks overhead.eager_s (fixed per-step CPU time)")
        self.eager_overhead = float(over["eager_s"])
        self.graph_overhead = float(over.get("graph_s", self.eager_overhead))
        self.graph_max_batch = int(over.get("graph_max_batch", 0))

    @classmethod
    def from_file(cls, path: str | Path) -> CalibratedCostModel:
        return cls(json.loads(Path(path).read_text()))

    def _attn_decode(self, batch: Any, context: Any) -> Any:
        a, b, c = self._decode
        return a + b * batch + c * context

    def step_time(self, batch: BatchShape) -> StepTiming:
        t = batch.num_tokens
        ops = self._token_ops
        zero = 0.0
        if batch.num_decode:
            attn_d = self._attn_decode(batch.num_decode, batch.decode_context)
            attn_d = attn_d if attn_d > zero else zero
        else:
            attn_d = zero
        if batch.prefill_tokens:
            a, b, c, d = self._prefill
            attn_p = a + b * batch.prefill_tokens + c * batch.prefill_context + d * batch.prefill_pairs
            attn_p = attn_p if attn_p > zero else zero
        else:
            attn_p = zero
        graph = batch.num_decode == batch.num_reqs and batch.num_reqs <= self.graph_max_batch
        breakdown = {
            "qkv_proj": ops["qkv_proj"](t) if t else zero,
            "o_proj": ops["o_proj"](t) if t else zero,
            "mlp": ops["mlp"](t) if t else zero,
            "attn_prefill": attn_p,
            "attn_decode": attn_d,
            "lm_head": self._lm_head(batch.num_sampling) if batch.num_sampling else zero,
            "norm_rotary": ops["norm_rotary"](t) if t and "norm_rotary" in ops else zero,
            "sampling": self._sampling(batch.num_sampling) if batch.num_sampling else zero,
            "communication": ops["communication"](t) if t and "communication" in ops else zero,
            "cpu_overhead": self.graph_overhead if graph else self.eager_overhead,
        }
        return StepTiming(sum(breakdown.values()), breakdown)

    def decode_step_times(self, batch_size: int, sum_context: int, k: int) -> np.ndarray:
        """Vectorised: in a pure-decode run only decode attention changes from step to step."""
        if k <= 0:
            return np.empty(0)
        first = self.step_time(BatchShape.decode(batch_size, sum_context))
        if batch_size == 0:
            return np.full(k, first.total)
        context = sum_context + batch_size * np.arange(k, dtype=float)
        attn = np.maximum(self._attn_decode(batch_size, context), 0.0)
        return (first.total - attn[0]) + attn
