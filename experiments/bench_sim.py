"""Simulator speed: N requests with Azure 2023 conv lengths, Poisson at ~80% of capacity.

Usage: python -m experiments.bench_sim [--num-requests 10000] [--rate R] [--repeat 3] [--profile]

Llama-3.1-8B on one H100, vLLM-like defaults with prefix caching. The event-loop time
covers the SimPy run (scheduling, cost model, metrics not included): the median of
``--repeat`` loops, each on a freshly built workload and engine (a shared 2-core machine's
speed moves by 15-40% from minute to minute; every loop's time is kept in the JSON). The
process time counts from interpreter start to the end of the first simulation's metrics,
imports included. Without --rate the capacity is first
measured by an overloaded probe run (3,000 requests) in a child process and the rate set
to 80% of it; the process time leaves out the wait for that child (``probe_s``).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from core.workloads.config import WorkloadConfig, build_workload
from simulator.runner import SimulationConfig, build_requests, run_simulation
from simulator.simulation import Simulation


def _process_age() -> float:
    """Seconds since this process started (Linux /proc), so imports are counted."""
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def _workload(n: int, rate: float):
    # Lengths resampled from the Azure conv trace (any count; the trace itself has 19,366 rows).
    return build_workload(WorkloadConfig(kind="synthetic", lengths="azure_conv", arrival="poisson", rate=rate,
                                         num_requests=n, seed=0, max_model_len=8192))


def _probe_capacity(cfg: SimulationConfig) -> float:
    """Requests/s of an overloaded 3,000-request run (``--probe``), in a child process."""
    flags = [] if cfg.fast_forward else ["--no-fast-forward"]
    child = subprocess.run([sys.executable, "-m", "experiments.bench_sim", "--probe", *flags], capture_output=True,
                           text=True, check=True)
    return float(child.stdout.strip().splitlines()[-1])


def _loop(cfg: SimulationConfig, num_requests: int, rate: float, profile: bool = False):
    """Build the workload and one engine, then time the event loop: (result, loop s, loop CPU s, build s)."""
    import dataclasses

    from core.config import CacheConfig
    from simulator.runner import EngineCore, SimBackend, get_hardware, get_model, make_cost_model, num_kv_blocks

    t_build = time.perf_counter()
    requests, _ = build_requests(_workload(num_requests, rate))
    if len(requests) != num_requests:
        raise SystemExit(f"workload has {len(requests)} requests, asked for {num_requests}")
    build_s = time.perf_counter() - t_build
    model, hw = get_model(cfg.model), get_hardware(cfg.hardware)
    blocks = num_kv_blocks(model, hw, 1, 1, cfg.block_size, cfg.gpu_memory_utilization)
    engine = EngineCore(dataclasses.replace(cfg.scheduler), CacheConfig(cfg.block_size, blocks),
                        SimBackend(make_cost_model("roofline", model, hw)))
    sim = Simulation([engine], requests, fast_forward=cfg.fast_forward)
    profiler = None
    if profile:
        from pyinstrument import Profiler
        profiler = Profiler()
        profiler.start()
    t0, c0 = time.perf_counter(), time.process_time()
    result = sim.run()
    loop, loop_cpu = time.perf_counter() - t0, time.process_time() - c0
    if profiler is not None:
        profiler.stop()
        print(profiler.output_text(unicode=False, color=False, show_all=False))
    return result, loop, loop_cpu, build_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-requests", type=int, default=10_000)
    ap.add_argument("--rate", type=float, default=None, help="req/s; default: 80%% of measured capacity")
    ap.add_argument("--repeat", type=int, default=3,
                    help="event loops to time, each on a fresh workload and engine (default 3); the median is "
                         "reported, all are listed; the process time is taken after the first")
    ap.add_argument("--no-fast-forward", action="store_true")
    ap.add_argument("--profile", action="store_true", help="profile the (first) event loop with pyinstrument")
    ap.add_argument("--out", default=None, help="JSON file to write (default: experiments/results/bench_sim_N.json)")
    ap.add_argument("--probe", action="store_true", help="only print the capacity probe's requests/s")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error(f"--repeat must be >= 1, got {args.repeat}")
    cfg = SimulationConfig(model="Llama-3.1-8B", hardware="H100", fast_forward=not args.no_fast_forward,
                           record_steps=True)
    if args.probe:
        print(run_simulation(cfg, _workload(3000, 1000.0)).metrics["request_throughput"])
        return
    rate = args.rate
    capacity = None
    probe_s = 0.0
    if rate is None:
        t_probe = time.perf_counter()
        capacity = _probe_capacity(cfg)
        probe_s = time.perf_counter() - t_probe
        rate = round(0.8 * capacity, 2)
    from core.metrics import summarize

    loops, cpu_loops = [], []
    for i in range(args.repeat):
        gc.freeze()  # as run_simulation does: the collector stops re-walking the requests' token lists
        try:
            result, loop, loop_cpu, build_s = _loop(cfg, args.num_requests, rate, profile=args.profile and i == 0)
            if i == 0:
                metrics = summarize(result.requests, result.steps)
                process = _process_age() - probe_s  # one whole simulation, imports included
                process_cpu = time.process_time()
                first = {"workload_build_s": build_s, "events": result.num_events,
                         "engine_steps": sum(s.num_steps for s in result.steps), "simulated_s": result.duration}
        finally:
            gc.unfreeze()
        del result
        loops.append(loop)
        cpu_loops.append(loop_cpu)
        if args.repeat > 1:
            print(f"event loop {i + 1}/{args.repeat}: {loop:.3f} s", file=sys.stderr)
    loop, loop_cpu = statistics.median(loops), statistics.median(cpu_loops)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = {
        "num_requests": args.num_requests, "rate": rate, "measured_capacity_req_s": capacity,
        "fast_forward": cfg.fast_forward, "repeat": args.repeat, "event_loop_s": loop,
        "event_loop_runs_s": loops, "event_loop_cpu_s": loop_cpu, **first,
        "process_s": process, "process_cpu_s": process_cpu, "probe_s": probe_s,
        "sim_requests_per_s": args.num_requests / loop, "sim_requests_per_cpu_s": args.num_requests / loop_cpu,
        "request_throughput": metrics["request_throughput"],
        "median_ttft_ms": metrics["median_ttft_ms"], "median_tpot_ms": metrics["median_tpot_ms"],
        "python": platform.python_version(), "cpus": os.cpu_count(), "commit": commit,
        "date": time.strftime("%Y-%m-%d"),
    }
    path = Path(args.out or f"experiments/results/bench_sim_{args.num_requests}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    print(f"simulated requests per second: {out['sim_requests_per_s']:.0f}")


if __name__ == "__main__":
    main()
