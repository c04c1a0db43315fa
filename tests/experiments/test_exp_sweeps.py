"""The command lines: the default run, a 2x2 multirun, aggregation, plots, launchers, errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from exp_helpers import compose_run, run_module
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from core.results import BREAKDOWN_FILE, METRICS_FILE, REQUESTS_FILE, STEPS_FILE
from experiments import aggregate, plot
from experiments.config import to_simulation_config

RUN_FILES = (METRICS_FILE, REQUESTS_FILE, STEPS_FILE, BREAKDOWN_FILE)


def test_default_run_without_arguments(tmp_path) -> None:
    """`python -m experiments.run` alone: the embedded default, a summary, files in outputs/."""
    proc = run_module("experiments.run", "hydra.run.dir=" + str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for needle in ("Llama-3.1-8B on H100-SXM", "req/s", "TTFT", "TPOT", "E2E", "preemptions",
                   "prefix cache hit rate", f"results: {tmp_path / 'run'}"):
        assert needle in out, needle
    assert "simulating" not in proc.stderr  # no progress bar when stderr is not a terminal
    metrics = json.loads((tmp_path / "run" / METRICS_FILE).read_text())
    assert metrics["completed"] == 500 and metrics["slo_attainment"] > 0.9  # not overloaded
    for name in RUN_FILES:
        assert (tmp_path / "run" / name).is_file()
    assert (tmp_path / "run" / ".hydra" / "config.yaml").is_file()


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory) -> Path:
    """The issue's sweep, 2 rates x 2 schedulers, in quick mode with the basic launcher."""
    root = tmp_path_factory.mktemp("sweep")
    proc = run_module("experiments.run", "-m", "workload.qps=2,8", "scheduler=vllm,sarathi", "quick=true",
                      f"hydra.sweep.dir={root}")
    assert proc.returncode == 0, proc.stderr
    return root


def test_multirun_makes_one_dir_per_point_named_by_overrides(sweep_dir) -> None:
    runs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    assert runs == ["scheduler=sarathi,workload.qps=2", "scheduler=sarathi,workload.qps=8",
                    "scheduler=vllm,workload.qps=2", "scheduler=vllm,workload.qps=8"]
    for run in runs:
        for name in RUN_FILES:
            assert (sweep_dir / run / name).stat().st_size > 0
        assert (sweep_dir / run / ".hydra" / "overrides.yaml").is_file()


def test_aggregate_reads_every_run(sweep_dir, capsys) -> None:
    aggregate.main([str(sweep_dir)])
    printed = capsys.readouterr().out
    assert "4 runs" in printed and "sarathi" in printed
    for table in (pd.read_parquet(sweep_dir / aggregate.TABLE_PARQUET), pd.read_csv(sweep_dir / aggregate.TABLE_CSV)):
        assert len(table) == 4
        assert {"workload.qps", "scheduler", "quick", "offered_qps", "num_gpus", "request_throughput",
                "p99_ttft_ms"} <= set(table.columns)
        assert sorted(table["workload.qps"]) == [2, 2, 8, 8]
        assert sorted(table["scheduler"]) == ["sarathi", "sarathi", "vllm", "vllm"]
        assert (table["offered_qps"] == table["workload.qps"]).all()
        assert (table["num_gpus"] == 1).all() and (table["completed"] > 0).all()


def test_plots_come_out_of_the_sweep(sweep_dir) -> None:
    paths = plot.plot_all(sweep_dir)
    names = {p.name for p in paths}
    for figure in ("latency_vs_load", "slo_attainment", "timeline", "breakdown"):
        assert {f"{figure}.png", f"{figure}.pdf"} <= names
    for p in paths:
        assert p.parent == sweep_dir / "plots" and p.stat().st_size > 10_000, p


def test_plot_groups_by_overrides_other_than_the_rate(sweep_dir) -> None:
    df = aggregate.collect(sweep_dir)
    assert plot.group_columns(df) == ["scheduler"]
    assert sorted(set(plot.label_groups(df))) == ["scheduler=sarathi", "scheduler=vllm"]


def test_goodput_is_interpolated_at_the_attainment_crossing() -> None:
    assert plot.goodput([1, 2, 4, 8], [1.0, 0.98, 0.94, 0.5], 0.9) == pytest.approx((4 + 0.04 / 0.44 * 4, ""))
    assert plot.goodput([1, 2], [0.95, 0.92], 0.9) == (2.0, ">=")
    assert plot.goodput([1, 2], [0.5, 0.2], 0.9) == (1.0, "<")


def test_timeline_binning_spreads_fast_forwarded_rows() -> None:
    """A 10-step decode row over [1, 2) s puts its 80 tokens and 10 steps evenly over the
    bins it covers; a single step stays in its own bin; totals are conserved."""
    steps = pd.DataFrame({"replica": [0, 0], "time": [0.0, 1.0], "duration": [0.5, 1.0]})
    sums = plot._binned_integral(steps, {"tokens": np.array([100.0, 80.0]), "steps": np.array([1.0, 10.0])},
                                 np.array([0.0, 1.0, 1.5, 2.0]))
    np.testing.assert_allclose(sums["tokens"], [100.0, 40.0, 40.0])
    np.testing.assert_allclose(sums["steps"], [1.0, 5.0, 5.0])


def test_joblib_launcher_runs_a_sweep_in_parallel(tmp_path) -> None:
    proc = run_module("experiments.run", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                      "workload.qps=1,4", "quick=true", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert "Joblib.Parallel" in proc.stderr + proc.stdout
    assert sorted(p.parent.name for p in tmp_path.glob(f"*/{METRICS_FILE}")) == ["workload.qps=1", "workload.qps=4"]


def test_slurm_launcher_config_composes(hydra_conf) -> None:
    cfg = compose_run(["hydra/launcher=slurm", "hydra.launcher.partition=cpu"], hydra_cfg=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.partition == "cpu" and launcher.cpus_per_task == 1 and launcher.timeout_min == 60
    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${hydra.job.override_dirname}"
    assert cfg.hydra.job.chdir is False


def test_unknown_key_is_rejected(hydra_conf) -> None:
    with pytest.raises(ConfigCompositionException) as err:
        compose_run(["scheduler.max_num_seq=8"])
    assert "max_num_seq" in str(err.value.__cause__) and "SchedulerConfig" in str(err.value.__cause__)


def test_wrong_type_is_rejected(hydra_conf) -> None:
    with pytest.raises(ConfigCompositionException) as err:
        compose_run(["workload.qps=fast"])
    cause = err.value.__cause__
    assert isinstance(cause, ValidationError) and "workload.qps" in str(cause) and "fast" in str(cause)


def test_unknown_group_option_is_rejected(hydra_conf) -> None:
    with pytest.raises(MissingConfigException, match="scheduler/fifo"):
        compose_run(["scheduler=fifo"])


def test_out_of_range_value_names_the_field(hydra_conf) -> None:
    with pytest.raises(ValueError, match="SchedulerConfig.max_num_seqs"):
        to_simulation_config(compose_run(["scheduler.max_num_seqs=0"]))


def test_bad_override_on_the_command_line_fails_clearly(tmp_path) -> None:
    proc = run_module("experiments.run", "scheduler.max_num_seq=8", f"hydra.run.dir={tmp_path}")
    assert proc.returncode != 0
    assert "Key 'max_num_seq' not in 'SchedulerConfig'" in proc.stderr
    assert not (tmp_path / METRICS_FILE).exists()
