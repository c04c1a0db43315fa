"""Run one simulated serving experiment from the Hydra configs in ``conf/``.

    python -m experiments.run                                   # the default: Llama-3.1-8B, 1 x H100, ShareGPT
    python -m experiments.run scheduler=sarathi workload.qps=6  # change anything
    python -m experiments.run -m workload.qps=1,2,4,8 scheduler=vllm,sarathi   # a sweep
    python -m experiments.run experiment=policy_compare         # a preset study (sweeps by itself)
    python -m experiments.run quick=true                        # a few requests: smoke test

Each run writes ``metrics.json``, ``requests.parquet``, ``steps.parquet`` and
``breakdown.json`` into its Hydra output dir next to ``.hydra/`` (the composed config and the
overrides), so ``experiments.aggregate`` and ``experiments.plot`` work from files alone.
"""
from __future__ import annotations

import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from tqdm import tqdm

from core.workloads.config import build_workload
from experiments.config import slo_bounds, to_simulation_config, to_workload_config
from simulator.runner import RunOutput, run_simulation

# Runs with at least this many requests get a progress bar even when stderr is not a
# terminal (batch jobs' logs), since they take minutes.
LONG_RUN_REQUESTS = 20_000
# With progress=auto on a terminal the bar appears only after this many seconds, so the
# usual few-second runs print nothing but their summary.
_AUTO_PROGRESS_DELAY_S = 2.0


def _progress_bar(cfg: DictConfig, total: int) -> ContextManager[tqdm | None]:
    """A tqdm bar over finished requests, or a null context when progress is off.

    ``progress`` true/false forces it; None (auto) shows it for a terminal or a long run,
    never under ``quick``.
    """
    if cfg.progress is None:
        enabled = not cfg.quick and (sys.stderr.isatty() or total >= LONG_RUN_REQUESTS)
        delay = _AUTO_PROGRESS_DELAY_S
    else:
        enabled, delay = bool(cfg.progress), 0.0
    if not enabled:
        return nullcontext()
    return tqdm(total=total, unit="req", desc="simulating", delay=delay, file=sys.stderr, mininterval=0.5)


def run(cfg: DictConfig, out_dir: str | Path) -> RunOutput:
    """Simulate the run ``cfg`` describes and write its result files to ``out_dir``."""
    workload = build_workload(to_workload_config(cfg))
    sim_cfg = to_simulation_config(cfg)
    with _progress_bar(cfg, len(workload)) as bar:
        on_progress: Callable[[int], Any] | None = bar.update if bar is not None else None
        return run_simulation(sim_cfg, workload, out_dir=out_dir, on_progress=on_progress)


def _ms(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:,.1f}"


def format_summary(cfg: DictConfig, output: RunOutput, out_dir: str | Path) -> str:
    """The few numbers one looks at first, as a small table, and where the files went."""
    m = output.metrics
    par, sched, wl = cfg.parallel, cfg.scheduler, to_workload_config(cfg)
    arrivals = wl.arrival_kind
    load = f"{arrivals} at {wl.rate:g} req/s" if arrivals in ("poisson", "gamma", "fixed") else f"{arrivals} arrivals"
    slo = slo_bounds(cfg)
    lines = [
        f"{cfg.model.name} on {cfg.hardware.name} (tp={par.tp} pp={par.pp} dp={par.dp}), "
        f"scheduler {sched.policy}/{sched.batching} budget {sched.max_num_batched_tokens}, "
        f"workload {wl.kind}, {load}",
        f"{m['completed']} requests completed ({m['aborted']} aborted) in {m['simulated_seconds']:.1f} s "
        f"simulated, {output.wall_seconds:.1f} s wall",
        "",
        f"  throughput     {m['request_throughput']:8.2f} req/s  {m['output_throughput']:10,.0f} output tok/s",
        f"  latency (ms)   {'p50':>8}  {'p99':>10}",
    ]
    for label, key in (("TTFT", "ttft"), ("TPOT", "tpot"), ("E2E", "e2el")):
        lines.append(f"    {label:<12} {_ms(m[f'median_{key}_ms']):>8}  {_ms(m[f'p99_{key}_ms']):>10}")
    hit = m["prefix_cache_hit_rate"]
    tail = f"  preemptions {m['num_preemptions']}   prefix cache hit rate " + \
        ("n/a" if hit != hit else f"{100 * hit:.1f}%")
    if m.get("slo_attainment") is not None:
        bounds = ", ".join(f"{k.removesuffix('_ms').upper()} <= {v:g} ms" for k, v in slo.items())
        tail += f"   SLO attainment {100 * m['slo_attainment']:.1f}% ({bounds})"
    lines += [tail, "", f"results: {out_dir}"]
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    output = run(cfg, out_dir)
    print(format_summary(cfg, output, out_dir), flush=True)


if __name__ == "__main__":
    main()
