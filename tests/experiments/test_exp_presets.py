"""Every shipped preset composes and runs (quick mode), and the layer's config plumbing holds."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pytest
from exp_helpers import CONF, compose_run
from hydra import compose
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from core.results import BREAKDOWN_FILE, METRICS_FILE, REQUESTS_FILE, STEPS_FILE
from core.workloads.config import WorkloadConfig
from experiments.config import QUICK_NUM_REQUESTS, WorkloadConf, to_simulation_config, to_workload_config
from experiments.run import run

GROUPS = ("model", "hardware", "workload", "scheduler", "cache", "parallel", "backend")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _extra(group: str, option: str, burstgpt_csv: Path, calibrated_profile: Path) -> list[str]:
    """What a preset needs besides itself: bigger models need TP, some inputs a file."""
    needs = {
        ("model", "llama3_70b"): ["parallel=tp4"],
        ("model", "mixtral_8x7b"): ["parallel=tp2"],
        ("workload", "burstgpt"): [f"workload.trace_path={burstgpt_csv}"],
        ("backend", "sim_calibrated"): [f"backend.cost_model_options.profile={calibrated_profile}"],
    }
    return needs.get((group, option), [])


def _check_run(cfg, out: Path) -> dict:
    result = run(cfg, out)
    for name in (METRICS_FILE, REQUESTS_FILE, STEPS_FILE, BREAKDOWN_FILE):
        assert (out / name).is_file(), name
    m = result.metrics
    assert m["completed"] + m["aborted"] == len(pd.read_parquet(out / REQUESTS_FILE))
    assert 0 < m["completed"] <= QUICK_NUM_REQUESTS
    assert m["request_throughput"] > 0 and m["median_ttft_ms"] > 0
    return m


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_group_option_runs_quick(hydra_conf, tmp_path, group, option, burstgpt_csv, calibrated_profile) -> None:
    cfg = compose_run([f"{group}={option}", *_extra(group, option, burstgpt_csv, calibrated_profile)])
    _check_run(cfg, tmp_path)


def _sweep_points(params: dict[str, str]) -> list[list[str]]:
    """Each value of each swept key once, the other keys at their first value (not the
    full product: that is what the sweep itself runs)."""
    parser = OverridesParser.create()
    values = {k: list(parser.parse_override(f"{k}={v}").sweep_string_iterator()) for k, v in params.items()}
    first = {k: v[0] for k, v in values.items()}
    points = {tuple(sorted({**first, k: v}.items())) for k, vs in values.items() for v in vs}
    return [[f"{k}={v}" for k, v in point] for point in sorted(points)]


@pytest.mark.parametrize("option", _options("experiment"))
def test_experiment_preset_runs_quick(hydra_conf, tmp_path, option) -> None:
    base = compose_run([f"experiment={option}"], hydra_cfg=True)
    params = base.hydra.sweeper.params or {}
    if option != "quick":  # every study preset sweeps by itself
        assert base.hydra.mode.name == "MULTIRUN" and params
    for i, point in enumerate(_sweep_points(dict(params)) or [[]]):
        _check_run(compose_run([f"experiment={option}", *point]), tmp_path / str(i))


def test_default_config_is_the_documented_setup(hydra_conf) -> None:
    cfg = compose("config")
    assert (cfg.model.name, cfg.hardware.name, cfg.workload.kind) == ("Llama-3.1-8B", "H100-SXM", "sharegpt")
    assert cfg.scheduler.batching == "continuous" and cfg.scheduler.enable_chunked_prefill
    assert cfg.scheduler.max_model_len == cfg.workload.max_model_len  # one context limit
    assert not cfg.quick and cfg.workload.num_requests == 500


def test_workload_schema_mirrors_workload_config() -> None:
    """WorkloadConf must keep up with core's WorkloadConfig (only rate is renamed qps)."""
    ours = [f.name for f in dataclasses.fields(WorkloadConf)]
    core = [("qps" if f.name == "rate" else f.name) for f in dataclasses.fields(WorkloadConfig)]
    assert ours == core


def test_qps_is_the_rate_and_quick_caps_requests(hydra_conf) -> None:
    cfg = compose("config", overrides=["workload.qps=7.5", "workload.num_requests=10000"])
    assert to_workload_config(cfg).rate == 7.5
    assert to_workload_config(cfg).num_requests == 10000
    cfg.quick = True
    assert to_workload_config(cfg).num_requests == QUICK_NUM_REQUESTS


def test_simulation_config_carries_every_group(hydra_conf) -> None:
    cfg = compose("config", overrides=["parallel=dp2", "cache=swap", "scheduler=sarathi", "hardware=a100",
                                       "+backend.cost_model_options.cpu_overhead=0.002", "slo.e2el_ms=30000"])
    sim = to_simulation_config(cfg)
    assert (sim.parallel.dp, sim.parallel.router) == (2, "round_robin")
    assert sim.swap_space_gb == 16.0 and sim.hardware == "A100-80GB-SXM"
    assert sim.scheduler.max_num_batched_tokens == 512 and sim.scheduler.long_prefill_token_threshold == 256
    assert sim.cost_model_options == {"cpu_overhead": 0.002}
    assert sim.slo == {"ttft_ms": 2000.0, "tpot_ms": 100.0, "e2el_ms": 30000.0}


def test_parallel_presets_cover_tp_and_dp() -> None:
    names = set(_options("parallel"))
    assert {"tp1", "tp2", "tp4", "tp8", "dp2"} <= names
    for option in names:
        spec = OmegaConf.load(CONF / "parallel" / f"{option}.yaml")
        assert set(spec) <= {"tp", "pp", "dp", "router", "num_microbatches"}


def test_every_option_is_in_a_known_group() -> None:
    """No stray YAML: each file under conf/ is a group option or one of the primary configs."""
    expected = set(GROUPS) | {"experiment", "hydra"}
    dirs = {p.relative_to(CONF).parts[0] for p in CONF.rglob("*.yaml") if p.parent != CONF}
    assert dirs == expected
    assert sorted(p.name for p in CONF.glob("*.yaml")) == ["common.yaml", "config.yaml", "search.yaml"]


def test_progress_bar_only_when_asked_or_automatic(hydra_conf, tmp_path, capsys) -> None:
    run(compose_run([]), tmp_path / "quiet")  # quick: never a bar
    assert "simulating" not in capsys.readouterr().err
    cfg = compose_run(["progress=true"])
    run(cfg, tmp_path / "bar")
    err = capsys.readouterr().err
    assert "simulating" in err and f"{QUICK_NUM_REQUESTS}/{QUICK_NUM_REQUESTS}" in err
