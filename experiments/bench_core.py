"""Cost of one scheduler step (schedule + update_from_output) with 256 running requests, prefix caching on.

Usage: python -m experiments.bench_core [--steps N] [--out experiments/results/bench_core.json]

The engine holds 256 decoding requests (1k-token prompts sharing a 512-token system
prompt, so the prefix cache is live); each measured step schedules all of them, takes
one token each from a no-op backend, and applies the result, crossing block boundaries
(allocation + block hashing) as a real run does.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import subprocess
import time
from pathlib import Path

from core.config import CacheConfig, SchedulerConfig
from core.engine import EngineCore
from core.request import Request
from core.sampling_params import SamplingParams
from core.scheduler_output import StepResult


class _NoOpBackend:
    def execute(self, out):
        return StepResult([[1] if s else [] for s in out.samples], 0.0)


def _engine(num_reqs: int) -> EngineCore:
    rng = random.Random(0)
    eng = EngineCore(SchedulerConfig(max_num_seqs=num_reqs, max_num_batched_tokens=8192, max_model_len=8192),
                     CacheConfig(block_size=16, num_gpu_blocks=65536, enable_prefix_caching=True),
                     _NoOpBackend(), record_steps=False)
    system = [rng.randrange(32000) for _ in range(512)]
    for i in range(num_reqs):
        prompt = system + [rng.randrange(32000) for _ in range(512)]
        eng.add_request(Request(f"r{i}", prompt, SamplingParams(max_tokens=4000, ignore_eos=True)))
    now = 0.0
    while any(r.is_prefill for r in eng.scheduler.running) or eng.scheduler.waiting:
        eng.step(now)
    return eng


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-reqs", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="experiments/results/bench_core.json")
    args = ap.parse_args()
    per_step_us, schedule_us, update_us = [], [], []
    clock = time.process_time  # CPU time: the cost, unaffected by other processes on a shared machine
    for _ in range(args.repeats):
        eng = _engine(args.num_reqs)
        sched, backend = eng.scheduler, eng.backend
        assert len(sched.running) == args.num_reqs
        t_sched = t_update = 0.0
        t0 = clock()
        for _ in range(args.steps):
            a = clock()
            out = sched.schedule()
            b = clock()
            result = backend.execute(out)
            c = clock()
            sched.update_from_output(out, result, 0.0)
            t_sched += b - a
            t_update += clock() - c
        per_step_us.append((clock() - t0) / args.steps * 1e6)
        schedule_us.append(t_sched / args.steps * 1e6)
        update_us.append(t_update / args.steps * 1e6)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    result = {
        "benchmark": "scheduler step (schedule + update), prefix caching on",
        "num_running": args.num_reqs, "steps": args.steps, "repeats": args.repeats,
        "median_us_per_step": statistics.median(per_step_us), "min_us_per_step": min(per_step_us),
        "median_schedule_us": statistics.median(schedule_us), "median_update_us": statistics.median(update_us),
        "median_scheduler_us": statistics.median([a + b for a, b in zip(schedule_us, update_us)]),
        "clock": "time.process_time (CPU time of this process)",
        "all_us_per_step": per_step_us, "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpus": __import__("os").cpu_count(),
        "commit": commit, "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"scheduler cost per step with {args.num_reqs} running requests (schedule + update_from_output, CPU time): "
          f"median {result['median_scheduler_us']:.1f} us (schedule {result['median_schedule_us']:.1f} us, "
          f"update {result['median_update_us']:.1f} us); whole step with a no-op backend "
          f"{result['median_us_per_step']:.1f} us; {args.repeats}x{args.steps} steps")


if __name__ == "__main__":
    main()
