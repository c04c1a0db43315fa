"""Serving-shaped engine steps and the step fits of a v2 profile (``step_fits``).

Why: summing op timings measured in isolation mispredicts whole steps by amounts that depend
on the CUDA-graph size and the spread of contexts (the H200 validation found graph decode
steps 2.3 ms too fast at 32 padded rows and long contexts and 2.3 ms too slow at 48, and the
mixed-graph steps 0.3-0.7 ms too slow). So the profiler also times *whole* steps shaped the
way serving runs them, and fits what the op tables leave over, per graph size:

* **the sweep** (``measure_step_sweep``): a real ``EngineCore`` on the ``RealBackend`` with
  ``N`` requests of spread prompt lengths decodes while one random request is aborted every
  few steps (``steps_per_batch``, more for small batches), so the batch walks down through
  every size from ``N`` to 1 (every decode graph, and every padding count inside it) at
  realistic, unequal contexts; every ``inject_every``-th step a fresh prompt joins, which
  makes that step a mixed-graph or eager step beside the decoders. Passes (``SweepPass``)
  differ in context level, in how many decoders sit beside the prompts and in the token
  budget (chunks). Aborts and additions happen between timed steps. Graph decode steps that
  follow a step with prefill tokens are left out of the graph lines (they pay 40-120 us
  more, and serving decodes mostly after decode steps).
* **the fits** (``fit_step_tables``, no torch): least squares made robust to host hiccups
  (``robust_lstsq``: a Huber fit, then points beyond 3.5 robust sigmas of it dropped):

  - a graph decode step of padded size ``G``: ``wall - non-attention device ops(G)`` ~
    ``a_G + b_G * num_reqs + c_G * sum_context + d * max_context``, fitted jointly over all
    sizes with one ``d`` for the graphs that split the keys and one for those that do not
    (the context terms become the step's ``attn_decode``, the rest its ``cpu_overhead``).
    Why one ``d`` per regime: within one size the sweep's longest context moves almost in
    step with the sum, so per-size ``d`` came out anywhere from -4.7 to +8.6 us per token
    and extrapolated to serving's contexts by up to 50 %; physically ``d`` is the rate of
    one program walking one long request, which does not depend on the padding;
  - a mixed-graph step of padded size ``M``: ``wall - device ops`` ~ ``a_M + f(num_decode) +
    c * decode_context + e * context before its prefill chunks``, jointly (one ``a`` per
    size; ``f`` piecewise linear over ``DECODE_KNOTS`` and the slopes shared: serving's mixed
    steps mostly carry 4-8 decoders, and per-size slopes fitted on a sweep dominated by large
    batches missed them by 5-15 %);
  - an eager step: ``wall - device ops`` ~ ``a + d * num_tokens + b * num_reqs +
    c * decode_context + e * context before its prefill chunks``, one fit over the steps
    whose device time is above the launch floor the eager rounds measured (``eager_floor``
    + ``eager_s``); the model keeps a floor under every eager step (on the H200 a
    2,000-4,000-token eager step takes 18-20 ms however little device work it has). A floor
    line fitted to the sweep's launch-bound steps instead (``f0 + f1 * num_reqs + f2 *
    num_tokens``) was tried and predicted serving worse (TTFT p50 6.8 % vs 4.0 %).

The wall of a step is from its start to the next step's start (as ``experiments.validate``
measures real runs), so it includes scheduling, input preparation, the launch or replay, the
wait for the device, sampling and the engine's update.
"""
from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

FULL_INJECT_TOKENS = (8, 20, 40, 90, 150, 230, 300, 450, 560, 700, 900, 1150, 1400, 1700, 1950,
                      2600, 3500, 5000, 7000)
QUICK_INJECT_TOKENS = (4, 12, 30, 90)


@dataclass(frozen=True)
class SweepPass:
    """One pass: ``requests`` decoders with prompts of ``shortest..longest`` tokens, the batch
    shrinking by one every ``steps_per_batch`` steps; a fresh prompt (``inject_tokens`` in turn)
    before every ``inject_every``-th step; ``max_num_batched_tokens`` (default: the runner's)
    below a prompt's length makes it arrive in chunks, as with chunked prefill in serving."""

    requests: int
    shortest: int
    longest: int
    steps_per_batch: int
    inject_every: int = 4
    inject_tokens: tuple[int, ...] = FULL_INJECT_TOKENS
    max_num_batched_tokens: int | None = None


# Full passes keep prompts + growth inside the 32768-block (524k-token) pool validation uses:
# every graph size at short, medium and long contexts; then the shapes serving has most of
# at low load (the first three passes reach them only at their very end, with grown
# contexts): small batches of short requests, steps with prefill tokens beside a few
# decoders, whole prompts and chunks of long ones.
FULL_PASSES = (SweepPass(256, 32, 1024, 3), SweepPass(256, 800, 2000, 3), SweepPass(48, 3000, 12000, 4),
               SweepPass(16, 16, 600, 12),
               SweepPass(16, 64, 3000, 12, inject_every=2),
               SweepPass(16, 200, 3000, 10, inject_every=8, inject_tokens=(1100, 2000, 3000, 4000),
                         max_num_batched_tokens=512),
               SweepPass(8, 50, 1500, 60, inject_every=1 << 30))  # long runs of pure decoding
QUICK_PASSES = (SweepPass(6, 8, 40, 1, inject_tokens=QUICK_INJECT_TOKENS),
                SweepPass(3, 60, 120, 2, inject_tokens=QUICK_INJECT_TOKENS),
                SweepPass(2, 8, 40, 2, inject_every=3, inject_tokens=(90,), max_num_batched_tokens=40))
# Small batches get more steps (at least this many divided by the batch size): serving spends
# most of its steps at low load there, and one batch size has only a few graph sizes near it.
SMALL_BATCH_STEPS = 96
OUTLIER_SIGMAS = 3.5
MIN_EAGER_POINTS = 25  # five coefficients: fewer device-bound eager steps keep the older eager terms
# Knots of the mixed steps' leftover vs their decode rows: it is not linear in them (the H200
# sweep: +25 % at 1-2 decoders, -4 % at 16-64 with one per-request slope).
DECODE_KNOTS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256)
MIN_SIGMA_S = 1e-6  # step walls are not steadier than a microsecond
HUBER_K = 1.345  # the usual Huber constant (95% efficiency on normal noise)
LEVEL_ROUNDS = 2  # pooled sweeps: fits with the (pass, source) levels (the second round moved them by up
# to 6 us on H200 session 6b's sweeps and up to 40 us on 6a's, where one pass ran ~200 us slow)

SAMPLE_FIELDS = ("pass_", "num_reqs", "num_tokens", "num_sampling", "num_decode", "decode_context",
                 "prefill_tokens", "prefill_context", "prefill_pairs", "max_decode_context")


def measure_step_sweep(backend: Any, quick: bool, log: Callable[[str], None], seed: int = 7,
                       passes: Sequence[SweepPass] | None = None) -> dict[str, list[float]]:
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
    cols: dict[str, list[float]] = {f: [] for f in (*SAMPLE_FIELDS, "wall_s")}
    for p, spec in enumerate(passes or (QUICK_PASSES if quick else FULL_PASSES)):
        n_req, lo, hi, per = spec.requests, spec.shortest, spec.longest, spec.steps_per_batch
        n_req = min(n_req, runner.max_num_seqs)
        inject = [t for t in spec.inject_tokens if t < runner.max_model_len] or [1]
        every = spec.inject_every
        token_budget = min(spec.max_num_batched_tokens or runner.max_num_batched_tokens,
                           runner.max_num_batched_tokens)
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
                                            max_num_batched_tokens=token_budget,
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
        timed: list[tuple[Any, float]] = []  # (scheduler output, wall): shapes are built after the pass,
        # so that no bookkeeping of the sweep lands inside the next step's wall

        def close(now: float) -> None:
            nonlocal prev
            if prev is not None:
                timed.append((prev[0], now - prev[1]))
            prev = None

        for steps in schedule:
            for _ in range(steps):
                if k % every == every - 1:
                    close(time.perf_counter())
                    t = inject[(k // every) % len(inject)]
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
        for out, wall in timed:
            shape = BatchShape.from_scheduler_output(out)
            cols["pass_"].append(p)
            for f in SAMPLE_FIELDS[1:]:
                cols[f].append(getattr(shape, f))
            cols["wall_s"].append(wall)
        log(f"  sweep pass {p}: {n_req} requests of {lo}..{hi} tokens, {token_budget}-token budget, {k} steps "
            f"({time.perf_counter() - t_pass:.1f} s)")
    return cols


# --- fits (numpy only) -------------------------------------------------------------------
def robust_lstsq(design: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, int]:
    """A step hit by a host hiccup must not tilt a line: Huber-weighted least squares (iterated
    reweighting), then one plain fit without the points beyond ``OUTLIER_SIGMAS`` robust sigmas
    (1.4826 x the median absolute residual, at least ``MIN_SIGMA_S``) of the Huber fit.
    Why not trim from a plain first fit: outliers tilt that fit, so good points of a size with
    few steps can be trimmed instead, leaving that size's line underdetermined.
    Returns (coefficients, points kept)."""
    def spread(res: np.ndarray) -> float:
        return max(1.4826 * float(np.median(np.abs(res - np.median(res)))), MIN_SIGMA_S)

    w = np.ones(len(y))
    coef = np.zeros(design.shape[1])
    for _ in range(20):
        sw = np.sqrt(w)
        coef, *_ = np.linalg.lstsq(design * sw[:, None], y * sw, rcond=None)
        res = y - design @ coef
        k = HUBER_K * spread(res)
        new = np.minimum(1.0, k / np.maximum(np.abs(res), 1e-300))
        if np.allclose(new, w, rtol=1e-6, atol=1e-9):
            break
        w = new
    keep = np.abs(res) <= OUTLIER_SIGMAS * spread(res)
    if keep.sum() >= design.shape[1]:
        coef, *_ = np.linalg.lstsq(design[keep], y[keep], rcond=None)
    return coef, int(keep.sum())


def fit_step_tables(profile: dict[str, Any], cols: dict[str, list[float]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``step_fits`` for ``profile`` (its op tables and sizes) from the sweep's columns, and a
    summary (points and median |residual| per class, for the log and ``meta``)."""
    from simulator.cost_model.base import BatchShape
    from simulator.cost_model.calibrated import EAGER, GRAPH, MIXED, CalibratedCostModel

    device = device_only_model(profile)
    groups: dict[tuple[str, int], list[tuple[Any, float, float]]] = {}
    prev_kind, prev_pass = None, None
    for i, wall in enumerate(cols["wall_s"]):
        shape = BatchShape(*(int(cols[f][i]) for f in SAMPLE_FIELDS[1:]))
        kind, size = device.step_kind(shape)
        size = 0 if kind == EAGER else size  # one eager line for all token counts
        follows_graph = prev_kind == GRAPH and prev_pass == cols["pass_"][i]
        prev_kind, prev_pass = kind, cols["pass_"][i]
        if kind == GRAPH and not follows_graph:
            continue  # see the module docstring: the graph lines are for steady decoding
        timing = device.step_time(shape)
        dev = timing.total - (timing.breakdown["attn_decode"] if kind == GRAPH else 0.0)
        groups.setdefault((kind, size), []).append((shape, float(wall), dev))
    fits: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    split_max = int(profile["attn_decode"].get("split_max_batch", 0))
    graph = sorted((size, rows) for (kind, size), rows in groups.items() if kind == GRAPH)
    if graph:
        fits["graph_decode"] = joint_fit(
            graph, lambda s: [1.0, s.num_reqs, s.decode_context],
            lambda size, s: [s.max_decode_context, 0.0] if size <= split_max else [0.0, s.max_decode_context],
            lambda size, shared: [shared[0] if size <= split_max else shared[1]])
    mixed = sorted((size, rows) for (kind, size), rows in groups.items() if kind == MIXED)
    if mixed:
        k = len(DECODE_KNOTS)
        fit = joint_fit(mixed, lambda s: [1.0], lambda size, s: [*hat_weights(s.num_decode), *_shared_terms(s)[1:]],
                        lambda size, shared: shared[k:])
        fit["decodes"] = {"knots": list(DECODE_KNOTS), "seconds": fit["shared"][:k]}
        fits["mixed_graph"] = fit
    floor = CalibratedCostModel({k: v for k, v in profile.items() if k != "step_fits"}).launch_floor
    every = groups.get((EAGER, 0), [])
    eager = [r for r in every if r[2] >= floor(r[0].num_tokens)]  # device-bound ones
    if len(eager) >= MIN_EAGER_POINTS:
        fit = joint_fit([(0, eager)], lambda s: [1.0, s.num_tokens], lambda size, s: _shared_terms(s),
                        lambda size, shared: shared)
        fits["eager"] = {"coef": fit["coef"][0], "points": fit["points"][0]}
    model = CalibratedCostModel({**profile, "step_fits": fits})
    for (kind, size), rows in sorted(groups.items()):
        err = [abs(model.step_time(s).total - w) / w for s, w, _ in rows]
        summary.setdefault(kind, {"size": [], "n": [], "median_abs_rel_err": []})
        summary[kind]["size"].append(size)
        summary[kind]["n"].append(len(rows))
        summary[kind]["median_abs_rel_err"].append(round(float(np.median(err)), 4))
    return fits, summary


def level_sources(profile: dict[str, Any], cols: dict[str, list[float]], sources: Sequence[int],
                  passes: Sequence[int], rounds: int = LEVEL_ROUNDS) -> tuple[dict[str, list[float]], dict[int, list[float]]]:
    """Bring every (pass, source) group of pooled sweeps to the level of the median source's
    run of the same pass: shift its walls by its median residual (against the pooled fit) minus
    the median of those over the sources, then refit; ``rounds`` times.
    Why: a profiling process now and then runs a whole pass slow (a sweep pass of 1-10 s ran
    its 1-8-request decode steps 140-230 us slower in one of three processes on one H200, while
    three serving runs there agreed to 1-2 %); an average over processes would carry a third of
    that, the median process carries none of it. Returns the shifted columns and, per pass,
    each source's shift in microseconds."""
    from simulator.cost_model.base import BatchShape
    from simulator.cost_model.calibrated import CalibratedCostModel

    wall = np.asarray(cols["wall_s"], dtype=float)
    src, orig = np.asarray(sources), np.asarray(passes)
    shapes = [BatchShape(*(int(cols[f][i]) for f in SAMPLE_FIELDS[1:])) for i in range(len(wall))]
    shift = np.zeros(len(wall))
    out = dict(cols)
    for _ in range(rounds):
        out["wall_s"] = (wall - shift).tolist()
        fits, _ = fit_step_tables(profile, out)
        model = CalibratedCostModel({**profile, "step_fits": fits})
        res = wall - np.array([model.step_time(s).total for s in shapes])
        for p in np.unique(orig):
            groups = {int(k): (orig == p) & (src == k) for k in np.unique(src[orig == p])}
            level = {k: float(np.median(res[g])) for k, g in groups.items()}
            mid = float(np.median(list(level.values())))
            for k, g in groups.items():
                shift[g] = level[k] - mid
    out["wall_s"] = (wall - shift).tolist()
    offsets = {int(p): [round(float(shift[(orig == p) & (src == k)][0]) * 1e6, 1) if np.any((orig == p) & (src == k))
                        else 0.0 for k in range(int(src.max()) + 1)] for p in np.unique(orig)}
    return out, offsets


def device_only_model(profile: dict[str, Any]) -> Any:
    """A ``CalibratedCostModel`` of ``profile``'s device tables alone: no step fits, no per-step or
    per-request CPU terms, no launch floor (what the step fits and the overhead fit start from)."""
    from simulator.cost_model.calibrated import CalibratedCostModel

    p = {k: v for k, v in profile.items() if k not in ("step_fits", "eager_floor")}
    p["overhead"] = {**p["overhead"], "eager_s": 0.0, "graph_s": 0.0, "cpu_per_request_s": 0.0, "mixed_graph_s": 0.0}
    return CalibratedCostModel(p)


def hat_weights(x: float, knots: Sequence[float] = DECODE_KNOTS) -> list[float]:
    """Weights of ``x`` on the piecewise-linear (hat) basis over ``knots`` (clamped at both ends):
    a least-squares fit over these columns is a measured curve through the knots."""
    w = [0.0] * len(knots)
    if x <= knots[0]:
        w[0] = 1.0
    elif x >= knots[-1]:
        w[-1] = 1.0
    else:
        i = bisect.bisect_right(knots, x) - 1
        t = (x - knots[i]) / (knots[i + 1] - knots[i])
        w[i], w[i + 1] = 1.0 - t, t
    return w


def _shared_terms(s: Any) -> list[float]:
    """Per request, per decode-context token, per token of context before the prefill chunks."""
    return [s.num_reqs, s.decode_context, s.prefill_context - s.prefill_tokens]


def joint_fit(groups: list[tuple[int, list[tuple[Any, float, float]]]], own: Callable[[Any], list[float]],
              shared: Callable[[int, Any], list[float]],
              shared_coef: Callable[[int, list[float]], list[float]]) -> dict[str, Any]:
    """``wall - device`` ~ ``own(shape)`` with coefficients of its own per size, plus
    ``shared(size, shape)`` with coefficients common to all sizes, in one least-squares fit.
    Each size's coefficient list is its own ones followed by ``shared_coef(size, shared)``.
    Why shared terms: a per-size slope fitted from a few dozen steps whose contexts move together
    extrapolates wildly (see the module docstring); a slope that physics says is the same for
    every size is better measured once, from all of them."""
    num_own = len(own(groups[0][1][0][0]))
    num_shared = len(shared(groups[0][0], groups[0][1][0][0]))
    rows = [(i, size, r) for i, (size, rs) in enumerate(groups) for r in rs]
    design = np.zeros((len(rows), num_own * len(groups) + num_shared))
    y = np.empty(len(rows))
    for k, (i, size, (shape, wall, dev)) in enumerate(rows):
        design[k, num_own * i:num_own * (i + 1)] = own(shape)
        design[k, num_own * len(groups):] = shared(size, shape)
        y[k] = wall - dev
    coef, _ = robust_lstsq(design, y)
    common = [float(c) for c in coef[num_own * len(groups):]]
    return {"graph_size": [size for size, _ in groups], "shared": common,
            "coef": [[float(c) for c in coef[num_own * i:num_own * (i + 1)]] + shared_coef(size, common)
                     for i, (size, _) in enumerate(groups)],
            "points": [len(rs) for _, rs in groups]}


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
