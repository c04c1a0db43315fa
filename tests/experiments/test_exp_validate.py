"""Sim-vs-real validation: the committed profile, the simpy-free request builder, the compare
phase on a synthetic "real" run, and (CPU, tiny random model) the whole pipeline."""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from core.config import SchedulerConfig
from core.results import write_results
from core.workloads.config import WorkloadConfig, build_workload
from experiments import validate
from simulator.cost_model import BatchShape, CalibratedCostModel, make_cost_model
from simulator.cost_model.base import StepTiming
from simulator.hardware import get_hardware
from simulator.model_spec import get_model
from simulator.runner import SimulationConfig, build_requests, run_simulation

REPO = Path(__file__).resolve().parents[2]
PROFILES = sorted((REPO / "experiments" / "profiles").glob("*.json"))
# The synthetic "real" runs below are of the Qwen3-0.6B shape: a profile of that model.
QWEN_PROFILES = [p for p in PROFILES if p.name.startswith("qwen3_0_6b")]


@pytest.mark.parametrize("path", PROFILES, ids=[p.name for p in PROFILES])
def test_committed_profile_plugs_into_make_cost_model(path: Path) -> None:
    assert path.stat().st_size < 2_000_000
    profile = json.loads(path.read_text())
    assert profile["format"] in ("servelab-profile-v1", "servelab-profile-v2")
    meta = profile["meta"]
    for key in ("device", "torch", "triton", "date"):
        assert meta.get(key), key
    assert profile["tp"] == 1 and profile["pp"] == 1
    cm = make_cost_model("calibrated", get_model(profile["model"]), get_hardware("H200"), profile=str(path))
    assert isinstance(cm, CalibratedCostModel)
    # Plausible, positive step times; a bigger decode batch or a longer prefill costs more.
    d1 = cm.step_time(BatchShape.decode(1, 512)).total
    d64 = cm.step_time(BatchShape.decode(64, 64 * 1024)).total
    p512 = cm.step_time(BatchShape.from_lists([512], [512])).total
    p8k = cm.step_time(BatchShape.from_lists([8192], [8192])).total
    assert 0 < d1 < d64 < 0.1
    assert 0 < p512 < p8k < 1.0
    cpu = cm.step_time(BatchShape.decode(8, 8 * 300)).breakdown["cpu_overhead"]
    if cm.version == 1:
        assert cpu == cm.graph_overhead
    elif "step_fits" in profile:  # fitted whole graph steps: host time and longest-context slope per size
        a, per_req, _, per_max = cm._graph_fit[8]
        assert cpu == pytest.approx(a + 8 * per_req)
        longer = cm.step_time(BatchShape.decode(64, 64 * 1000, 8000)).total
        assert longer == pytest.approx(cm.step_time(BatchShape.decode(64, 64 * 1000)).total
                                       + cm._graph_fit[64][3] * (8000 - 1000))
    else:  # v2: the per-request host time is explicit
        assert cpu == pytest.approx(cm.graph_overhead + 8 * cm.cpu_per_request)
        # the longest context matters above the split-K graphs, not below
        assert (cm.step_time(BatchShape.decode(64, 64 * 1000, 8000)).total
                > cm.step_time(BatchShape.decode(64, 64 * 1000)).total)
        assert (cm.step_time(BatchShape.decode(8, 8 * 1000, 8000)).total
                == cm.step_time(BatchShape.decode(8, 8 * 1000)).total)


@pytest.mark.parametrize("path", PROFILES[:1], ids=[p.name for p in PROFILES[:1]])
def test_profile_cold_start_under_2s(path: Path) -> None:
    code = ("import time; t = time.perf_counter(); "
            "from simulator.cost_model import make_cost_model; from simulator.model_spec import get_model; "
            "from simulator.hardware import get_hardware; import json; "
            f"p = json.load(open({str(path)!r})); "
            "cm = make_cost_model('calibrated', get_model(p['model']), get_hardware('H200'), "
            f"profile={str(path)!r}); "
            "print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert float(out.stdout.strip()) < 2.0


def test_open_loop_requests_match_the_simulator_builder() -> None:
    wl = build_workload(WorkloadConfig(kind="synthetic", lengths="uniform", input_range=(8, 64),
                                       output_range=(2, 9), num_requests=12, rate=5.0, num_turns=2, seed=3))
    ours = validate.build_requests_open_loop(wl)
    ref, _ = build_requests(wl)
    assert [r.request_id for r in ours] == [r.request_id for r in ref]
    assert [r.prompt_token_ids for r in ours] == [r.prompt_token_ids for r in ref]
    assert [r.arrival_time for r in ours] == [r.arrival_time for r in ref]
    assert [r.sampling_params.max_tokens for r in ours] == [r.sampling_params.max_tokens for r in ref]
    assert [r.forced_output_token_ids for r in ours] == [r.forced_output_token_ids for r in ref]


def test_validate_and_profile_import_neither_simpy_nor_hydra() -> None:
    code = ("import sys, experiments.validate, experiments.profile; "
            "bad = [m for m in ('simpy', 'hydra', 'omegaconf') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def _fake_real_run(root: Path, name: str = "qps_low") -> dict:
    """A "real" run dir produced by the roofline simulator, with the record the real phase writes."""
    record = {"name": name, "workload": {**validate.CASES[name]["workload"], "num_requests": 20, "rate": 4.0},
              "scheduler": {**dataclasses.asdict(SchedulerConfig()), "max_model_len": 4096},
              "cache": {"block_size": 16, "num_gpu_blocks": 4096, "enable_prefix_caching": True},
              "model_name": "Qwen3-0.6B", "device": "NVIDIA H200"}
    cfg = SimulationConfig(model="Qwen3-0.6B", hardware="H200", scheduler=SchedulerConfig(**record["scheduler"]),
                           num_gpu_blocks=4096)
    run = run_simulation(cfg, build_workload(WorkloadConfig.from_dict(record["workload"])))
    d = root / name
    write_results(d, run.result.requests, run.result.steps, run.metrics)
    (d / "case.json").write_text(json.dumps(record))
    return record


@pytest.mark.skipif(not QWEN_PROFILES, reason="no committed Qwen3-0.6B profile")
def test_refit_eager_reproduces_the_committed_profile() -> None:
    """The committed profile is ``--refit-eager`` of what the GPU run wrote; refitting it
    again (from the same stored warm pass) must give the same numbers."""
    from experiments.profile import refit_eager_from_meta

    profile = json.loads(QWEN_PROFILES[0].read_text())
    if "mixed_after_op_timings" not in profile["meta"]:
        pytest.skip("profile was written by the current profile.py (no refit needed)")
    again = refit_eager_from_meta(json.loads(json.dumps(profile)))
    assert again["overhead"] == profile["overhead"]
    assert again["per_token_ops"].keys() == profile["per_token_ops"].keys()
    for op, values in profile["per_token_ops"].items():  # numpy versions may differ in the last bits
        assert again["per_token_ops"][op] == pytest.approx(values, rel=1e-9), op


@pytest.mark.skipif(not QWEN_PROFILES, reason="no committed Qwen3-0.6B profile")
def test_compare_phase_on_a_synthetic_real_run(tmp_path: Path) -> None:
    real = tmp_path / "real"
    _fake_real_run(real)
    out = tmp_path / "cmp"
    table = validate.compare(real, QWEN_PROFILES[0], out)
    for f in ("errors.csv", "errors.md", "summary.json", "requests_compare_qps_low.parquet", "cdf_qps_low.png"):
        assert (out / f).exists(), f
    assert not (out / "runs").exists()
    # The "real" run was the roofline itself: the roofline rerun must match it exactly.
    roof = table[table.metric.isin(["median_ttft_ms", "p99_e2el_ms", "output_throughput"])]["roofline_rel_err"]
    assert all(abs(v) < 1e-9 for v in roof)
    cal = table.loc[table.metric == "median_tpot_ms", "calibrated"].iloc[0]
    assert math.isfinite(cal) and cal > 0
    import pandas as pd

    per = pd.read_parquet(out / "requests_compare_qps_low.parquet")
    assert len(per) == 20 and {"ttft_real", "ttft_calibrated", "ttft_roofline"} <= set(per.columns)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["roofline"]["median_ttft_ms"] == 0.0


@pytest.mark.skipif(not QWEN_PROFILES, reason="no committed Qwen3-0.6B profile")
def test_a_real_run_stopped_by_max_duration_is_simulated_up_to_the_same_moment(tmp_path: Path) -> None:
    """``cut_off`` keeps what finished by the stop, aborts what had arrived, leaves later arrivals
    unfinished; ``compare`` cuts the simulation where the real run (case.json's max_duration,
    requests left) stopped, so the roofline rerun of a roofline "real" run matches it exactly."""
    from core.metrics import summarize
    from core.request import RequestStatus

    record = _fake_real_run(tmp_path / "whole")
    cfg = SimulationConfig(model="Qwen3-0.6B", hardware="H200", scheduler=SchedulerConfig(**record["scheduler"]),
                           num_gpu_blocks=4096)
    run = run_simulation(cfg, build_workload(WorkloadConfig.from_dict(record["workload"])))
    first = min(r.arrival_time for r in run.result.requests)
    t = first + 2.0
    finish = {r.request_id: r.finish_time for r in run.result.requests}
    arrival = {r.request_id: r.arrival_time for r in run.result.requests}
    requests, steps = validate.cut_off(run.result.requests, run.result.steps, t)
    done = [r for r in requests if r.status in (RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_STOPPED)]
    assert {r.request_id for r in done} == {k for k, f in finish.items() if f <= t}
    aborted = {r.request_id for r in requests if r.status == RequestStatus.FINISHED_ABORTED}
    assert aborted == {k for k, f in finish.items() if f > t and arrival[k] <= t} and aborted
    assert all(s.time <= t for s in steps) and len(steps) < len(run.result.steps)
    metrics = summarize(requests, steps)
    assert metrics["unfinished"] == sum(1 for a in arrival.values() if a > t) > 0
    real = tmp_path / "real"
    write_results(real / "qps_low", requests, steps, metrics)
    (real / "qps_low" / "case.json").write_text(json.dumps({**record, "max_duration": 2.0}))
    table = validate.compare(real, QWEN_PROFILES[0], tmp_path / "cmp", plots=False)
    rows = table[table.metric.isin(["median_ttft_ms", "median_e2el_ms", "output_throughput"])]
    assert all(abs(v) < 1e-9 for v in rows["roofline_rel_err"])
    whole = validate.compare(tmp_path / "whole", QWEN_PROFILES[0], tmp_path / "cmp_whole", plots=False)
    assert (whole.loc[whole.metric == "output_throughput", "real"].iloc[0]
            != table.loc[table.metric == "output_throughput", "real"].iloc[0])


def test_errors_summary_and_markdown() -> None:
    import pandas as pd

    rows = []
    for case, err in (("a", 0.01), ("b", -0.05), ("c", 0.02)):
        for key in validate.metric_keys():
            rows.append({"case": case, "metric": key, "real": 1.0, "calibrated": 1 + err, "roofline": 2.0,
                         "calibrated_rel_err": err, "roofline_rel_err": 1.0})
    table = pd.DataFrame(rows)
    s = validate.summarize_errors(table)
    assert s["calibrated"]["median_ttft_ms"] == pytest.approx(0.02)
    assert s["calibrated_targets_met"]["p50_and_throughput_le_3pct"]
    assert not s["roofline_targets_met"]["p50_and_throughput_le_3pct"]
    md = validate.errors_markdown(table, s)
    assert "| calibrated |" in md and "### b" in md


@pytest.mark.slow
def test_whole_pipeline_on_cpu_with_a_tiny_model(tmp_path: Path) -> None:
    """make_random_model -> profile (quick, CPU) -> real (one case, 3 requests) -> compare."""
    pytest.importorskip("torch")
    from executor.make_random_model import write_random_model
    from experiments.profile import build_profile

    model = write_random_model(tmp_path / "tiny", "Qwen3ForCausalLM", "tiny",
                               overrides={"max_position_embeddings": 1024})
    profile = build_profile(str(model), model_name="tiny-qwen3", device="cpu", quick=True, max_model_len=256,
                            max_num_seqs=8, max_num_batched_tokens=256, num_gpu_blocks=256, log=lambda s: None)
    assert profile["meta"]["eager_fit"]["source"] == "interleaved eager rounds"
    assert "mixed_cold_pass" in profile["meta"]
    # every timed engine step is kept (ms), the eager rounds with one summary row each; the fit's
    # per-size medians come from the steady rounds' mixed steps
    rounds = profile["samples"]["eager_rounds"]
    steps = rounds["steps"]
    assert set(steps["series"]) == {"mixed", "after_graph", "after_graph_b2b", "after_idle", "after_idle_b2b"}
    assert len({len(v) for v in steps.values()}) == 1 and set(steps["round"]) == set(range(rounds["rounds"]))
    assert [r["round"] for r in rounds["per_round"]] == list(range(rounds["rounds"]))
    assert "load1" in rounds["per_round"][0]["clock_start"]
    assert profile["samples"]["engine_steps"]["mixed_cold"]["wall_ms"]
    steady = set(rounds["steady_rounds"]["decoders"])
    fitted = profile["meta"]["overhead_fit"]["mixed_by_tokens"]["n"]
    assert sum(fitted) == sum(1 for s, r in zip(steps["series"], steps["round"]) if s == "mixed" and r in steady)
    assert sum(profile["meta"]["overhead_fit"]["mixed_all_rounds_by_tokens"]["n"]) == steps["series"].count("mixed")
    assert profile["overhead"]["graph_max_batch"] == 0  # no CUDA graphs on the CPU
    # the newer measurements: lone latency line, decode rows in the eager tile, uneven contexts,
    # the paired switch penalties
    assert profile["attn_decode"]["lone_latency"]["seconds"]
    assert set(profile["attn_decode_eager"]) == {"batch", "context", "seconds"}
    assert "attn_decode_mixed" not in profile  # no mixed-step graphs to time the split decode rows of
    assert profile["meta"]["attn_decode_uneven"]["seconds"]
    assert profile["overhead"]["eager_after_graph_s"] >= 0.0 and profile["overhead"]["eager_after_idle_s"] >= 0.0
    assert CalibratedCostModel(profile).version == 2
    prof_path = tmp_path / "tiny.json"
    prof_path.write_text(json.dumps(profile, default=float))
    real = tmp_path / "real"
    validate.run_real(["qps_overload"], str(model), real, model_name="tiny-qwen3", device="cpu", num_requests=3,
                      num_gpu_blocks=256, max_model_len=256, clip_len=48, warmup=False)
    metrics = json.loads((real / "qps_overload" / "metrics.json").read_text())
    assert metrics["completed"] == 3
    table = validate.compare(real, prof_path, tmp_path / "cmp", plots=False)
    assert set(table.case) == {"qps_overload"}
    assert (tmp_path / "cmp" / "errors.md").exists()


V1_PROFILE = REPO / "experiments" / "profiles" / "qwen3_0_6b_h200.json"
V2_PROFILE = REPO / "experiments" / "profiles" / "qwen3_0_6b_h200_v2.json"
REAL_RUNS = REPO / "experiments" / "results" / "validation" / "real_h200"


@pytest.mark.skipif(not V2_PROFILE.exists(), reason="no converted profile")
def test_v2_from_v1_reproduces_the_committed_v2_profile() -> None:
    """The committed v2 profile is ``--v2-from-v1`` of the committed v1 one (H200: 132 SMs;
    Qwen3-0.6B: 8 KV heads)."""
    from experiments.profile import v2_from_v1

    again = v2_from_v1(json.loads(V1_PROFILE.read_text()), num_kv_heads=8, num_sms=132)
    committed = json.loads(V2_PROFILE.read_text())
    assert again["format"] == committed["format"] == "servelab-profile-v2"
    assert again["attn_decode"] == committed["attn_decode"]
    for key in ("overhead", "eager_floor", "per_token_ops"):
        for field, value in committed[key].items():
            assert again[key][field] == pytest.approx(value), (key, field)
    # the decode points whose KV exceeded the profiling pool are gone, the split regime recorded
    assert committed["attn_decode"]["split_max_batch"] == 16 and committed["attn_decode"]["latency_batch"] == 32
    assert all(b * c <= 262144 for b, c in zip(committed["attn_decode"]["batch"], committed["attn_decode"]["context"]))


def test_fit_eager_v2_holds_the_floor_where_the_device_dominates() -> None:
    from experiments.profile import fit_eager_v2

    v2 = {"overhead": {}}
    diag = fit_eager_v2(v2, [100, 1000, 4000, 8000], [0.014, 0.015, 0.022, 0.052], [0.002, 0.004, 0.020, 0.050], 17)
    assert diag["device_bound"] == [False, False, True, True]
    assert v2["overhead"]["eager_s"] == pytest.approx(0.002)
    assert v2["eager_floor"]["seconds"] == pytest.approx([0.012, 0.013, 0.013, 0.013])
    assert v2["overhead"]["eager_ref_reqs"] == 17


@pytest.mark.skipif(not (REAL_RUNS / "chunked_on" / "steps.parquet").exists(), reason="no committed real run")
def test_replay_rebuilds_every_real_step_and_step_errors() -> None:
    """The scheduler replayed on the real steps' start times gives every step's batch back."""
    df = validate.replay_steps(REAL_RUNS / "chunked_on")
    assert len(df) > 500 and df["match"].all()
    assert (df["max_decode_context"] >= df["decode_context"] / df["num_decode"].clip(lower=1) - 1e-9).all()


@pytest.mark.skipif(not V2_PROFILE.exists(), reason="no converted profile")
def test_step_errors_table(tmp_path: Path) -> None:
    real = tmp_path / "real"
    (real / "chunked_on").mkdir(parents=True)
    for f in ("case.json", "steps.parquet", "requests.parquet", "metrics.json"):
        (real / "chunked_on" / f).write_bytes((REAL_RUNS / "chunked_on" / f).read_bytes())
    steps, summary = validate.step_errors(real, {"v1": V1_PROFILE, "v2": V2_PROFILE})
    assert set(summary["profile"]) == {"v1", "v2"}
    assert {"graph decode", "eager mixed", "eager after eager", "eager after graph"} <= set(summary["kind"])
    # every eager step is counted once among the 'after' rows
    rows = summary[(summary.case == "all") & (summary.profile == "v2")].set_index("kind")
    assert rows.filter(like="eager after", axis=0)["steps"].sum() == rows.loc["eager mixed", "steps"]
    allrow = summary[(summary.case == "all") & (summary.kind == "eager mixed")].set_index("profile")
    # chunked_on's eager steps: v1 adds attention to the launch time (+26%), v2 takes the max
    assert allrow.loc["v1", "median_abs"] > 0.2 > 0.12 > allrow.loc["v2", "median_abs"]
    md = validate.step_errors_markdown(summary)
    assert "| **all** | eager mixed |" in md


def test_eager_follows_and_predict_in_order_tell_the_model_of_idling() -> None:
    """Steps are predicted in order and an idle gap reaches the model before the next step."""
    import pandas as pd

    shapes = [BatchShape.from_lists([100], [100]), BatchShape.decode(1, 101), BatchShape.from_lists([1, 50], [102, 50]),
              BatchShape.from_lists([60], [60]), BatchShape.from_lists([70], [70])]
    df = pd.DataFrame([dataclasses.asdict(s) for s in shapes])
    df["idle_before"] = [float("nan"), 0.0003, 0.0003, 0.5, 0.0003]
    df["kind"] = validate.step_kind(df, graph_max_batch=256)
    assert list(validate.eager_follows(df)) == ["idle", "", "graph", "idle", "eager"]

    class Recorder:
        def __init__(self) -> None:
            self.events: list[Any] = []

        def note_idle(self, seconds: float) -> None:
            self.events.append(("idle", seconds))

        def step_time(self, batch: BatchShape) -> Any:
            self.events.append(batch.num_tokens)
            return StepTiming(1.0, {})

    rec = Recorder()
    assert validate.predict_in_order(rec, df) == [1.0] * 5
    assert rec.events == [100, 1, 51, ("idle", 0.5), 60, 70]


FUSED = REPO / "experiments" / "results" / "validation" / "fused"


@pytest.mark.skipif(not (FUSED / "real_h200" / "qps_overload" / "case.json").exists(), reason="no fused real run")
def test_log_case_records_rebuild_the_real_phase_cases() -> None:
    """From a real phase's log alone, every case is rebuilt as the real phase built it (its
    case.json), the QPS-sweep rates from the overload run's throughput."""
    logged = validate.parse_real_log((FUSED / "real.log").read_text())
    assert list(logged) == validate.CASE_ORDER  # the warm-up lines are skipped
    assert logged["qps_overload"] == {"completed": 300, "num_rejected": 0, "wall_seconds": 14.2,
                                      "num_engine_steps": 1105, "request_throughput": 21.2,
                                      "median_ttft_ms": 978.8, "median_tpot_ms": 19.44, "num_preemptions": 0}
    exact = json.loads((FUSED / "real_h200" / "qps_overload" / "metrics.json").read_text())["request_throughput"]
    logged["qps_overload"]["request_throughput"] = exact
    records = validate.log_case_records(logged, model_name="Qwen3-0.6B", device="NVIDIA H200", num_gpu_blocks=32768)
    for name, rec in records.items():
        real = json.loads((FUSED / "real_h200" / name / "case.json").read_text())
        for key in ("workload", "scheduler", "cache", "model_name", "device"):
            assert json.loads(json.dumps(rec[key])) == real[key], (name, key)
    with pytest.raises(ValueError, match="qps_overload"):
        validate.log_case_records({"qps_knee": logged["qps_knee"]}, model_name="Qwen3-0.6B", device="NVIDIA H200",
                                  num_gpu_blocks=32768)


@pytest.mark.skipif(not V2_PROFILE.exists(), reason="no converted profile")
def test_log_compare_simulates_the_logged_cases(tmp_path: Path) -> None:
    log = tmp_path / "real.log"
    log.write_text("warm-up done (5.0 s)\n  chunked_off: 150 done, 0 rejected, 10.7 s wall, 3539 steps, req/s 14.02, "
                   "TTFT p50 21.4 ms, TPOT p50 3.53 ms, preemptions 0\nreal phase done in 162.5 s\n")
    table = validate.log_compare(log, {"v2": V2_PROFILE}, tmp_path / "out", model_name="Qwen3-0.6B",
                                 device="NVIDIA H200", num_gpu_blocks=32768)
    assert list(table["metric"]) == list(validate.LOG_METRICS) and set(table["case"]) == {"chunked_off"}
    row = table.set_index("metric").loc["median_ttft_ms"]
    assert row["real"] == 21.4 and row["v2_rel_err"] == pytest.approx(row["v2"] / 21.4 - 1)
    md = (tmp_path / "out" / "log_compare.md").read_text()
    assert "| chunked_off | median_tpot_ms | 3.53 |" in md and (tmp_path / "out" / "log_compare.csv").exists()


def test_run_spread_compares_every_ordered_pair_of_real_roots(tmp_path: Path) -> None:
    """Two real roots, two common cases: the spread is the median |a/b - 1| per metric, both ways."""
    base = {k: 10.0 for k in (*validate.TARGETS, *validate.TAIL_TARGETS)}
    for root, scale in (("a", 1.0), ("b", 1.25)):
        for case, extra in (("x", 1.0), ("y", 1.0)):
            d = tmp_path / root / case
            d.mkdir(parents=True)
            (d / "case.json").write_text("{}")
            (d / "metrics.json").write_text(json.dumps({k: v * scale * extra for k, v in base.items()}))
    (tmp_path / "b" / "only_b").mkdir()  # a case the other root lacks is ignored
    (tmp_path / "b" / "only_b" / "case.json").write_text("{}")
    (tmp_path / "b" / "only_b" / "metrics.json").write_text(json.dumps(base))
    spread = validate.run_spread([tmp_path / "a", tmp_path / "b"])
    assert len(spread["pairs"]) == 2
    ab, ba = spread["pairs"].values()
    assert ab["median_ttft_ms"] == pytest.approx(0.2) and ba["median_ttft_ms"] == pytest.approx(0.25)
    assert spread["median_over_pairs"]["output_throughput"] == pytest.approx(0.225)
    with pytest.raises(ValueError, match="at least two"):
        validate.run_spread([tmp_path / "a"])


def test_summary_table_has_one_row_per_comparison(tmp_path: Path) -> None:
    """``validate table``: every compare summary.json under the root is a row (by its relative
    directory), with the calibrated errors and the targets; a root without one is an error."""
    keys = (*validate.TARGETS, *validate.TAIL_TARGETS)
    for name, err, met in (("s1/cmp_a", 0.02, True), ("s2/cmp_b", 0.05, False)):
        d = tmp_path / name
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({
            "calibrated": {k: err for k in keys},
            "calibrated_targets_met": {"p50_and_throughput_le_3pct": met, "p99_le_8pct": True}}))
    lines = validate.summary_table(tmp_path).splitlines()
    assert len(lines) == 4
    assert lines[2].startswith("| s1/cmp_a | 2.0% |") and lines[2].endswith("| yes | yes |")
    assert lines[3].startswith("| s2/cmp_b | 5.0% |") and lines[3].endswith("| no | yes |")
    with pytest.raises(ValueError, match="no compare"):
        validate.summary_table(tmp_path / "s1" / "cmp_a" / "nothing")
