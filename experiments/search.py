"""Capacity search: the highest load each configuration serves within an SLO, per GPU.

    python -m experiments.search                                  # Llama-3.1-8B, H100, ShareGPT, default grid
    python -m experiments.search model=llama3_70b search.tp=[2,4,8] search.scheduler=[vllm,sarathi] \\
        search.max_num_batched_tokens=[512,2048] search.max_num_seqs=[64,256] slo.ttft_ms=1000

Every grid point (``search.tp`` x ``search.scheduler`` preset x chunk size
``search.max_num_batched_tokens`` x ``search.max_num_seqs``; None keeps the preset's value)
is composed like a run (all other overrides apply) and its capacity found by probing: a
probe simulates requests arriving at one rate and passes when the ``search.percentile``
(p99) TTFT / TPOT / E2E latencies meet the bounds set in ``slo`` (default TTFT <= 2 s,
TPOT <= 100 ms). A probe has ``search.num_requests`` requests, or more when needed for its
arrivals to span ``search.min_probe_s`` seconds: an overloaded server falls behind by
(rate / capacity - 1) seconds per second of arrivals, so a probe much shorter than
(TTFT bound / overload) passes far above capacity (300 requests at 60 req/s look fine for
a server that handles 45). Starting at ``search.start_qps``, the rate doubles
while probes pass (halves while they fail) until the capacity is bracketed, then bisects
(geometrically) to ``search.rel_tol``. Trace workloads are sped up or slowed down to the
probed rate. Grid points run in ``search.workers`` processes.

The result, one row per configuration with its QPS per GPU and whether it is on the Pareto
front of (fewer GPUs, more QPS per GPU), is printed and written to ``search.csv`` in the
Hydra output dir. Probes write no result files.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import multiprocessing
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import hydra
import pandas as pd
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

from core.workloads.config import WorkloadConfig, build_workload
from experiments.config import QUICK_NUM_REQUESTS, slo_bounds, to_simulation_config, to_workload_config
from simulator.runner import SimulationConfig, run_simulation

RESULT_FILE = "search.csv"
# metrics.json key prefix of each percentile summarize() reports.
_PERCENTILE_KEYS = {50: "median", 90: "p90", 95: "p95", 99: "p99"}
# Halving the start rate this many times without a passing probe means "cannot meet the SLO".
_MAX_HALVINGS = 10


@dataclass(frozen=True)
class GridPoint:
    """One configuration of the grid; None = keep the scheduler preset's value."""

    tp: int
    scheduler: str
    max_num_batched_tokens: Optional[int]
    max_num_seqs: Optional[int]

    def overrides(self) -> list[str]:
        out = [f"scheduler={self.scheduler}", f"parallel.tp={self.tp}"]
        if self.max_num_batched_tokens is not None:
            out.append(f"scheduler.max_num_batched_tokens={self.max_num_batched_tokens}")
        if self.max_num_seqs is not None:
            out.append(f"scheduler.max_num_seqs={self.max_num_seqs}")
        return out


# Override keys the grid sets itself; the same keys given on the command line would clash.
_GRID_KEYS = ("scheduler", "parallel.tp", "scheduler.max_num_batched_tokens", "scheduler.max_num_seqs")


@dataclass(frozen=True)
class Settings:
    """What a worker needs besides the configuration (plain values: it is pickled)."""

    slo: dict[str, float]
    percentile: int
    num_requests: int
    min_probe_s: float
    start_qps: float
    rel_tol: float
    max_probes: int


def grid(cfg: DictConfig) -> list[GridPoint]:
    s = cfg.search
    return [GridPoint(*p) for p in itertools.product(s.tp, s.scheduler, s.max_num_batched_tokens, s.max_num_seqs)]


def meets_slo(metrics: dict[str, Any], slo: dict[str, float], percentile: int) -> bool:
    """Every request finished and the percentile of each bounded latency is within its bound."""
    if metrics["unfinished"] or not metrics["completed"]:
        return False
    prefix = _PERCENTILE_KEYS[percentile]
    return all(metrics[f"{prefix}_{key}"] <= bound for key, bound in slo.items())


def find_capacity(meets: Callable[[float], bool], start: float, rel_tol: float,
                  max_probes: int) -> tuple[float, float, int]:
    """Largest rate for which ``meets`` holds, assuming it holds below some capacity.

    Returns (lo, hi, probes): ``lo`` passed (0 when nothing did), ``hi`` failed (inf when
    every probe passed within ``max_probes``). Brackets by doubling / halving from
    ``start``, then bisects geometrically until hi / lo <= 1 + rel_tol.
    """
    lo, hi, q, probes = 0.0, math.inf, start, 0
    while probes < max_probes and (lo == 0.0 or hi == math.inf):
        if meets(q):
            lo = q
        else:
            hi = q
        probes += 1
        q = q * 2 if hi == math.inf else q / 2
        if lo == 0.0 and q < start / 2 ** _MAX_HALVINGS:
            break
    while probes < max_probes and lo > 0.0 and hi / lo > 1 + rel_tol:
        mid = math.sqrt(lo * hi)
        if meets(mid):
            lo = mid
        else:
            hi = mid
        probes += 1
    return lo, hi, probes


def _workload_at(workload: WorkloadConfig, native_rate: float | None,
                 st: Settings) -> Callable[[float], WorkloadConfig]:
    """The probe's workload at a given mean rate: the rate itself for synthetic arrivals,
    the replay speed that gives that rate for a trace (``native_rate`` = its rate at speed
    1); enough requests for ``st.num_requests`` and ``st.min_probe_s`` of arrivals."""
    def at(qps: float) -> WorkloadConfig:
        n = max(st.num_requests, math.ceil(qps * st.min_probe_s))
        if native_rate is None:
            return dataclasses.replace(workload, rate=qps, num_requests=n)
        return dataclasses.replace(workload, speed=qps / native_rate, num_requests=n)
    return at


def _trace_rate(workload: WorkloadConfig) -> float:
    arrivals = [r.arrival_time for r in build_workload(dataclasses.replace(workload, speed=1.0)).requests]
    span = max(arrivals) - min(arrivals)
    if span <= 0:
        raise ValueError("the trace's first requests all arrive at once: no rate to scale")
    return (len(arrivals) - 1) / span


def search_point(task: tuple[GridPoint, SimulationConfig, WorkloadConfig, Settings]) -> dict[str, Any]:
    """Capacity of one configuration (runs in a worker process). A configuration that
    cannot run at all (model does not fit, TP does not divide the heads, a prompt exceeds
    a non-chunking token budget) gets its reason in ``error`` instead of a rate."""
    point, sim_cfg, workload, st = task
    row: dict[str, Any] = {
        "tp": point.tp, "scheduler": point.scheduler,
        "max_num_batched_tokens": sim_cfg.scheduler.max_num_batched_tokens,
        "max_num_seqs": sim_cfg.scheduler.max_num_seqs,
        "num_gpus": sim_cfg.parallel.tp * sim_cfg.parallel.pp * sim_cfg.parallel.dp,
    }
    passing: dict[str, Any] = {}
    try:
        if workload.arrival_kind == "closed_loop":
            raise ValueError("a closed-loop workload sets its own rate; capacity search needs open-loop arrivals")
        at = _workload_at(workload, _trace_rate(workload) if workload.arrival_kind == "trace" else None, st)

        def meets(qps: float) -> bool:
            metrics = run_simulation(sim_cfg, build_workload(at(qps))).metrics
            ok = meets_slo(metrics, st.slo, st.percentile)
            if ok and qps >= passing.get("qps", 0.0):
                passing.update(metrics, qps=qps)
            return ok

        lo, hi, probes = find_capacity(meets, st.start_qps, st.rel_tol, st.max_probes)
    except (ValueError, RuntimeError) as exc:  # cannot be built, or can never schedule its requests
        return {**row, "max_qps": math.nan, "qps_per_gpu": math.nan, "error": str(exc)}
    prefix = _PERCENTILE_KEYS[st.percentile]
    row.update(max_qps=lo, qps_per_gpu=lo / row["num_gpus"], upper_bound_qps=hi, probes=probes,
               **{f"{prefix}_{k}_at_max": passing.get(f"{prefix}_{k}", math.nan)
                  for k in ("ttft_ms", "tpot_ms", "e2el_ms")},
               error="" if lo > 0 else "no probed rate met the SLO")
    return row


def pareto_front(df: pd.DataFrame) -> pd.Series:
    """True where no other configuration uses no more GPUs and serves at least as much per
    GPU, being strictly better in one of the two."""
    ok = df["qps_per_gpu"] > 0
    g, q = df["num_gpus"], df["qps_per_gpu"]

    def dominated(i: Any) -> bool:
        better = ok & (g <= g[i]) & (q >= q[i]) & ((g < g[i]) | (q > q[i]))
        return bool(better.any())

    return pd.Series([bool(ok[i]) and not dominated(i) for i in df.index], index=df.index)


def _run_all(tasks: list[Any], workers: int, report: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
    """``search_point`` over the tasks, in ``workers`` processes when there is more than one."""
    rows = []
    with ExitStack() as stack:
        if workers > 1 and len(tasks) > 1:
            pool = stack.enter_context(multiprocessing.get_context().Pool(min(workers, len(tasks))))
            results: Iterable[dict[str, Any]] = pool.imap_unordered(search_point, tasks)
        else:
            results = map(search_point, tasks)
        for row in results:
            report(row)
            rows.append(row)
    return rows


def run_search(cfg: DictConfig, overrides: list[str],
               report: Callable[[dict[str, Any]], None] = lambda row: None) -> pd.DataFrame:
    """Search every grid point of ``cfg.search``: each is composed from conf/search.yaml with
    ``overrides`` (the command line's, without grid keys) plus its own; ``report`` sees each
    row as it completes. Needs an initialized Hydra (``@hydra.main`` or ``initialize_config_*``)."""
    s = cfg.search
    if s.percentile not in _PERCENTILE_KEYS:
        raise ValueError(f"search.percentile must be one of {sorted(_PERCENTILE_KEYS)}, got {s.percentile}")
    slo = slo_bounds(cfg)
    if not slo:
        raise ValueError("capacity search needs at least one SLO bound (slo.ttft_ms, slo.tpot_ms, slo.e2el_ms)")
    # quick: fixed tiny probes (a smoke test of the search, not a capacity estimate)
    settings = Settings(slo, s.percentile, QUICK_NUM_REQUESTS if cfg.quick else s.num_requests,
                        0.0 if cfg.quick else s.min_probe_s, s.start_qps, s.rel_tol, s.max_probes)
    tasks = []
    for point in grid(cfg):
        point_cfg = compose("search", overrides=[*overrides, *point.overrides()])
        sim_cfg = dataclasses.replace(to_simulation_config(point_cfg), record_steps=False)
        tasks.append((point, sim_cfg, to_workload_config(point_cfg), settings))
    df = pd.DataFrame(_run_all(tasks, s.workers, report))
    df = df.sort_values(["num_gpus", "qps_per_gpu"], ascending=[True, False], kind="stable").reset_index(drop=True)
    df.insert(df.columns.get_loc("qps_per_gpu") + 1, "pareto", pareto_front(df))
    return df


def _describe(row: dict[str, Any]) -> str:
    what = (f"tp={row['tp']} {row['scheduler']} chunk={row['max_num_batched_tokens']} "
            f"max_num_seqs={row['max_num_seqs']}")
    if row["error"]:
        return f"{what}: {row['error']}"
    return f"{what}: {row['max_qps']:.3g} req/s ({row['qps_per_gpu']:.3g} per GPU, {row['probes']} probes)"


def format_table(df: pd.DataFrame) -> str:
    cols = ["num_gpus", "tp", "scheduler", "max_num_batched_tokens", "max_num_seqs", "max_qps", "qps_per_gpu", "pareto"]
    view = df[cols + (["error"] if df["error"].any() else [])].rename(columns={"max_num_batched_tokens": "chunk"})
    view["pareto"] = view["pareto"].map({True: "*", False: ""})
    return view.to_string(index=False, float_format=lambda x: f"{x:.3g}", na_rep="-")


def task_overrides() -> list[str]:
    """The command line's overrides minus the grid's own keys (each grid point sets those)."""
    parsed = OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task))
    return [o.input_line for o in parsed if o.key_or_group not in _GRID_KEYS]


@hydra.main(version_base="1.3", config_path="../conf", config_name="search")
def main(cfg: DictConfig) -> None:
    out = Path(HydraConfig.get().runtime.output_dir)
    n = len(grid(cfg))
    print(f"capacity search: {cfg.model.name} on {cfg.hardware.name}, workload {cfg.workload.kind}, "
          f"SLO p{cfg.search.percentile} {slo_bounds(cfg)} ms, {n} configurations", flush=True)
    df = run_search(cfg, task_overrides(), report=lambda row: print("  " + _describe(row), flush=True))
    df.to_csv(out / RESULT_FILE, index=False)
    print("\nQPS per GPU within the SLO (* = Pareto-optimal: fewer GPUs or more QPS per GPU)")
    print(format_table(df))
    print(f"\nresults: {out / RESULT_FILE}")


if __name__ == "__main__":
    main()
