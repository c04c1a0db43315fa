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

Format v2 (``servelab-profile-v2``) keeps every v1 table but changes what three of them mean,
because v1's sums did not describe our executor (see docs/validation.md)::

      "attn_decode": {"batch": [...], "context": [...], "seconds": [...],   # grid, equal contexts
                      "split_max_batch": 16, "latency_batch": 32},
      "eager_floor": {"num_tokens": [...], "seconds": [...]},
      "overhead": {"graph_s": ..., "graph_max_batch": 256, "graph_sizes": [1, 2, 4, ..., 256],
                   "cpu_per_request_s": ..., "eager_s": ..., "eager_ref_reqs": 17}

* Per-token tables are raw device times (no eager adjustment).
* A pure-decode step of at most ``graph_max_batch`` requests replays the CUDA graph of the
  next captured size (``graph_sizes``): its GEMMs and its attention run at that padded batch.
* Decode attention is the measured grid (``batch`` x per-request ``context``), interpolated
  piecewise-linearly in context along each batch line and linearly between batch lines, at
  the batch's mean context. Graphs of at most ``split_max_batch`` rows split the keys; larger
  ones (and eager steps) do not, so each program walks its request's whole context and the
  kernel cannot end before its longest request: the time is at least the ``latency_batch``
  line (the smallest non-split batch measured) at the batch's longest context.
* Optional ``attn_decode.lone_latency`` ({"context": [...], "seconds": [...]}: the latency
  batch with one request at that context and the others at the shortest one) replaces the
  latency line: in serving the longest request's programs share the GPU with shorter ones,
  not with equally long ones.
* Optional ``attn_decode_eager`` (a grid like ``attn_decode``): decode rows launched beside a
  prefill chunk, where the kernel tiles every query block for the chunk (64 query rows
  instead of 16) and a serving chunk leaves the launch unsplit. Without it such rows use
  the graph grid.
* Optional ``attn_decode_mixed`` (a grid like ``attn_decode``, plus ``splits``): decode rows
  as a mixed-step graph launches them, with the chunk's query tile and the key range split
  ``splits`` ways, so the longest row's programs walk ``max_context / splits`` keys each (the
  latency line is read there). Without it the mixed steps use ``attn_decode_eager`` and the
  unsplit latency line, as the executor ran them before its mixed graphs split the keys.
* Per-request host time (input preparation, the engine's update) is ``cpu_per_request_s``
  per scheduled request, explicit instead of folded into attention.
* An eager step is bound by the CPU launching its kernels: ``max(eager_floor(tokens),
  device) + eager_s + cpu_per_request_s * (num_reqs - eager_ref_reqs)``, where
  ``eager_floor`` is the measured wall time of serving-like eager steps (of
  ``eager_ref_reqs`` requests) minus ``eager_s``, and ``eager_s`` the part of an eager step
  that does not overlap the device (measured where the device time dominates). The part of
  the floor not covered by device work is reported as ``cpu_overhead``.
* Optional ``overhead.mixed_graph_sizes`` / ``mixed_graph_s``: the executor replays a CUDA
  graph for a step with prefill tokens of at most ``mixed_graph_sizes[-1]`` tokens, padded to
  the next size: its GEMMs run at that size, attention at the real shape (decode rows as
  ``attn_decode_mixed`` says, else as beside a chunk, unsplit), and its CPU time is ``mixed_graph_s + cpu_per_request_s * num_reqs``, with no
  launch floor.
* An eager step that follows a graph step or idling may cost more than one that follows
  another eager step (the launch path is cold): optional ``overhead.eager_after_graph_s`` /
  ``eager_after_idle_s`` (default 0) are added to its launch floor, so they hide behind a
  device-bound step. This makes the model stateful: ``step_time`` must be called once per
  executed step, in order (``decode_step_times`` counts as its k steps), and the simulator
  reports idling with ``note_idle``.
* Optional ``step_fits`` (``experiments/profile_steps.py`` measures and fits them from whole
  serving-shaped steps): linear corrections of what the op tables leave over, per graph
  size. ``graph_decode`` ({"graph_size": [...], "coef": [[a, b, c, d], ...]}): a graph decode
  step of padded size G costs its non-attention device ops plus ``a + b * num_reqs`` (its
  ``cpu_overhead``) plus ``c * sum_context + d * max_context`` (its ``attn_decode``);
  ``mixed_graph`` ({"graph_size", "coef": [[a, c, e], ...], "decodes": {"knots", "seconds"}}):
  a mixed-graph step of padded size M costs its device ops plus ``a + f(num_decode) + c *
  decode_context + e * (context before its prefill chunks)``, ``f`` piecewise linear through
  the knots, flat past them (a size without its own line takes the nearest measured one);
  ``eager`` ({"coef": [a, d, b, c, e]}): an eager step costs its device ops plus ``a + d *
  num_tokens + b * num_reqs + c * decode_context + e * (context before its prefill
  chunks)``, and at least the launch floor ``eager_floor(tokens) + eager_s``; this replaces
  the per-request term and the switch penalties. A graph size without a fit keeps the terms
  above.
"""
from __future__ import annotations

import bisect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from simulator.cost_model.base import BatchShape, CostModel, StepTiming

PROFILE_FORMAT = "servelab-profile-v2"
PROFILE_FORMATS = ("servelab-profile-v1", PROFILE_FORMAT)
_REQUIRED_TOKEN_OPS = ("qkv_proj", "o_proj", "mlp")
_OPTIONAL_TOKEN_OPS = ("norm_rotary", "communication")


class PiecewiseLinear:
    """y(x) through measured points; linear extrapolation past both ends, never below 0 (or, with
    ``clamp``, flat past both ends and of any sign: a fitted correction rather than a time).

    Scalar lookups use ``bisect`` on Python lists: the same values as ``numpy.interp``
    inside the range, without numpy's per-call overhead on scalars.
    """

    def __init__(self, xs: Sequence[float], ys: Sequence[float], what: str, clamp: bool = False) -> None:
        if len(xs) != len(ys) or not xs:
            raise ValueError(f"{what}: need equally long, non-empty x and y lists, got {len(xs)} and {len(ys)}")
        if any(b <= a for a, b in zip(xs, xs[1:])):
            raise ValueError(f"{what}: x values must be strictly increasing, got {list(xs)}")
        self.xs = [float(x) for x in xs]
        self.ys = [float(y) for y in ys]
        self._slopes = [(y1 - y0) / (x1 - x0) for x0, x1, y0, y1
                        in zip(self.xs, self.xs[1:], self.ys, self.ys[1:])] or [0.0]
        self.clamp = clamp

    def __call__(self, x: float) -> float:
        if self.clamp:  # a fitted correction: flat past the knots, any sign
            x = min(max(x, self.xs[0]), self.xs[-1])
        i = min(max(bisect.bisect_right(self.xs, x) - 1, 0), len(self._slopes) - 1)
        y = self.ys[i] + self._slopes[i] * (x - self.xs[i])
        return y if y > 0.0 or self.clamp else 0.0


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


#: What an eager step can follow, for its launch penalty (``CalibratedCostModel``'s state).
AFTER_EAGER, AFTER_GRAPH, AFTER_IDLE = "eager", "graph", "idle"
#: How the executor runs a step (``CalibratedCostModel.step_kind``).
GRAPH, MIXED, EAGER = "graph", "mixed", "eager"


class DecodeGrid:
    """Decode attention measured at (batch, per-request context) points with equal contexts:
    piecewise-linear in context along each batch line, linear in batch between lines, and
    proportional to the batch beyond the largest one."""

    def __init__(self, table: dict[str, Any], what: str) -> None:
        lines: dict[int, list[tuple[float, float]]] = {}
        for b, c, t in zip(table["batch"], table["context"], table["seconds"]):
            lines.setdefault(int(b), []).append((float(c), float(t)))
        self.batches = sorted(lines)
        self.lines = [PiecewiseLinear([c for c, _ in sorted(lines[b])], [t for _, t in sorted(lines[b])],
                                      f"{what}[batch={b}]") for b in self.batches]

    def line(self, batch: int) -> PiecewiseLinear | None:
        """The measured line of exactly ``batch`` rows, if there is one."""
        return self.lines[self.batches.index(batch)] if batch in self.batches else None

    def __call__(self, batch: float, context: float) -> float:
        bs, lines = self.batches, self.lines
        if batch >= bs[-1]:
            return lines[-1](context) * (batch / bs[-1])
        if batch <= bs[0]:
            return lines[0](context)
        i = bisect.bisect_left(bs, batch)
        hi = lines[i](context)
        if bs[i] == batch:
            return hi
        lo = lines[i - 1](context)
        return lo + (hi - lo) * ((batch - bs[i - 1]) / (bs[i] - bs[i - 1]))

    def many(self, batch: float, contexts: np.ndarray) -> np.ndarray:
        """``self(batch, c)`` for every c, in the same float operations (so equal)."""
        bs, lines = self.batches, self.lines
        if batch >= bs[-1]:
            return _pl_vec(lines[-1], contexts) * (batch / bs[-1])
        if batch <= bs[0]:
            return _pl_vec(lines[0], contexts)
        i = bisect.bisect_left(bs, batch)
        hi = _pl_vec(lines[i], contexts)
        if bs[i] == batch:
            return hi
        lo = _pl_vec(lines[i - 1], contexts)
        return lo + (hi - lo) * ((batch - bs[i - 1]) / (bs[i] - bs[i - 1]))


class CalibratedCostModel(CostModel):
    """Step times interpolated from a measured profile (see the module docstring)."""

    def __init__(self, profile: dict[str, Any]) -> None:
        if profile.get("format") not in PROFILE_FORMATS:
            raise ValueError(f"profile format must be one of {PROFILE_FORMATS}, got {profile.get('format')!r}")
        self.version = 2 if profile["format"] == PROFILE_FORMAT else 1
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

        if self.version == 1:
            dec = _section(profile, "attn_decode", ("batch", "total_context", "seconds"))
            self._decode = _fit_linear([dec["batch"], dec["total_context"]], dec["seconds"], "attn_decode")
        else:
            self._init_v2(profile)
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

    def _init_v2(self, profile: dict[str, Any]) -> None:
        dec = _section(profile, "attn_decode", ("batch", "context", "seconds"))
        self._grid = DecodeGrid(dec, "attn_decode")
        eager = profile.get("attn_decode_eager")
        self._eager_grid = (DecodeGrid(_section(profile, "attn_decode_eager", ("batch", "context", "seconds")),
                                       "attn_decode_eager") if eager else self._grid)
        mixed = profile.get("attn_decode_mixed")
        self._mixed_grid = (DecodeGrid(_section(profile, "attn_decode_mixed", ("batch", "context", "seconds")),
                                       "attn_decode_mixed") if mixed else None)
        self.mixed_splits = int(mixed.get("splits", 1)) if mixed else 1
        self.split_max_batch = int(dec.get("split_max_batch", 0))
        lone = dec.get("lone_latency")
        self._latency_line = (PiecewiseLinear(lone["context"], lone["seconds"], "attn_decode.lone_latency") if lone
                              else self._grid.line(int(dec.get("latency_batch", 0))))
        over = profile.get("overhead") or {}
        self.graph_sizes = sorted(int(x) for x in over.get("graph_sizes", []))
        self.mixed_graph_sizes = sorted(int(x) for x in over.get("mixed_graph_sizes", []))
        self.mixed_graph_overhead = float(over.get("mixed_graph_s", 0.0))
        self.cpu_per_request = float(over.get("cpu_per_request_s", 0.0))
        self.eager_ref_reqs = int(over.get("eager_ref_reqs", 0))
        floor = profile.get("eager_floor")
        self._eager_floor = (PiecewiseLinear(floor["num_tokens"], floor["seconds"], "eager_floor")
                             if floor else None)
        self.eager_after = {AFTER_EAGER: 0.0, AFTER_GRAPH: float(over.get("eager_after_graph_s", 0.0)),
                            AFTER_IDLE: float(over.get("eager_after_idle_s", 0.0))}
        self._after = AFTER_IDLE  # what the next step follows: a run starts on an idle engine
        fits = profile.get("step_fits") or {}
        gd, md, ea = fits.get("graph_decode"), fits.get("mixed_graph"), fits.get("eager")
        self._graph_fit = ({int(g): tuple(float(x) for x in c) for g, c in zip(gd["graph_size"], gd["coef"])}
                           if gd else {})
        measured = {int(m): tuple(float(x) for x in c) for m, c in zip(md["graph_size"], md["coef"])} if md else {}
        self._mixed_decodes = (PiecewiseLinear(md["decodes"]["knots"], md["decodes"]["seconds"], "mixed_graph.decodes",
                                               clamp=True) if md else None)
        self._mixed_fit = {m: measured[min(measured, key=lambda x: (abs(x - m), x))]
                           for m in self.mixed_graph_sizes} if measured else {}
        self._eager_fit = tuple(float(x) for x in ea["coef"]) if ea else None

    def note_idle(self, seconds: float) -> None:
        """The replica sat idle (no unfinished request) for ``seconds`` before its next step.
        The simulator calls this as an idle replica wakes up; the next eager step then pays
        ``eager_after_idle_s`` (the profile measures one idle length, so any idle counts)."""
        if seconds > 0.0:
            self._after = AFTER_IDLE

    def _attn_decode_v2(self, rows: int, num_decode: int, sum_context: float, max_context: float,
                        split: bool) -> float:
        t = self._grid(rows, sum_context / num_decode)
        if not split and self._latency_line is not None:
            lat = self._latency_line(max_context)
            if lat > t:
                t = lat
        return t

    def _padded(self, n: int, sizes: list[int] | None = None) -> int:
        sizes = self.graph_sizes if sizes is None else sizes
        i = bisect.bisect_left(sizes, n)
        return sizes[i] if i < len(sizes) else n

    def step_kind(self, batch: BatchShape) -> tuple[str, int]:
        """How the executor runs a step of this shape: ("graph", padded batch) for a decode CUDA
        graph, ("mixed", padded tokens) for a mixed-step graph, else ("eager", tokens). The
        second value is the token count its GEMMs run at (v2 profiles)."""
        if batch.num_decode == batch.num_reqs and 0 < batch.num_reqs <= self.graph_max_batch:
            return GRAPH, self._padded(batch.num_tokens)
        if self.mixed_graph_sizes and batch.num_tokens <= self.mixed_graph_sizes[-1]:
            return MIXED, self._padded(batch.num_tokens, self.mixed_graph_sizes)
        return EAGER, batch.num_tokens

    def _step_time_v2(self, batch: BatchShape) -> StepTiming:
        zero = 0.0
        kind, t = self.step_kind(batch)
        graph, mixed = kind is GRAPH, kind is MIXED
        if graph and t in self._graph_fit:
            return self._fitted_graph_step(batch, t)
        attn_p = self._attn_prefill(batch)
        if batch.num_decode:
            if graph:
                attn_d = self._attn_decode_v2(t, batch.num_decode, batch.decode_context, batch.max_decode_context,
                                              t <= self.split_max_batch)
            else:
                # One launch runs the prefill chunks' and the decode rows' programs side by side:
                # it lasts at least their summed work and at least its longest program. Beside a
                # chunk the decode rows get the chunk's larger query tile (attn_decode_eager);
                # a mixed graph also splits their keys (attn_decode_mixed).
                splits = 1
                if mixed and self._mixed_grid is not None:
                    grid, splits = self._mixed_grid, self.mixed_splits
                else:
                    grid = self._eager_grid if batch.prefill_tokens else self._grid
                attn_d = grid(batch.num_decode, batch.decode_context / batch.num_decode)
                if self._latency_line is not None:
                    lat = self._latency_line(batch.max_decode_context / splits) - attn_p
                    if lat > attn_d:
                        attn_d = lat
        else:
            attn_d = zero
        breakdown = self._device_breakdown(t, batch.num_sampling, attn_p, attn_d)
        device = sum(breakdown.values())
        if graph:
            cpu = self.graph_overhead + self.cpu_per_request * batch.num_reqs
        elif mixed and self._mixed_fit:
            c = self._mixed_fit[t]
            cpu = (c[0] + self._mixed_decodes(batch.num_decode) + c[1] * batch.decode_context
                   + c[2] * (batch.prefill_context - batch.prefill_tokens))
        elif mixed:
            cpu = self.mixed_graph_overhead + self.cpu_per_request * batch.num_reqs
        elif self._eager_fit is not None:
            c = self._eager_fit
            cpu = (c[0] + c[1] * batch.num_tokens + c[2] * batch.num_reqs + c[3] * batch.decode_context
                   + c[4] * (batch.prefill_context - batch.prefill_tokens))
            floor = self.launch_floor(batch.num_tokens)  # stays under the fitted line
            if floor > device + cpu:
                cpu = floor - device
        else:
            cpu = self.eager_overhead + self.cpu_per_request * (batch.num_reqs - self.eager_ref_reqs)
            if self._eager_floor is not None:
                floor = self._eager_floor(batch.num_tokens) + self.eager_after[self._after]
                if floor > device:  # the GPU waits for the launches
                    cpu += floor - device
            cpu = cpu if cpu > zero else zero
        self._after = AFTER_GRAPH if graph or mixed else AFTER_EAGER
        breakdown["cpu_overhead"] = cpu
        return StepTiming(_positive(device + cpu), breakdown)

    def launch_floor(self, num_tokens: int) -> float:
        """The wall an eager step of ``num_tokens`` tokens cannot go below (the CPU launching its
        kernels): ``eager_floor`` + ``eager_s`` as the profile's eager rounds measured them; 0
        without a floor table."""
        if self._eager_floor is None:
            return 0.0
        floor = self._eager_floor(num_tokens) + self.eager_overhead
        return floor if floor > 0.0 else 0.0

    def _fitted_graph_step(self, batch: BatchShape, size: int) -> StepTiming:
        """A graph decode step of padded ``size`` with its ``step_fits.graph_decode`` line."""
        a, per_req, per_ctx, per_max = self._graph_fit[size]
        attn_d = per_ctx * batch.decode_context + per_max * batch.max_decode_context
        breakdown = self._device_breakdown(size, batch.num_sampling, 0.0, attn_d)
        cpu = a + per_req * batch.num_reqs
        breakdown["cpu_overhead"] = cpu
        self._after = AFTER_GRAPH
        return StepTiming(_positive(sum(breakdown.values())), breakdown)

    def _attn_prefill(self, batch: BatchShape) -> float:
        """The prefill plane ``a + b*tokens + c*context + d*causal_pairs`` (0 without prefill)."""
        if not batch.prefill_tokens:
            return 0.0
        a, b, c, d = self._prefill
        t = a + b * batch.prefill_tokens + c * batch.prefill_context + d * batch.prefill_pairs
        return t if t > 0.0 else 0.0

    def _device_breakdown(self, t: int, rows: int, attn_p: float, attn_d: float) -> dict[str, float]:
        """GPU time per op (both profile versions) for ``t`` tokens (padded to the graph size in
        a graph step), ``rows`` sampling rows and the given attention times."""
        ops = self._token_ops
        return {
            "qkv_proj": ops["qkv_proj"](t) if t else 0.0,
            "o_proj": ops["o_proj"](t) if t else 0.0,
            "mlp": ops["mlp"](t) if t else 0.0,
            "attn_prefill": attn_p,
            "attn_decode": attn_d,
            "lm_head": self._lm_head(rows) if rows else 0.0,
            "norm_rotary": ops["norm_rotary"](t) if t and "norm_rotary" in ops else 0.0,
            "sampling": self._sampling(rows) if rows else 0.0,
            "communication": ops["communication"](t) if t and "communication" in ops else 0.0,
        }

    @classmethod
    def from_file(cls, path: str | Path) -> CalibratedCostModel:
        return cls(json.loads(Path(path).read_text()))

    def _attn_decode(self, batch: Any, context: Any) -> Any:
        a, b, c = self._decode
        return a + b * batch + c * context

    def step_time(self, batch: BatchShape) -> StepTiming:
        if self.version == 2:
            return self._step_time_v2(batch)
        zero = 0.0
        if batch.num_decode:
            attn_d = self._attn_decode(batch.num_decode, batch.decode_context)
            attn_d = attn_d if attn_d > zero else zero
        else:
            attn_d = zero
        attn_p = self._attn_prefill(batch)
        graph = batch.num_decode == batch.num_reqs and batch.num_reqs <= self.graph_max_batch
        breakdown = self._device_breakdown(batch.num_tokens, batch.num_sampling, attn_p, attn_d)
        breakdown["cpu_overhead"] = self.graph_overhead if graph else self.eager_overhead
        return StepTiming(sum(breakdown.values()), breakdown)

    def decode_step_times(self, batch_size: int, sum_context: int, k: int,
                          max_context: int | None = None) -> np.ndarray:
        """Vectorised: in a pure-decode run only decode attention changes from step to step.
        For v2 this stands for k executed steps (it advances the model's state like them)."""
        if k <= 0:
            return np.empty(0)
        shape = BatchShape.decode(batch_size, sum_context, max_context)
        if self.version == 2:
            return self._decode_step_times_v2(batch_size, sum_context, k, shape.max_decode_context)
        first = self.step_time(shape)
        if batch_size == 0:
            return np.full(k, first.total)
        context = sum_context + batch_size * np.arange(k, dtype=float)
        attn = np.maximum(self._attn_decode(batch_size, context), 0.0)
        return (first.total - attn[0]) + attn

    def _decode_step_times_v2(self, batch_size: int, sum_context: int, k: int, max_context: int) -> np.ndarray:
        """``step_time`` of the k steps with numpy, in the same float operations (so equal)."""
        if not 0 < batch_size <= self.graph_max_batch:
            # eager pure-decode steps: the launch floor (and the state) make them non-additive
            return np.array([self.step_time(BatchShape.decode(batch_size, sum_context + j * batch_size,
                                                              max_context + j if batch_size else 0)).total
                             for j in range(k)])
        first = self.step_time(BatchShape.decode(batch_size, sum_context, max_context))
        rows = self._padded(batch_size)
        j = np.arange(k, dtype=float)
        fit = self._graph_fit.get(rows)
        if fit is not None:
            attn = fit[2] * (sum_context + batch_size * j) + fit[3] * (max_context + j)
            return np.maximum(first.total - first.breakdown["attn_decode"] + attn, _MIN_STEP_S)
        attn = self._grid.many(rows, (sum_context + batch_size * j) / batch_size)
        if not (rows <= self.split_max_batch) and self._latency_line is not None:
            attn = np.maximum(attn, _pl_vec(self._latency_line, max_context + j))
        rest = first.total - first.breakdown["attn_decode"]
        return rest + attn


_MIN_STEP_S = 1e-6  # a fitted step is never free (a fit extrapolated far could reach 0)


def _positive(t: float) -> float:
    return t if t > _MIN_STEP_S else _MIN_STEP_S


def _pl_vec(f: PiecewiseLinear, x: np.ndarray) -> np.ndarray:
    """``PiecewiseLinear`` at many points, with the same arithmetic as its scalar call."""
    xs = np.asarray(f.xs)
    i = np.clip(np.searchsorted(xs, x, side="right") - 1, 0, len(f._slopes) - 1)
    y = np.asarray(f.ys)[i] + np.asarray(f._slopes)[i] * (x - xs[i])
    return np.maximum(y, 0.0)
