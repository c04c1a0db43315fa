"""Capacity search: bracketing + bisection, the Pareto front, and small real searches."""
from __future__ import annotations

import math

import pandas as pd
import pytest
from exp_helpers import run_module
from hydra import compose

from experiments.search import RESULT_FILE, find_capacity, pareto_front, run_search

TINY = ["search.scheduler=[vllm]", "search.num_requests=60", "search.min_probe_s=10", "search.rel_tol=0.25",
        "search.max_probes=12"]


@pytest.mark.parametrize("capacity", [0.3, 1.0, 7.3, 100.0])
def test_find_capacity_brackets_then_bisects(capacity) -> None:
    probed = []

    def meets(q: float) -> bool:
        probed.append(q)
        return q <= capacity

    lo, hi, probes = find_capacity(meets, start=1.0, rel_tol=0.05, max_probes=30)
    assert lo <= capacity < hi and hi / lo <= 1.05
    assert probes == len(probed) < 30


def test_find_capacity_when_nothing_or_everything_passes() -> None:
    assert find_capacity(lambda q: False, 1.0, 0.05, 30)[0] == 0.0
    lo, hi, probes = find_capacity(lambda q: True, 1.0, 0.05, 5)
    assert (lo, hi, probes) == (16.0, math.inf, 5)


def test_pareto_front_prefers_fewer_gpus_and_more_qps_per_gpu() -> None:
    df = pd.DataFrame({"num_gpus": [1, 1, 2, 4, 4], "qps_per_gpu": [5.0, 4.0, 6.0, 5.5, math.nan]})
    assert pareto_front(df).tolist() == [True, False, True, False, False]


def test_search_on_a_tiny_grid(hydra_conf) -> None:
    overrides = [*TINY, "search.tp=[1,2]", "search.workers=2"]
    df = run_search(compose("search", overrides=overrides), overrides)
    assert df["tp"].tolist() == [1, 2] and df["num_gpus"].tolist() == [1, 2]
    assert (df["error"] == "").all()
    assert ((df["max_qps"] > 0.5) & (df["max_qps"] < 500)).all()  # a sane rate for an 8B model on H100s
    assert (df["upper_bound_qps"] / df["max_qps"] <= 1.25).all()
    assert (df["qps_per_gpu"] == df["max_qps"] / df["num_gpus"]).all()
    assert (df["p99_ttft_ms_at_max"] <= 2000).all() and (df["p99_tpot_ms_at_max"] <= 100).all()
    assert df["max_qps"].iloc[1] > df["max_qps"].iloc[0]  # two GPUs serve more than one
    assert df["pareto"].iloc[0]


def test_search_reports_configurations_that_cannot_run(hydra_conf) -> None:
    overrides = [*TINY, "model=llama3_70b", "search.tp=[1]", "search.workers=1"]
    row = run_search(compose("search", overrides=overrides), overrides).iloc[0]
    assert "does not fit" in row["error"] and math.isnan(row["max_qps"]) and not row["pareto"]


def test_search_scales_a_trace_to_the_probed_rate(hydra_conf) -> None:
    overrides = [*TINY, "workload=azure_conv", "search.tp=[1]", "search.workers=1", "search.num_requests=40"]
    row = run_search(compose("search", overrides=overrides), overrides).iloc[0]
    assert row["error"] == "" and row["max_qps"] > 0.5


def test_search_command_line_writes_the_table(tmp_path) -> None:
    proc = run_module("experiments.search", *TINY, "search.tp=[1]", "search.workers=1", "search.num_requests=40",
                      f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert "Pareto" in proc.stdout and "qps_per_gpu" in proc.stdout
    table = pd.read_csv(tmp_path / RESULT_FILE)
    assert len(table) == 1 and table["max_qps"].iloc[0] > 0
