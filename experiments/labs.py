"""Teaching labs: six guided studies (docs/labs/) that each run in well under a minute on a
laptop CPU, and the figures and headline numbers that go with them.

Every lab is one or two Hydra presets, ``conf/experiment/lab*.yaml``; each preset is a
sweep that writes its runs to ``outputs/labs/<preset>``. This module only *reads* those
result files (``metrics.json``, ``requests.parquet``, ``steps.parquet``, ``breakdown.json``
and ``.hydra/config.yaml``), like ``experiments.aggregate`` and ``experiments.plot``:

    python -m experiments.run experiment=lab1_batching            # the sweep (a Hydra preset)
    python -m experiments.labs plot outputs/labs/lab1_batching     # its figure and headline numbers

or both at once, per lab (``--quick``: fewer sweep points and requests, the mode the tests
use; results go to ``outputs/labs/quick/``):

    python -m experiments.labs run lab1 [--quick]
    python -m experiments.labs list

A preset's figure goes to ``<sweep dir>/plots/<preset>.png``; the headline numbers are
printed and written to ``<sweep dir>/headline.json``.

Note: ``quick=true`` (24 requests a run) also works on every lab preset, as a smoke test,
but it is too few requests for the labs' effects to show; ``--quick`` keeps enough.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from core.results import BREAKDOWN_FILE, REQUESTS_FILE, STEPS_FILE  # noqa: E402
from experiments.aggregate import collect, read_config  # noqa: E402
from experiments.plot import goodput  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUTPUT_ROOT = Path("outputs/labs")
FIGURE_DPI = 100
FINISHED = ("FINISHED_LENGTH", "FINISHED_STOPPED")
# Composed-config values every lab table carries (read from each run's .hydra/config.yaml,
# so they are there whether a value came from a preset, a sweep or a dict override).
CONFIG_COLUMNS = {
    "qps": "workload.qps", "speed": "workload.speed", "num_requests": "workload.num_requests",
    "batching": "scheduler.batching", "policy": "scheduler.policy", "preemption_mode": "scheduler.preemption_mode",
    "chunked_prefill": "scheduler.enable_chunked_prefill", "budget": "scheduler.max_num_batched_tokens",
    "max_model_len": "scheduler.max_model_len", "block_size": "cache.block_size",
    "prefix_caching": "cache.enable_prefix_caching", "tp": "parallel.tp", "pp": "parallel.pp", "dp": "parallel.dp",
    "model": "model.name", "duration_s": "workload.duration_s", "workload_kind": "workload.kind",
    "trace_path": "workload.trace_path",
    "slo_ttft_ms": "slo.ttft_ms", "slo_tpot_ms": "slo.tpot_ms",
}
COLORS = plt.get_cmap("tab10").colors


# ---- reading a lab's runs ------------------------------------------------------------------

def load(root: str | Path) -> pd.DataFrame:
    """One row per run under ``root``: aggregate's table (overrides, metrics) plus the
    composed-config values of ``CONFIG_COLUMNS``."""
    root = Path(root)
    df = collect(root)
    extra = []
    for run in df["run"]:
        cfg = read_config(root / run)
        extra.append({col: (OmegaConf.select(cfg, key) if cfg is not None else None)
                      for col, key in CONFIG_COLUMNS.items()})
    extra_df = pd.DataFrame(extra, index=df.index)
    out = pd.concat([df.drop(columns=[c for c in extra_df.columns if c in df.columns]), extra_df], axis=1)
    out.attrs = dict(df.attrs)
    return out


def preset_of(df: pd.DataFrame) -> str:
    """The lab preset the runs came from (their ``experiment=...`` override)."""
    names = set(df["experiment"].dropna()) if "experiment" in df else set()
    if len(names) != 1:
        raise ValueError(f"expected the runs of one lab preset (an experiment=lab... override), found {sorted(names)}")
    return str(names.pop())


def requests_of(root: Path, run: str) -> pd.DataFrame:
    return pd.read_parquet(root / run / REQUESTS_FILE)


def steps_of(root: Path, run: str) -> pd.DataFrame:
    return pd.read_parquet(root / run / STEPS_FILE)


def time_weighted(steps: pd.DataFrame, column: str) -> float:
    """Mean of a per-step quantity weighted by step duration (the time it held)."""
    w = steps["duration"].to_numpy()
    return float((steps[column].to_numpy() * w).sum() / w.sum()) if w.sum() > 0 else math.nan


def kv_allocated_and_held(steps: pd.DataFrame, requests: pd.DataFrame, num_blocks: int,
                          block_size: int) -> tuple[float, float]:
    """(allocated, held) KV in tokens, time-averaged over the run's steps.

    Allocated = the pool's used blocks x block size (steps.parquet). Held = tokens the
    running requests actually have in KV, estimated from requests.parquet: a request holds
    its whole prompt from its first step on and its output tokens at an even pace between
    its first token and its finish. Preemptions (which free KV) are not modelled, so use it
    on runs without them.
    """
    t = steps["time"].to_numpy()
    w = steps["duration"].to_numpy()
    allocated = steps["kv_usage"].to_numpy() * num_blocks * block_size
    r = requests[requests["status"].isin(FINISHED)]
    start, first, end = (r[c].to_numpy()[None, :] for c in ("first_scheduled_time", "first_token_time", "finish_time"))
    prompt, out = r["prompt_len"].to_numpy()[None, :], r["output_len"].to_numpy()[None, :]
    held = np.zeros_like(t)
    for i in range(0, len(t), 2048):  # chunks of steps x requests
        tt = t[i:i + 2048, None]
        running = (tt >= start) & (tt < end)
        progress = np.clip((tt - first) / np.maximum(end - first, 1e-9), 0.0, 1.0)
        held[i:i + 2048] = (running * (prompt + progress * out)).sum(axis=1)
    return float((allocated * w).sum() / w.sum()), float((held * w).sum() / w.sum())


# ---- small plotting helpers ----------------------------------------------------------------

def _plain(v: float, _pos: int = 0) -> str:
    return f"{v:,.0f}" if v >= 1 else f"{v:g}"


def _plain_log(ax: plt.Axes, axis: str = "y") -> None:
    """Log axis with plain numbers (y: base 10, minor 2x and 5x ticks labelled on a short
    axis; x: base 2, for block and chunk sizes). Call after plotting."""
    if axis == "x":
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(_plain))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, p: ""))
        return
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    short = np.log10(hi / lo) < 1.5

    def minor(v: float, pos: int) -> str:
        mantissa = round(v / 10 ** np.floor(np.log10(v)), 6)
        return _plain(v) if short and mantissa in (2.0, 5.0) else ""

    ax.yaxis.set_major_formatter(FuncFormatter(_plain))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def _finish(fig: Figure, title: str) -> Figure:
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    for ax in fig.axes:
        ax.grid(True, which="major", alpha=0.3)
    return fig


def _p50_p99(ax: plt.Axes, x: Sequence[float], p50: Sequence[float], p99: Sequence[float], color: Any,
             label: str, marker: str = "o") -> None:
    ax.plot(x, p99, "-", marker=marker, color=color, ms=4, label=f"{label} p99")
    ax.plot(x, p50, "--", marker=marker, color=color, ms=4, mfc="white", label=f"{label} p50")


def _tokens(n: float) -> str:
    """Token counts as people write them: 8k = 8192, 1M = 2**20, else rounded (448k)."""
    n = round(n)
    if n >= 2**20:
        return f"{n >> 20}M" if n % 2**20 == 0 else f"{n / 2**20:.1f}M"
    if n >= 1024:
        return f"{n >> 10}k" if n % 1024 == 0 else f"{n / 1000:.0f}k"
    return str(n)


# ---- lab 1: static vs continuous batching --------------------------------------------------

_BATCHING_NAMES = {"static": "static batching", "continuous": "continuous batching (vLLM)"}


def plot_lab1(root: Path, df: pd.DataFrame) -> Figure:
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    (a, b), (c, d) = axes
    for i, (kind, g) in enumerate(df.sort_values("qps").groupby("batching", sort=False)):
        name, color = _BATCHING_NAMES.get(kind, kind), COLORS[i]
        a.plot(g["qps"], g["request_throughput"], "-o", color=color, label=name)
        _p50_p99(b, g["qps"], g["median_ttft_ms"], g["p99_ttft_ms"], color, name)
        _p50_p99(c, g["qps"], g["median_tpot_ms"], g["p99_tpot_ms"], color, name)
        run = g.loc[g["qps"].idxmax(), "run"]
        steps = steps_of(root, run).sort_values("time")
        d.step(steps["time"], steps["batch_size"], where="post", color=color, lw=1.0, label=name)
    top = df["qps"].max()
    a.plot([0, top], [0, top], ":", color="gray", label="offered load")
    a.set(xlabel="offered load (req/s)", ylabel="completed requests / s", title="Throughput")
    a.legend(fontsize=8)
    for ax, what in ((b, "TTFT"), (c, "TPOT")):
        _plain_log(ax)
        ax.set(xlabel="offered load (req/s)", ylabel=f"{what} (ms)", title=f"{what} (solid p99, dashed p50)")
    b.legend(fontsize=7, ncol=2)
    d.set(xlabel="simulated time (s)", ylabel="requests in the running batch",
          title=f"Running batch over time at {top:g} req/s")
    d.legend(fontsize=8)
    return _finish(fig, "Lab 1: static vs continuous batching (Llama-3.1-8B, 1 x H100, ShareGPT)")


def headline_lab1(root: Path, df: pd.DataFrame) -> dict[str, Any]:
    top = df["qps"].max()
    at = df[df["qps"] == top].set_index("batching")
    low = df[df["qps"] == df["qps"].min()].set_index("batching")
    return {
        "max_qps": float(top),
        "static_throughput": float(at.loc["static", "request_throughput"]),
        "continuous_throughput": float(at.loc["continuous", "request_throughput"]),
        "throughput_ratio": float(at.loc["continuous", "request_throughput"] / at.loc["static", "request_throughput"]),
        "static_ttft_p50_ms_low_load": float(low.loc["static", "median_ttft_ms"]),
        "continuous_ttft_p50_ms_low_load": float(low.loc["continuous", "median_ttft_ms"]),
        "static_tpot_p50_ms_high_load": float(at.loc["static", "median_tpot_ms"]),
        "continuous_tpot_p50_ms_high_load": float(at.loc["continuous", "median_tpot_ms"]),
    }


# ---- lab 2: PagedAttention ------------------------------------------------------------------

_KV_NAMES = {"orca": "reserve max_model_len (Orca)", "continuous": "paged blocks (vLLM)"}


def _lab2_paged_table(root: Path, df: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, row in df.iterrows():
        steps, reqs = steps_of(root, row["run"]), requests_of(root, row["run"])
        alloc, held = kv_allocated_and_held(steps, reqs, int(row["num_gpu_blocks"]), int(row["block_size"]))
        rows.append({"batching": row["batching"], "max_model_len": int(row["max_model_len"]),
                     "throughput": row["request_throughput"], "ttft_p50": row["median_ttft_ms"],
                     "concurrency": time_weighted(steps, "num_running"),
                     "kv_used": time_weighted(steps, "kv_usage"),
                     "waste": max(0.0, 1.0 - held / alloc) if alloc > 0 else math.nan,
                     "alloc_per_req": alloc / max(time_weighted(steps, "num_running"), 1e-9)})
    return pd.DataFrame(rows).sort_values(["batching", "max_model_len"])


def plot_lab2_paged(root: Path, df: pd.DataFrame) -> Figure:
    t = _lab2_paged_table(root, df)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    (a, b), (c, d) = axes
    for i, kind in enumerate(("orca", "continuous")):
        g = t[t["batching"] == kind]
        name, color = _KV_NAMES[kind], COLORS[3 if kind == "orca" else 0]
        a.plot(g["max_model_len"], g["throughput"], "-o", color=color, label=name)
        b.plot(g["max_model_len"], g["concurrency"], "-o", color=color, label=name)
        c.plot(g["max_model_len"], 100 * g["waste"], "-o", color=color, label=name)
        d.plot(g["max_model_len"], g["ttft_p50"], "-o", color=color, label=name)
    a.set(ylabel="completed requests / s", title="Maximum throughput (offered 32 req/s)")
    b.set(ylabel="requests running at once (time mean)", title="Concurrency")
    c.set(ylabel="allocated KV holding no token (%)", title="KV memory wasted (estimate)")
    c.set_ylim(-3, 103)
    d.set(ylabel="TTFT p50 (ms)", title="Median time to first token")
    _plain_log(d)
    for ax in axes.flat:
        _plain_log(ax, "x")
        ax.set_xlabel("context limit max_model_len (tokens)")
        ax.set_xticks(sorted(t["max_model_len"].unique()))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: _tokens(v)))
    a.legend(fontsize=8)
    return _finish(fig, "Lab 2A: KV reserved for the context limit vs paged KV (Llama-3.1-8B, 1 x H100)")


def headline_lab2_paged(root: Path, df: pd.DataFrame) -> dict[str, Any]:
    t = _lab2_paged_table(root, df)
    L = int(t["max_model_len"].min())
    at = t[t["max_model_len"] == L].set_index("batching")
    longest = t[t["max_model_len"] == t["max_model_len"].max()].set_index("batching")
    return {
        "max_model_len": L,
        "orca_throughput": float(at.loc["orca", "throughput"]),
        "paged_throughput": float(at.loc["continuous", "throughput"]),
        "orca_concurrency": float(at.loc["orca", "concurrency"]),
        "paged_concurrency": float(at.loc["continuous", "concurrency"]),
        "orca_kv_waste": float(at.loc["orca", "waste"]), "paged_kv_waste": float(at.loc["continuous", "waste"]),
        "longest_max_model_len": int(t["max_model_len"].max()),
        "orca_throughput_longest": float(longest.loc["orca", "throughput"]),
        "paged_throughput_longest": float(longest.loc["continuous", "throughput"]),
    }


def _lab2_block_table(root: Path, df: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, row in df.iterrows():
        r = requests_of(root, row["run"])
        r = r[r["status"].isin(FINISHED)]
        bs = int(row["block_size"])
        length = (r["prompt_len"] + r["output_len"]).to_numpy()
        blocks = -(-length // bs)
        rows.append({"block_size": bs, "hit_rate": row["prefix_cache_hit_rate"],
                     "slack": float((blocks * bs - length).sum() / (blocks * bs).sum()),
                     "blocks_per_req": float(blocks.mean()), "ttft_p50": row["median_ttft_ms"],
                     "ttft_p99": row["p99_ttft_ms"], "throughput": row["request_throughput"]})
    return pd.DataFrame(rows).sort_values("block_size")


def plot_lab2_block_size(root: Path, df: pd.DataFrame) -> Figure:
    t = _lab2_block_table(root, df)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    (a, b), (c, d) = axes
    a.plot(t["block_size"], 100 * t["hit_rate"], "-o", color=COLORS[2])
    a.set(ylabel="prompt tokens served from cache (%)", title="Prefix-cache hit rate", ylim=(0, 100))
    b.plot(t["block_size"], 100 * t["slack"], "-o", color=COLORS[3])
    b.set(ylabel="empty slots in last blocks (%)", title="Internal fragmentation at finish")
    c.plot(t["block_size"], t["blocks_per_req"], "-o", color=COLORS[4])
    _plain_log(c)
    c.set(ylabel="blocks per request (mean)", title="Block-table entries (not priced by the simulator)")
    _p50_p99(d, t["block_size"], t["ttft_p50"], t["ttft_p99"], COLORS[0], "TTFT")
    d.set(ylabel="TTFT (ms)", title="Time to first token")
    d.legend(fontsize=8)
    for ax in axes.flat:
        _plain_log(ax, "x")
        ax.set_xticks(t["block_size"].tolist())
        ax.set_xlabel("block size (tokens)")
    return _finish(fig, "Lab 2B: block size on shared system prompts of 100/300/700/1500 tokens")


def headline_lab2_block_size(root: Path, df: pd.DataFrame) -> dict[str, Any]:
    t = _lab2_block_table(root, df).set_index("block_size")
    lo, hi = int(t.index.min()), int(t.index.max())
    return {"smallest_block": lo, "largest_block": hi,
            "hit_rate_smallest": float(t.loc[lo, "hit_rate"]), "hit_rate_largest": float(t.loc[hi, "hit_rate"]),
            "slack_smallest": float(t.loc[lo, "slack"]), "slack_largest": float(t.loc[hi, "slack"]),
            "blocks_per_req_smallest": float(t.loc[lo, "blocks_per_req"]),
            "blocks_per_req_largest": float(t.loc[hi, "blocks_per_req"]),
            "hit_rate_by_block": {int(k): float(v) for k, v in t["hit_rate"].items()}}


# ---- lab 3: prefix caching on Mooncake -----------------------------------------------------

@lru_cache(maxsize=8)
def mooncake_hit_bound(trace_path: str | None, num_requests: int | None) -> float:
    """Prefix-cache hit rate with an infinite cache: each prompt's leading run of hash
    blocks (512 tokens) already seen in an earlier prompt, never its last token."""
    from core.workloads.traces import read_mooncake_trace, resolve_trace_path
    trace = read_mooncake_trace(resolve_trace_path("mooncake", trace_path), num_requests)
    seen: set[tuple[int, ...]] = set()
    hit = total = 0
    for ids, length in zip(trace.hash_ids, trace.input_lens.tolist()):
        k = 0
        while k < len(ids) and tuple(ids[:k + 1]) in seen:
            k += 1
        seen.update(tuple(ids[:j + 1]) for j in range(len(ids)))
        hit += min(k * trace.hash_block_size, length - 1)
        total += length
    return hit / total


def _kv_bytes_per_token(model: str) -> float:
    from simulator.memory import kv_block_bytes
    from simulator.model_spec import get_model
    return kv_block_bytes(get_model(model), 1, 1, 16) / 16


def _lab3_table(root: Path, df: pd.DataFrame) -> pd.DataFrame:
    t = df.copy()
    t["capacity"] = t["num_gpu_blocks"] * t["block_size"]
    prefill = []
    for run in t["run"]:
        r = requests_of(root, run)
        prefill.append(float((r["prompt_len"] - r["num_cached_tokens"]).sum()))
    t["prefill_tokens"] = prefill
    return t.sort_values("capacity")


def plot_lab3_prefix_cache(root: Path, df: pd.DataFrame) -> Figure:
    t = _lab3_table(root, df)
    row0 = t.iloc[0]
    bound = mooncake_hit_bound(row0["trace_path"], int(row0["num_requests"]))
    gib = _kv_bytes_per_token(row0["model"]) / 2**30
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.6))
    a, b, c = axes
    for on, color in ((True, COLORS[2]), (False, COLORS[7])):
        g = t[t["prefix_caching"].astype(bool) == on]
        name = "prefix caching on" if on else "prefix caching off"
        if on:
            a.plot(g["capacity"], 100 * g["prefix_cache_hit_rate"], "-o", color=color, label=name)
        _p50_p99(b, g["capacity"], g["median_ttft_ms"], g["p99_ttft_ms"], color, name)
        c.plot(g["capacity"], g["prefill_tokens"] / 1e6, "-o", color=color, label=name)
    a.axhline(100 * bound, ls=":", color="black", label=f"infinite cache ({100 * bound:.1f}%)")
    default = t.loc[t["capacity"].idxmin(), "capacity"]
    for ax in axes:
        ax.axvline(default, color="gray", lw=0.8, ls="--")
        _plain_log(ax, "x")
        ax.set_xticks(sorted(t["capacity"].unique()))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{_tokens(v)}\n{v * gib:,.0f} GiB"))
        ax.set_xlabel("KV cache capacity (tokens / GiB)")
    a.text(default, 1, " one H100", color="gray", fontsize=8, va="bottom")
    a.set(ylabel="prompt tokens from cache (%)", title="Hit rate vs cache size")
    a.set_ylim(0, 130 * bound)
    a.legend(fontsize=8, loc="upper left")
    _plain_log(b)
    b.set(ylabel="TTFT (ms)", title="TTFT (solid p99, dashed p50)")
    b.legend(fontsize=7)
    c.set(ylabel="prompt tokens prefilled (millions)", title="Prefill work")
    c.set_ylim(bottom=0)
    n = int(row0["num_requests"])
    return _finish(fig, f"Lab 3A: prefix caching on the Mooncake conversation trace (first {n} requests, "
                        f"{row0['speed']:g}x speed, Llama-3.1-8B)")


def headline_lab3_prefix_cache(root: Path, df: pd.DataFrame) -> dict[str, Any]:
    t = _lab3_table(root, df)
    big, small = t["capacity"].max(), t["capacity"].min()
    caching = t["prefix_caching"].astype(bool)
    on, off = t[caching], t[~caching]
    nan_row = pd.Series({"median_ttft_ms": math.nan, "p99_ttft_ms": math.nan, "prefix_cache_hit_rate": math.nan})

    def at(rows: pd.DataFrame, capacity: int) -> pd.Series:  # a missing point reads as NaN
        match = rows[rows["capacity"] == capacity]
        return match.iloc[0] if len(match) else nan_row

    on_big, off_big, on_small, off_small = at(on, big), at(off, big), at(on, small), at(off, small)
    row0 = t.iloc[0]
    return {
        "num_requests": int(row0["num_requests"]),
        "hit_rate_bound": mooncake_hit_bound(row0["trace_path"], int(row0["num_requests"])),
        "largest_capacity_tokens": int(big), "smallest_capacity_tokens": int(small),
        "hit_rate_largest": float(on_big["prefix_cache_hit_rate"]),
        "hit_rate_smallest": float(on_small["prefix_cache_hit_rate"]),
        "ttft_p50_on_largest": float(on_big["median_ttft_ms"]),
        "ttft_p50_off_largest": float(off_big["median_ttft_ms"]),
        "ttft_p99_on_largest": float(on_big["p99_ttft_ms"]), "ttft_p99_off_largest": float(off_big["p99_ttft_ms"]),
        "ttft_p50_on_smallest": float(on_small["median_ttft_ms"]),
        "ttft_p50_off_smallest": float(off_small["median_ttft_ms"]),
        "hit_rate_by_capacity": {int(k): float(v) for k, v in zip(on["capacity"], on["prefix_cache_hit_rate"])},
    }


def plot_lab3_block_size(root: Path, df: pd.DataFrame) -> Figure:
    t = df.sort_values("block_size")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    a, b = axes
    a.plot(t["block_size"], 100 * t["prefix_cache_hit_rate"], "-o", color=COLORS[2])
    a.set(ylabel="prompt tokens from cache (%)", title="Hit rate vs block size")
    a.set_ylim(0, 120 * max(t["prefix_cache_hit_rate"].max(), 0.01))
    b.plot(t["block_size"], t["median_ttft_ms"], "-o", color=COLORS[0])
    for x, y in zip(t["block_size"], t["median_ttft_ms"]):
        b.annotate(f"{y:,.0f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    b.set(ylabel="TTFT p50 (ms)", title="Median time to first token")
    b.margins(y=0.25)
    for ax in axes:
        ax.axvline(512, color="gray", ls="--", lw=0.8)
        _plain_log(ax, "x")
        ax.set_xticks(t["block_size"].tolist())
        ax.set_xlabel("KV block size (tokens)")
    a.text(480, 1, "trace's hash block (512) ", color="gray", fontsize=8, ha="right")
    cap = int((t["num_gpu_blocks"] * t["block_size"]).iloc[0])
    return _finish(fig, f"Lab 3B: block size on the Mooncake trace (KV capacity {_tokens(cap)} tokens in every run)")


def headline_lab3_block_size(root: Path, df: pd.DataFrame) -> dict[str, Any]:
    t = df.set_index("block_size")
    return {"hit_rate_by_block": {int(k): float(v) for k, v in t["prefix_cache_hit_rate"].items()},
            "ttft_p50_by_block": {int(k): float(v) for k, v in t["median_ttft_ms"].items()}}


# ---- lab 4: chunked prefill ----------------------------------------------------------------

def _chunk_label(row: pd.Series) -> str:
    return "off" if not row["chunked_prefill"] else f"{int(row['budget'])}"


def _lab4_table(df: pd.DataFrame) -> pd.DataFrame:
    t = df.copy()
    t["chunk"] = t.apply(_chunk_label, axis=1)
    t["order"] = t.apply(lambda r: r["budget"] + (1e9 if not r["chunked_prefill"] else 0), axis=1)
    return t.sort_values(["qps", "order"])


def plot_lab4(root: Path, df: pd.DataFrame) -> Figure:
    t = _lab4_table(df)
    labels = list(dict.fromkeys(t["chunk"]))
    pos = {c: i for i, c in enumerate(labels)}
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    (a, b), (c, d) = axes
    for i, (qps, g) in enumerate(t.groupby("qps")):
        x = g["chunk"].map(pos)
        color = COLORS[i]
        _p50_p99(a, x, g["median_ttft_ms"], g["p99_ttft_ms"], color, f"{qps:g} req/s")
        b.plot(x, g["p99_tpot_ms"], "-o", color=color, label=f"{qps:g} req/s TPOT p99")
        b.plot(x, g["p99_itl_ms"], ":s", color=color, ms=4, label=f"{qps:g} req/s ITL p99")
    for ax in (a, b):
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel("chunk size: max_num_batched_tokens (off: whole prompts)")
        _plain_log(ax)
    a.set(ylabel="TTFT (ms)", title="TTFT (solid p99, dashed p50)")
    b.set(ylabel="ms", title="Decode smoothness: TPOT p99 and inter-token gap p99")
    a.legend(fontsize=7, ncol=2)
    b.legend(fontsize=7)
    # One run's step times: the smallest chunk vs no chunking, at the highest load.
    top = t[t["qps"] == t["qps"].max()]
    shown = [(c, top["chunk"].iloc[0]), (d, "off")]
    runs = {label: steps_of(root, top.loc[top["chunk"] == label, "run"].iloc[0]) for _, label in shown}
    start = 0.3 * min(float(s["time"].max()) for s in runs.values())  # the same 10 s window in both
    per_step_all = pd.concat([1000 * s["duration"] / s["num_steps"] for s in runs.values()])
    ylim = (0.7 * per_step_all.min(), 1.4 * per_step_all.max())
    for ax, label in shown:
        steps = runs[label]
        # A fast-forwarded row stands for num_steps equal decode steps: plot their mean duration.
        per_step = 1000 * steps["duration"] / steps["num_steps"]
        win = (steps["time"] >= start) & (steps["time"] < start + 10.0)
        m = steps["num_prefill_tokens"] > 0
        ax.scatter(steps.loc[win & ~m, "time"], per_step[win & ~m], s=6, color=COLORS[2], label="decode-only step")
        ax.scatter(steps.loc[win & m, "time"], per_step[win & m], s=10, color=COLORS[3],
                   label="step with a prefill (decodes wait for it)")
        ax.set(xlabel="simulated time (s)", ylabel="step duration (ms)", xlim=(start, start + 10.0),
               title=f"Engine steps, chunk {label}, {top['qps'].iloc[0]:g} req/s "
                     f"(longest {per_step.max():.0f} ms)")
        ax.legend(fontsize=7, loc="upper right")
    for ax in (c, d):
        ax.set_ylim(*ylim)
        _plain_log(ax)
    return _finish(fig, "Lab 4: chunked prefill, prompts of 512..6144 tokens (Llama-3.1-8B, 1 x H100)")


def headline_lab4(root: Path, df: pd.DataFrame) -> dict[str, Any]:
    t = _lab4_table(df)
    out: dict[str, Any] = {}
    for qps, g in t.groupby("qps"):
        g = g.set_index("chunk")
        out[f"{qps:g}"] = {c: {"ttft_p50_ms": float(g.loc[c, "median_ttft_ms"]),
                               "ttft_p99_ms": float(g.loc[c, "p99_ttft_ms"]),
                               "tpot_p99_ms": float(g.loc[c, "p99_tpot_ms"]),
                               "itl_p99_ms": float(g.loc[c, "p99_itl_ms"]),
                               "throughput": float(g.loc[c, "request_throughput"])} for c in g.index}
    return out


# ---- lab 5: parallelism ----------------------------------------------------------------------

def _layout(row: pd.Series) -> str:
    parts = [f"TP{int(row['tp'])}"]
    if row["pp"] > 1:
        parts.append(f"PP{int(row['pp'])}")
    if row["dp"] > 1:
        parts.append(f"DP{int(row['dp'])}")
    return " x ".join(parts)


def _attainment(root: Path, run: str, ttft_ms: float, tpot_ms: float) -> float:
    r = pd.read_parquet(root / run / REQUESTS_FILE, columns=["status", "ttft", "tpot"])
    ok = r["status"].isin(FINISHED) & (r["ttft"] * 1000 <= ttft_ms) & (r["tpot"].fillna(0) * 1000 <= tpot_ms)
    return float(ok.mean())


def _lab5_table(root: Path, df: pd.DataFrame, target: float = 0.9) -> tuple[pd.DataFrame, pd.DataFrame]:
    t = df.copy()
    t["layout"] = t.apply(_layout, axis=1)
    t["attainment"] = [_attainment(root, r, s, p) for r, s, p in zip(t["run"], t["slo_ttft_ms"], t["slo_tpot_ms"])]
    t = t.sort_values(["layout", "qps"])
    rows = []
    for layout, g in t.groupby("layout", sort=False):
        rate, how = goodput(g["qps"].tolist(), g["attainment"].tolist(), target)
        first = g.iloc[0]
        rows.append({"layout": layout, "goodput": rate if how != "<" else 0.0, "how": how,
                     "gpus": int(first["tp"] * first["pp"] * first["dp"]),
                     "kv_tokens_per_replica": int(first["num_gpu_blocks"] * first["block_size"])})
    return t, pd.DataFrame(rows).sort_values("goodput", ascending=False)


def plot_lab5(root: Path, df: pd.DataFrame) -> Figure:
    t, caps = _lab5_table(root, df)
    colors = {layout: COLORS[i] for i, layout in enumerate(caps["layout"])}
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    (a, b), (c, d) = axes
    for layout in caps["layout"]:
        g, color = t[t["layout"] == layout], colors[layout]
        a.plot(g["qps"], 100 * g["attainment"], "-o", color=color, ms=4, label=layout)
        c.plot(g["qps"], g["p99_ttft_ms"], "-o", color=color, ms=4, label=layout)
        d.plot(g["qps"], g["median_tpot_ms"], "-o", color=color, ms=4, label=layout)
    a.axhline(90, color="gray", ls="--", lw=1)
    for _, row in caps.iterrows():
        if row["goodput"] > 0 and row["how"] == "":
            a.plot([row["goodput"]], [90], marker="*", ms=12, color=colors[row["layout"]], mec="black", mew=0.5)
    a.set(xlabel="offered load (req/s)", ylabel="requests meeting the SLO (%)", ylim=(-3, 103),
          title="SLO attainment (TTFT <= 2 s and TPOT <= 100 ms); * = goodput")
    a.legend(fontsize=8)
    bars = b.barh(caps["layout"], caps["goodput"], color=[colors[x] for x in caps["layout"]])
    for bar, (_, row) in zip(bars, caps.iterrows()):
        b.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
               f" {row['how']}{row['goodput']:.1f} req/s, KV {_tokens(row['kv_tokens_per_replica'])} tok/replica",
               va="center", fontsize=8)
    b.invert_yaxis()
    b.set_xlim(0, caps["goodput"].max() * 1.9 if caps["goodput"].max() > 0 else 1)
    b.set(xlabel="goodput on 8 GPUs (req/s at 90% attainment)", title="Capacity within the SLO")
    _plain_log(c)
    c.set(xlabel="offered load (req/s)", ylabel="TTFT p99 (ms)", title="TTFT p99")
    d.set(xlabel="offered load (req/s)", ylabel="TPOT p50 (ms)", title="TPOT p50")
    first = t.iloc[0]
    return _finish(fig, f"Lab 5: {first['model']} on 8 x H100, {len(caps)} parallel layouts "
                        f"(ShareGPT, {df['duration_s'].iloc[0]:g} s of arrivals a run)")


def headline_lab5(root: Path, df: pd.DataFrame) -> dict[str, Any]:
    _, caps = _lab5_table(root, df)
    return {"goodput": {r["layout"]: float(r["goodput"]) for _, r in caps.iterrows()},
            "bound": {r["layout"]: r["how"] for _, r in caps.iterrows()},
            "kv_tokens_per_replica": {r["layout"]: int(r["kv_tokens_per_replica"]) for _, r in caps.iterrows()},
            "best": str(caps.iloc[0]["layout"])}


# ---- lab 6: overload -------------------------------------------------------------------------

def _lab6_table(root: Path, df: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, row in df.iterrows():
        r = requests_of(root, row["run"])
        by_prio = r.groupby("priority")["ttft"].median() * 1000
        swap_s = 0.0
        path = root / row["run"] / BREAKDOWN_FILE
        if path.exists():
            swap_s = float(json.loads(path.read_text()).get("swap", 0.0))
        rows.append({"config": f"{row['policy']} / {row['preemption_mode']}", "policy": row["policy"],
                     "mode": row["preemption_mode"], "qps": row["qps"], "goodput": row["request_goodput"],
                     "attainment": row["slo_attainment"], "completed": int(row["completed"]),
                     "requests": len(r), "aborted": int(row["aborted"]), "preemptions": int(row["num_preemptions"]),
                     "ttft_p50_high": float(by_prio.get(0, math.nan)), "ttft_p50_low": float(by_prio.get(1, math.nan)),
                     "tpot_p99": row["p99_tpot_ms"], "swap_s": swap_s,
                     "recomputed_from_cache": int(row["recomputed_cached_tokens"])})
    return pd.DataFrame(rows).sort_values(["policy", "mode", "qps"])


def plot_lab6(root: Path, df: pd.DataFrame) -> Figure:
    t = _lab6_table(root, df)
    style = {"recompute": "-", "swap": "--"}
    color = {"fcfs": COLORS[3], "priority": COLORS[0]}
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    (a, b), (c, d) = axes
    for (policy, mode), g in t.groupby(["policy", "mode"]):
        kw = {"color": color[policy], "ls": style[mode], "marker": "o" if mode == "recompute" else "x", "ms": 5}
        a.plot(g["qps"], g["goodput"], label=f"{policy}, {mode}", **kw)
        c.plot(g["qps"], g["preemptions"], label=f"{policy}, {mode}", **kw)
        d.plot(g["qps"], g["tpot_p99"], label=f"{policy}, {mode}", **kw)
        if mode == "recompute":
            b.plot(g["qps"], g["ttft_p50_high"], "-o", color=color[policy], ms=4, label=f"{policy}: priority 0 (high)")
            b.plot(g["qps"], g["ttft_p50_low"], ":s", color=color[policy], ms=4, label=f"{policy}: priority 1 (low)")
    a.set(ylabel="requests / s meeting the SLO", title="Goodput (TTFT <= 2 s and TPOT <= 100 ms)")
    a.legend(fontsize=8)
    _plain_log(b)
    b.set(ylabel="TTFT p50 (ms)", title="Median TTFT by priority class (recompute)")
    b.legend(fontsize=7)
    c.set(ylabel="preemptions in the run", title="Preemptions (every request still completes)")
    d.set(ylabel="TPOT p99 (ms)", title="TPOT p99: who pays for priority")
    for ax in axes.flat:
        ax.set_xlabel("offered load (req/s)")
    lost = int((t["requests"] - t["completed"]).sum())
    return _finish(fig, f"Lab 6: overload on a 64k-token KV pool (Llama-3.1-8B, 1 x H100); "
                        f"requests lost in all runs: {lost}")


def headline_lab6(root: Path, df: pd.DataFrame) -> dict[str, Any]:
    t = _lab6_table(root, df)
    top = t[t["qps"] == t["qps"].max()].set_index("config")
    return {
        "max_qps": float(t["qps"].max()),
        "requests_lost": int((t["requests"] - t["completed"]).sum()), "aborted": int(t["aborted"].sum()),
        "preemptions_total": int(t["preemptions"].sum()),
        "goodput_at_max_qps": {k: float(v) for k, v in top["goodput"].items()},
        "ttft_p50_high_at_max_qps": {k: float(v) for k, v in top["ttft_p50_high"].items()},
        "ttft_p50_low_at_max_qps": {k: float(v) for k, v in top["ttft_p50_low"].items()},
        "swap_seconds_at_max_qps": {k: float(v) for k, v in top["swap_s"].items()},
    }


# ---- registry --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Study:
    """One lab preset: its sweep, a quick version of it, its figure and headline numbers."""

    preset: str
    quick: tuple[str, ...]
    plot: Callable[[Path, pd.DataFrame], Figure]
    headline: Callable[[Path, pd.DataFrame], dict[str, Any]]


@dataclass(frozen=True)
class Lab:
    key: str
    title: str
    page: str
    studies: tuple[Study, ...]


LABS: dict[str, Lab] = {lab.key: lab for lab in (
    Lab("lab1", "Static vs continuous batching", "lab1_batching.md", (
        Study("lab1_batching", ("workload.qps=2,32", "workload.num_requests=200"), plot_lab1, headline_lab1),)),
    Lab("lab2", "PagedAttention: reservation vs paged KV, and the block size", "lab2_paged_attention.md", (
        Study("lab2_paged", ("scheduler.max_model_len=8192,32768", "workload.num_requests=200"),
              plot_lab2_paged, headline_lab2_paged),
        Study("lab2_block_size", ("cache.block_size=8,256", "workload.num_requests=200"),
              plot_lab2_block_size, headline_lab2_block_size))),
    Lab("lab3", "Prefix caching on the Mooncake trace", "lab3_prefix_caching.md", (
        Study("lab3_prefix_cache", (("cache={num_gpu_blocks:0},{num_gpu_blocks:262144},"
                                     "{enable_prefix_caching:false,num_gpu_blocks:262144}"),
                                    "workload.num_requests=500"),
              plot_lab3_prefix_cache, headline_lab3_prefix_cache),
        Study("lab3_block_size", ("cache={block_size:16,num_gpu_blocks:262144},{block_size:1024,num_gpu_blocks:4096}",
                                  "workload.num_requests=500"), plot_lab3_block_size, headline_lab3_block_size))),
    Lab("lab4", "Chunked prefill: TTFT vs TPOT", "lab4_chunked_prefill.md", (
        Study("lab4_chunked_prefill", (("scheduler={max_num_batched_tokens:256},{max_num_batched_tokens:8192},"
                                        "{enable_chunked_prefill:false,max_num_batched_tokens:8192}"),
                                       "workload.qps=6", "workload.num_requests=200"), plot_lab4, headline_lab4),)),
    Lab("lab5", "Parallelism: TP vs DP vs PP under an SLO", "lab5_parallelism.md", (
        Study("lab5_parallelism", ("parallel={tp:8},{tp:4,dp:2},{tp:2,dp:4}", "workload.qps=2,8,10,12"),
              plot_lab5, headline_lab5),)),
    Lab("lab6", "Overload: preemption, priorities and goodput", "lab6_overload.md", (
        Study("lab6_overload", ("workload.qps=2,6", "workload.num_requests=300"), plot_lab6, headline_lab6),)),
)}
STUDIES: dict[str, Study] = {s.preset: s for lab in LABS.values() for s in lab.studies}


# ---- running and reporting -------------------------------------------------------------------

def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):
        return value.item()
    return value


def report(root: str | Path, preset: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Figure and headline numbers of one lab sweep directory: writes
    ``root/plots/<preset>.png`` and ``root/headline.json``; returns (figure path, headline)."""
    root = Path(root)
    df = load(root)
    preset = preset or preset_of(df)
    study = STUDIES[preset]
    fig = study.plot(root, df)
    out = root / "plots"
    out.mkdir(exist_ok=True)
    path = out / f"{preset}.png"
    fig.savefig(path, dpi=FIGURE_DPI)
    plt.close(fig)
    headline = _jsonable(study.headline(root, df))
    (root / "headline.json").write_text(json.dumps(headline, indent=2))
    return path, headline


def sweep_command(preset: str, out: Path, quick: bool, extra: Sequence[str] = ()) -> list[str]:
    """The ``experiments.run`` command line of a lab preset (multirun by itself)."""
    study = STUDIES[preset]
    return [sys.executable, "-m", "experiments.run", f"experiment={preset}", f"hydra.sweep.dir={out}",
            *(study.quick if quick else ()), *extra]


def run_study(preset: str, out: Path, quick: bool = False, extra: Sequence[str] = ()) -> tuple[Path, dict[str, Any]]:
    """Run a lab preset's sweep into ``out`` (a fresh directory) and report on it."""
    out = Path(out).resolve()
    if out.exists():
        if not (out / "multirun.yaml").exists():
            raise FileExistsError(f"{out} exists and is not a Hydra sweep directory; not overwriting it")
        shutil.rmtree(out)  # a previous run of this lab: stale runs would mix into the tables
    proc = subprocess.run(sweep_command(preset, out, quick, extra), cwd=REPO, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{preset} sweep failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return report(out, preset)


def _print_headline(preset: str, path: Path, headline: dict[str, Any], seconds: float | None = None) -> None:
    took = f" ({seconds:.1f} s)" if seconds is not None else ""
    print(f"== {preset}{took}: figure {path}")
    print(json.dumps(headline, indent=2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="run a lab's presets, then plot them")
    p_run.add_argument("lab", choices=sorted(LABS))
    p_run.add_argument("--quick", action="store_true", help="fewer sweep points and requests (the tests' mode)")
    p_run.add_argument("--out", type=Path, help="parent of the sweep dirs (default outputs/labs[/quick])")
    p_run.add_argument("overrides", nargs="*", help="extra Hydra overrides for every preset of the lab")
    p_plot = sub.add_parser("plot", help="figure and headline numbers of a finished lab sweep")
    p_plot.add_argument("dir", type=Path)
    p_plot.add_argument("--preset", choices=sorted(STUDIES), help="default: from the runs' experiment= override")
    sub.add_parser("list", help="the labs and their presets")
    args, rest = parser.parse_known_args(argv)  # overrides may follow the options
    if rest and args.cmd != "run":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.cmd == "list":
        for lab in LABS.values():
            print(f"{lab.key}: {lab.title}  (docs/labs/{lab.page}; presets: "
                  f"{', '.join(s.preset for s in lab.studies)})")
    elif args.cmd == "plot":
        path, headline = report(args.dir, args.preset)
        _print_headline(args.preset or path.stem, path, headline)
    else:
        parent = args.out or (OUTPUT_ROOT / "quick" if args.quick else OUTPUT_ROOT)
        t0 = time.perf_counter()
        for study in LABS[args.lab].studies:
            t = time.perf_counter()
            path, headline = run_study(study.preset, parent / study.preset, args.quick, [*args.overrides, *rest])
            _print_headline(study.preset, path, headline, time.perf_counter() - t)
        print(f"{args.lab}: {time.perf_counter() - t0:.1f} s in all")


if __name__ == "__main__":
    main()
