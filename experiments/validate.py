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
QPS sweep). ``--baseline-profile`` adds a second calibrated run (``calibrated_v1``).

``steps`` is the step-level check: it rebuilds every real step's batch (``replay_steps``:
the scheduler replayed on the real steps' start times) and compares each profile's
predicted step time with the real wall time, per step kind and case (``step_errors.md``)::

    python -m experiments.validate steps --real runs/ --profile v2=P.json [--profile v1=Q.json] --out DIR

``log-compare`` is for a real phase whose run directories were lost: it rebuilds each case
from the log's summary lines (the QPS-sweep rates from the logged overload throughput) and
compares the logged request throughput, TTFT / TPOT p50 and preemptions with the simulator's::

    python -m experiments.validate log-compare --log real.log --profile P.json --num-gpu-blocks 32768 --out DIR
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import math
import re
import statistics
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


def set_rate_of(case: dict[str, Any], ref_request_throughput: float) -> None:
    """A ``rate_of`` case's Poisson rate from its reference run's request throughput (req/s),
    as the real phase sets it (rounded to 3 decimals); removes ``rate_of``."""
    _, frac = case.pop("rate_of")
    case["workload"]["rate"] = round(float(frac * ref_request_throughput), 3)


def case_configs(case: dict[str, Any], base_sched: dict[str, Any], *, vocab: int, pool_blocks: int,
                 max_model_len: int, max_num_batched_tokens: int,
                 clip_len: int | None = None) -> tuple[dict[str, Any], dict[str, Any], int, bool]:
    """The concrete (workload dict, SchedulerConfig kwargs, KV blocks, prefix caching) the real
    phase serves ``case`` with: ``base_sched`` (a SchedulerConfig as a dict) updated by the
    case's scheduler, the model length capped at ``max_model_len`` (and ``clip_len``), token
    ids below ``vocab``, the case's KV blocks capped at the backend's pool."""
    wl = dict(case["workload"])
    wl["vocab_size"] = vocab
    if clip_len is not None:
        wl["max_model_len"] = min(wl.get("max_model_len") or clip_len, clip_len)
    sched_kw = {**base_sched, **case.get("scheduler", {})}
    sched_kw["max_model_len"] = min(sched_kw["max_model_len"], max_model_len)
    if clip_len is not None:
        sched_kw["max_model_len"] = min(sched_kw["max_model_len"], clip_len)
        sched_kw["max_num_batched_tokens"] = max(min(sched_kw["max_num_batched_tokens"], max_num_batched_tokens),
                                                 1 if sched_kw.get("enable_chunked_prefill", True) else clip_len)
    blocks = min(case.get("cache", {}).get("num_gpu_blocks") or pool_blocks, pool_blocks)
    prefix = case.get("cache", {}).get("enable_prefix_caching", True)
    return wl, sched_kw, int(blocks), bool(prefix)


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
        wl, sched_kw, blocks, prefix = case_configs(case, dataclasses.asdict(base_sched), vocab=vocab,
                                                    pool_blocks=runner.num_gpu_blocks, max_model_len=max_model_len,
                                                    max_num_batched_tokens=max_num_batched_tokens,
                                                    clip_len=clip_len)
        sched = SchedulerConfig(**sched_kw)
        cache = CacheConfig(runner.block_size, blocks, 0, prefix)
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
                      "max_duration": max_duration,
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
            ref = case["rate_of"][0]
            ref_metrics = done.get(ref)
            if ref_metrics is None and (out / ref / "metrics.json").exists():
                ref_metrics = json.loads((out / ref / "metrics.json").read_text())
            if ref_metrics is None:
                raise ValueError(f"case {name} takes its rate from {ref}; run {ref} first")
            set_rate_of(case, ref_metrics["request_throughput"])
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


def cut_off(requests: list[Any], steps: list[Any], t: float) -> tuple[list[Any], list[Any]]:
    """A simulated run as a real run stopped at time ``t`` records it (``run_online``'s
    ``max_duration``): what is in flight is aborted at ``t``, later arrivals are never added,
    steps after ``t`` never run. A simulation is causal, so nothing before ``t`` changes: this
    is the same as simulating with the stop. Edits the requests in place."""
    from core.request import RequestStatus

    for r in requests:
        if r.status.finished and r.finish_time is not None and r.finish_time <= t:
            continue
        if r.arrival_time <= t:
            r.status, r.finish_time = RequestStatus.FINISHED_ABORTED, t
        else:
            r.status, r.finish_time = RequestStatus.WAITING, None
    return requests, [s for s in steps if s.time <= t]


def simulate_case(record: dict[str, Any], cost_model: str, options: dict[str, Any], out_dir: Path | None,
                  hardware: str | None = None, stop_after: float | None = None) -> dict[str, Any]:
    """Simulate a real case's record; ``stop_after`` (seconds after its first arrival) cuts the
    run where the real one was stopped (``cut_off``)."""
    from core.config import SchedulerConfig
    from core.metrics import summarize
    from core.results import write_results
    from core.workloads.config import WorkloadConfig, build_workload
    from simulator.runner import SimulationConfig, run_simulation

    workload = build_workload(WorkloadConfig.from_dict(record["workload"]))
    cache = record["cache"]
    cfg = SimulationConfig(model=_model_spec(record), hardware=hardware or _sim_hardware(record["device"]),
                           scheduler=SchedulerConfig(**record["scheduler"]), block_size=cache["block_size"],
                           enable_prefix_caching=cache["enable_prefix_caching"],
                           num_gpu_blocks=cache["num_gpu_blocks"], cost_model=cost_model,
                           cost_model_options=options)
    if stop_after is None:
        return run_simulation(cfg, workload, out_dir=out_dir).metrics
    res = run_simulation(cfg, workload).result
    t = min(r.arrival_time for r in res.requests) + stop_after
    requests, steps = cut_off(res.requests, res.steps, t)
    metrics = summarize(requests, steps)
    if out_dir is not None:
        write_results(out_dir, requests, steps, metrics, res.breakdown)
    return metrics


def _rel(sim: float | None, real: float | None) -> float:
    if sim is None or real is None:
        return math.nan
    sim, real = float(sim), float(real)
    if not (math.isfinite(sim) and math.isfinite(real)):
        return math.nan
    if real == 0:
        return 0.0 if sim == 0 else math.nan
    return (sim - real) / abs(real)


def _sim_variants(profile: Path, baseline_profile: Path | None) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, cost model, options) of each simulator run per case."""
    out = [("calibrated", "calibrated", {"profile": str(profile)})]
    if baseline_profile is not None:
        out.append(("calibrated_v1", "calibrated", {"profile": str(baseline_profile)}))
    out.append(("roofline", "roofline", {}))
    return out


def sim_labels(table: Any) -> list[str]:
    return [label for label in SIM_LABELS if label in getattr(table, "columns", table)]


SIM_LABELS = ("calibrated", "calibrated_v1", "roofline")


def compare(real_root: Path, profile: Path, out: Path, cases: list[str] | None = None,
            plots: bool = True, sim_root: Path | None = None, baseline_profile: Path | None = None,
            max_duration: float | None = None) -> Any:
    """Rerun every case under ``real_root`` in the simulator; write the comparison to ``out``.
    The simulated runs' own result files go to ``sim_root`` (a temporary folder if None).
    ``baseline_profile`` (optional) adds a second calibrated run, labelled ``calibrated_v1``.
    A real case that its ``max_duration`` (case.json, else ``max_duration``) stopped with
    requests left is simulated up to the same moment (``cut_off`` at its measured duration)."""
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
        limit = record.get("max_duration", max_duration)
        stopped = limit is not None and (real.get("aborted", 0) + real.get("unfinished", 0)) > 0
        stop_after = float(real["duration"]) if stopped else None
        t0 = time.perf_counter()
        sims: dict[str, dict[str, Any]] = {}
        frames = {"real": pd.read_parquet(d / REQUESTS_FILE)}
        variants = _sim_variants(profile, baseline_profile)
        labels = [v[0] for v in variants]
        for label, kind, opts in variants:
            sim_dir = sim_root / name / label
            sims[label] = simulate_case(record, kind, opts, sim_dir, stop_after=stop_after)
            frames[label] = pd.read_parquet(sim_dir / REQUESTS_FILE)
        metrics_by_case[name] = {"real": real, **sims}
        for key in metric_keys():
            row = {"case": name, "metric": key, "real": real.get(key)}
            for label in labels:
                row[label] = sims[label].get(key)
                row[f"{label}_rel_err"] = _rel(sims[label].get(key), real.get(key))
            rows.append(row)
        # per-request comparison
        cols = ["request_id", "arrival_time", "prompt_len", "output_len", "ttft", "tpot", "e2el",
                "num_preemptions", "num_cached_tokens"]
        merged = frames["real"][cols].rename(columns={c: f"{c}_real" for c in cols[4:]})
        for label in labels:
            f = frames[label][["request_id", "ttft", "tpot", "e2el", "num_preemptions", "num_cached_tokens"]]
            merged = merged.merge(f.rename(columns={c: f"{c}_{label}" for c in f.columns[1:]}),
                                  on="request_id", how="left")
        merged.insert(0, "case", name)
        merged.to_parquet(out / f"requests_compare_{name}.parquet", index=False)
        per_case_frames[name] = merged
        cut = f", stopped at {stop_after:.1f} s like the real run" if stop_after is not None else ""
        print(f"  {name}: simulated {len(labels)} times in {time.perf_counter() - t0:.1f} s{cut}", flush=True)
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
    for label in sim_labels(table):
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


def run_spread(roots: list[Path]) -> dict[str, Any]:
    """How far real runs of the same cases (on other machines or processes) are from each
    other: for every ordered pair of roots, the median over their common cases of
    |metric_a / metric_b - 1|; per metric the median over pairs (and the pairs themselves).
    Why: the error a simulator could reach against one run is bounded below by how well
    another run of the same workload would predict it, so the targets must be read against it."""
    if len(roots) < 2:
        raise ValueError(f"need at least two real roots to compare, got {len(roots)}")
    metrics = [{d.parent.name: json.loads((d.parent / "metrics.json").read_text())
                for d in sorted(root.glob("*/case.json")) if (d.parent / "metrics.json").exists()} for root in roots]
    keys = (*TARGETS, *TAIL_TARGETS)
    pairs: dict[str, dict[str, float]] = {}
    for i, a in enumerate(metrics):
        for j, b in enumerate(metrics):
            cases = sorted(set(a) & set(b))
            if i == j or not cases:
                continue
            pairs[f"{roots[i]} vs {roots[j]}"] = {
                k: statistics.median([abs(a[c][k] / b[c][k] - 1) for c in cases if b[c].get(k)]) for k in keys}
    if not pairs:
        raise ValueError("the real roots share no case")
    return {"median_over_pairs": {k: statistics.median([v[k] for v in pairs.values()]) for k in keys},
            "pairs": pairs}


def summary_table(root: Path) -> str:
    """One markdown row per comparison under ``root`` (every ``summary.json`` that ``compare``
    wrote, by its directory relative to ``root``): the calibrated model's median |error| over the
    cases on the target metrics and whether the targets are met."""
    keys = (*TARGETS, *TAIL_TARGETS)
    rows = []
    for path in sorted(root.rglob("summary.json")):
        summary = json.loads(path.read_text())
        if "calibrated" not in summary:
            continue
        met = summary.get("calibrated_targets_met", {})
        rows.append(f"| {path.parent.relative_to(root)} | "
                    + " | ".join(_abs_pct(summary["calibrated"].get(k)) for k in keys)
                    + f" | {'yes' if met.get('p50_and_throughput_le_3pct') else 'no'}"
                    + f" | {'yes' if met.get('p99_le_8pct') else 'no'} |")
    if not rows:
        raise ValueError(f"no compare summary.json under {root}")
    head = "| comparison | " + " | ".join(keys) + " | p50 <= 3 % | p99 <= 8 % |"
    return "\n".join([head, "|" + "---|" * (len(keys) + 3), *rows]) + "\n"


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
    labels = sim_labels(table)
    lines.append("| simulator | " + " | ".join(keys) + " |")
    lines.append("|---|" + "---|" * len(keys))
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(_abs_pct(summary[label][k]) for k in keys) + " |")
    lines.append("")
    for case in table.case.unique():
        sub = table[table.case == case].set_index("metric")
        lines.append(f"### {case}")
        lines.append("")
        lines.append("| metric | real | " + " | ".join(f"{label} | err" for label in labels) + " |")
        lines.append("|---|---:|" + "---:|---:|" * len(labels))
        for key in SHOWN:
            if key not in sub.index:
                continue
            r = sub.loc[key]
            lines.append(f"| {key} | {_fmt(r.real)} | " + " | ".join(
                f"{_fmt(r[label])} | {_pct(r[f'{label}_rel_err'])}" for label in labels) + " |")
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
    all_styles = {"real": ("k", "-"), "calibrated": ("tab:blue", "--"), "calibrated_v1": ("tab:green", "-."),
                  "roofline": ("tab:orange", ":")}
    for name, df in frames.items():
        styles = {k: v for k, v in all_styles.items() if f"ttft_{k}" in df.columns}
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
    styles = {"real": ("k", "-", "o"), "calibrated": ("tab:blue", "--", "s"),
              "calibrated_v1": ("tab:green", "-.", "v"), "roofline": ("tab:orange", ":", "^")}
    styles = {k: v for k, v in styles.items() if k in metrics_by_case[cases[0]]}
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


# --- log compare ----------------------------------------------------------------------------------
#: One case's summary line as ``run_real`` prints it.
_LOG_LINE = re.compile(
    r"^\s*(?P<name>\w+): (?P<completed>\d+) done, (?P<num_rejected>\d+) rejected, (?P<wall_seconds>[\d.]+) s wall, "
    r"(?P<num_engine_steps>\d+) steps, req/s (?P<request_throughput>[\d.]+), TTFT p50 (?P<median_ttft_ms>[\d.]+) ms, "
    r"TPOT p50 (?P<median_tpot_ms>[\d.]+) ms, preemptions (?P<num_preemptions>\d+)\s*$")
#: The metrics a log line carries that the simulator also reports (compared by ``log_compare``).
LOG_METRICS = ("request_throughput", "median_ttft_ms", "median_tpot_ms", "num_preemptions")


def parse_real_log(text: str) -> dict[str, dict[str, float]]:
    """The per-case summary lines of a real phase's log (``run_real``'s output), by case name;
    warm-up lines and anything else are skipped. Values are as printed (rounded)."""
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        m = _LOG_LINE.match(line)
        if m and m["name"] in CASES:
            out[m["name"]] = {k: (float(v) if "." in v else int(v)) for k, v in m.groupdict().items() if k != "name"}
    return out


def log_case_records(logged: dict[str, dict[str, float]], *, model_name: str, device: str, num_gpu_blocks: int,
                     block_size: int = 16, max_model_len: int = 16384, max_num_batched_tokens: int = 8192,
                     max_num_seqs: int = 256, vocab: int | None = None) -> dict[str, dict[str, Any]]:
    """``case.json``-like records (what ``simulate_case`` needs) of the logged cases, rebuilt as
    ``run_real`` built them with these backend settings (its defaults; ``num_gpu_blocks`` is the
    pool). A ``rate_of`` case takes its rate from the logged (rounded) request throughput of
    its reference case. ``vocab`` defaults to ``run_real``'s min(32000, the model's vocabulary)."""
    from core.config import SchedulerConfig
    from simulator.model_spec import get_model

    spec = get_model(model_name)
    vocab = vocab if vocab is not None else min(32000, spec.vocab_size)
    max_model_len = min(max_model_len, spec.max_position_embeddings)
    base = dataclasses.asdict(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                              max_model_len=max_model_len))
    records = {}
    for name in [c for c in CASE_ORDER if c in logged]:
        case = resolve_case(name)
        if "rate_of" in case:
            ref = case["rate_of"][0]
            if ref not in logged:
                raise ValueError(f"case {name} takes its rate from {ref}, which the log lacks")
            set_rate_of(case, logged[ref]["request_throughput"])
        wl, sched_kw, blocks, prefix = case_configs(case, base, vocab=vocab, pool_blocks=num_gpu_blocks,
                                                    max_model_len=max_model_len,
                                                    max_num_batched_tokens=max_num_batched_tokens)
        records[name] = {"name": name, "workload": wl, "scheduler": dataclasses.asdict(SchedulerConfig(**sched_kw)),
                         "cache": {"block_size": block_size, "num_gpu_blocks": blocks,
                                   "enable_prefix_caching": prefix},
                         "model_name": model_name, "device": device}
    return records


def log_compare(log_path: Path, profiles: dict[str, Path], out: Path | None = None, **record_kw: Any) -> Any:
    """Simulate every case of a real phase's log (only its summary lines survive: request
    throughput, TTFT / TPOT p50, preemptions) with each calibrated profile, and compare.
    Returns a table (case, metric, real, per profile the simulated value and relative error);
    with ``out`` also writes ``log_compare.csv`` / ``log_compare.md`` there."""
    import pandas as pd

    logged = parse_real_log(log_path.read_text())
    if not logged:
        raise ValueError(f"{log_path}: no case summary lines")
    records = log_case_records(logged, **record_kw)
    rows = []
    for name, record in records.items():
        sims = {label: simulate_case(record, "calibrated", {"profile": str(path)}, None)
                for label, path in profiles.items()}
        for key in LOG_METRICS:
            row = {"case": name, "metric": key, "real": logged[name][key]}
            for label, m in sims.items():
                row[label] = m.get(key)
                row[f"{label}_rel_err"] = _rel(m.get(key), logged[name][key])
            rows.append(row)
    table = pd.DataFrame(rows)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "log_compare.csv", index=False)
        (out / "log_compare.md").write_text(log_compare_markdown(table, list(profiles), log_path, records))
    return table


def log_compare_markdown(table: Any, labels: list[str], log_path: Path | None = None,
                         records: dict[str, dict[str, Any]] | None = None) -> str:
    lines = []
    if log_path is not None:
        lines += [(f"Real: the summary lines of `{log_path}` (values as logged); simulated: the same cases "
                   "rebuilt as the real phase built them."), ""]
    if records:
        rates = {n: r["workload"]["rate"] for n, r in records.items() if "rate_of" in CASES[n]}
        if rates:
            lines += ["Rates from the log's overload throughput: "
                      + ", ".join(f"{n} {v:g} req/s" for n, v in rates.items()) + ".", ""]
    lines += ["Median |relative error| over the cases:", "",
              "| profile | " + " | ".join(k for k in LOG_METRICS if k != "num_preemptions") + " |",
              "|---|" + "---|" * (len(LOG_METRICS) - 1)]
    for label in labels:
        cells = []
        for key in LOG_METRICS:
            if key == "num_preemptions":
                continue
            vals = table.loc[table.metric == key, f"{label}_rel_err"].abs().dropna()
            cells.append(_abs_pct(float(vals.median()) if len(vals) else None))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Per case: real, then simulated (relative error) per profile; preemptions are counts.", "",
              "| case | metric | real | " + " | ".join(labels) + " |", "|---|---|---:|" + "---:|" * len(labels)]
    for r in table.to_dict("records"):
        count = r["metric"] == "num_preemptions"
        cells = [(_fmt(int(r[label])) if count and r[label] is not None and math.isfinite(r[label])
                  else "-" if count
                  else f"{_fmt(r[label])} ({_pct(r[f'{label}_rel_err'])})") for label in labels]
        real = _fmt(int(r["real"])) if count else _fmt(r["real"])
        lines.append(f"| {r['case']} | {r['metric']} | {real} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- step level -----------------------------------------------------------------------------------
#: A real step whose next step started more than this after its end was followed by idling:
#: its wall time (to the next step's start) is not a step time, so it is left out.
IDLE_GAP_S = 0.002


def replay_steps(case_dir: Path, max_duration: float = 45.0) -> Any:
    """Every real step of a run, with the batch shape it ran, rebuilt without the GPU.

    The scheduler is deterministic given when each step started, so replaying the case's
    requests through ``run_online`` with the real steps' start times as the clock (and their
    measured durations) reproduces each step's batch. Columns: the ``BatchShape`` fields, the
    real ``duration`` and ``wall`` (to the next step's start), ``idle_before`` (seconds
    between the previous step's end and this step's start) and ``match`` (batch size and
    token counts equal the real step's)."""
    import numpy as np
    import pandas as pd

    from core.config import CacheConfig, SchedulerConfig
    from core.results import STEPS_FILE
    from core.workloads.config import WorkloadConfig, build_workload
    from executor.online import run_online
    from simulator.cost_model.base import BatchShape, StepTiming
    from simulator.sim_backend import SimBackend

    record = json.loads((case_dir / "case.json").read_text())
    steps = pd.read_parquet(case_dir / STEPS_FILE)
    times, durs = steps["time"].to_numpy(), steps["duration"].to_numpy()
    shapes: list[BatchShape] = []

    class _Zero:
        def step_time(self, batch: BatchShape) -> StepTiming:
            return StepTiming(0.0, {})

    class _Replay(SimBackend):
        def execute(self, out: Any) -> Any:
            k = len(shapes)
            shapes.append(BatchShape.from_scheduler_output(out))
            res = super().execute(out)
            return dataclasses.replace(res, duration=float(durs[k]) if k < len(durs) else 0.0)

    cache = record["cache"]
    engine_cls = __import__("core.engine", fromlist=["EngineCore"]).EngineCore
    engine = engine_cls(SchedulerConfig(**record["scheduler"]),
                        CacheConfig(cache["block_size"], cache["num_gpu_blocks"], 0, cache["enable_prefix_caching"]),
                        _Replay(_Zero()))
    requests = build_requests_open_loop(build_workload(WorkloadConfig.from_dict(record["workload"])))

    def clock() -> float:
        k = len(shapes)
        return float(times[k]) if k < len(times) else float(times[-1]) + max_duration + 1.0

    run_online(engine, requests, clock=clock, sleep=lambda s: None, max_duration=max_duration)
    n = min(len(shapes), len(steps))
    df = pd.DataFrame([dataclasses.asdict(x) for x in shapes[:n]])
    df.insert(0, "case", record["name"])
    df.insert(1, "step", np.arange(n))
    df["duration"] = durs[:n]
    nxt = np.append(times[1:n], np.nan)
    df["wall"] = nxt - times[:n]
    prev_end = np.insert(times[:n - 1] + durs[:n - 1], 0, np.nan)
    df["idle_before"] = times[:n] - prev_end
    df["match"] = ((steps["batch_size"].to_numpy()[:n] == df["num_reqs"].to_numpy())
                   & ((steps["num_prefill_tokens"] + steps["num_decode_tokens"]).to_numpy()[:n]
                      == df["num_tokens"].to_numpy()))
    return df


def step_kind(df: Any, graph_max_batch: int) -> Any:
    import numpy as np

    graph = (df["num_decode"] == df["num_reqs"]) & (df["num_reqs"] <= graph_max_batch)
    return np.where(graph, "graph decode", "eager mixed")


def eager_follows(df: Any) -> Any:
    """What each eager step of ``df`` (one case's steps, in order, with ``kind``) follows:
    'idle' (the engine idled more than ``IDLE_GAP_S`` before it), 'graph' or 'eager' (the
    previous step's kind); '' for graph steps."""
    import numpy as np

    prev = df["kind"].shift(1).fillna("eager mixed").str.split().str[0]
    follows = np.where(df["idle_before"].fillna(np.inf) > IDLE_GAP_S, "idle", prev)
    return np.where(df["kind"] == "eager mixed", follows, "")


def predict_in_order(model: Any, df: Any) -> list[float]:
    """The model's step times for one case's steps, in order, telling it of idle gaps (as
    the simulator must: ``note_idle``), so that a stateful model sees the real history."""
    from simulator.cost_model.base import BatchShape

    fields = [f.name for f in dataclasses.fields(BatchShape)]
    note_idle = getattr(model, "note_idle", None)
    out = []
    for r in df[fields + ["idle_before"]].to_dict("records"):
        idle = r.pop("idle_before")
        if note_idle is not None and idle > IDLE_GAP_S:  # NaN (the first step) is not > anything
            note_idle(idle)
        out.append(model.step_time(BatchShape(**{f: int(v) for f, v in r.items()})).total)
    return out


def step_errors(real_root: Path, profiles: dict[str, Path], graph_max_batch: int = 256) -> tuple[Any, Any]:
    """Per real step: predicted (each profile) vs measured wall time. Returns (steps, summary)
    where summary has, per profile, step kind and case (and 'all'), the median signed and the
    median / p90 absolute relative error; for 'all' also the eager steps split by what they
    follow (``eager_follows``). Each case is predicted in step order by a fresh model (it may
    be stateful). Steps followed by idling are left out."""
    import pandas as pd

    from simulator.cost_model.calibrated import CalibratedCostModel

    dirs = sorted(p.parent for p in real_root.glob("*/case.json"))
    frames = [replay_steps(d) for d in sorted(dirs, key=lambda p: CASE_ORDER.index(p.name)
                                                 if p.name in CASE_ORDER else 99)]
    for f in frames:
        f["kind"] = step_kind(f, graph_max_batch)
        f["follows"] = eager_follows(f)
    df = pd.concat(frames, ignore_index=True)
    busy = (df["wall"] - df["duration"] <= IDLE_GAP_S) & df["match"]
    rows = []
    for label, path in profiles.items():
        df[f"pred_{label}"] = [t for f in frames for t in predict_in_order(CalibratedCostModel.from_file(path), f)]
        df[f"err_{label}"] = df[f"pred_{label}"] / df["wall"] - 1.0
        sub = df[busy]
        eager = sub[sub["kind"] == "eager mixed"]
        groups = ([(("all", k), g) for k, g in sub.groupby("kind")]
                  + [(("all", f"eager after {k}"), g) for k, g in eager.groupby("follows")]
                  + list(sub.groupby(["case", "kind"])))
        for (case, kind), g in groups:
            e = g[f"err_{label}"]
            rows.append({"profile": label, "case": case, "kind": kind, "steps": len(e),
                         "median_signed": float(e.median()), "median_abs": float(e.abs().median()),
                         "p90_abs": float(e.abs().quantile(0.9))})
    df["busy"] = busy
    return df, pd.DataFrame(rows)


def step_errors_markdown(summary: Any) -> str:
    labels = list(dict.fromkeys(summary["profile"]))
    lines = [("Step-level relative error of the predicted step time against each real step's wall time "
              "(start to the next step's start; steps followed by idling left out). Each cell: median "
              "signed / median abs / p90 abs."), ""]
    lines.append("| case | kind | steps | " + " | ".join(labels) + " |")
    lines.append("|---|---|---:|" + "---|" * len(labels))
    piv = summary.set_index(["case", "kind", "profile"])
    keys = list(dict.fromkeys(zip(summary["case"], summary["kind"])))
    for case, kind in keys:
        cells = []
        for label in labels:
            r = piv.loc[(case, kind, label)]
            cells.append(f"{100 * r.median_signed:+.1f}% / {100 * r.median_abs:.1f}% / {100 * r.p90_abs:.1f}%")
        n = int(piv.loc[(case, kind, labels[0])].steps)
        lines.append(f"| {'**all**' if case == 'all' else case} | {kind} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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
    c.add_argument("--baseline-profile", default=None, help="a second profile, reported as calibrated_v1")
    c.add_argument("--max-duration", type=float, default=None,
                   help="the real phase's --max-duration, for runs whose case.json predates recording it")
    st = sub.add_parser("steps", help="step-level check: every real step's wall time vs each profile's prediction")
    st.add_argument("--real", required=True)
    st.add_argument("--profile", action="append", required=True, metavar="LABEL=PATH")
    st.add_argument("--out", default="experiments/results/validation")
    lc = sub.add_parser("log-compare", help="simulate the cases of a real phase's log (its summary lines only)")
    lc.add_argument("--log", required=True, help="the real phase's stdout")
    lc.add_argument("--profile", action="append", required=True, metavar="[LABEL=]PATH")
    lc.add_argument("--out", default=None, help="write log_compare.csv / .md here")
    lc.add_argument("--model-name", default="Qwen3-0.6B")
    lc.add_argument("--device", default="NVIDIA H200")
    lc.add_argument("--num-gpu-blocks", type=int, required=True, help="the real phase's KV pool")
    lc.add_argument("--max-model-len", type=int, default=16384)
    sp = sub.add_parser("spread", help="run-to-run spread of real runs (the noise floor of the targets)")
    sp.add_argument("--real", action="append", required=True, help="a real phase's root (two or more)")
    tb = sub.add_parser("table", help="one row per comparison (compare's summary.json) under a directory")
    tb.add_argument("root")
    tb.add_argument("--out", default=None, help="also write the markdown table here")
    sub.add_parser("cases", help="list the cases")
    args = ap.parse_args(argv)
    if args.phase == "real":
        run_real(_case_list(args.case), args.model_dir, Path(args.out), model_name=args.model_name,
                 device=args.device, num_requests=args.num_requests, num_gpu_blocks=args.num_gpu_blocks,
                 max_model_len=args.max_model_len, clip_len=args.clip_len, max_duration=args.max_duration,
                 warmup=not args.no_warmup)
    elif args.phase == "compare":
        compare(Path(args.real), Path(args.profile), Path(args.out),
                        cases=_case_list(args.case) if args.case else None, plots=not args.no_plots,
                        sim_root=Path(args.sim_dir) if args.sim_dir else None,
                        baseline_profile=Path(args.baseline_profile) if args.baseline_profile else None,
                        max_duration=args.max_duration)
        summary = json.loads((Path(args.out) / "summary.json").read_text())
        print(json.dumps(summary, indent=1))
    elif args.phase == "steps":
        profiles = dict(spec.split("=", 1) for spec in args.profile)
        _, summary = step_errors(Path(args.real), {k: Path(v) for k, v in profiles.items()})
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        summary.to_csv(out / "step_errors.csv", index=False)
        md = step_errors_markdown(summary)
        (out / "step_errors.md").write_text(md)
        print(md)
    elif args.phase == "log-compare":
        profiles = {}
        for spec in args.profile:
            label, _, path = spec.rpartition("=")
            profiles[label or Path(path).stem] = Path(path)
        table = log_compare(Path(args.log), profiles, Path(args.out) if args.out else None,
                            model_name=args.model_name, device=args.device, num_gpu_blocks=args.num_gpu_blocks,
                            max_model_len=args.max_model_len)
        print(log_compare_markdown(table, list(profiles)))
    elif args.phase == "spread":
        spread = run_spread([Path(r) for r in args.real])
        print("median |relative difference| between real runs (over cases, then over ordered pairs of runs):")
        for k, v in spread["median_over_pairs"].items():
            print(f"  {k:18s} {v * 100:5.1f}%")
    elif args.phase == "table":
        table = summary_table(Path(args.root))
        if args.out:
            Path(args.out).write_text(table)
        print(table, end="")
    else:
        for name, case in CASES.items():
            print(f"{name:14s} {case.get('note', '')}")


if __name__ == "__main__":
    sys.exit(main())
