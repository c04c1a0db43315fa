"""Sim vs real: run a workload on the executor, then the same workload in the simulator.

Two phases, two machines::

    # on the GPU machine (no simpy, no hydra needed): one or more cases, one process
    python -m experiments.validate real --case all --model-dir DIR --out runs/ [--model-name Qwen3-0.6B]
    # here, on a CPU: rerun each case in the simulator (calibrated profile and roofline)
    python -m experiments.validate compare --real runs/ --profile experiments/profiles/P.json \
        --out experiments/results/validation

``real`` builds each case's requests from its ``WorkloadConfig`` exactly as the simulator
does (same token ids, arrival times and output lengths: ``core.workloads.build_workload``
plus a simpy-free copy of ``simulator.runner.build_requests``), serves them on a
``RealBackend`` with ``executor.online.run_online`` (wall clock), and writes
``metrics.json`` / ``requests.parquet`` / ``steps.parquet`` (``core.results``) and
``case.json`` (the concrete configs, so the compare phase needs nothing else) per case.
One backend (model, KV pool, CUDA graphs) serves all cases; each case gets a fresh
``EngineCore`` whose ``CacheConfig`` may use fewer blocks than the pool has (KV-starved).

``compare`` writes per case ``requests_compare.parquet`` (one row per request: real,
calibrated and roofline latencies), and over all cases ``errors.csv`` / ``errors.md``
(TTFT/TPOT/ITL/E2E at p50/p90/p99, throughputs, preemptions, prefix hit rate: real, sim,
relative error) and PNG overlays (latency CDFs per case; latency vs throughput over the
QPS sweep).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

# Cases. "workload" is a WorkloadConfig dict; "scheduler" a SchedulerConfig dict; "cache"
# holds enable_prefix_caching and num_gpu_blocks (None = the real backend's pool).
# "rate_of": (case, fraction) sets the Poisson rate to that fraction of the request
# throughput the named case (an overload run) reached on this machine.
_SHAREGPT = {"kind": "synthetic", "lengths": "sharegpt", "arrival": "poisson", "num_requests": 300,
             "max_model_len": 4096, "seed": 0}
_CHUNKED_WL = {"kind": "synthetic", "lengths": "uniform", "input_range": (1024, 4096), "output_range": (32, 256),
               "arrival": "poisson", "rate": 15.0, "num_requests": 150, "seed": 1}
CASES: dict[str, dict[str, Any]] = {
    "qps_overload": {"workload": {**_SHAREGPT, "rate": 1000.0},
                     "scheduler": {"max_model_len": 4096},
                     "note": "ShareGPT lengths, all requests arrive within ~0.3 s: saturation"},
    "qps_knee": {"workload": {**_SHAREGPT}, "rate_of": ("qps_overload", 0.8),
                 "scheduler": {"max_model_len": 4096},
                 "note": "Poisson at 80% of the overload run's request throughput"},
    "qps_low": {"workload": {**_SHAREGPT, "num_requests": 150}, "rate_of": ("qps_overload", 0.25),
                "scheduler": {"max_model_len": 4096},
                "note": "Poisson at 25% of the overload run's request throughput"},
    "azure_conv": {"workload": {"kind": "azure_conv", "num_requests": 200, "speed": 4.0, "max_model_len": 8192},
                   "scheduler": {"max_model_len": 8192},
                   "note": "Azure 2023 conversation trace, first 200 rows at 4x speed"},
    "mooncake": {"workload": {"kind": "mooncake", "num_requests": 120, "speed": 2.0, "max_model_len": 16384},
                 "scheduler": {"max_model_len": 16384}, "cache": {"enable_prefix_caching": True},
                 "note": "Mooncake conversation trace, first 120 rows at 2x speed, prompts clipped to 16k, "
                         "prefix caching on"},
    "chunked_on": {"workload": dict(_CHUNKED_WL),
                   "scheduler": {"max_model_len": 8192, "max_num_batched_tokens": 512,
                                 "enable_chunked_prefill": True},
                   "note": "1k-4k prompts at 15 req/s, 512-token budget with chunked prefill"},
    "chunked_off": {"workload": dict(_CHUNKED_WL),
                    "scheduler": {"max_model_len": 8192, "max_num_batched_tokens": 8192,
                                  "enable_chunked_prefill": False},
                    "note": "same workload, whole prompts (no chunking), 8192-token budget"},
    "kv_starved": {"workload": {"kind": "synthetic", "lengths": "uniform", "input_range": (256, 768),
                                "output_range": (256, 768), "arrival": "poisson", "rate": 20.0,
                                "num_requests": 100, "seed": 2},
                   "scheduler": {"max_model_len": 2048}, "cache": {"num_gpu_blocks": 320},
                   "note": "320 KV blocks (5120 tokens) for 100 requests of up to 1.5k tokens: recompute "
                           "preemption"},
}
CASE_ORDER = list(CASES)
QPS_CASES = ("qps_low", "qps_knee", "qps_overload")

LATENCIES = ("ttft", "tpot", "itl", "e2el")
QUANTILES = (("p50", "median"), ("p90", "p90"), ("p99", "p99"))
SCALARS = ("request_throughput", "output_throughput", "total_token_throughput", "num_preemptions",
           "prefix_cache_hit_rate")
TARGETS = ("median_ttft_ms", "median_tpot_ms", "median_e2el_ms", "output_throughput")
TAIL_TARGETS = ("p99_ttft_ms", "p99_tpot_ms", "p99_e2el_ms")


def metric_keys() -> list[str]:
    keys = [f"{q}_{lat}_ms" for lat in LATENCIES for _, q in QUANTILES]
    return keys + list(SCALARS)


# --- requests without simpy -----------------------------------------------------------------
def build_requests_open_loop(workload: Any) -> list[Any]:
    """The case's requests, built by core alone: ``simulator.runner`` imports simpy, which the
    GPU machine lacks."""
    if workload.is_closed_loop:
        raise ValueError("validation cases are open loop")
    return workload.core_requests()[0]


def resolve_case(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    if name not in CASES:
        raise ValueError(f"unknown case {name!r}; known: {', '.join(CASES)}")
    case = copy.deepcopy(CASES[name])
    case.setdefault("cache", {})
    case["name"] = name
    for k, v in (overrides or {}).items():
        case["workload"][k] = v
    return case


# --- real phase ---------------------------------------------------------------------------------
def run_real(cases: list[str], model_dir: str, out: Path, *, model_name: str | None = None,
             device: str | None = None, num_requests: int | None = None, num_gpu_blocks: int | None = None,
             max_model_len: int = 16384, max_num_batched_tokens: int = 8192, max_num_seqs: int = 256,
             clip_len: int | None = None, max_duration: float = 90.0, warmup: bool = True) -> None:
    import torch

    from core.config import CacheConfig, SchedulerConfig
    from core.engine import EngineCore
    from core.metrics import summarize
    from core.results import write_results
    from core.workloads.config import WorkloadConfig, build_workload
    from executor.backend import RealBackend, resolve_device
    from executor.loader import load_model
    from executor.online import run_online

    t_all = time.perf_counter()
    dev = resolve_device(device)
    loaded = load_model(model_dir, device=dev)
    cfg = loaded.config
    max_model_len = min(max_model_len, cfg.max_position_embeddings)
    base_sched = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                 max_model_len=max_model_len)
    if num_gpu_blocks is None and dev.type != "cuda":
        num_gpu_blocks = 2048
    backend = RealBackend.from_pretrained(loaded, scheduler_config=base_sched, num_gpu_blocks=num_gpu_blocks,
                                          gpu_memory_utilization=0.85)
    runner = backend.runner
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"backend ready: {runner.num_gpu_blocks} blocks, device {dev_name} "
          f"({time.perf_counter() - t_all:.1f} s)", flush=True)
    vocab = min(32000, cfg.vocab_size)
    out.mkdir(parents=True, exist_ok=True)

    def serve(case: dict[str, Any], case_dir: Path | None) -> dict[str, Any]:
        wl = dict(case["workload"])
        wl["vocab_size"] = vocab
        if clip_len is not None:
            wl["max_model_len"] = min(wl.get("max_model_len") or clip_len, clip_len)
        sched_kw = {**dataclasses.asdict(base_sched), **case.get("scheduler", {})}
        sched_kw["max_model_len"] = min(sched_kw["max_model_len"], max_model_len)
        if clip_len is not None:
            sched_kw["max_model_len"] = min(sched_kw["max_model_len"], clip_len)
            sched_kw["max_num_batched_tokens"] = max(min(sched_kw["max_num_batched_tokens"], max_num_batched_tokens),
                                                     1 if sched_kw.get("enable_chunked_prefill", True) else clip_len)
        sched = SchedulerConfig(**sched_kw)
        blocks = case["cache"].get("num_gpu_blocks") or runner.num_gpu_blocks
        blocks = min(blocks, runner.num_gpu_blocks)
        prefix = case["cache"].get("enable_prefix_caching", True)
        cache = CacheConfig(runner.block_size, int(blocks), 0, prefix)
        workload = build_workload(WorkloadConfig.from_dict(wl))
        requests = build_requests_open_loop(workload)
        engine = EngineCore(sched, cache, backend, eos_token_id=backend.eos_token_id)
        runner.reset()
        gc.collect()
        t0 = time.perf_counter()
        # sleeps are capped so that max_duration is honoured while waiting for a late arrival
        result = run_online(engine, requests, max_duration=max_duration,
                            sleep=lambda s: time.sleep(min(s, 0.5)))
        wall = time.perf_counter() - t0
        metrics = summarize(result.requests, result.steps)
        metrics.update(num_gpu_blocks=int(blocks), num_rejected=len(result.rejected), wall_seconds=wall,
                       num_engine_steps=result.num_steps)
        if case_dir is not None:
            write_results(case_dir, result.requests, result.steps, metrics, engine.breakdown)
            record = {"name": case["name"], "note": case.get("note", ""), "workload": wl,
                      "scheduler": dataclasses.asdict(sched),
                      "cache": {"block_size": runner.block_size, "num_gpu_blocks": int(blocks),
                                "enable_prefix_caching": prefix},
                      "model_name": model_name or Path(model_dir).name, "model_dir": str(model_dir),
                      "device": dev_name, "torch": torch.__version__,
                      "runner": {"max_model_len": runner.max_model_len, "pool_blocks": runner.num_gpu_blocks,
                                 "cuda_graph_sizes": list(runner.capture_sizes)},
                      "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            (case_dir / "case.json").write_text(json.dumps(record, indent=1, default=list))
        print(f"  {case['name']}: {metrics['completed']} done, {len(result.rejected)} rejected, "
              f"{wall:.1f} s wall, {result.num_steps} steps, req/s {metrics['request_throughput']:.2f}, "
              f"TTFT p50 {metrics['median_ttft_ms']:.1f} ms, TPOT p50 {metrics['median_tpot_ms']:.2f} ms, "
              f"preemptions {metrics['num_preemptions']}", flush=True)
        return metrics

    if warmup:
        t = time.perf_counter()
        for budget, chunk in ((512, True), (max_num_batched_tokens, False)):
            wcase = {"name": "warmup", "cache": {}, "workload": {
                "kind": "synthetic", "lengths": "uniform", "input_range": (16, min(3000, max_model_len // 2)),
                "output_range": (4, 64), "arrival": "poisson", "rate": 200.0,
                "num_requests": 12 if num_requests else 96, "seed": 99},
                "scheduler": {"max_num_batched_tokens": budget, "enable_chunked_prefill": chunk,
                              "max_model_len": max_model_len}}
            serve(wcase, None)
        print(f"warm-up done ({time.perf_counter() - t:.1f} s)", flush=True)

    done: dict[str, dict[str, Any]] = {}
    order = [c for c in CASE_ORDER if c in cases]
    for name in order:
        case = resolve_case(name, {"num_requests": num_requests} if num_requests else None)
        if "rate_of" in case:
            ref, frac = case.pop("rate_of")
            ref_metrics = done.get(ref)
            if ref_metrics is None and (out / ref / "metrics.json").exists():
                ref_metrics = json.loads((out / ref / "metrics.json").read_text())
            if ref_metrics is None:
                raise ValueError(f"case {name} takes its rate from {ref}; run {ref} first")
            case["workload"]["rate"] = round(float(frac * ref_metrics["request_throughput"]), 3)
        done[name] = serve(case, out / name)
    print(f"real phase done in {time.perf_counter() - t_all:.1f} s", flush=True)


# --- compare phase --------------------------------------------------------------------------------
def _sim_hardware(device: str) -> str:
    low = device.lower()
    if "h200" in low:
        return "H200"
    if "h100" in low:
        return "H100-SXM"
    return "H100-SXM"


def _model_spec(record: dict[str, Any]) -> Any:
    from simulator.model_spec import ModelSpec, get_model

    name = record["model_name"]
    try:
        return get_model(name)
    except ValueError:
        path = Path(record.get("model_dir", ""))
        if not (path / "config.json").exists():
            raise
        return ModelSpec.from_hf_config(path, name=name)


def simulate_case(record: dict[str, Any], cost_model: str, options: dict[str, Any], out_dir: Path | None,
                  hardware: str | None = None) -> dict[str, Any]:
    from core.config import SchedulerConfig
    from core.workloads.config import WorkloadConfig, build_workload
    from simulator.runner import SimulationConfig, run_simulation

    workload = build_workload(WorkloadConfig.from_dict(record["workload"]))
    cache = record["cache"]
    cfg = SimulationConfig(model=_model_spec(record), hardware=hardware or _sim_hardware(record["device"]),
                           scheduler=SchedulerConfig(**record["scheduler"]), block_size=cache["block_size"],
                           enable_prefix_caching=cache["enable_prefix_caching"],
                           num_gpu_blocks=cache["num_gpu_blocks"], cost_model=cost_model,
                           cost_model_options=options)
    run = run_simulation(cfg, workload, out_dir=out_dir)
    return run.metrics


def _rel(sim: float | None, real: float | None) -> float:
    if sim is None or real is None:
        return math.nan
    sim, real = float(sim), float(real)
    if not (math.isfinite(sim) and math.isfinite(real)):
        return math.nan
    if real == 0:
        return 0.0 if sim == 0 else math.nan
    return (sim - real) / abs(real)


def compare(real_root: Path, profile: Path, out: Path, cases: list[str] | None = None,
            plots: bool = True, sim_root: Path | None = None) -> Any:
    """Rerun every case under ``real_root`` in the simulator; write the comparison to ``out``.
    The simulated runs' own result files go to ``sim_root`` (a temporary folder if None)."""
    import tempfile

    import pandas as pd

    from core.results import REQUESTS_FILE, read_metrics

    out.mkdir(parents=True, exist_ok=True)
    dirs = sorted(p.parent for p in real_root.glob("*/case.json"))
    if cases:
        dirs = [d for d in dirs if d.name in cases]
    if not dirs:
        raise FileNotFoundError(f"no case directories (with case.json) under {real_root}")
    rows = []
    per_case_frames: dict[str, Any] = {}
    metrics_by_case: dict[str, dict[str, dict[str, Any]]] = {}
    prof = json.loads(profile.read_text())
    tmp = None
    if sim_root is None:
        tmp = tempfile.TemporaryDirectory(prefix="servelab-validate-")
        sim_root = Path(tmp.name)
    for d in sorted(dirs, key=lambda p: CASE_ORDER.index(p.name) if p.name in CASE_ORDER else 99):
        record = json.loads((d / "case.json").read_text())
        name = record["name"]
        real = read_metrics(d)
        t0 = time.perf_counter()
        sims: dict[str, dict[str, Any]] = {}
        frames = {"real": pd.read_parquet(d / REQUESTS_FILE)}
        for label, kind, opts in (("calibrated", "calibrated", {"profile": str(profile)}),
                                  ("roofline", "roofline", {})):
            sim_dir = sim_root / name / label
            sims[label] = simulate_case(record, kind, opts, sim_dir)
            frames[label] = pd.read_parquet(sim_dir / REQUESTS_FILE)
        metrics_by_case[name] = {"real": real, **sims}
        for key in metric_keys():
            row = {"case": name, "metric": key, "real": real.get(key)}
            for label in ("calibrated", "roofline"):
                row[label] = sims[label].get(key)
                row[f"{label}_rel_err"] = _rel(sims[label].get(key), real.get(key))
            rows.append(row)
        # per-request comparison
        cols = ["request_id", "arrival_time", "prompt_len", "output_len", "ttft", "tpot", "e2el",
                "num_preemptions", "num_cached_tokens"]
        merged = frames["real"][cols].rename(columns={c: f"{c}_real" for c in cols[4:]})
        for label in ("calibrated", "roofline"):
            f = frames[label][["request_id", "ttft", "tpot", "e2el", "num_preemptions", "num_cached_tokens"]]
            merged = merged.merge(f.rename(columns={c: f"{c}_{label}" for c in f.columns[1:]}),
                                  on="request_id", how="left")
        merged.insert(0, "case", name)
        merged.to_parquet(out / f"requests_compare_{name}.parquet", index=False)
        per_case_frames[name] = merged
        print(f"  {name}: simulated twice in {time.perf_counter() - t0:.1f} s", flush=True)
    if tmp is not None:
        tmp.cleanup()
    table = pd.DataFrame(rows)
    table.to_csv(out / "errors.csv", index=False)
    summary = summarize_errors(table)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "errors.md").write_text(errors_markdown(table, summary, profile=prof, real_root=real_root,
                                                   metrics_by_case=metrics_by_case))
    if plots:
        plot_cdfs(per_case_frames, out)
        plot_latency_throughput(metrics_by_case, out)
    return table


def summarize_errors(table: Any) -> dict[str, Any]:
    """Median absolute relative error over cases, per metric and simulator."""
    out: dict[str, Any] = {}
    for label in ("calibrated", "roofline"):
        per_metric = {}
        for key in (*TARGETS, *TAIL_TARGETS, "median_itl_ms", "request_throughput"):
            vals = table.loc[table.metric == key, f"{label}_rel_err"].abs().dropna()
            per_metric[key] = float(vals.median()) if len(vals) else None
        out[label] = per_metric
        out[f"{label}_targets_met"] = {
            "p50_and_throughput_le_3pct": all(per_metric[k] is not None and per_metric[k] <= 0.03 for k in TARGETS),
            "p99_le_8pct": all(per_metric[k] is not None and per_metric[k] <= 0.08 for k in TAIL_TARGETS),
        }
    return out


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:.0f}"
        return f"{v:.{digits}f}"
    return str(v)


def _pct(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{100 * v:+.1f}%"


def _abs_pct(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{100 * v:.1f}%"


SHOWN = ("median_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "p90_tpot_ms", "p99_tpot_ms",
         "median_itl_ms", "p99_itl_ms", "median_e2el_ms", "p90_e2el_ms", "p99_e2el_ms", "request_throughput",
         "output_throughput", "num_preemptions", "prefix_cache_hit_rate")


def errors_markdown(table: Any, summary: dict[str, Any], profile: dict[str, Any] | None = None,
                    real_root: Path | None = None, metrics_by_case: dict[str, Any] | None = None) -> str:
    lines = []
    if profile is not None:
        meta = profile.get("meta", {})
        lines.append(f"Profile: model {profile.get('model')}, {meta.get('device')}, torch {meta.get('torch')}, "
                     f"triton {meta.get('triton')}, measured {meta.get('date')}.")
        lines.append("")
    lines.append("Median |relative error| over the cases:")
    lines.append("")
    keys = list(summary["calibrated"])
    lines.append("| simulator | " + " | ".join(keys) + " |")
    lines.append("|---|" + "---|" * len(keys))
    for label in ("calibrated", "roofline"):
        lines.append(f"| {label} | " + " | ".join(_abs_pct(summary[label][k]) for k in keys) + " |")
    lines.append("")
    for case in table.case.unique():
        sub = table[table.case == case].set_index("metric")
        lines.append(f"### {case}")
        lines.append("")
        lines.append("| metric | real | calibrated | err | roofline | err |")
        lines.append("|---|---:|---:|---:|---:|---:|")
        for key in SHOWN:
            if key not in sub.index:
                continue
            r = sub.loc[key]
            lines.append(f"| {key} | {_fmt(r.real)} | {_fmt(r.calibrated)} | {_pct(r.calibrated_rel_err)} | "
                         f"{_fmt(r.roofline)} | {_pct(r.roofline_rel_err)} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _ecdf(values: Any) -> tuple[Any, Any]:
    import numpy as np

    v = np.sort(np.asarray(values, dtype=float))
    v = v[np.isfinite(v)]
    return v, np.arange(1, len(v) + 1) / max(len(v), 1)


def plot_cdfs(frames: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    styles = {"real": ("k", "-"), "calibrated": ("tab:blue", "--"), "roofline": ("tab:orange", ":")}
    for name, df in frames.items():
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for ax, (col, title) in zip(axes, (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2el", "E2E latency"))):
            for label, (color, ls) in styles.items():
                x, y = _ecdf(df[f"{col}_{label}"] * 1000.0)
                if len(x):
                    ax.plot(x, y, color=color, ls=ls, lw=1.6, label=label)
            ax.set_xlabel(f"{title} (ms)")
            ax.set_ylabel("CDF")
            ax.grid(alpha=0.3)
            if col == "ttft" and len(df) and (df["ttft_real"].max() / max(df["ttft_real"].min(), 1e-9) > 50):
                ax.set_xscale("log")
        axes[0].legend(loc="lower right", fontsize=8)
        fig.suptitle(f"{name}: simulated vs real latency CDFs", fontsize=10)
        fig.tight_layout()
        p = out / f"cdf_{name}.png"
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(p)
    return paths


def plot_latency_throughput(metrics_by_case: dict[str, Any], out: Path) -> Path | None:
    cases = [c for c in QPS_CASES if c in metrics_by_case]
    if len(cases) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    styles = {"real": ("k", "-", "o"), "calibrated": ("tab:blue", "--", "s"), "roofline": ("tab:orange", ":", "^")}
    for ax, key, title in zip(axes, ("median_ttft_ms", "median_tpot_ms", "p90_e2el_ms"),
                              ("median TTFT (ms)", "median TPOT (ms)", "p90 E2E (ms)")):
        for label, (color, ls, marker) in styles.items():
            xs = [metrics_by_case[c][label]["output_throughput"] for c in cases]
            ys = [metrics_by_case[c][label][key] for c in cases]
            ax.plot(xs, ys, color=color, ls=ls, marker=marker, label=label)
        ax.set_xlabel("output throughput (tok/s)")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("QPS sweep (low, knee, overload): latency vs throughput", fontsize=10)
    fig.tight_layout()
    p = out / "latency_throughput.png"
    fig.savefig(p, dpi=90)
    plt.close(fig)
    return p


# --- CLI ----------------------------------------------------------------------------------------
def _case_list(spec: str) -> list[str]:
    if spec == "all":
        return list(CASE_ORDER)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    for n in names:
        if n not in CASES:
            raise SystemExit(f"unknown case {n!r}; known: {', '.join(CASES)}")
    return names


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="phase", required=True)
    r = sub.add_parser("real", help="run cases on the executor (GPU machine)")
    r.add_argument("--case", default="all", help="a case name, a comma list, or 'all'")
    r.add_argument("--model-dir", required=True)
    r.add_argument("--out", required=True, help="root directory; one subdirectory per case")
    r.add_argument("--model-name", default=None, help="catalog name for the simulator (default: dir name)")
    r.add_argument("--device", default=None)
    r.add_argument("--num-requests", type=int, default=None, help="override every case's request count")
    r.add_argument("--num-gpu-blocks", type=int, default=None, help="KV pool (default: memory profiling)")
    r.add_argument("--max-model-len", type=int, default=16384)
    r.add_argument("--clip-len", type=int, default=None, help="clip every prompt + output to this (dry runs)")
    r.add_argument("--max-duration", type=float, default=90.0)
    r.add_argument("--no-warmup", action="store_true")
    c = sub.add_parser("compare", help="rerun real cases in the simulator and compare (CPU)")
    c.add_argument("--real", required=True, help="root written by the real phase")
    c.add_argument("--profile", required=True)
    c.add_argument("--out", default="experiments/results/validation")
    c.add_argument("--case", default=None, help="restrict to these cases (comma list)")
    c.add_argument("--no-plots", action="store_true")
    c.add_argument("--sim-dir", default=None, help="keep the simulated runs' result files here")
    sub.add_parser("cases", help="list the cases")
    args = ap.parse_args(argv)
    if args.phase == "real":
        run_real(_case_list(args.case), args.model_dir, Path(args.out), model_name=args.model_name,
                 device=args.device, num_requests=args.num_requests, num_gpu_blocks=args.num_gpu_blocks,
                 max_model_len=args.max_model_len, clip_len=args.clip_len, max_duration=args.max_duration,
                 warmup=not args.no_warmup)
    elif args.phase == "compare":
        table = compare(Path(args.real), Path(args.profile), Path(args.out),
                        cases=_case_list(args.case) if args.case else None, plots=not args.no_plots,
                        sim_root=Path(args.sim_dir) if args.sim_dir else None)
        summary = json.loads((Path(args.out) / "summary.json").read_text())
        print(json.dumps(summary, indent=1))
        del table
    else:
        for name, case in CASES.items():
            print(f"{name:14s} {case.get('note', '')}")


if __name__ == "__main__":
    sys.exit(main())
