# ruff: noqa: B023  (closures timed immediately, inside their loop iteration)
"""Profile the executor's ops on this machine and write a ``servelab-profile-v2`` JSON.

    python -m experiments.profile --model-dir DIR --out experiments/profiles/NAME.json

What is timed (GPU: CUDA events around CUDA-graph replays of the op for all layers, so
the numbers are pure device time without launch gaps; warm-ups first, median of repeats):

* per-token ops vs the step's new tokens: ``qkv_proj``, ``o_proj``, ``mlp`` (gate/up GEMM,
  SwiGLU, down GEMM) and ``norm_rotary`` (fused add+RMSNorm x2, q/k-norm, rotary, KV store,
  plus the embedding gather and the final norm), each over all layers;
* ``lm_head`` and ``sampling`` (the runner's fused temperature sampler) vs sampled rows;
* attention with ``executor.kernels.paged_attention`` on the runner's real paged KV pool:
  decode vs (batch, context) exactly as the decode CUDA graphs launch it (the padded size
  and the split-K its captured graph uses), only up to the profiling pool's size; the
  latency batch with one long request among short ones (``attn_decode.lone_latency``);
  decode rows tiled as beside a prefill chunk, unsplit as an eager step launches them
  (``attn_decode_eager``) and split as the mixed-step graphs launch them
  (``attn_decode_mixed``, with its ``splits``); decode batches with
  evenly spread contexts (``meta.attn_decode_uneven``, a diagnostic for a wave-aware term);
  prefill vs (chunk, context) as an eager step launches it;
* real ``EngineCore`` steps on the ``RealBackend``: right after start-up, pure-decode steps
  (CUDA graphs), lone prefills and a cold pass of serving-like eager steps (16 decodes + one
  fresh prompt; a diagnostic); after the op timings, the fitted eager steps in interleaved
  rounds (``measure_eager_rounds``): each round visits every prompt size of those steps and
  the eager steps after graph steps and after idling, each paired with the same step run
  right after it (``overhead.eager_after_graph_s`` / ``eager_after_idle_s``: the median
  difference), in shuffled order, and reads the GPU and CPU clocks at its start and end;
  slow rounds are left out of the fit (``steady_rounds``), and every step's wall is kept
  in the profile's ``samples`` with one summary row per round. A step's wall time
  (start of one step to the start of the next: scheduling, input preparation, launch,
  sampling, the engine's update) minus the device time the tables predict gives the CPU
  terms: ``graph_s`` + ``cpu_per_request_s`` per request for graph steps; for eager steps,
  which are bound by the CPU launching a few hundred kernels, ``max(eager_floor(tokens),
  device) + eager_s`` (see ``fit_eager_v2``).

The profile is written in format v2 (``simulator/cost_model/calibrated.py`` describes it);
``--v2-from-v1`` converts a v1 file written by the earlier version of this module from the
raw data it kept, and ``--refit-eager`` still redoes that earlier version's v1 eager fit.
This module imports neither simpy nor hydra (the GPU machine has neither).

Unlike v1, the tables stay raw device times (no eager adjustment, no per-request CPU folded
into attention), and decode attention is the measured grid itself. Decode points whose KV
would exceed the profiling pool are not measured (their block tables would reuse blocks;
in the v1 profile such points ran up to 1.6x faster than real serving, likely L2 hits).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments.profile_steps import (columns_from_samples, device_only_model, fit_step_tables, level_sources,
                                      measure_step_sweep, samples_columns)

PROFILE_FORMAT = "servelab-profile-v2"
PROFILE_FORMAT_V1 = "servelab-profile-v1"

FULL_TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 192, 256, 384, 512, 1024, 2048, 4096, 8192]
QUICK_TOKENS = [1, 4, 16, 64, 256, 512]
FULL_ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
QUICK_ROWS = [1, 4, 16]
FULL_DECODE = [(b, c) for b in (1, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256)
               for c in (128, 512, 1024, 2048, 4096, 8192, 16384) if b * c <= 1 << 20]
QUICK_DECODE = [(b, c) for b in (1, 4) for c in (32, 128)]
# Decode rows beside a prefill chunk (eager steps): the chunk's query length picks the kernel's
# 64-row query tile for every block.
EAGER_TILE_QUERY_LEN = 64
FULL_DECODE_EAGER = [(b, c) for b in (1, 4, 16, 32, 64, 128, 256) for c in (512, 2048, 8192) if b * c <= 1 << 20]
QUICK_DECODE_EAGER = [(b, c) for b in (1, 4) for c in (32, 128)]
FULL_LONE_CONTEXTS = [512, 1024, 2048, 4096, 8192, 16384]  # one long request in the latency batch
QUICK_LONE_CONTEXTS = [64, 128]
FULL_DECODE_UNEVEN = [(b, c) for b in (32, 64, 128, 256) for c in (512, 1024, 2048)]  # diagnostic
QUICK_DECODE_UNEVEN = [(4, 64)]
FULL_PREFILL = [(n, n + c) for n in (16, 64, 256, 512, 1024, 2048, 4096, 8192) for c in (0, 1024, 4096)]
QUICK_PREFILL = [(n, n + c) for n in (8, 32, 128) for c in (0, 64)]
# Real engine steps for the overhead fit.
FULL_DECODE_BATCHES = [1, 4, 16, 32, 64, 128, 256]
QUICK_DECODE_BATCHES = [1, 4]
FULL_PREFILL_STEPS = [32, 128, 240, 512, 1024, 2048, 4096]
QUICK_PREFILL_STEPS = [16, 64]
MIXED_DECODES = 16  # decodes running beside each measured prefill
AFTER_PREFILLS = [144, 528, 2064]  # eager steps after graph steps / after idling (paired)
AFTER_GRAPH_STEPS = 8
AFTER_IDLE_S = 0.3
# The fitted eager steps run in rounds, each visiting every mixed prompt size and one after-graph
# and one after-idle pair per size in shuffled order: 12 pairs per size (the switch cost is
# ~1 ms on ~13 ms steps) and 12 samples per mixed size; a slow period of the host then hits
# every size alike and shows as slow rounds (``steady_rounds``).
EAGER_ROUNDS = 12
QUICK_EAGER_ROUNDS = 3
EAGER_ROUNDS_SEED = 3
STEADY_REFERENCE_QUANTILE = 0.25  # per step kind and size: the fast level a slow period cannot undercut
DRIFT_LIMIT = 1.10  # a round segment more than 10% above that level (median over its steps) is slow


# --- timing -------------------------------------------------------------------------------
class Timer:
    """Median seconds of ``fn``: CUDA-graph replays timed by CUDA events on a GPU (eager
    launches with events if capture fails), ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device, repeats: int = 7, warmup: int = 2) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.repeats = repeats
        self.warmup = warmup
        self.graph_failures = 0

    def __call__(self, fn: Callable[[], Any], graph: bool = True) -> float:
        if not self.cuda:
            for _ in range(max(1, self.warmup // 2)):
                fn()
            times = []
            for _ in range(max(2, self.repeats // 2)):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return statistics.median(times)
        for _ in range(self.warmup):
            fn()
        torch.cuda.synchronize(self.device)
        run = fn
        g = None
        if graph:
            try:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    fn()
                g.replay()  # one untimed replay
                run = g.replay
            except Exception:  # noqa: BLE001 - fall back to eager event timing
                self.graph_failures += 1
                g = None
                torch.cuda.synchronize(self.device)
                run = fn
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeats)]
        for s, e in zip(starts, ends):
            s.record()
            run()
            e.record()
        torch.cuda.synchronize(self.device)
        t = statistics.median(s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends))
        del g
        return t


# --- op timings ---------------------------------------------------------------------------
class OpProfiler:
    def __init__(self, backend: Any, quick: bool, log: Callable[[str], None]) -> None:
        from executor import memory

        self.backend = backend
        self.runner = backend.runner
        self.model = self.runner.model
        self.cfg = self.runner.config
        self.device = self.runner.device
        self.dtype = self.cfg.dtype
        self.layers = list(self.model.model.layers)
        self.caches = memory.layer_views(self.runner.kv_pool)
        self.bs = self.runner.block_size
        self.num_blocks = self.runner.num_gpu_blocks
        self.timer = Timer(self.device, repeats=5 if quick else 9)
        self.quick = quick
        self.log = log
        self.gen = torch.Generator(device="cpu").manual_seed(0)

    def _randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen).to(self.device, self.dtype)

    def _clamp_tokens(self, grid: list[int]) -> list[int]:
        limit = self.runner.max_num_batched_tokens
        return [t for t in grid if t <= limit]

    def per_token_ops(self, tokens: list[int]) -> dict[str, list[float]]:
        cfg, layers = self.cfg, self.layers
        out: dict[str, list[float]] = {"qkv_proj": [], "o_proj": [], "mlp": [], "norm_rotary": []}
        hk, d = cfg.num_key_value_heads, cfg.head_dim
        max_slots = self.num_blocks * self.bs
        for t in tokens:
            x = self._randn(t, cfg.hidden_size)
            res = self._randn(t, cfg.hidden_size)
            a = self._randn(t, cfg.q_size)
            out["qkv_proj"].append(self.timer(lambda: [l.self_attn.qkv_proj(x) for l in layers]))
            out["o_proj"].append(self.timer(lambda: [l.self_attn.o_proj(a) for l in layers]))
            out["mlp"].append(self.timer(lambda: [l.mlp(x) for l in layers]))
            q = self._randn(t, cfg.num_attention_heads, d)
            k = self._randn(t, hk, d)
            v = self._randn(t, hk, d)
            positions = torch.arange(t, device=self.device) % cfg.max_position_embeddings
            slots = (torch.arange(t, device=self.device, dtype=torch.int64) % max_slots)
            ids = torch.randint(0, cfg.vocab_size, (t,), generator=self.gen).to(self.device)
            model = self.model
            caches = self.caches
            from executor.layers import get_kernel_ops

            ops = get_kernel_ops()

            def norm_rotary() -> None:
                model.model.embed_tokens(ids)
                for i, l in enumerate(layers):
                    att = l.self_attn
                    l.input_layernorm(x, res)
                    qq, kk = q, k
                    if att.q_norm is not None:
                        qq, kk = att.q_norm(q), att.k_norm(k)
                    att.rotary_emb(positions, qq, kk)
                    ops.store_kv(k, v, caches[i][0], caches[i][1], slots)
                    l.post_attention_layernorm(x, res)
                model.model.norm(x, res)

            out["norm_rotary"].append(self.timer(norm_rotary))
            self.log(f"  tokens {t:5d}: qkv {out['qkv_proj'][-1] * 1e6:8.1f} us  o {out['o_proj'][-1] * 1e6:8.1f} us  "
                     f"mlp {out['mlp'][-1] * 1e6:8.1f} us  norm/rot {out['norm_rotary'][-1] * 1e6:8.1f} us")
        return out

    def lm_head_and_sampling(self, rows: list[int]) -> tuple[list[float], list[float]]:
        from executor.sampler import SamplingBatch, sample

        w = self.runner._lm_head_weight
        lm, smp = [], []
        for r in rows:
            h = self._randn(r, self.cfg.hidden_size)
            if w is not None:
                lm.append(self.timer(lambda: torch.nn.functional.linear(h, w)))
                logits = torch.nn.functional.linear(h, w)
            else:
                lm.append(self.timer(lambda: self.model.compute_logits(h)))
                logits = self.model.compute_logits(h)
            temps = torch.ones(r, device=self.device, dtype=torch.float32)
            batch = SamplingBatch(all_greedy=False, any_greedy=False, temperature=temps, seed=1234)
            smp.append(self.timer(lambda: sample(logits, batch)))
        self.log(f"  lm_head {[round(x * 1e6, 1) for x in lm]} us; sampling {[round(x * 1e6, 1) for x in smp]} us")
        return lm, smp

    def _tables(self, lens: list[int]) -> torch.Tensor:
        """Block tables of requests with these context lengths over distinct pool blocks
        (a random permutation, so reads are scattered as in a long-running server)."""
        bs = self.bs
        need = [-(-n // bs) for n in lens]
        width = max(need)
        width = -(-width // 16) * 16
        perm = torch.randperm(self.num_blocks, generator=self.gen)
        total = sum(need)
        if total > self.num_blocks:  # reuse blocks (only when the pool is smaller than asked)
            perm = perm.repeat(-(-total // self.num_blocks))
        bt = torch.zeros(len(lens), width, dtype=torch.int32)
        o = 0
        for i, n in enumerate(need):
            bt[i, :n] = perm[o:o + n].to(torch.int32)
            o += n
        return bt.to(self.device)

    def mixed_graph_splits(self) -> int | None:
        """The split-K the runner's mixed-step graphs were captured with (None without them)."""
        graphs = getattr(getattr(self.runner, "mixed_graphs", None), "graphs", {}) if self.runner.use_graphs else {}
        return next(iter(graphs.values())).num_splits if graphs else None

    def _time_decode(self, lens: list[int], eager_tile: bool = False,
                     splits: int | None = None) -> tuple[float, int] | None:
        """(seconds over all layers, split-K) of one paged-attention launch over decode rows of
        these context lengths, or None if their KV exceeds the pool (the block tables would
        reuse blocks: L2 hits). By default launched exactly as a captured decode graph launches
        it: the split-K of the graph of the padded size (the runner may raise the heuristic's
        choice) and ``max_seq_len`` = ``max_model_len``. ``eager_tile``: decode rows beside a
        prefill chunk, where the chunk's ``max_query_len`` makes the kernel tile every query
        block for 64 rows; an eager step launches them unsplit (a serving chunk adds enough
        query blocks to fill the GPU), a mixed-step graph with its captured ``splits`` and
        ``max_seq_len`` = ``max_model_len``."""
        from executor.kernels import choose_num_splits, paged_attention

        cfg = self.cfg
        b, max_len = len(lens), self.runner.max_model_len
        if max(lens) > max_len or sum(-(-c // self.bs) for c in lens) * self.bs > self.num_blocks * self.bs:
            return None
        q = self._randn(b, cfg.num_attention_heads, cfg.head_dim)
        qsl = torch.arange(b + 1, dtype=torch.int32, device=self.device)
        seq = torch.tensor(lens, dtype=torch.int32, device=self.device)
        bt = self._tables(lens)
        query_len, max_seq = 1, max(lens)
        if eager_tile:
            query_len = EAGER_TILE_QUERY_LEN
            if splits is None:  # an eager step: beside a chunk the launch has enough programs not to split
                splits = 1
            else:  # a mixed-step graph: split and sized for any context, as captured
                max_seq = max_len
        elif self.runner.use_graphs:
            sms = torch.cuda.get_device_properties(self.device).multi_processor_count if self.timer.cuda else 1
            padded = self.runner.graphs.padded_size(b) or b
            captured = getattr(self.runner.graphs, "graphs", {}).get(padded)
            splits = (captured.num_splits if captured is not None else
                      self.runner.attention_num_splits or choose_num_splits(
                          padded, cfg.num_key_value_heads, max_len, sms))
            max_seq = max_len
        caches, scale = self.caches, cfg.head_dim ** -0.5

        def fn() -> None:
            for kc, vc in caches:
                paged_attention(q, kc, vc, qsl, seq, bt, scale, max_query_len=query_len, max_seq_len=max_seq,
                                num_splits=splits)

        return self.timer(fn), int(splits or 1)

    def attn_decode(self, points: list[tuple[int, int]], eager_tile: bool = False,
                    splits: int | None = None) -> dict[str, list[float]]:
        """The decode grid: ``b`` rows of context ``c`` each, per point (see ``_time_decode``)."""
        res: dict[str, list[float]] = {"batch": [], "total_context": [], "seconds": [], "splits": []}
        for b, c in points:
            timed = self._time_decode([c] * b, eager_tile, splits)
            if timed is None:
                continue
            res["batch"].append(b)
            res["total_context"].append(b * c)
            res["seconds"].append(timed[0])
            res["splits"].append(timed[1])
        tile = f" (chunk tile, split {splits})" if eager_tile and splits else " (chunk tile)" if eager_tile else ""
        self.log(f"  attn_decode{tile}: {len(res['seconds'])} points, "
                 f"{min(res['seconds']) * 1e6:.1f}..{max(res['seconds']) * 1e6:.1f} us")
        return res

    def attn_decode_lone(self, batch: int, contexts: list[int], short: int) -> dict[str, Any]:
        """The latency line of serving: ``batch`` rows (a non-split graph size), one of context
        c and the others of ``short``, as the graph launches them. The equal-context grid at
        (batch, c) makes every program as long as the longest; in serving the others are
        shorter and contend less."""
        res: dict[str, Any] = {"batch": batch, "short_context": short, "context": [], "seconds": []}
        for c in contexts:
            timed = self._time_decode([c] + [short] * (batch - 1))
            if timed is not None:
                res["context"].append(c)
                res["seconds"].append(timed[0])
        self.log(f"  attn_decode lone latency (batch {batch}): {[round(x * 1e6, 1) for x in res['seconds']]} us")
        return res

    def attn_decode_uneven(self, points: list[tuple[int, int]]) -> dict[str, list[float]]:
        """Diagnostic for a wave-aware decode term: ``b`` rows whose contexts are spread evenly
        over [1, 2c - 1] (mean c, coefficient of variation ~0.58, like serving batches), as the
        graph launches them; compare with the equal-context grid at (b, c)."""
        res: dict[str, list[float]] = {"batch": [], "mean_context": [], "max_context": [], "seconds": []}
        for b, c in points:
            lens = np.linspace(1, 2 * c - 1, b).round().astype(int).tolist()
            timed = self._time_decode(lens)
            if timed is not None:
                res["batch"].append(b)
                res["mean_context"].append(sum(lens) / b)
                res["max_context"].append(max(lens))
                res["seconds"].append(timed[0])
        self.log(f"  attn_decode uneven: {len(res['seconds'])} points")
        return res

    def attn_prefill(self, points: list[tuple[int, int]]) -> dict[str, list[float]]:
        from executor.kernels import paged_attention

        cfg = self.cfg
        res: dict[str, list[float]] = {"chunk_tokens": [], "context_len": [], "seconds": []}
        scale = cfg.head_dim ** -0.5
        for n, L in points:
            if L > self.runner.max_model_len or n > self.runner.max_num_batched_tokens:
                continue
            q = self._randn(n, cfg.num_attention_heads, cfg.head_dim)
            qsl = torch.tensor([0, n], dtype=torch.int32, device=self.device)
            seq = torch.tensor([L], dtype=torch.int32, device=self.device)
            bt = self._tables([L])
            caches = self.caches

            def fn() -> None:
                for kc, vc in caches:
                    paged_attention(q, kc, vc, qsl, seq, bt, scale, max_query_len=n, max_seq_len=L)

            res["chunk_tokens"].append(n)
            res["context_len"].append(L)
            res["seconds"].append(self.timer(fn))
        self.log(f"  attn_prefill: {len(res['seconds'])} points, "
                 f"{min(res['seconds']) * 1e6:.1f}..{max(res['seconds']) * 1e6:.1f} us")
        return res


# --- real engine steps --------------------------------------------------------------------

def _timed_step(engine: Any, t0: float, prev: tuple[Any, float, float] | None,
                records: list[tuple[Any, float, float]]) -> tuple[Any, float, float] | None:
    """Run one engine step at wall time since ``t0``; record the previous step's wall time as
    (its output, start to this step's start, its measured duration). Returns this step's
    pending record (None for an empty step)."""
    now = time.perf_counter()
    if prev is not None:
        records.append((prev[0], now - prev[1], prev[2]))
    out = engine.step(now - t0)
    so = out.scheduler_output
    return None if so is None or so.is_empty else (so, now, out.duration)

def _engine_steps(backend: Any, sched_kwargs: dict[str, Any], prompts: list[int], max_tokens: int,
                  vocab: int, rng: np.random.Generator, repeats: int = 1) -> list[tuple[Any, float, float]]:
    """Run requests through a fresh EngineCore; returns (scheduler output, wall seconds to
    the next step's start, measured step duration) for each non-empty step but the last."""
    from core.config import SchedulerConfig
    from core.engine import EngineCore
    from core.request import Request
    from core.sampling_params import SamplingParams

    sched = SchedulerConfig(**sched_kwargs)
    records: list[tuple[Any, float, float]] = []
    for rep in range(repeats):
        engine = EngineCore(sched, backend.cache_config, backend, eos_token_id=backend.eos_token_id)
        backend.bind(engine.scheduler.requests)
        backend.runner.reset()
        for i, n in enumerate(prompts):
            ids = rng.integers(3, vocab, size=n).tolist()
            engine.add_request(Request(f"p{rep}-{i}", ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                                       arrival_time=0.0))
        t0 = time.perf_counter()
        prev: tuple[Any, float, float] | None = None
        while engine.has_unfinished():
            prev = _timed_step(engine, t0, prev, records)
    return records


def _predict_device(profile: dict[str, Any], outputs: list[Any]) -> np.ndarray:
    """Device-only prediction of the tables (overheads zeroed) for scheduler outputs."""
    from simulator.cost_model.base import BatchShape
    from simulator.cost_model.calibrated import CalibratedCostModel

    p = json.loads(json.dumps(profile))
    p["overhead"] = {"eager_s": 0.0, "graph_s": 0.0, "graph_max_batch": profile["overhead"]["graph_max_batch"]}
    cm = CalibratedCostModel(p)
    return np.array([cm.step_time(BatchShape.from_scheduler_output(o)).total for o in outputs])


def _is_graph_step(out: Any, graph_max: int) -> bool:
    n = len(out.req_ids)
    return n > 0 and out.total_num_scheduled_tokens == n and n <= graph_max


def _mixed_steps(backend: Any, base: dict[str, Any], num_decodes: int, prefills: list[int], reps: int,
                 vocab: int, rng: np.random.Generator) -> list[tuple[Any, float, float]]:
    """Serving-like eager steps: ``num_decodes`` requests keep decoding while one fresh
    prompt of T tokens (max_tokens=1) is added before each step, so every recorded step
    is ``num_decodes`` decodes plus one whole prefill of T."""
    from core.config import SchedulerConfig
    from core.engine import EngineCore
    from core.request import Request
    from core.sampling_params import SamplingParams

    steps_needed = len(prefills) * reps + 4
    engine = EngineCore(SchedulerConfig(**base), backend.cache_config, backend, eos_token_id=backend.eos_token_id)
    backend.bind(engine.scheduler.requests)
    backend.runner.reset()
    for i in range(num_decodes):
        engine.add_request(Request(f"d{i}", rng.integers(3, vocab, size=32).tolist(),
                                   SamplingParams(max_tokens=steps_needed + 8, ignore_eos=True), arrival_time=0.0))
    t0 = time.perf_counter()
    engine.step(0.0)  # the decoders' prefill
    engine.step(time.perf_counter() - t0)  # one pure decode step (graph)
    records: list[tuple[Any, float, float]] = []
    prev: tuple[Any, float, float] | None = None
    k = 0
    for t in prefills:
        for _ in range(reps):
            engine.add_request(Request(f"m{k}", rng.integers(3, vocab, size=t).tolist(),
                                       SamplingParams(max_tokens=1, ignore_eos=True), arrival_time=0.0))
            k += 1
            prev = _timed_step(engine, t0, prev, records)
    now = time.perf_counter()
    if prev is not None:
        records.append((prev[0], now - prev[1], prev[2]))
    while engine.has_unfinished():  # drain (not recorded)
        for rid in list(engine.scheduler.requests):
            engine.abort_request(rid, 0.0)
    return [r for r in records if len(r[0].req_ids) == num_decodes + 1]


def _mixed_grid(runner: Any, quick: bool, num_dec: int) -> list[int]:
    """Prompt sizes of the mixed eager steps: the grid up to what one step can schedule beside
    ``num_dec`` decodes, plus that limit itself."""
    limit = min(runner.max_num_batched_tokens - num_dec, runner.max_model_len - 1)
    grid = [t for t in (QUICK_PREFILL_STEPS if quick else FULL_PREFILL_STEPS) if t <= limit]
    if limit not in grid and limit > grid[-1]:
        grid.append(limit)
    return grid


def measure_engine_steps(backend: Any, quick: bool, log: Callable[[str], None],
                         seed: int = 0) -> dict[str, list[tuple[Any, float, float]]]:
    """Real engine steps in a fresh process state: pure decode (CUDA graphs) at several batch
    sizes (the graph fit's data), serving-like mixed eager steps (16 decodes + one fresh
    prompt of T tokens, one size at a time: the cold pass, a diagnostic since the eager fit
    uses ``measure_eager_rounds``) and lone fresh prefills (a diagnostic)."""
    runner = backend.runner
    graph_max = max(runner.capture_sizes, default=0)
    vocab = runner.config.vocab_size
    rng = np.random.default_rng(seed)
    base = {"max_num_seqs": runner.max_num_seqs, "max_num_batched_tokens": runner.max_num_batched_tokens,
            "max_model_len": runner.max_model_len}
    gc.collect()
    out: dict[str, list[tuple[Any, float, float]]] = {"decode": [], "mixed": [], "lone_prefill": []}
    num_dec = 2 if quick else MIXED_DECODES
    grid = _mixed_grid(runner, quick, num_dec)
    t = time.perf_counter()
    out["mixed"] = _mixed_steps(backend, base, num_dec, grid, 3 if quick else 8, vocab, rng)
    log(f"  mixed eager steps: {len(out['mixed'])} ({time.perf_counter() - t:.1f} s)")
    for b in (QUICK_DECODE_BATCHES if quick else FULL_DECODE_BATCHES):
        if b > runner.max_num_seqs:
            continue
        recs = _engine_steps(backend, base, [32] * b, 8 if quick else 32, vocab, rng)
        out["decode"] += [r for r in recs if _is_graph_step(r[0], graph_max)]
    for t in grid:
        recs = _engine_steps(backend, {**base, "max_num_seqs": 1}, [t] * (3 if quick else 6), 1, vocab, rng)
        out["lone_prefill"] += [r for r in recs if r[0].total_num_scheduled_tokens == t and len(r[0].req_ids) == 1]
    log(f"  decode graph steps: {len(out['decode'])}, lone prefill steps: {len(out['lone_prefill'])}")
    return out


def _summary_by(records: list[tuple[Any, float, float]], pred: np.ndarray, key: np.ndarray) -> dict[str, Any]:
    wall = np.array([r[1] for r in records])
    dur = np.array([r[2] for r in records])
    u = np.unique(key)
    return {"key": u.tolist(),
            "median_wall_s": [float(np.median(wall[key == k])) for k in u],
            "median_measured_duration_s": [float(np.median(dur[key == k])) for k in u],
            "median_predicted_device_s": [float(np.median(pred[key == k])) for k in u],
            "median_residual_s": [float(np.median((wall - pred)[key == k])) for k in u],
            "n": [int((key == k).sum()) for k in u]}


def fit_overhead(profile: dict[str, Any], records: dict[str, list[tuple[Any, float, float]]],
                 log: Callable[[str], None]) -> dict[str, Any]:
    """Per-step CPU overhead from real engine steps (see the module docstring); edits the
    profile's tables in place and returns the fit's diagnostics."""
    graph_max = profile["overhead"]["graph_max_batch"]
    result: dict[str, Any] = {}
    dec_records = records.get("decode", [])
    if dec_records:
        pred = _predict_device(profile, [r[0] for r in dec_records])
        batch = np.array([len(r[0].req_ids) for r in dec_records], dtype=float)
        summ = _summary_by(dec_records, pred, batch)
        bs_u, med = np.array(summ["key"]), np.array(summ["median_residual_s"])
        if len(bs_u) >= 2:
            per_req, _ = np.polyfit(bs_u, med, 1)
            per_req = max(0.0, float(per_req))
            graph_s = float(np.median(med - per_req * bs_u))
        else:
            per_req, graph_s = 0.0, float(med[0])
        result["decode_by_batch"] = summ
        profile["overhead"]["graph_s"] = graph_s
        profile["overhead"]["cpu_per_decode_request_s"] = per_req
        # Fold the per-request CPU cost into the decode-attention slope (linear in batch).
        dec = profile["attn_decode"]
        dec["seconds"] = [s + per_req * b for s, b in zip(dec["seconds"], dec["batch"])]
        log(f"  graph decode: graph_s {graph_s * 1e6:.1f} us + {per_req * 1e6:.2f} us per decode request")
    if records.get("lone_prefill"):
        recs = records["lone_prefill"]
        pred = _predict_device(profile, [r[0] for r in recs])
        toks = np.array([r[0].total_num_scheduled_tokens for r in recs], dtype=float)
        result["lone_prefill_by_tokens"] = _summary_by(recs, pred, toks)
    mixed = records.get("mixed", [])
    if mixed:
        pred = _predict_device(profile, [r[0] for r in mixed])
        toks = np.array([r[0].total_num_scheduled_tokens for r in mixed], dtype=float)
        summ = _summary_by(mixed, pred, toks)
        eager_s, adjusted = fit_eager(profile, summ["key"], summ["median_residual_s"])
        summ["adjusted"] = adjusted
        result["mixed_by_tokens"] = summ
        log(f"  mixed eager steps: eager_s {eager_s * 1e6:.1f} us; table adjustments above {graph_max} tokens: "
            f"{[(t, round(d * 1e6)) for t, d in adjusted]} us")
    return result


def fit_eager(profile: dict[str, Any], tokens: list[float], residuals: list[float]) -> tuple[float, list[Any]]:
    """``eager_s`` = median residual (wall - predicted device time) of the measured eager
    steps of at most ``graph_max_batch`` tokens; above that, each measured token count's
    residual minus ``eager_s`` is added to the per-token tables (see ``_adjust_tokens``)."""
    graph_max = profile["overhead"]["graph_max_batch"]
    t_u, med = np.asarray(tokens, dtype=float), np.asarray(residuals, dtype=float)
    small = t_u <= graph_max
    eager_s = float(np.median(med[small])) if small.any() else float(med[0])
    profile["overhead"]["eager_s"] = eager_s
    tok = profile["per_token_ops"]
    adjusted = []
    for t, m in zip(t_u.tolist(), med.tolist()):
        if t <= graph_max:
            continue
        _adjust_tokens(tok, int(t), m - eager_s)
        adjusted.append((int(t), m - eager_s))
    if adjusted:  # grid points above graph_max_batch that no step measured: nearest delta
        done = {a for a, _ in adjusted}
        for t in list(tok["num_tokens"]):
            if t > graph_max and t not in done:
                nearest = min(adjusted, key=lambda a: abs(math.log(a[0]) - math.log(t)))
                _adjust_tokens(tok, int(t), nearest[1])
    profile["meta"]["effective_from_tokens"] = graph_max + 1
    return eager_s, adjusted


def refit_eager_from_meta(profile: dict[str, Any]) -> dict[str, Any]:
    """Redo the eager fit of a profile written by an earlier version of this module, whose
    fit used the first (cold) pass of the mixed steps, from the warm second pass it also
    recorded (``meta.mixed_after_op_timings``): per-token tables restored from
    ``raw_device``, device predictions per token count from the first pass (the same step
    shapes, predicted with the raw tables), wall times from the warm pass."""
    meta = profile["meta"]
    first, warm = meta["overhead_fit"]["mixed_by_tokens"], meta["mixed_after_op_timings"]
    if first["key"] != warm["key"]:
        raise ValueError("the two mixed passes measured different token counts")
    profile["per_token_ops"] = json.loads(json.dumps(profile["raw_device"]["per_token_ops"]))
    residuals = [w - p for w, p in zip(warm["median_wall_s"], first["median_predicted_device_s"])]
    _, adjusted = fit_eager(profile, first["key"], residuals)
    meta["eager_fit"] = {"source": "mixed_after_op_timings (warm pass)", "residual_s": residuals,
                         "adjusted": adjusted, "refit": True}
    return profile


def weighted_decode_plane(dec: dict[str, list[float]]) -> tuple[list[float], tuple[float, float, float]]:
    """Relative-error (1/s^2-weighted) least-squares plane ``a + b*batch + c*context`` of the
    decode timings, evaluated back at the measured points. The v1 model refits a plain
    least-squares plane to whatever points it gets, which the few largest points (256 x 4k)
    dominate, so a batch of 1 came out 3x too slow; on the plane's own points the refit
    reproduces this weighted plane exactly."""
    b = np.asarray(dec["batch"], dtype=float)
    c = np.asarray(dec["total_context"], dtype=float)
    s = np.asarray(dec["seconds"], dtype=float)
    x = np.column_stack([np.ones_like(b), b, c])
    w = 1.0 / np.maximum(s, 1e-9)
    coef, *_ = np.linalg.lstsq(x * w[:, None], s * w, rcond=None)
    return (x @ coef).tolist(), (float(coef[0]), float(coef[1]), float(coef[2]))


def _adjust_tokens(tok: dict[str, list[float]], t: int, delta: float) -> None:
    """Add ``delta`` seconds to the per-token ops at grid point ``t`` (inserted if absent):
    a positive delta goes to ``norm_rotary``; a negative one is taken from every op in
    proportion to its size, never below zero."""
    grid = tok["num_tokens"]
    ops = [k for k in tok if k != "num_tokens"]
    if t not in grid:
        i = int(np.searchsorted(grid, t))
        for k in ops:
            tok[k].insert(i, float(np.interp(t, grid, tok[k])))
        grid.insert(i, t)
    i = grid.index(t)
    if delta >= 0:
        tok["norm_rotary"][i] += delta
        return
    total = sum(tok[k][i] for k in ops)
    if total <= 0:
        return
    f = max(0.0, (total + delta) / total)
    for k in ops:
        tok[k][i] *= f


# --- format v2 ------------------------------------------------------------------------------
def decode_regime(batches: list[int], graph_sizes: list[int], num_kv_heads: int, num_sms: int,
                  forced_splits: int | None = None) -> tuple[int, int]:
    """(split_max_batch, latency_batch): the largest decode-graph size whose attention splits
    the keys (``choose_num_splits``' rule: fewer programs, ``batch * kv_heads``, than SMs),
    and the smallest measured grid batch above it (every program walks its whole context)."""
    if forced_splits is not None:
        split_max = max(graph_sizes, default=0) if forced_splits > 1 else 0
    else:
        split_max = max((g for g in graph_sizes if g * num_kv_heads < num_sms), default=0)
    above = [b for b in sorted(set(batches)) if b > split_max]
    return split_max, (above[0] if above else 0)


def fit_eager_v2(v2: dict[str, Any], tokens: list[float], walls: list[float], devices: list[float],
                 ref_reqs: int) -> dict[str, Any]:
    """``eager_s`` = median (wall - device) of the mixed steps whose device time exceeds the
    smallest step's wall (there the launches hide behind the GPU, so what is left is the CPU
    time that overlaps nothing); ``eager_floor(T)`` = wall - ``eager_s`` at the launch-bound
    token counts, held at the largest launch-bound value above them."""
    t, w, d = (np.asarray(x, dtype=float) for x in (tokens, walls, devices))
    bound = d > w.min()
    eager_s = float(np.median((w - d)[bound])) if bound.any() else 0.0
    floor = np.maximum(w - eager_s, 0.0)
    # Where the device dominated, the wall says nothing about the launch floor except that it
    # is below the device time: hold the last launch-bound value (the kernel count, hence the
    # launch work, does not grow with the tokens).
    if bound.any() and (~bound).any():
        last = floor[~bound][np.argmax(t[~bound])]
        floor[bound] = np.minimum(floor[bound], last)
    v2["overhead"]["eager_s"] = eager_s
    v2["overhead"]["eager_ref_reqs"] = int(ref_reqs)
    v2["eager_floor"] = {"num_tokens": t.tolist(), "seconds": floor.tolist()}
    return {"num_tokens": t.tolist(), "wall_s": w.tolist(), "device_s": d.tolist(),
            "device_bound": bound.tolist(), "eager_s": eager_s, "ref_reqs": int(ref_reqs)}


def make_v2(raw: dict[str, Any], *, pool_tokens: int, split_max_batch: int, latency_batch: int,
            graph_sizes: list[int], graph_s: float, cpu_per_request_s: float,
            mixed: tuple[list[float], list[float], list[Any]] | None, ref_reqs: int) -> dict[str, Any]:
    """A v2 profile from raw measurements: ``raw`` has the v1 keys with raw device tables in
    ``per_token_ops``, ``raw_device.attn_decode_seconds`` and ``attn_decode.batch/total_context``;
    ``mixed`` is (token counts, median walls, one BatchShape per count) of the warm mixed steps."""
    from simulator.cost_model.base import BatchShape

    dec = raw["attn_decode"]
    seconds = raw.get("raw_device", {}).get("attn_decode_seconds", dec["seconds"])
    keep = [(int(b), int(tc) // int(b), float(s)) for b, tc, s in zip(dec["batch"], dec["total_context"], seconds)
            if int(tc) <= pool_tokens]
    dropped = [(int(b), int(tc) // int(b)) for b, tc in zip(dec["batch"], dec["total_context"])
               if int(tc) > pool_tokens]
    v2 = {k: json.loads(json.dumps(raw[k])) for k in ("model", "hardware", "tp", "pp", "per_token_ops", "lm_head",
                                                      "sampling", "attn_prefill")}
    v2["format"] = PROFILE_FORMAT
    if "raw_device" in raw:
        v2["per_token_ops"] = json.loads(json.dumps(raw["raw_device"]["per_token_ops"]))
    v2["attn_decode"] = {"batch": [b for b, _, _ in keep], "context": [c for _, c, _ in keep],
                         "seconds": [s for _, _, s in keep], "split_max_batch": int(split_max_batch),
                         "latency_batch": int(latency_batch)}
    if "splits" in dec:  # the split-K each point was measured with (diagnostic)
        v2["attn_decode"]["splits"] = [int(k) for k, tc in zip(dec["splits"], dec["total_context"])
                                       if int(tc) <= pool_tokens]
    if dec.get("lone_latency", {}).get("seconds"):
        v2["attn_decode"]["lone_latency"] = json.loads(json.dumps(dec["lone_latency"]))
    for key in ("attn_decode_eager", "attn_decode_mixed"):
        grid = raw.get(key)
        if grid and grid["seconds"]:
            v2[key] = {"batch": [int(b) for b in grid["batch"]],
                       "context": [int(tc) // int(b) for b, tc in zip(grid["batch"], grid["total_context"])],
                       "seconds": [float(x) for x in grid["seconds"]]}
            if key == "attn_decode_mixed":  # the split the mixed graphs run their decode rows with
                v2[key]["splits"] = int(max(grid["splits"]))
    v2["overhead"] = {"graph_s": float(graph_s), "graph_max_batch": int(raw["overhead"]["graph_max_batch"]),
                      "graph_sizes": [int(g) for g in graph_sizes], "cpu_per_request_s": float(cpu_per_request_s),
                      "eager_s": float(raw["overhead"].get("eager_s", 0.0)), "eager_ref_reqs": int(ref_reqs)}
    meta = json.loads(json.dumps(raw.get("meta", {})))
    meta["v2"] = {"decode_points_dropped_beyond_pool": dropped, "profiling_pool_tokens": int(pool_tokens)}
    v2["meta"] = meta
    if mixed is not None:
        tokens, walls, shapes = mixed
        dev_model = device_only_model(v2)
        devices = [dev_model.step_time(s if isinstance(s, BatchShape) else BatchShape.from_scheduler_output(s)).total
                   for s in shapes]
        meta["v2"]["eager_fit"] = fit_eager_v2(v2, tokens, walls, devices, ref_reqs)
    return v2


# --- interleaved eager rounds (the eager fit's data) --------------------------------------
SEGMENT_OF = {"mixed": "decoders", "after_graph": "decoders", "after_graph_b2b": "decoders",
              "after_idle": "idle", "after_idle_b2b": "idle"}


def _num(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text.strip()


def _cpuinfo_mhz(cores: set[int]) -> list[float]:
    """``cpu MHz`` of these logical CPUs (all if empty) from /proc/cpuinfo, [] if unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    out, proc = [], -1
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key = key.strip()
        if key == "processor":
            proc = int(val)
        elif key == "cpu MHz" and (not cores or proc in cores):
            out.append(float(val))
    return out


class ClockProbe:
    """GPU clocks and the CPU's frequency and load at an instant, read at the start and end of
    every eager round, to tell a slow period of the host or the GPU from a slow step shape
    (session 3's profile ran equal eager steps at 12 or 18-21 ms depending on when they ran).
    Fail-soft: what cannot be read is left out; nvidia-smi (the GPU this process uses, by
    UUID, else every GPU; all fields, else the SM clock) is dropped after one timeout, and
    ``torch.cuda.clock_rate`` (needs nvidia-ml-py) is the fallback for the SM clock. A call
    slower than ``slow_s`` is the last one (24 calls must not add more than seconds)."""

    SMI_FIELDS = ("clocks.sm", "clocks.mem", "temperature.gpu", "power.draw", "clocks_throttle_reasons.active")
    SMI_KEYS = ("gpu_sm_mhz", "gpu_mem_mhz", "gpu_temp_c", "gpu_power_w", "gpu_throttle_reasons")

    def __init__(self, device: torch.device, timeout_s: float = 3.0, slow_s: float = 0.5) -> None:
        self.device = device
        self.timeout_s = timeout_s
        self.slow_s = slow_s
        self.cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self.sources: dict[str, str] = {}
        self._smi: list[list[str]] = []  # nvidia-smi argument lists left to try, the working one first
        self._nvml = device.type == "cuda"
        if device.type == "cuda" and shutil.which("nvidia-smi"):
            uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
            ids = ([["-i", f"GPU-{uuid}"]] if uuid else []) + [[]]
            self._smi = [[*i, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"]
                         for fields in (self.SMI_FIELDS, self.SMI_FIELDS[:1]) for i in ids]

    def read(self) -> dict[str, Any]:
        out = self._cpu()
        if self.device.type == "cuda":
            out.update(self._gpu())
        return out

    def _cpu(self) -> dict[str, Any]:
        mhz: list[float] = []
        for c in self.cores:
            try:
                mhz.append(int(Path(f"/sys/devices/system/cpu/cpu{c}/cpufreq/scaling_cur_freq").read_text()) / 1e3)
            except (OSError, ValueError):
                mhz = []
                break
        source = "sysfs scaling_cur_freq"
        if not mhz:
            mhz, source = _cpuinfo_mhz(set(self.cores)), "/proc/cpuinfo"
        out: dict[str, Any] = {}
        if mhz:
            self.sources["cpu"] = f"{source}, over the {len(mhz)} CPUs this process may run on"
            out.update(cpu_mhz_mean=round(statistics.fmean(mhz), 1), cpu_mhz_min=round(min(mhz), 1),
                       cpu_mhz_max=round(max(mhz), 1))
        try:
            out["load1"] = round(os.getloadavg()[0], 2)
        except OSError:
            pass
        return out

    def _gpu(self) -> dict[str, Any]:
        while self._smi:
            args = self._smi[0]
            t0 = time.perf_counter()
            try:
                res = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, check=False,
                                     timeout=self.timeout_s)
            except (OSError, subprocess.TimeoutExpired):
                self._smi = []
                break
            rows = [[_num(v) for v in line.split(",")] for line in res.stdout.strip().splitlines()]
            if res.returncode == 0 and rows and all(len(r) == len(rows[0]) for r in rows):
                self.sources["gpu"] = "nvidia-smi " + " ".join(args[:-2] or ["(every GPU)"]) + f" {args[-2]}"
                keys = self.SMI_KEYS[:len(rows[0])]
                if time.perf_counter() - t0 > self.slow_s:
                    self._smi = []
                return (dict(zip(keys, rows[0])) if len(rows) == 1
                        else {k: [r[i] for r in rows] for i, k in enumerate(keys)})
            self._smi.pop(0)
        if self._nvml:
            try:
                mhz = torch.cuda.clock_rate(self.device)
            except Exception:  # noqa: BLE001 - no nvidia-ml-py / NVML: no GPU clock
                self._nvml = False
            else:
                self.sources["gpu"] = "torch.cuda.clock_rate"
                return {"gpu_sm_mhz": mhz}
        return {}


@dataclass
class EagerRounds:
    """Every recorded step of ``measure_eager_rounds`` in execution order (parallel lists: its
    series -- a ``SEGMENT_OF`` key --, its round, the (scheduler output, wall, measured
    duration) record, and its start in seconds since the pass began) and, per round, its
    segments' order, start and end times and the clock readings at both ends."""

    seed: int
    series: list[str] = field(default_factory=list)
    round: list[int] = field(default_factory=list)
    records: list[tuple[Any, float, float]] = field(default_factory=list)
    start_s: list[float] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    clock_sources: dict[str, str] = field(default_factory=dict)

    def select(self, series: str, rounds: Collection[int] | None = None) -> list[tuple[Any, float, float]]:
        """The records of one series, in order, from these rounds only (all if None)."""
        return [rec for s, r, rec in zip(self.series, self.round, self.records)
                if s == series and (rounds is None or r in rounds)]


def measure_eager_rounds(backend: Any, quick: bool, log: Callable[[str], None], seed: int = EAGER_ROUNDS_SEED,
                         rounds: int | None = None) -> EagerRounds:
    """The eager steps the fit uses, in rounds (``EAGER_ROUNDS``). A round has two segments,
    each on a fresh engine, their order alternating: *decoders* -- ``MIXED_DECODES`` requests
    keep decoding while, in shuffled order, each mixed prompt size runs once as an eager step
    right after an eager step (``mixed``), and each ``AFTER_PREFILLS`` size once right after
    ``AFTER_GRAPH_STEPS`` CUDA-graph steps (``after_graph``), paired with the same shape run
    right after it (``after_graph_b2b``; the pair's difference is the switch cost whatever the
    process state); *idle* -- in shuffled order each ``AFTER_PREFILLS`` size as a lone prompt
    after ``AFTER_IDLE_S`` of idling (``after_idle``), paired likewise (``after_idle_b2b``).
    Measured one size at a time, a slow period of the host moved whole sizes (session 3);
    interleaved, it slows every size of the rounds it covers (``steady_rounds`` finds them).
    A step's wall runs from the arriving prompt's ``add_request`` (its token ids drawn before)
    to the return of ``engine.step``, the work between two step starts in serving; a decoder
    segment opens with an unrecorded eager step, so that every ``mixed`` step follows one."""
    from core.config import SchedulerConfig
    from core.engine import EngineCore
    from core.request import Request
    from core.sampling_params import SamplingParams

    runner = backend.runner
    vocab = runner.config.vocab_size
    ids_rng = np.random.default_rng(seed)
    order_rng = random.Random(seed)
    sched = SchedulerConfig(max_num_seqs=runner.max_num_seqs, max_num_batched_tokens=runner.max_num_batched_tokens,
                            max_model_len=runner.max_model_len)
    num_dec = 2 if quick else MIXED_DECODES
    mixed = _mixed_grid(runner, quick, num_dec)
    limit = min(runner.max_num_batched_tokens - num_dec, runner.max_model_len - 1)
    after = [t for t in ((16, 64) if quick else AFTER_PREFILLS) if t <= limit]
    gap = 2 if quick else AFTER_GRAPH_STEPS
    idle_s = 0.05 if quick else AFTER_IDLE_S
    probe = ClockProbe(runner.device)
    res = EagerRounds(seed)
    num_prompts = 0
    gc.collect()
    t_pass = time.perf_counter()

    def fresh_engine(decoders: int, steps: int) -> Any:
        engine = EngineCore(sched, backend.cache_config, backend, eos_token_id=backend.eos_token_id)
        backend.bind(engine.scheduler.requests)
        runner.reset()
        for i in range(decoders):
            engine.add_request(Request(f"d{i}", ids_rng.integers(3, vocab, size=32).tolist(),
                                       SamplingParams(max_tokens=steps, ignore_eos=True), arrival_time=0.0))
        return engine

    def step(engine: Any) -> None:
        engine.step(time.perf_counter() - t_pass)

    def prompt_step(engine: Any, t: int, decoders: int) -> tuple[tuple[Any, float, float], float] | None:
        """A fresh prompt of ``t`` tokens (max_tokens=1) and the step that prefills it: (record,
        start) if the step was exactly the decoders plus the whole prompt, else None."""
        nonlocal num_prompts
        ids = ids_rng.integers(3, vocab, size=t).tolist()
        start = time.perf_counter()
        engine.add_request(Request(f"a{num_prompts}", ids, SamplingParams(max_tokens=1, ignore_eos=True),
                                   arrival_time=0.0))
        out = engine.step(start - t_pass)
        wall = time.perf_counter() - start
        num_prompts += 1
        so = out.scheduler_output
        if so is None or len(so.req_ids) != decoders + 1 or so.total_num_scheduled_tokens != t + decoders:
            return None
        return (so, wall, out.duration), start - t_pass

    def record(rnd: int, *steps: tuple[str, tuple[tuple[Any, float, float], float] | None]) -> None:
        """Keep these steps (one, or a pair) only if each had the intended shape."""
        kept = [(series, s) for series, s in steps if s is not None]
        if len(kept) == len(steps):
            for series, (rec, start) in kept:
                res.series.append(series)
                res.round.append(rnd)
                res.records.append(rec)
                res.start_s.append(start)

    def decoder_segment(rnd: int) -> None:
        items = [("mixed", t) for t in mixed] + [("after_graph", t) for t in after]
        order_rng.shuffle(items)
        engine = fresh_engine(num_dec, 8 + len(mixed) + len(after) * (gap + 2))
        step(engine)  # the decoders' prefill
        step(engine)  # a graph step
        prompt_step(engine, mixed[0], num_dec)  # unrecorded: the first recorded step follows an eager one
        for series, t in items:
            if series == "mixed":
                record(rnd, ("mixed", prompt_step(engine, t, num_dec)))
                continue
            for _ in range(gap):
                step(engine)
            first = prompt_step(engine, t, num_dec)
            record(rnd, ("after_graph", first), ("after_graph_b2b", prompt_step(engine, t, num_dec)))
        for rid in list(engine.scheduler.requests):
            engine.abort_request(rid, 0.0)

    def idle_segment(rnd: int) -> None:
        sizes = list(after)
        order_rng.shuffle(sizes)
        engine = fresh_engine(0, 1)
        for t in sizes:
            time.sleep(idle_s)
            first = prompt_step(engine, t, 0)
            record(rnd, ("after_idle", first), ("after_idle_b2b", prompt_step(engine, t, 0)))
        for rid in list(engine.scheduler.requests):
            engine.abort_request(rid, 0.0)

    for rnd in range(rounds or (QUICK_EAGER_ROUNDS if quick else EAGER_ROUNDS)):
        segments = ("decoders", "idle") if rnd % 2 == 0 else ("idle", "decoders")
        info: dict[str, Any] = {"round": rnd, "segments": list(segments), "clock_start": probe.read(),
                                "start_s": round(time.perf_counter() - t_pass, 3)}
        for seg in segments:
            (decoder_segment if seg == "decoders" else idle_segment)(rnd)
        info["end_s"] = round(time.perf_counter() - t_pass, 3)
        info["clock_end"] = probe.read()
        res.rounds.append(info)
    res.clock_sources = dict(probe.sources)
    log(f"  {len(res.records)} eager steps in {len(res.rounds)} rounds ({time.perf_counter() - t_pass:.1f} s)")
    return res


def steady_rounds(steps: EagerRounds, limit: float = DRIFT_LIMIT, quantile: float = STEADY_REFERENCE_QUANTILE
                  ) -> tuple[dict[str, list[int]], dict[str, list[float | None]]]:
    """(steady rounds, drift) per segment (``decoders``, ``idle``). Per series and prompt size
    the reference wall is the ``quantile`` of its walls over the rounds: a slow period only adds
    time, so while at least a quarter of the rounds are steady the lower quartile sits at the
    steady level, and unlike the minimum it is not one lucky sample. A segment's drift in a
    round is the median over its steps of wall / reference, and the segment is steady there if
    that is at most ``limit``: back-to-back eager steps vary by a few percent, session 3's slow
    periods were 30-75% slower. The fit then takes, per size, the median over the steady rounds:
    slow rounds are left out even as a majority (up to three quarters), where a plain median
    would follow them, and a slow stretch within a steady round costs each size one sample of
    its median. With fewer than two steady rounds, a segment keeps all its rounds (the pass
    has no fast level to prefer)."""
    keys = [(s, int(r[0].total_num_scheduled_tokens)) for s, r in zip(steps.series, steps.records)]
    walls = [r[1] for r in steps.records]
    by_key: dict[tuple[str, int], list[float]] = {}
    for key, w in zip(keys, walls):
        by_key.setdefault(key, []).append(w)
    ref = {key: float(np.quantile(ws, quantile)) for key, ws in by_key.items()}
    steady: dict[str, list[int]] = {}
    drift: dict[str, list[float | None]] = {}
    for seg in ("decoders", "idle"):
        ratios: list[list[float]] = [[] for _ in steps.rounds]
        for key, w, r in zip(keys, walls, steps.round):
            if SEGMENT_OF[key[0]] == seg:
                ratios[r].append(w / ref[key])
        drift[seg] = [float(np.median(x)) if x else None for x in ratios]
        measured = [r for r, d in enumerate(drift[seg]) if d is not None]
        ok = [r for r, d in enumerate(drift[seg]) if d is not None and d <= limit]
        steady[seg] = ok if len(ok) >= 2 else measured
    return steady, drift


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)


def round_summary(steps: EagerRounds, steady: dict[str, list[int]],
                  drift: dict[str, list[float | None]]) -> list[dict[str, Any]]:
    """One row per round: its timing and clock readings, each segment's drift and steadiness,
    the median wall of its mixed steps and the median switch cost of its pairs (ms)."""
    rows = []
    for info in steps.rounds:
        r = info["round"]

        def walls(series: str) -> list[float]:
            return [rec[1] for s, rr, rec in zip(steps.series, steps.round, steps.records) if s == series and rr == r]

        row = {**info, "drift": {seg: None if d[r] is None else round(d[r], 4) for seg, d in drift.items()},
               "steady": {seg: r in rounds for seg, rounds in steady.items()}}
        mixed = walls("mixed")
        row["mixed_median_wall_ms"] = _ms(float(np.median(mixed))) if mixed else None
        for kind in ("graph", "idle"):
            diffs = [a - b for a, b in zip(walls(f"after_{kind}"), walls(f"after_{kind}_b2b"))]
            row[f"after_{kind}_median_diff_ms"] = _ms(float(np.median(diffs))) if diffs else None
        rows.append(row)
    return rows


def _round_line(row: dict[str, Any]) -> str:
    """One log line per round: drift, steadiness, mixed median, switch costs, clocks."""
    def fmt(d: float | None) -> str:
        return "-" if d is None else f"{d:.2f}"

    def clock(label: str, key: str) -> str:
        a, b = row["clock_start"].get(key), row["clock_end"].get(key)
        return "" if a is None and b is None else f", {label} {a}->{b}"

    seg = " / ".join(f"{s} {fmt(row['drift'][s])}{'' if row['steady'][s] else ' SLOW'}" for s in row["segments"])
    return (f"  round {row['round']:2d} ({row['start_s']:.1f}-{row['end_s']:.1f} s): drift {seg}; mixed median "
            f"{row['mixed_median_wall_ms']} ms; switch graph {row['after_graph_median_diff_ms']} / idle "
            f"{row['after_idle_median_diff_ms']} ms{clock('SM MHz', 'gpu_sm_mhz')}{clock('CPU MHz', 'cpu_mhz_mean')}"
            f"{clock('load', 'load1')}")


def _columns(records: list[tuple[Any, float, float]]) -> dict[str, list[Any]]:
    return {"tokens": [int(r[0].total_num_scheduled_tokens) for r in records],
            "reqs": [len(r[0].req_ids) for r in records],
            "wall_ms": [_ms(r[1]) for r in records], "duration_ms": [_ms(r[2]) for r in records]}


def samples_section(first: dict[str, list[tuple[Any, float, float]]], steps: EagerRounds,
                    steady: dict[str, list[int]], per_round: list[dict[str, Any]]) -> dict[str, Any]:
    """The profile's ``samples``: every timed engine step, columnar, so that a reader can see
    drift and bimodal walls and refit, where the fit keeps only medians. ``first`` are the
    steps of ``measure_engine_steps`` (before the op timings)."""
    return {
        "units": ("wall_ms / duration_ms: milliseconds (3 decimals); start_s, per_round start_s / end_s: "
                  "seconds since the eager rounds began; tokens / reqs: the step's scheduled tokens / requests"),
        "engine_steps": {name: _columns(recs) for name, recs in first.items()},
        "eager_rounds": {
            "seed": steps.seed, "rounds": len(steps.rounds), "reference_quantile": STEADY_REFERENCE_QUANTILE,
            "drift_limit": DRIFT_LIMIT, "steady_rounds": steady, "clock_sources": steps.clock_sources,
            "steps": {"series": steps.series, "round": steps.round,
                      "start_s": [round(s, 3) for s in steps.start_s], **_columns(steps.records)},
            "per_round": per_round,
        },
    }


def after_penalties(after: dict[str, list[tuple[Any, float, float]]]) -> dict[str, float]:
    """``overhead.eager_after_graph_s`` / ``eager_after_idle_s``: the median over the pairs of
    ``measure_eager_rounds`` (those of its steady rounds) of (wall after graph steps / idling - wall of the same shape run
    right after it), never below 0 (a colder launch path cannot make a step cheaper; a
    negative median is noise). 0 without pairs."""
    out = {}
    for kind in ("graph", "idle"):
        first, second = after.get(f"after_{kind}", []), after.get(f"after_{kind}_b2b", [])
        diffs = [a[1] - b[1] for a, b in zip(first, second)]
        out[f"eager_after_{kind}_s"] = max(0.0, float(np.median(diffs))) if diffs else 0.0
    return out


def fit_overhead_v2(v2: dict[str, Any], records: dict[str, list[tuple[Any, float, float]]],
                    after: dict[str, list[tuple[Any, float, float]]], ref_reqs: int,
                    log: Callable[[str], None]) -> dict[str, Any]:
    """Per-step CPU terms of a v2 profile from real engine steps (edits ``v2`` in place):
    ``graph_s`` + ``cpu_per_request_s`` * batch from the pure-decode (graph) steps' wall minus
    the v2 device time, then the eager fit (``fit_eager_v2``) from the mixed steps of the steady
    eager rounds (``records["mixed"]``; ``mixed_cold`` and ``mixed_all_rounds`` are summarized
    as diagnostics)."""
    from simulator.cost_model.base import BatchShape

    result: dict[str, Any] = {}
    dev = device_only_model(v2)

    def device(recs: list[tuple[Any, float, float]]) -> np.ndarray:
        return np.array([dev.step_time(BatchShape.from_scheduler_output(r[0])).total for r in recs])

    dec = records.get("decode", [])
    if dec:
        pred = device(dec)
        batch = np.array([len(r[0].req_ids) for r in dec], dtype=float)
        summ = _summary_by(dec, pred, batch)
        bs_u, med = np.array(summ["key"]), np.array(summ["median_residual_s"])
        per_req = max(0.0, float(np.polyfit(bs_u, med, 1)[0])) if len(bs_u) >= 2 else 0.0
        graph_s = float(np.median(med - per_req * bs_u))
        v2["overhead"]["graph_s"], v2["overhead"]["cpu_per_request_s"] = graph_s, per_req
        result["decode_by_batch"] = summ
        log(f"  graph decode: graph_s {graph_s * 1e6:.1f} us + {per_req * 1e6:.2f} us per request")
    mixed = records.get("mixed", [])
    if mixed:
        pred = device(mixed)
        toks = np.array([r[0].total_num_scheduled_tokens for r in mixed], dtype=float)
        summ = _summary_by(mixed, pred, toks)
        result["mixed_by_tokens"] = summ
        key = np.array(summ["key"], dtype=float)
        sizes = v2["overhead"].get("mixed_graph_sizes") or []
        in_graph = key <= (sizes[-1] if sizes else 0)
        if in_graph.any():
            # Replayed graphs: what is left over the (padded) device time is CPU time, per
            # step plus per request, with no launch floor.
            reqs = np.array([len(r[0].req_ids) for r in mixed], dtype=float)
            per_step = np.array([r[1] for r in mixed]) - pred - v2["overhead"]["cpu_per_request_s"] * reqs
            mixed_s = float(np.median(per_step[toks <= sizes[-1]]))
            v2["overhead"]["mixed_graph_s"] = mixed_s
            result["mixed_graph_s"] = mixed_s
            log(f"  mixed graph steps (<= {sizes[-1]} tokens): mixed_graph_s {mixed_s * 1e6:.1f} us")
        eager = ~in_graph
        if eager.any():
            v2["meta"]["v2"]["eager_fit"] = fit_eager_v2(
                v2, key[eager].tolist(), np.array(summ["median_wall_s"])[eager].tolist(),
                np.array(summ["median_predicted_device_s"])[eager].tolist(), ref_reqs)
            log(f"  mixed eager steps: eager_s {v2['overhead']['eager_s'] * 1e6:.1f} us, floor "
                f"{[round(x * 1e3, 2) for x in v2['eager_floor']['seconds']]} ms")
    if records.get("mixed_cold"):
        cold = records["mixed_cold"]
        toks = np.array([r[0].total_num_scheduled_tokens for r in cold], dtype=float)
        result["mixed_cold_pass"] = _summary_by(cold, device(cold), toks)
        v2["meta"]["mixed_cold_pass"] = result["mixed_cold_pass"]
    if records.get("mixed_all_rounds"):  # what the slow rounds would have moved (diagnostic)
        every = records["mixed_all_rounds"]
        toks = np.array([r[0].total_num_scheduled_tokens for r in every], dtype=float)
        result["mixed_all_rounds_by_tokens"] = _summary_by(every, device(every), toks)
    if records.get("lone_prefill"):
        recs = records["lone_prefill"]
        toks = np.array([r[0].total_num_scheduled_tokens for r in recs], dtype=float)
        result["lone_prefill_by_tokens"] = _summary_by(recs, device(recs), toks)
    from simulator.cost_model.calibrated import CalibratedCostModel

    full = CalibratedCostModel(v2)
    for kind, recs in after.items():
        if not recs:
            continue
        pred = np.array([full.step_time(BatchShape.from_scheduler_output(r[0])).total for r in recs])
        toks = np.array([r[0].total_num_scheduled_tokens for r in recs], dtype=float)
        summ = _summary_by(recs, pred, toks)
        summ["note"] = "median_predicted_device_s here is the full v2 step-time prediction (CPU terms included)"
        result[f"eager_{kind}"] = summ
        log(f"  eager {kind}: wall {[round(x * 1e3, 2) for x in summ['median_wall_s']]} ms vs model "
            f"{[round(x * 1e3, 2) for x in summ['median_predicted_device_s']]} ms")
    v2["overhead"].update(after_penalties(after))
    log(f"  switch penalties: after graph {v2['overhead']['eager_after_graph_s'] * 1e3:.2f} ms, "
        f"after idle {v2['overhead']['eager_after_idle_s'] * 1e3:.2f} ms (paired)")
    return result


def v2_from_v1(v1: dict[str, Any], *, num_kv_heads: int, num_sms: int, pool_tokens: int | None = None,
               mixed_decode_context: int = 64) -> dict[str, Any]:
    """Convert a v1 profile written by this module (it kept the raw device tables, the raw
    decode grid and the warm mixed-step walls) to v2. The mixed steps' shapes were not stored:
    they are rebuilt as ``MIXED_DECODES`` decodes of ``mixed_decode_context`` tokens beside one
    fresh prompt, which is how ``_mixed_steps`` built them (the decoders' contexts grew from
    34 to about 100 tokens over the pass)."""
    from simulator.cost_model.base import BatchShape

    if v1.get("format") != PROFILE_FORMAT_V1:
        raise ValueError(f"not a v1 profile: {v1.get('format')!r}")
    meta = v1["meta"]
    if pool_tokens is None:  # build_profile's default pool (the v1 files did not record it)
        max_len = int(meta["max_model_len"])
        pool_tokens = max(2 * -(-max_len // 16), (256 * 1024) // 16) * int(meta.get("block_size", 16))
    sizes = list(meta["cuda_graph_sizes"])
    split_max, lat = decode_regime(v1["attn_decode"]["batch"], sizes, num_kv_heads, num_sms)
    over = v1["overhead"]
    warm = meta.get("mixed_after_op_timings") or meta["overhead_fit"]["mixed_by_tokens"]
    tokens, walls = warm["key"], warm["median_wall_s"]
    shapes = [BatchShape.from_lists([1] * MIXED_DECODES + [int(t) - MIXED_DECODES],
                                    [mixed_decode_context] * MIXED_DECODES + [int(t) - MIXED_DECODES])
              for t in tokens]
    v2 = make_v2(v1, pool_tokens=pool_tokens, split_max_batch=split_max, latency_batch=lat, graph_sizes=sizes,
                 graph_s=over["graph_s"], cpu_per_request_s=over.get("cpu_per_decode_request_s", 0.0),
                 mixed=(tokens, walls, shapes), ref_reqs=MIXED_DECODES + 1)
    v2["meta"]["v2"].update({"converted_from": PROFILE_FORMAT_V1, "num_kv_heads": num_kv_heads, "num_sms": num_sms,
                             "mixed_decode_context_assumed": mixed_decode_context})
    for k in ("attn_decode_plane", "effective_from_tokens", "eager_fit"):
        v2["meta"].pop(k, None)
    v2["meta"]["v1_eager_fit"] = meta.get("eager_fit")
    return v2


# --- main -----------------------------------------------------------------------------------
def build_profile(model_dir: str, *, model_name: str | None = None, hardware_name: str | None = None,
                  device: str | None = None, quick: bool = False, max_model_len: int = 16384,
                  max_num_seqs: int = 256, max_num_batched_tokens: int = 8192, num_gpu_blocks: int | None = None,
                  log: Callable[[str], None] = print, **runner_options: Any) -> dict[str, Any]:
    from core.config import SchedulerConfig
    from executor.backend import RealBackend, resolve_device
    from executor.layers import set_kernel_ops
    from executor.loader import load_model

    t_start = time.perf_counter()
    dev = resolve_device(device)
    loaded = load_model(model_dir, device=dev)
    cfg = loaded.config
    max_model_len = min(max_model_len, cfg.max_position_embeddings)
    max_num_batched_tokens = min(max_num_batched_tokens, max(max_model_len, 16))
    if num_gpu_blocks is None:
        # enough for the largest decode point (256 x 1024) and prefill (one max-length request)
        num_gpu_blocks = max(2 * -(-max_model_len // 16), (256 * 1024) // 16 if not quick else 256)
    sched = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                            max_model_len=max_model_len)
    backend = RealBackend.from_pretrained(loaded, scheduler_config=sched, num_gpu_blocks=num_gpu_blocks,
                                          **runner_options)
    runner = backend.runner
    log(f"model loaded, {runner.num_gpu_blocks} KV blocks, graphs {runner.capture_sizes[:3]}..{runner.capture_sizes[-3:] if runner.capture_sizes else []} "
        f"({time.perf_counter() - t_start:.1f} s)")
    log("real engine steps (before the op timings, in a fresh process state)")
    engine_records = measure_engine_steps(backend, quick, log)
    prof = OpProfiler(backend, quick, log)
    tokens = prof._clamp_tokens(QUICK_TOKENS if quick else FULL_TOKENS)
    rows = [r for r in (QUICK_ROWS if quick else FULL_ROWS) if r <= max(max_num_seqs, 1)]
    previous = set_kernel_ops(runner.ops)
    try:
        with torch.inference_mode():
            log("per-token ops")
            tok = prof.per_token_ops(tokens)
            log("lm_head / sampling")
            lm, smp = prof.lm_head_and_sampling(rows)
            log("attention")
            dec = prof.attn_decode(QUICK_DECODE if quick else FULL_DECODE)
            sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 1
            split_max, lat = decode_regime(dec["batch"], list(runner.capture_sizes), cfg.num_key_value_heads, sms,
                                           runner.attention_num_splits)
            if lat:
                dec["lone_latency"] = prof.attn_decode_lone(
                    lat, QUICK_LONE_CONTEXTS if quick else FULL_LONE_CONTEXTS,
                    short=min(c for _, c in (QUICK_DECODE if quick else FULL_DECODE)))
            dec_eager = prof.attn_decode(QUICK_DECODE_EAGER if quick else FULL_DECODE_EAGER, eager_tile=True)
            mixed_splits = prof.mixed_graph_splits()
            dec_mixed = (prof.attn_decode(QUICK_DECODE_EAGER if quick else FULL_DECODE_EAGER, eager_tile=True,
                                          splits=mixed_splits) if mixed_splits else None)
            uneven = prof.attn_decode_uneven(QUICK_DECODE_UNEVEN if quick else FULL_DECODE_UNEVEN)
            pre = prof.attn_prefill(QUICK_PREFILL if quick else FULL_PREFILL)
    finally:
        set_kernel_ops(previous)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        dev_name = torch.cuda.get_device_name(dev)
    else:
        dev_name = f"cpu ({platform.processor() or platform.machine()})"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover
        triton_version = None
    graph_max = max(runner.capture_sizes, default=0)
    raw: dict[str, Any] = {
        "format": PROFILE_FORMAT_V1,  # the raw measurements, in v1's layout; make_v2 turns them into v2
        "model": model_name or Path(model_dir).name,
        "hardware": hardware_name or _hardware_name(dev_name),
        "tp": 1, "pp": 1,
        "per_token_ops": {"num_tokens": tokens, **{k: v for k, v in tok.items()}},
        "lm_head": {"num_rows": rows, "seconds": lm},
        "sampling": {"num_rows": rows, "seconds": smp},
        "attn_decode": dec,
        "attn_decode_eager": dec_eager,
        **({"attn_decode_mixed": dec_mixed} if dec_mixed else {}),
        "attn_prefill": pre,
        "overhead": {"eager_s": 0.0, "graph_s": 0.0, "graph_max_batch": graph_max},
        "meta": {
            "device": dev_name, "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version(),
            "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "model_dir": str(model_dir), "dtype": str(cfg.dtype).removeprefix("torch."),
            "block_size": runner.block_size, "max_model_len": runner.max_model_len,
            "max_num_seqs": runner.max_num_seqs, "max_num_batched_tokens": runner.max_num_batched_tokens,
            "num_gpu_blocks": runner.num_gpu_blocks,
            "cuda_graph_sizes": list(runner.capture_sizes), "quick": quick,
            "mixed_cuda_graph_sizes": list(runner.mixed_capture_sizes),
            "timing": ("CUDA events around CUDA-graph replays of each op over all layers, median"
                       if dev.type == "cuda" else "perf_counter, median (CPU)"),
            "graph_capture_failures": prof.timer.graph_failures,
            "attn_decode_uneven": uneven,
        },
    }
    # The first mixed pass ran in a cold process (its first eager steps were up to 2x slower)
    # and one size at a time: a diagnostic. The eager fit uses the interleaved rounds' steady ones.
    log("eager steps in interleaved rounds (mixed; after graph steps / idling, each paired with a back-to-back one)")
    eager = measure_eager_rounds(backend, quick, log)
    steady, drift = steady_rounds(eager)
    per_round = round_summary(eager, steady, drift)
    for row in per_round:
        log(_round_line(row))
    first = {"decode": engine_records["decode"], "mixed_cold": engine_records["mixed"],
             "lone_prefill": engine_records["lone_prefill"]}
    records = {**first, "mixed": eager.select("mixed", steady["decoders"]), "mixed_all_rounds": eager.select("mixed")}
    after = {s: eager.select(s, steady[seg]) for s, seg in SEGMENT_OF.items() if s != "mixed"}
    ref_reqs = (2 if quick else MIXED_DECODES) + 1
    profile = make_v2(raw, pool_tokens=runner.num_gpu_blocks * runner.block_size, split_max_batch=split_max,
                      latency_batch=lat, graph_sizes=list(runner.capture_sizes), graph_s=0.0, cpu_per_request_s=0.0,
                      mixed=None, ref_reqs=ref_reqs)
    if runner.mixed_capture_sizes:
        profile["overhead"]["mixed_graph_sizes"] = [int(x) for x in runner.mixed_capture_sizes]
    profile["meta"]["v2"].update({"num_sms": sms, "num_kv_heads": cfg.num_key_value_heads})
    log("overhead fit")
    profile["meta"]["overhead_fit"] = fit_overhead_v2(profile, records, after, ref_reqs, log)
    profile["meta"]["eager_fit"] = {
        "source": "interleaved eager rounds",
        "statistic": ("per prompt size, the median wall over the rounds whose decoder segment ran at the pass's "
                      "fast level (drift <= drift_limit); switch penalties: the median paired difference over "
                      "the steady rounds of their segment (see steady_rounds in experiments/profile.py)"),
        "rounds": len(eager.rounds), "steady_rounds": steady, "drift_limit": DRIFT_LIMIT}
    profile["samples"] = samples_section(first, eager, steady, per_round)
    log("serving-shaped step sweep (decode batches walking down through every graph size, prompts injected)")
    try:
        sweep = measure_step_sweep(backend, quick, log)
    except (RuntimeError, ValueError) as e:  # keep the op profile: it is still a working (older-style) one
        log(f"  step sweep FAILED, profile written without step_fits: {type(e).__name__}: {e}")
    else:
        profile["samples"]["step_sweep"] = samples_columns(sweep)
        refit_steps(profile, log)
    profile["meta"]["profile_seconds"] = round(time.perf_counter() - t_start, 1)
    log(f"profile done in {profile['meta']['profile_seconds']} s")
    return profile


def refit_steps(profile: dict[str, Any], log: Callable[[str], None] = print) -> dict[str, Any]:
    """(Re)fit ``step_fits`` from the profile's stored sweep (edits ``profile`` in place)."""
    fits, summary = fit_step_tables(profile, columns_from_samples(profile["samples"]["step_sweep"]))
    profile["step_fits"] = fits
    profile["meta"]["step_fit_summary"] = summary
    for kind, row in summary.items():
        log(f"  step fit {kind}: " + ", ".join(f"{s}:{n}/{e * 100:.1f}%" for s, n, e
                                               in zip(row["size"], row["n"], row["median_abs_rel_err"]))
            + "  (size: points / median |rel err| on the sweep itself)")
    return profile


# Sections of device timings that pooled profiles share as the median of their processes.
TABLE_SECTIONS = ("per_token_ops", "lm_head", "sampling", "attn_prefill", "attn_decode", "attn_decode_eager",
                  "attn_decode_mixed", "eager_floor", "overhead")


def _median_section(name: str, mine: dict[str, Any], theirs: list[dict[str, Any]]) -> None:
    """``mine`` (edited in place): every timing (a ``seconds`` list, an op's list in
    ``per_token_ops``, an ``overhead`` ``*_s`` scalar) becomes the median over ``mine`` and
    ``theirs``; every other list (a grid) must be the same in all of them."""
    for key, val in mine.items():
        other = [t.get(key) for t in theirs]
        if isinstance(val, dict):
            if any(not isinstance(o, dict) for o in other):
                raise ValueError(f"cannot pool: {name}.{key} is missing from a profile")
            _median_section(f"{name}.{key}", val, other)
        elif key == "seconds" or (name == "per_token_ops" and key != "num_tokens") or (
                name == "overhead" and key.endswith("_s") and isinstance(val, float)):
            if any(o is None or (isinstance(val, list) and len(o) != len(val)) for o in other):
                raise ValueError(f"cannot pool: {name}.{key} has another length or is missing in a profile")
            mine[key] = (np.median(np.array([val, *other], dtype=float), axis=0).tolist() if isinstance(val, list)
                         else float(np.median([val, *other])))
        elif isinstance(val, list) and any(o != val for o in other):
            raise ValueError(f"cannot pool: {name}.{key} (a grid) differs between the profiles")


def pool_sweeps(profile: dict[str, Any], others: Sequence[dict[str, Any]],
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """One profile from ``profile`` and ``others`` (the same model and executor on the same
    machine, each measured in its own process): the op tables and overhead timings are the
    median over the processes (``TABLE_SECTIONS``), and the step fits are refitted on all the
    step sweeps, each pass of each sweep brought to the level of the median process's run of
    that pass (``profile_steps.level_sources``). The result does not depend on which profile
    comes first. Edits ``profile`` in place.

    Why: one sweep's per-size lines move by a few per cent from one profiling process to the
    next (three processes on one H200 predicted the same serving steps of 17-64 requests
    0.2-5 % apart, and the qps_knee case's TPOT p50 11 % apart), because a process now and
    then runs a whole pass slow; and with one process's op tables under the pooled fits (they
    differ by < 1 %), a near-the-knee case's TTFT p50 still moved by 3 %."""
    if not others:
        raise ValueError("pooling needs at least one other profile")
    own = profile["samples"]["step_sweep"]
    cols = {k: list(v) for k, v in own.items()}
    step = max(cols["pass_"], default=0) + 1
    sources, passes = [0] * len(cols["pass_"]), list(cols["pass_"])
    for key in ("model", "hardware"):
        if any(o.get(key) != profile.get(key) for o in others):
            raise ValueError(f"cannot pool sweeps of another {key} into {profile.get(key)!r}")
    for key in ("graph_sizes", "mixed_graph_sizes"):
        if any(o["overhead"].get(key) != profile["overhead"].get(key) for o in others):
            raise ValueError(f"cannot pool sweeps: overhead.{key} differs: another executor configuration")
    for sec in TABLE_SECTIONS:
        if sec in profile:
            _median_section(sec, profile[sec], [o.get(sec) or {} for o in others])
    for i, other in enumerate(others, 1):
        sweep = (other.get("samples") or {}).get("step_sweep")
        if not sweep:
            raise ValueError(f"profile {i} of the pool has no step sweep (samples.step_sweep)")
        if max(sweep["pass_"], default=0) >= step:
            raise ValueError(f"profile {i} of the pool ran other sweep passes ({max(sweep['pass_']) + 1} vs {step})")
        for k in cols:  # passes renumbered: a step follows another only within its own sweep's pass
            cols[k] += [v + i * step for v in sweep[k]] if k == "pass_" else list(sweep[k])
        sources += [i] * len(sweep["pass_"])
        passes += list(sweep["pass_"])
    levelled, offsets = level_sources(profile, columns_from_samples(cols), sources, passes)
    profile["samples"]["step_sweep"] = samples_columns(levelled)
    profile["meta"]["pooled_sweeps"] = {
        "profiles": [{"date": o["meta"].get("date"), "steps": len(o["samples"]["step_sweep"]["pass_"])}
                     for o in (profile, *others)],
        "pass_offsets_us": {str(p): v for p, v in offsets.items()},
        "note": "op tables: the median of the profiles; walls in samples.step_sweep are levelled: each "
                "(pass, profile) shifted by the offset here"}
    log(f"pooled {len(others) + 1} step sweeps: {len(cols['pass_'])} steps; per pass, each profile's offset "
        f"from the median one (us): {offsets}")
    return refit_steps(profile, log)


def _hardware_name(dev_name: str) -> str:
    low = dev_name.lower()
    for key, name in (("h200", "H200"), ("h100", "H100"), ("a100", "A100"), ("l40", "L40S")):
        if key in low:
            return f"{name}-measured"
    return dev_name


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--refit-eager", default=None, metavar="PROFILE",
                    help="recompute the eager fit of an older profile from its stored warm pass, write --out")
    ap.add_argument("--refit-steps", default=None, metavar="PROFILE",
                    help="recompute step_fits of a profile from its stored step sweep, write --out")
    ap.add_argument("--pool-sweeps", default=None, nargs="+", metavar="PROFILE",
                    help="profiles of the same model on this machine, each from its own process: one profile "
                         "of their median op tables and the step fits of all their sweeps, each pass levelled "
                         "to the median process's; write --out")
    ap.add_argument("--v2-from-v1", default=None, metavar="PROFILE",
                    help="convert a v1 profile written by this module to v2 (needs --num-kv-heads, --num-sms)")
    ap.add_argument("--num-kv-heads", type=int, default=None, help="the model's KV heads (--v2-from-v1)")
    ap.add_argument("--num-sms", type=int, default=None, help="the profiled GPU's SM count (--v2-from-v1)")
    ap.add_argument("--out", required=True, help="profile JSON to write")
    ap.add_argument("--model-name", default=None, help="catalog name the simulator knows (default: dir name)")
    ap.add_argument("--hardware-name", default=None)
    ap.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    ap.add_argument("--quick", action="store_true", help="a few points only (CPU dry runs, tests)")
    ap.add_argument("--max-model-len", type=int, default=16384)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--num-gpu-blocks", type=int, default=None)
    args = ap.parse_args(argv)
    if args.refit_eager:
        profile = refit_eager_from_meta(json.loads(Path(args.refit_eager).read_text()))
        Path(args.out).write_text(json.dumps(profile, indent=1, default=float) + "\n")
        print(f"refit eager_s = {profile['overhead']['eager_s'] * 1e3:.2f} ms -> {args.out}")
        return
    if args.refit_steps:
        profile = refit_steps(json.loads(Path(args.refit_steps).read_text()))
        Path(args.out).write_text(json.dumps(profile, indent=1, default=float) + "\n")
        print(f"refit step_fits -> {args.out}")
        return
    if args.pool_sweeps:
        first, *rest = (json.loads(Path(p).read_text()) for p in args.pool_sweeps)
        try:
            profile = pool_sweeps(first, rest)
        except ValueError as e:
            ap.error(str(e))
        Path(args.out).write_text(json.dumps(profile, indent=1, default=float) + "\n")
        print(f"pooled step_fits -> {args.out}")
        return
    if args.v2_from_v1:
        if not (args.num_kv_heads and args.num_sms):
            ap.error("--v2-from-v1 needs --num-kv-heads and --num-sms")
        profile = v2_from_v1(json.loads(Path(args.v2_from_v1).read_text()), num_kv_heads=args.num_kv_heads,
                             num_sms=args.num_sms)
        Path(args.out).write_text(json.dumps(profile, indent=1, default=float) + "\n")
        print(f"v2: eager_s {profile['overhead']['eager_s'] * 1e3:.2f} ms, split graphs up to batch "
              f"{profile['attn_decode']['split_max_batch']} -> {args.out}")
        return
    if not args.model_dir:
        ap.error("--model-dir is required")
    profile = build_profile(args.model_dir, model_name=args.model_name, hardware_name=args.hardware_name,
                            device=args.device, quick=args.quick, max_model_len=args.max_model_len,
                            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                            num_gpu_blocks=args.num_gpu_blocks, log=lambda s: print(s, flush=True))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(profile, indent=1, default=float) + "\n")
    print(f"wrote {out} ({out.stat().st_size / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
