"""Serving-shaped engine steps and the step fits of a v2 profile (``step_fits``).

Why: summing op timings measured in isolation mispredicts whole steps by amounts that depend
on the CUDA-graph size and the spread of contexts (the H200 validation found graph decode
steps 2.3 ms too fast at 32 padded rows and long contexts and 2.3 ms too slow at 48, and the
mixed-graph steps 0.3-0.7 ms too slow). So the profiler also times *whole* steps shaped the
way serving runs them, and fits what the op tables leave over, per graph size:

* **the sweep** (``measure_step_sweep``): a real ``EngineCore`` on the ``RealBackend`` with
  ``N`` requests of spread prompt lengths decodes while one random request is aborted every
  few steps (``steps_per_batch``, more for small batches), so the batch walks down through every size from ``N`` to 1 (every
  decode graph, and every padding count inside it) at realistic, unequal contexts; every
  ``inject_every``-th step a fresh prompt (cycling through ``INJECT_TOKENS``) joins, which
  makes that step a mixed-graph or eager step beside the decoders. Passes differ in context
  level (short, medium, long). Aborts and additions happen between timed steps.
* **the fits** (``fit_step_tables``, no torch): ordinary least squares with one outlier pass
  (points beyond 3.5 robust sigmas dropped, then refitted):

  - a graph decode step of padded size ``G``: ``wall - non-attention device ops(G)`` ~
    ``a + b * num_reqs + c * sum_context + d * max_context``, one fit per ``G`` (the
    context terms become the step's ``attn_decode``, the rest its ``cpu_overhead``);
  - a mixed-graph step of padded size ``M``: ``wall - device ops`` ~ ``a + b * num_reqs +
    c * decode_context``, one fit per ``M`` (sizes with too few points share a fit over all
    mixed steps that also has a token term);
  - an eager step: ``wall - device ops`` ~ ``a + b * num_reqs + c * decode_context +
    d * num_tokens``, one fit.

The wall of a step is from its start to the next step's start (as ``experiments.validate``
measures real runs), so it includes scheduling, input preparation, the launch or replay, the
wait for the device, sampling and the engine's update.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

# (requests, shortest prompt, longest prompt, steps per batch size) of each sweep pass.
# Full passes keep prompts + growth inside the 32768-block (524k-token) pool validation uses.
FULL_PASSES = [(256, 32, 1024, 3), (256, 800, 2000, 3), (48, 3000, 12000, 4)]
QUICK_PASSES = [(6, 8, 40, 1), (3, 60, 120, 2)]
FULL_INJECT_TOKENS = [8, 20, 40, 90, 150, 230, 300, 450, 560, 700, 900, 1150, 1400, 1700, 1950,
                      2600, 3500, 5000, 7000]
QUICK_INJECT_TOKENS = [4, 12, 30, 90]
INJECT_EVERY = 4
# Small batches get more steps (at least this many divided by the batch size): serving spends
# most of its steps at low load there, and one batch size has only a few graph sizes near it.
SMALL_BATCH_STEPS = 24
MIN_POINTS_PER_SIZE = 6
OUTLIER_SIGMAS = 3.5

SAMPLE_FIELDS = ("pass_", "num_reqs", "num_tokens", "num_sampling", "num_decode", "decode_context",
                 "prefill_tokens", "prefill_context", "prefill_pairs", "max_decode_context")


def measure_step_sweep(backend: Any, quick: bool, log: Callable[[str], None], seed: int = 7,
                       passes: list[tuple[int, int, int, int]] | None = None) -> dict[str, list[float]]:
    """Run the sweep passes; returns the timed steps as columns (``SAMPLE_FIELDS`` + ``wall_s``)."""
    from core.config import SchedulerConfig
    from core.engine import EngineCore
    from core.request import Request
    from core.sampling_params import SamplingParams
    from simulator.cost_model.base import BatchShape

    runner = backend.runner
    rng = np.random.default_rng(seed)
    vocab = runner.config.vocab_size
    pool = runner.num_gpu_blocks * runner.block_size
    inject = QUICK_INJECT_TOKENS if quick else FULL_INJECT_TOKENS
    inject = [t for t in inject if t < runner.max_model_len]
    cols: dict[str, list[float]] = {f: [] for f in (*SAMPLE_FIELDS, "wall_s")}
    for p, (n_req, lo, hi, per) in enumerate(passes or (QUICK_PASSES if quick else FULL_PASSES)):
        n_req = min(n_req, runner.max_num_seqs)
        schedule = [max(per, -(-(1 if quick else SMALL_BATCH_STEPS) // n)) for n in range(n_req, 0, -1)]
        budget = sum(schedule) + 8
        hi = min(hi, runner.max_model_len - budget - 2)
        lo = min(lo, hi)
        lens = rng.integers(lo, hi + 1, size=n_req)
        if lens.sum() + n_req * n_req * per // 2 + SMALL_BATCH_STEPS * 4 + max(inject) > pool:
            log(f"  sweep pass {p}: {n_req} x {lo}..{hi} tokens would not fit the {pool}-token pool, skipped")
            continue
        t_pass = time.perf_counter()
        engine = EngineCore(SchedulerConfig(max_num_seqs=runner.max_num_seqs,
                                            max_num_batched_tokens=runner.max_num_batched_tokens,
                                            max_model_len=runner.max_model_len),
                            backend.cache_config, backend, eos_token_id=backend.eos_token_id)
        backend.bind(engine.scheduler.requests)
        backend.runner.reset()
        for i, n in enumerate(lens):
            engine.add_request(Request(f"s{p}-{i}", rng.integers(3, vocab, size=int(n)).tolist(),
                                       SamplingParams(max_tokens=budget, ignore_eos=True), arrival_time=0.0))
        t0 = time.perf_counter()
        sched = engine.scheduler
        while sched.waiting or any(not r.output_token_ids for r in sched.running):  # prefill (not timed)
            engine.step(time.perf_counter() - t0)
        k = 0
        prev: tuple[Any, float] | None = None

        def close(now: float) -> None:
            nonlocal prev
            if prev is not None:
                shape = BatchShape.from_scheduler_output(prev[0])
                cols["pass_"].append(p)
                for f in SAMPLE_FIELDS[1:]:
                    cols[f].append(getattr(shape, f))
                cols["wall_s"].append(now - prev[1])
            prev = None

        for steps in schedule:
            for _ in range(steps):
                if k % INJECT_EVERY == INJECT_EVERY - 1:
                    close(time.perf_counter())
                    t = inject[(k // INJECT_EVERY) % len(inject)]
                    engine.add_request(Request(f"i{p}-{k}", rng.integers(3, vocab, size=t).tolist(),
                                               SamplingParams(max_tokens=1, ignore_eos=True), arrival_time=0.0))
                now = time.perf_counter()
                close(now)
                out = engine.step(now - t0).scheduler_output
                prev = None if out is None or out.is_empty else (out, now)
                k += 1
            close(time.perf_counter())
            decoding = [r for r in sched.running if r.request_id.startswith("s")]
            if not decoding:
                break
            engine.abort_request(decoding[int(rng.integers(len(decoding)))].request_id, time.perf_counter() - t0)
        for rid in list(sched.requests):  # what is left (an injected chunk): not recorded
            engine.abort_request(rid, 0.0)
        log(f"  sweep pass {p}: {n_req} requests of {lo}..{hi} tokens, {k} steps "
            f"({time.perf_counter() - t_pass:.1f} s)")
    return cols


# --- fits (numpy only) -------------------------------------------------------------------
def robust_lstsq(design: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, int]:
    """Least squares, then once more without the points beyond ``OUTLIER_SIGMAS`` robust sigmas
    (1.4826 x the median absolute residual): a step hit by a host hiccup must not tilt a line.
    Returns (coefficients, points kept)."""
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    res = y - design @ coef
    sigma = 1.4826 * float(np.median(np.abs(res - np.median(res))))
    keep = np.abs(res) <= OUTLIER_SIGMAS * sigma if sigma > 0 else np.ones(len(y), bool)
    if keep.sum() >= design.shape[1] and not keep.all():
        coef, *_ = np.linalg.lstsq(design[keep], y[keep], rcond=None)
    return coef, int(keep.sum())


def _padded(sizes: list[int], n: int) -> int:
    i = int(np.searchsorted(sizes, n))
    return sizes[i] if i < len(sizes) else 0


def classify(profile: dict[str, Any], shape: Any) -> tuple[str, int]:
    """("graph", G), ("mixed", M) or ("eager", 0): how the executor ran a step of this shape."""
    over = profile["overhead"]
    graph_sizes = sorted(int(g) for g in over.get("graph_sizes", []))
    mixed_sizes = sorted(int(m) for m in over.get("mixed_graph_sizes", []))
    if shape.num_decode == shape.num_reqs and 0 < shape.num_reqs <= int(over.get("graph_max_batch", 0)):
        return "graph", _padded(graph_sizes, shape.num_reqs)
    if mixed_sizes and shape.num_tokens <= mixed_sizes[-1]:
        return "mixed", _padded(mixed_sizes, shape.num_tokens)
    return "eager", 0


def fit_step_tables(profile: dict[str, Any], cols: dict[str, list[float]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``step_fits`` for ``profile`` (its op tables and sizes) from the sweep's columns, and a
    summary (points and median |residual| per class, for the log and ``meta``)."""
    from simulator.cost_model.base import BatchShape
    from simulator.cost_model.calibrated import CalibratedCostModel

    base = {k: v for k, v in profile.items() if k != "step_fits"}
    base["overhead"] = {**base["overhead"], "eager_s": 0.0, "graph_s": 0.0, "cpu_per_request_s": 0.0,
                        "mixed_graph_s": 0.0}
    base.pop("eager_floor", None)
    device = CalibratedCostModel(base)
    groups: dict[tuple[str, int], list[tuple[Any, float, float]]] = {}
    for i, wall in enumerate(cols["wall_s"]):
        shape = BatchShape(*(int(cols[f][i]) for f in SAMPLE_FIELDS[1:]))
        kind, size = classify(profile, shape)
        timing = device.step_time(shape)
        dev = timing.total - (timing.breakdown["attn_decode"] if kind == "graph" else 0.0)
        groups.setdefault((kind, size), []).append((shape, float(wall), dev))
    fits: dict[str, Any] = {}
    summary: dict[str, Any] = {}

    def solve(rows: list[tuple[Any, float, float]], terms: Callable[[Any], list[float]]) -> tuple[list[float], int]:
        design = np.array([[1.0, *terms(s)] for s, _, _ in rows])
        y = np.array([w - d for _, w, d in rows])
        coef, kept = robust_lstsq(design, y)
        return [float(c) for c in coef], kept

    graph = sorted((size, rows) for (kind, size), rows in groups.items() if kind == "graph")
    if graph:
        fits["graph_decode"] = {"graph_size": [], "coef": [], "points": []}
        for size, rows in graph:
            coef, kept = solve(rows, lambda s: [s.num_reqs, s.decode_context, s.max_decode_context])
            fits["graph_decode"]["graph_size"].append(size)
            fits["graph_decode"]["coef"].append(coef)
            fits["graph_decode"]["points"].append(kept)
    mixed = sorted((size, rows) for (kind, size), rows in groups.items() if kind == "mixed")
    if mixed:
        every = [r for _, rows in mixed for r in rows]
        shared, kept_all = solve(every, lambda s: [s.num_reqs, s.decode_context, s.num_tokens])
        fits["mixed_graph"] = {"graph_size": [], "coef": [], "points": [], "shared_coef": shared}
        for size, rows in mixed:
            if len(rows) >= MIN_POINTS_PER_SIZE:
                coef, kept = solve(rows, lambda s: [s.num_reqs, s.decode_context])
                fits["mixed_graph"]["graph_size"].append(size)
                fits["mixed_graph"]["coef"].append(coef)
                fits["mixed_graph"]["points"].append(kept)
    eager = groups.get(("eager", 0), [])
    if len(eager) >= 5:
        coef, kept = solve(eager, lambda s: [s.num_reqs, s.decode_context, s.num_tokens])
        fits["eager"] = {"coef": coef, "points": kept}
    model = CalibratedCostModel({**profile, "step_fits": fits})
    for (kind, size), rows in sorted(groups.items()):
        err = [abs(model.step_time(s).total - w) / w for s, w, _ in rows]
        summary.setdefault(kind, {"size": [], "n": [], "median_abs_rel_err": []})
        summary[kind]["size"].append(size)
        summary[kind]["n"].append(len(rows))
        summary[kind]["median_abs_rel_err"].append(round(float(np.median(err)), 4))
    return fits, summary


def samples_columns(cols: dict[str, list[float]]) -> dict[str, list[float]]:
    """The sweep's columns for the profile's ``samples`` (walls in microseconds, 0.1 us)."""
    out: dict[str, list[float]] = {f: [int(v) for v in cols[f]] for f in SAMPLE_FIELDS}
    out["wall_us"] = [round(w * 1e6, 1) for w in cols["wall_s"]]
    return out


def columns_from_samples(samples: dict[str, list[float]]) -> dict[str, list[float]]:
    """Inverse of ``samples_columns`` (refits from a stored profile)."""
    cols: dict[str, list[float]] = {f: list(samples[f]) for f in SAMPLE_FIELDS}
    cols["wall_s"] = [w * 1e-6 for w in samples["wall_us"]]
    return cols
