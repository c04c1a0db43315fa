"""Data and tensor parallelism on real GPUs against the simulator (issue 7).

Two phases, two machines, as in ``experiments.validate``::

    # GPU machine with 2 GPUs (no simpy / hydra needed): DP=1 and DP=2 runs of one workload
    python -m experiments.validate_parallel real --out $OUT/dp_h200x2
    # here, on a CPU: rerun both in the simulator (calibrated profile and roofline, dp=1 / dp=2,
    # the same router), and compare the committed TP=1 / TP=2 decode step times with the
    # roofline's tensor-parallel model
    python -m experiments.validate_parallel compare --real experiments/results/validation/dp_h200x2
    python -m experiments.validate_parallel compare --no-dp --out /tmp/tp      # the TP part alone

``real`` writes a random-weight Qwen3-0.6B (unless ``--model-dir`` already holds a model),
then serves ONE open-loop workload (ShareGPT lengths, Poisson arrivals) twice with
``executor.dp.run_online_dp``: on one replica (``cuda:0``) and on two (``cuda:0``, ``cuda:1``,
``least_loaded`` router). Each replica is a ``ProcessReplica`` built like
``experiments.validate``'s real runs (runner ``max_model_len`` 16384, 32768 KV blocks,
``max_num_seqs`` 256, 8192-token budget, CUDA graphs, two warm-up workloads), so the committed
H200 profile applies. The rate, 45 req/s, is 1.6x one replica's steady-state capacity on this
workload (28 req/s in the calibrated simulator; the ``qps_overload`` burst measured 21-24 req/s
including its drain) and 0.8x two replicas': DP=1 queues, DP=2 does not. Each run leaves
``metrics.json`` / ``requests.parquet`` / ``steps.parquet`` (``core.results``) and ``case.json``
(the exact workload, scheduler, cache, router) in ``<out>/dp1`` and ``<out>/dp2``.

``compare`` writes ``compare.md`` (printed too), ``compare_dp.csv``, ``compare_tp.csv`` and
``compare.json`` to ``--out`` (default: the ``--real`` directory).

``--tiny`` runs the real phase on the CPU with a tiny random model and in-process replicas (a
pipeline check: it records the model as Qwen3-0.6B so that ``compare`` can use the committed
profile, but its timings are the CPU's).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from experiments import validate

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "experiments" / "results" / "validation" / "dp_h200x2"
DEFAULT_PROFILE = REPO / "experiments" / "profiles" / "qwen3_0_6b_h200_v2_fused2.json"  # same GPU session as the DP runs
#: Committed TP=1 vs TP=2 decode timings (``executor.parallel.selfcheck`` on 2 x H200), by model.
TP_RESULTS = {"Qwen3-0.6B": REPO / "experiments" / "results" / "tp_h200x2.json",
              "Llama-3.1-8B": REPO / "experiments" / "results" / "tp_llama8b_h200x2.json"}
#: The selfcheck's ``--prompt-len`` (its default, used by both committed runs).
TP_PROMPT_LEN = 128
BLOCK_SIZE = 16

#: The workload both runs serve; lengths, ``rate`` and ``num_requests`` come from ``RealConfig``.
WORKLOAD = {"kind": "synthetic", "arrival": "poisson", "seed": 0}
#: Metrics of the DP table, with their column titles.
DP_METRICS = {"request_throughput": "req/s", "output_throughput": "out tok/s", "median_ttft_ms": "TTFT p50",
              "p99_ttft_ms": "TTFT p99", "median_tpot_ms": "TPOT p50", "p99_tpot_ms": "TPOT p99",
              "median_e2el_ms": "E2E p50", "p99_e2el_ms": "E2E p99",
              "max_replica_share": "busiest replica's share of requests"}
SCALED = ("request_throughput", "output_throughput")


@dataclass
class RealConfig:
    """Everything the real phase needs. The defaults are the 2 x H200 run; ``tiny`` the CPU check."""

    model_dir: str = "/dev/shm/q06"
    model_name: str = "Qwen3-0.6B"  # what the simulator simulates (a catalog name)
    shape: str = "Qwen3-0.6B"  # written to model_dir when it holds no config.json
    dtype: str = "bfloat16"
    device: str = "cuda"
    dps: tuple[int, ...] = (1, 2)
    router: str = "least_loaded"
    replicas: str = "process"  # "process" (one process per GPU) or "inprocess" (stepped in turn)
    num_requests: int = 800
    rate: float = 45.0
    lengths: dict[str, Any] = field(default_factory=lambda: {"lengths": "sharegpt"})
    clip_len: int = 4096  # prompt + output clip; also the engines' max_model_len
    max_model_len: int = 16384  # the runner's (it picks the decode graphs' split-K), as validate.py
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    num_gpu_blocks: int = 32768  # fixed, so the simulator gets the same pool
    gpu_memory_utilization: float = 0.85
    warmup_requests: int = 96  # per warm-up workload (two of them), 0 = none
    threads: int | None = None  # torch threads per replica (CPU)

    @classmethod
    def tiny(cls, model_dir: str | Path, **overrides: Any) -> RealConfig:
        """A CPU run of a few seconds: tiny Qwen3, both replicas in this process. Uniform
        lengths: ShareGPT's clipped to a tiny model's context would be 1-token prompts."""
        base = cls(model_dir=str(model_dir), shape="tiny-qwen3", dtype="float32", device="cpu",
                   replicas="inprocess", num_requests=12, rate=40.0,
                   lengths={"lengths": "uniform", "input_range": [8, 48], "output_range": [4, 32]},
                   clip_len=96, max_model_len=512,
                   max_num_seqs=16, max_num_batched_tokens=512, num_gpu_blocks=256, warmup_requests=2, threads=1)
        return dataclasses.replace(base, **overrides)

    def workload(self, vocab_size: int) -> dict[str, Any]:
        return {**WORKLOAD, **self.lengths, "num_requests": self.num_requests, "rate": self.rate,
                "max_model_len": self.clip_len, "vocab_size": vocab_size}

    def runner_scheduler(self, max_position_embeddings: int) -> dict[str, Any]:
        return {"max_num_seqs": self.max_num_seqs, "max_num_batched_tokens": self.max_num_batched_tokens,
                "max_model_len": min(self.max_model_len, max_position_embeddings)}

    def scheduler(self) -> dict[str, Any]:
        return {"max_num_seqs": self.max_num_seqs, "max_num_batched_tokens": self.max_num_batched_tokens,
                "max_model_len": self.clip_len}


# --- real phase ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReplicaFactory:
    """``index -> EngineCore`` built the way ``validate.py``'s real runs build theirs, so the
    committed profile describes it: the runner sized by ``runner_scheduler`` (its
    ``max_model_len`` picks the decode graphs), the engine on the run's ``scheduler``, and
    two warm-up workloads first (Triton autotuning and first-touch costs stay out of the run).
    Picklable: a ``ProcessReplica`` calls it in the replica's own process."""

    model_dir: str
    device: str
    runner_scheduler: dict[str, Any]
    scheduler: dict[str, Any]
    num_gpu_blocks: int
    gpu_memory_utilization: float
    warmup_requests: int

    def __call__(self, index: int) -> Any:
        from core.config import CacheConfig, SchedulerConfig
        from core.engine import EngineCore
        from executor.backend import RealBackend

        backend = RealBackend.from_pretrained(
            self.model_dir, scheduler_config=SchedulerConfig(**self.runner_scheduler), device=self._device(index),
            block_size=BLOCK_SIZE, num_gpu_blocks=self.num_gpu_blocks,
            gpu_memory_utilization=self.gpu_memory_utilization)
        if self.warmup_requests:
            self._warm_up(backend)
        cache = CacheConfig(BLOCK_SIZE, backend.runner.num_gpu_blocks, 0, True)
        engine = EngineCore(SchedulerConfig(**self.scheduler), cache, backend, eos_token_id=backend.eos_token_id)
        backend.bind(engine.scheduler.requests)
        return engine

    def _device(self, index: int) -> str:
        return f"cuda:{index}" if self.device == "cuda" else self.device

    def _warm_up(self, backend: Any) -> None:
        """validate.py's warm-up: a chunked (512-token budget) and an unchunked workload."""
        from core.config import CacheConfig, SchedulerConfig
        from core.engine import EngineCore
        from core.workloads.config import build_workload
        from executor.online import run_online

        max_len = self.runner_scheduler["max_model_len"]
        for budget, chunked in ((512, True), (self.runner_scheduler["max_num_batched_tokens"], False)):
            sched = SchedulerConfig(**{**self.runner_scheduler, "max_num_batched_tokens": budget,
                                       "enable_chunked_prefill": chunked})
            wl = {"kind": "synthetic", "lengths": "uniform", "input_range": (16, min(3000, max_len // 2)),
                  "output_range": (4, 64), "arrival": "poisson", "rate": 200.0,
                  "num_requests": self.warmup_requests, "seed": 99,
                  "vocab_size": min(32000, backend.runner.config.vocab_size)}
            engine = EngineCore(sched, CacheConfig(BLOCK_SIZE, backend.runner.num_gpu_blocks, 0, True), backend,
                                eos_token_id=backend.eos_token_id)
            run_online(engine, validate.build_requests_open_loop(build_workload(wl)))
            backend.runner.reset()


def ensure_model(cfg: RealConfig) -> Path:
    """The model directory, written (random weights, ``cfg.shape``) when it holds no model yet."""
    path = Path(cfg.model_dir)
    if (path / "config.json").exists():
        print(f"model: reusing {path}", flush=True)
        return path
    from executor.make_random_model import write_random_model

    t = time.perf_counter()
    write_random_model(path, None, cfg.shape, cfg.dtype)
    print(f"model: wrote random {cfg.shape} ({cfg.dtype}) to {path} in {time.perf_counter() - t:.1f} s", flush=True)
    return path


def _check_devices(cfg: RealConfig) -> str:
    """The device name for the records; fails early (before any model is written) when the
    machine cannot run the largest DP degree."""
    import torch

    if cfg.device == "cpu":
        return "cpu"
    n = torch.cuda.device_count()
    if n < max(cfg.dps):
        raise SystemExit(f"real: DP={max(cfg.dps)} needs {max(cfg.dps)} GPUs, torch sees {n}")
    return torch.cuda.get_device_name(0)


def serve(cfg: RealConfig, factory: ReplicaFactory, dp: int, requests: list[Any]) -> Any:
    """One run: ``dp`` replicas behind ``cfg.router``, arrivals replayed in wall-clock time."""
    from executor.dp import ProcessReplica, run_online_dp

    if cfg.replicas == "process":
        replicas = [ProcessReplica(factory, i, threads=cfg.threads, block_size=BLOCK_SIZE) for i in range(dp)]
    elif cfg.replicas == "inprocess":
        replicas = [factory(i) for i in range(dp)]
    else:
        raise ValueError(f"replicas must be 'process' or 'inprocess', got {cfg.replicas!r}")
    return run_online_dp(replicas, requests, router=cfg.router)


def run_real(cfg: RealConfig, out: Path) -> dict[str, dict[str, Any]]:
    """Serve the workload at every DP degree of ``cfg.dps``; write ``<out>/dp<N>``; return the metrics."""
    import torch

    from core.config import SchedulerConfig
    from core.metrics import summarize
    from core.results import write_results
    from core.workloads.config import build_workload
    from executor.loader import load_config

    t_all = time.perf_counter()
    if cfg.threads:  # in-process CPU replicas: OpenMP spinning on a shared box costs ~50x
        torch.set_num_threads(cfg.threads)
    device_name = _check_devices(cfg)
    print(f"real: torch {torch.__version__}, device {device_name}, DP {list(cfg.dps)}, router {cfg.router}, "
          f"{cfg.replicas} replicas, {cfg.num_requests} requests at {cfg.rate} req/s", flush=True)
    model_dir = ensure_model(cfg)
    mcfg = load_config(model_dir)
    wl = cfg.workload(min(32000, mcfg.vocab_size))
    build_workload(wl)  # fail now, not after the engines started (e.g. no ShareGPT lengths file)
    factory = ReplicaFactory(str(model_dir), cfg.device, cfg.runner_scheduler(mcfg.max_position_embeddings),
                             cfg.scheduler(), cfg.num_gpu_blocks, cfg.gpu_memory_utilization, cfg.warmup_requests)
    done: dict[str, dict[str, Any]] = {}
    for dp in cfg.dps:
        name = f"dp{dp}"
        requests = validate.build_requests_open_loop(build_workload(wl))
        t = time.perf_counter()
        print(f"{name}: starting {dp} replica(s) (model load, KV pool, CUDA graphs, warm-up)", flush=True)
        try:
            result = serve(cfg, factory, dp, requests)
        except Exception as e:  # say which run failed; the runs already written stay
            print(f"FAILED {name} after {time.perf_counter() - t:.1f} s: {e!r}", flush=True)
            raise
        wall = time.perf_counter() - t
        metrics = summarize(result.requests, result.steps)
        metrics.update(num_rejected=len(result.rejected), wall_seconds=wall, num_engine_steps=result.num_steps,
                       per_replica=list(result.per_replica),
                       max_replica_share=max(result.per_replica) / max(sum(result.per_replica), 1))
        run_dir = out / name
        write_results(run_dir, result.requests, result.steps, metrics)
        record = {"name": name, "dp": dp, "router": cfg.router, "replicas": cfg.replicas, "workload": wl,
                  "scheduler": dataclasses.asdict(SchedulerConfig(**factory.scheduler)),
                  "cache": {"block_size": BLOCK_SIZE, "num_gpu_blocks": cfg.num_gpu_blocks,
                            "enable_prefix_caching": True},
                  "runner": {**factory.runner_scheduler, "num_gpu_blocks": cfg.num_gpu_blocks,
                             "gpu_memory_utilization": cfg.gpu_memory_utilization,
                             "warmup_requests": cfg.warmup_requests},
                  "per_replica": list(result.per_replica), "model_name": cfg.model_name,
                  "model_dir": str(model_dir), "device": device_name, "torch": torch.__version__,
                  "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (run_dir / "case.json").write_text(json.dumps(record, indent=1))
        _report_run(name, metrics, cfg.num_requests, wall)
        done[name] = metrics
    print(f"real phase done in {time.perf_counter() - t_all:.1f} s; results in {out}\n", flush=True)
    print(real_table(done), flush=True)
    return done


def _report_run(name: str, m: dict[str, Any], num_requests: int, wall: float) -> None:
    print(f"  {name}: {m['completed']} done, {m['num_rejected']} rejected, per replica {m['per_replica']}, "
          f"{wall:.1f} s wall (incl. start-up), {m['num_engine_steps']} steps, req/s {m['request_throughput']:.2f}, "
          f"TTFT p50 {m['median_ttft_ms']:.1f} ms, TPOT p50 {m['median_tpot_ms']:.2f} ms", flush=True)
    if m["completed"] != num_requests:
        print(f"  WARNING {name}: only {m['completed']} of {num_requests} requests completed", flush=True)


def real_table(done: dict[str, dict[str, Any]]) -> str:
    lines = ["| run | done | req/s | out tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | E2E p99 ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in done.items():
        lines.append(f"| {name} | {m['completed']} | {m['request_throughput']:.2f} | {m['output_throughput']:.0f} | "
                     f"{m['median_ttft_ms']:.1f} | {m['p99_ttft_ms']:.1f} | {m['median_tpot_ms']:.2f} | "
                     f"{m['p99_e2el_ms']:.0f} |")
    if "dp1" in done and "dp2" in done:
        ratio = done["dp2"]["output_throughput"] / done["dp1"]["output_throughput"]
        lines.append(f"\nDP=2 / DP=1 output throughput: x{ratio:.2f}")
    return "\n".join(lines)


# --- compare phase: DP ----------------------------------------------------------------------------
def run_dirs(real_root: Path) -> list[Path]:
    dirs = [p.parent for p in real_root.glob("*/case.json")]
    dirs = [d for d in dirs if "dp" in json.loads((d / "case.json").read_text())]
    if not dirs:
        raise FileNotFoundError(f"no DP run directories (case.json with 'dp') under {real_root}")
    return sorted(dirs, key=lambda d: json.loads((d / "case.json").read_text())["dp"])


def sim_variants(profile: Path, baseline_profile: Path | None) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, cost model, options) of each simulator rerun, labelled as in ``validate.py``."""
    out = [("calibrated", "calibrated", {"profile": str(profile)})]
    if baseline_profile is not None:
        out.append(("calibrated_v1", "calibrated", {"profile": str(baseline_profile)}))
    return out + [("roofline", "roofline", {})]


def simulate_run(record: dict[str, Any], cost_model: str, options: dict[str, Any]) -> dict[str, Any]:
    """The real run's workload on ``record['dp']`` simulated replicas behind the same router."""
    from core.config import SchedulerConfig
    from core.workloads.config import WorkloadConfig, build_workload
    from simulator.runner import ParallelSpec, SimulationConfig, run_simulation

    cache = record["cache"]
    cfg = SimulationConfig(model=validate._model_spec(record), hardware=validate._sim_hardware(record["device"]),
                           parallel=ParallelSpec(dp=record["dp"], router=record["router"]),
                           scheduler=SchedulerConfig(**record["scheduler"]), block_size=cache["block_size"],
                           enable_prefix_caching=cache["enable_prefix_caching"],
                           num_gpu_blocks=cache["num_gpu_blocks"], cost_model=cost_model,
                           cost_model_options=options)
    run = run_simulation(cfg, build_workload(WorkloadConfig.from_dict(record["workload"])))
    counts = [0] * record["dp"]
    for r in run.result.requests:
        counts[r.replica] += 1
    return {**run.metrics, "per_replica": counts, "max_replica_share": max(counts) / max(sum(counts), 1)}


def compare_dp(real_root: Path, profile: Path,
               baseline_profile: Path | None = None) -> tuple[Any, dict[str, dict[str, dict[str, Any]]]]:
    """Long table (run, metric, real, each simulator and its relative error) and the metrics
    of every run by source; the DP=2 / DP=1 throughput ratios are rows of run ``dp2/dp1``."""
    import pandas as pd

    from core.results import read_metrics

    variants = sim_variants(profile, baseline_profile)
    labels = [v[0] for v in variants]
    by_run: dict[str, dict[str, dict[str, Any]]] = {}
    for d in run_dirs(real_root):
        record = json.loads((d / "case.json").read_text())
        t = time.perf_counter()
        by_run[record["name"]] = {"real": read_metrics(d)}
        for label, kind, opts in variants:
            by_run[record["name"]][label] = simulate_run(record, kind, opts)
        print(f"  {record['name']}: simulated {len(variants)} times in {time.perf_counter() - t:.1f} s", flush=True)
    rows = [_row(name, key, {src: m.get(key) for src, m in runs.items()}, labels)
            for name, runs in by_run.items() for key in DP_METRICS]
    if "dp1" in by_run and "dp2" in by_run:
        for key in SCALED:
            ratios = {src: _ratio(by_run["dp2"][src].get(key), by_run["dp1"][src].get(key))
                      for src in ("real", *labels)}
            rows.append(_row("dp2/dp1", key, ratios, labels))
    return pd.DataFrame(rows), by_run


def _row(run: str, metric: str, values: dict[str, Any], labels: list[str]) -> dict[str, Any]:
    row = {"run": run, "metric": metric, "real": values.get("real")}
    for label in labels:
        row[label] = values.get(label)
        row[f"{label}_rel_err"] = validate._rel(values.get(label), values.get("real"))
    return row


def _ratio(a: Any, b: Any) -> float:
    if a is None or b is None or not b:
        return math.nan
    return float(a) / float(b)


def dp_markdown(table: Any, by_run: dict[str, dict[str, dict[str, Any]]], real_root: Path) -> str:
    labels = validate.sim_labels(table)
    lines = [f"Real runs: `{real_root}`. Each cell: real / " + " / ".join(f"{lab} error" for lab in labels) + ".", ""]
    for name, runs in by_run.items():
        real = runs["real"]
        lines.append(f"- {name}: {real.get('completed')} requests completed, per replica {real.get('per_replica')}, "
                     f"wall {validate._fmt(real.get('wall_seconds'), 1)} s (incl. start-up)")
    lines += ["", "| run | " + " | ".join(DP_METRICS.values()) + " |", "|---|" + "---|" * len(DP_METRICS)]
    for run in by_run:
        sub = table[table["run"] == run].set_index("metric")
        cells = []
        for key in DP_METRICS:
            if key not in sub.index:
                cells.append("")
                continue
            r = sub.loc[key]
            errors = [validate._pct(r[f"{lab}_rel_err"]) for lab in labels]
            cells.append(" / ".join([validate._fmt(r["real"]), *errors]))
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    scal = table[table["run"] == "dp2/dp1"]
    if len(scal):
        lines += ["", "DP=2 / DP=1 scaling:", "", "| metric | real | " + " | ".join(labels) + " |",
                  "|---|---:|" + "---:|" * len(labels)]
        for _, r in scal.iterrows():
            lines.append(f"| {r['metric']} | x{r['real']:.3f} | " + " | ".join(
                f"x{r[lab]:.3f} ({validate._pct(r[f'{lab}_rel_err'])})" for lab in labels) + " |")
    return "\n".join(lines) + "\n"


# --- compare phase: TP ----------------------------------------------------------------------------
def tp_measurements(results: dict[str, Path]) -> list[dict[str, Any]]:
    """One row per (model, tp, batch) of the selfcheck JSONs: median CUDA-event step time of
    ``execute`` and wall time per step (scheduler, pickling and broadcast included)."""
    rows = []
    for model, path in results.items():
        data = json.loads(Path(path).read_text())
        for key, points in data["decode"].items():
            if not key.startswith("tp") or not isinstance(points, list):
                continue
            for p in points:
                rows.append({"model": model, "device": data["device"], "tp": int(key[2:]), "batch": p["batch"],
                             "steps": p["steps"], "real_step_ms": p["median_step_ms"],
                             "real_wall_ms": p["wall_per_step_ms"]})
    return rows


def roofline_step(model: str, hardware: Any, tp: int, batch: int, steps: int) -> Any:
    """The roofline's timing of the selfcheck's median decode step: every request has its
    128-token prompt, the first sampled token and half the timed steps behind it."""
    from simulator.cost_model import BatchShape, make_cost_model
    from simulator.model_spec import get_model

    context = TP_PROMPT_LEN + 1 + steps // 2
    cm = make_cost_model("roofline", get_model(model), hardware, tp=tp)
    return cm.step_time(BatchShape.decode(batch, batch * context, context))


def _device_ms(timing: Any) -> float:
    """The GPU part of a roofline step: what the selfcheck's CUDA events measure."""
    return 1e3 * (timing.total - timing.breakdown["cpu_overhead"])


def fit_tp_terms(rows: list[dict[str, Any]], hardware: Any) -> dict[str, Any]:
    """The two fixed costs the roofline's decode step lacks, fitted to the measurements.

    * ``link_latency``: for each (model, batch) pair, the real all-reduce time is what TP=2
      adds beyond the roofline's own saving, ``(real2 - real1) - (roof2_no_comm - roof1)``
      (a per-step constant that TP does not change cancels out); the roofline's all-reduce
      time is linear in ``link_latency``, so one latency per pair solves it exactly.
    * a per-layer floor: what a TP=1 step takes beyond the roofline, per decoder layer
      (kernel launch / graph-node latency of the ~10 small kernels of a layer, which a
      roofline of bytes and FLOPs cannot see).

    Each fit is the median over the pairs (TP=1 rows for the floor)."""
    from simulator.model_spec import get_model

    zero = dataclasses.replace(hardware, link_latency=0.0)
    real = {(r["model"], r["tp"], r["batch"]): r for r in rows}
    pairs = []
    for (model, tp, batch), r2 in real.items():
        r1 = real.get((model, 1, batch))
        if tp == 1 or r1 is None:
            continue
        t1 = roofline_step(model, hardware, 1, batch, r1["steps"])
        t2 = roofline_step(model, hardware, tp, batch, r2["steps"])
        comm = 1e3 * t2.breakdown["communication"]
        comm0 = 1e3 * roofline_step(model, zero, tp, batch, r2["steps"]).breakdown["communication"]
        target = (r2["real_step_ms"] - r1["real_step_ms"]) - (_device_ms(t2) - comm - _device_ms(t1))
        layers = get_model(model).num_layers
        pairs.append({"model": model, "tp": tp, "batch": batch, "real_comm_ms": target, "roofline_comm_ms": comm,
                      "us_per_allreduce": 1e3 * target / (2 * layers),
                      "link_latency_us": 1e6 * hardware.link_latency * (target - comm0) / (comm - comm0),
                      "tp1_floor_us_per_layer": 1e3 * (r1["real_step_ms"] - _device_ms(t1)) / layers})
    if not pairs:
        raise ValueError("the TP results hold no TP=1 / TP>1 pair at the same batch")
    return {"pairs": pairs, "hardware": hardware.name, "default_link_latency_s": hardware.link_latency,
            "link_latency_s": 1e-6 * statistics.median(p["link_latency_us"] for p in pairs),
            "floor_s_per_layer": 1e-6 * statistics.median(p["tp1_floor_us_per_layer"] for p in pairs)}


#: Predictions of the TP table: the roofline as catalogued, with the fitted link latency, and
#: with the fitted link latency plus the fitted per-layer floor.
TP_VARIANTS = ("roofline", "latency", "latency_floor")


def compare_tp(results: dict[str, Path]) -> tuple[Any, dict[str, Any]]:
    """Measured TP=1 / TP=2 decode step times next to the roofline's device part (its CPU term
    left out: the real step is a CUDA-event time), for each of ``TP_VARIANTS``."""
    import pandas as pd

    from simulator.hardware import get_hardware
    from simulator.model_spec import get_model

    rows = tp_measurements(results)
    if not rows:
        raise ValueError("no TP measurements found")
    hw = get_hardware(validate._sim_hardware(rows[0]["device"]))
    fit = fit_tp_terms(rows, hw)
    fitted_hw = dataclasses.replace(hw, link_latency=fit["link_latency_s"])
    for r in rows:
        t = roofline_step(r["model"], hw, r["tp"], r["batch"], r["steps"])
        f = roofline_step(r["model"], fitted_hw, r["tp"], r["batch"], r["steps"])
        floor_ms = 1e3 * fit["floor_s_per_layer"] * get_model(r["model"]).num_layers
        r.update(context=TP_PROMPT_LEN + 1 + r["steps"] // 2, real_host_ms=r["real_wall_ms"] - r["real_step_ms"],
                 roofline_ms=_device_ms(t), roofline_comm_ms=1e3 * t.breakdown["communication"],
                 latency_ms=_device_ms(f), latency_comm_ms=1e3 * f.breakdown["communication"],
                 latency_floor_ms=_device_ms(f) + floor_ms, roofline_with_cpu_ms=1e3 * t.total)
        for v in TP_VARIANTS:
            r[f"{v}_rel_err"] = validate._rel(r[f"{v}_ms"], r["real_step_ms"])
        r["roofline_with_cpu_rel_err_vs_wall"] = validate._rel(r["roofline_with_cpu_ms"], r["real_wall_ms"])
    return pd.DataFrame(rows), fit


def tp_speedups(table: Any) -> list[dict[str, Any]]:
    """TP=1 step / TP=2 step per (model, batch): real and each prediction."""
    out = []
    idx = table.set_index(["model", "tp", "batch"])
    for (model, tp, batch), r in idx.iterrows():
        if tp == 1 or (model, 1, batch) not in idx.index:
            continue
        r1 = idx.loc[(model, 1, batch)]
        out.append({"model": model, "tp": tp, "batch": batch,
                    **{f"{k}_speedup": r1[f"{k}_ms"] / r[f"{k}_ms"] for k in ("real_step", *TP_VARIANTS)}})
    return out


def tp_markdown(table: Any, fit: dict[str, Any]) -> str:
    lat, floor = 1e6 * fit["link_latency_s"], 1e6 * fit["floor_s_per_layer"]
    lines = [f"Pure-decode step on {fit['hardware']}, device part: the real step is the median CUDA-event time "
             "of `execute` (graph replay with the collectives, logits all-gather, sampling); the predictions "
             "leave out the roofline's CPU term. `roofline`: as catalogued "
             f"({1e6 * fit['default_link_latency_s']:.1f} us per ring step); `+latency`: link latency "
             f"{lat:.2f} us (fitted); `+floor`: also {floor:.1f} us per decoder layer (fitted on TP=1). "
             "Both fits use these same points (a consistency check, not a validation). ms; error vs real.", "",
             "| model | TP | batch | real | roofline (all-reduce) | +latency (all-reduce) | +latency +floor | "
             "host ms/step (wall - step) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for _, r in table.sort_values(["model", "batch", "tp"], ascending=[False, True, True]).iterrows():
        lines.append(f"| {r.model} | {r.tp} | {r.batch} | {r.real_step_ms:.3f} | {r.roofline_ms:.3f} "
                     f"({r.roofline_comm_ms:.3f}) {validate._pct(r.roofline_rel_err)} | {r.latency_ms:.3f} "
                     f"({r.latency_comm_ms:.3f}) {validate._pct(r.latency_rel_err)} | {r.latency_floor_ms:.3f} "
                     f"{validate._pct(r.latency_floor_rel_err)} | {r.real_host_ms:.2f} |")
    lines += ["", "TP=1 step / TP=2 step:", "", "| model | batch | real | roofline | +latency | +latency +floor |",
              "|---|---:|---:|---:|---:|---:|"]
    for s in tp_speedups(table):
        lines.append(f"| {s['model']} | {s['batch']} | {s['real_step_speedup']:.2f} | {s['roofline_speedup']:.2f} | "
                     f"{s['latency_speedup']:.2f} | {s['latency_floor_speedup']:.2f} |")
    lines += ["", "Per pair: the all-reduce time TP=2 adds beyond the roofline's own saving, and the fits:", "",
              "| model | batch | real all-reduce ms/step | us per all-reduce (2 per layer) | roofline all-reduce "
              "ms/step | link latency that fits (us) | TP=1 floor (us per layer) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for p in fit["pairs"]:
        lines.append(f"| {p['model']} | {p['batch']} | {p['real_comm_ms']:.3f} | {p['us_per_allreduce']:.1f} | "
                     f"{p['roofline_comm_ms']:.3f} | {p['link_latency_us']:.2f} | {p['tp1_floor_us_per_layer']:.1f} |")
    return "\n".join(lines) + "\n"


# --- compare phase: files ---------------------------------------------------------------------------
def compare(out: Path, *, real_root: Path | None, profile: Path = DEFAULT_PROFILE,
            baseline_profile: Path | None = None, tp_results: dict[str, Path] | None = None) -> dict[str, Any]:
    """Both comparisons (DP only when ``real_root`` is given); writes compare.md / .json and
    compare_dp.csv / compare_tp.csv to ``out``; returns what compare.json holds."""
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    summary: dict[str, Any] = {"profile": str(profile)}
    if real_root is not None:
        table, by_run = compare_dp(real_root, profile, baseline_profile)
        table.to_csv(out / "compare_dp.csv", index=False)
        sections.append("## DP=1 and DP=2 vs the simulator\n\n" + dp_markdown(table, by_run, real_root))
        summary["dp"] = {"runs": by_run, "table": table.to_dict("records")}
    tp_table, fit = compare_tp(tp_results or TP_RESULTS)
    tp_table.to_csv(out / "compare_tp.csv", index=False)
    sections.append("## TP=2 vs TP=1 decode steps vs the roofline's TP model\n\n" + tp_markdown(tp_table, fit))
    summary["tp"] = {"rows": tp_table.to_dict("records"), "speedups": tp_speedups(tp_table), "fit": fit}
    md = "\n".join(sections)
    (out / "compare.md").write_text(md)
    (out / "compare.json").write_text(json.dumps(summary, indent=1, default=_json_default))
    return summary


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


# --- CLI ----------------------------------------------------------------------------------------------
def _real_config(args: argparse.Namespace) -> RealConfig:
    model_dir = args.model_dir or (str(Path(args.out) / "tiny-model") if args.tiny else RealConfig.model_dir)
    cfg = RealConfig.tiny(model_dir) if args.tiny else RealConfig(model_dir=model_dir)
    overrides = {k: getattr(args, k) for k in ("num_requests", "rate", "router", "replicas", "device")
                 if getattr(args, k) is not None}
    if args.dp is not None:
        overrides["dps"] = tuple(int(x) for x in args.dp.split(","))
    return dataclasses.replace(cfg, **overrides)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="phase", required=True)
    r = sub.add_parser("real", help="DP=1 and DP=2 runs on the executor (GPU machine)")
    r.add_argument("--out", default=str(DEFAULT_OUT), help="one subdirectory per run (dp1, dp2)")
    r.add_argument("--model-dir", default=None,
                   help=f"model to serve; written if empty (default {RealConfig.model_dir})")
    r.add_argument("--tiny", action="store_true", help="CPU pipeline check: tiny model, in-process replicas")
    r.add_argument("--dp", default=None, help="comma list of DP degrees (default 1,2)")
    r.add_argument("--num-requests", type=int, default=None)
    r.add_argument("--rate", type=float, default=None, help="Poisson rate, req/s")
    r.add_argument("--router", default=None)
    r.add_argument("--replicas", choices=("process", "inprocess"), default=None)
    r.add_argument("--device", choices=("cuda", "cpu"), default=None)
    c = sub.add_parser("compare", help="rerun the real runs in the simulator; TP step times vs the roofline (CPU)")
    c.add_argument("--real", default=str(DEFAULT_OUT), help="directory written by the real phase")
    c.add_argument("--no-dp", action="store_true", help="only the TP comparison")
    c.add_argument("--out", default=None, help="default: the --real directory")
    c.add_argument("--profile", default=str(DEFAULT_PROFILE))
    c.add_argument("--baseline-profile", default=None, help="a second profile, reported as calibrated_v1")
    c.add_argument("--tp-result", action="append", default=None, metavar="MODEL=PATH",
                   help="selfcheck JSON of a catalog model (default: the two committed 2 x H200 runs)")
    args = ap.parse_args(argv)
    if args.phase == "real":
        run_real(_real_config(args), Path(args.out))
        return 0
    if args.out is None and args.no_dp:
        ap.error("compare --no-dp needs --out")
    tp = dict(spec.split("=", 1) for spec in args.tp_result) if args.tp_result else None
    compare(Path(args.out or args.real), real_root=None if args.no_dp else Path(args.real),
            profile=Path(args.profile),
            baseline_profile=Path(args.baseline_profile) if args.baseline_profile else None,
            tp_results={k: Path(v) for k, v in tp.items()} if tp else None)
    print((Path(args.out or args.real) / "compare.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
