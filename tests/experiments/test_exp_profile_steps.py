"""The step fits (``experiments/profile_steps.py``) recover known lines, and the calibrated model
prices graph decode, mixed-graph and eager steps with them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from experiments.profile_steps import (SAMPLE_FIELDS, columns_from_samples, device_only_model, fit_step_tables,
                                       robust_lstsq, samples_columns)
from simulator.cost_model import BatchShape, CalibratedCostModel

PROFILE = Path(__file__).resolve().parents[2] / "experiments/profiles/qwen3_0_6b_h200_v2_mixedsplit.json"

# The "true" leftovers the synthetic steps carry over the op tables (seconds).
GRAPH_TRUE = {"a": 4e-4, "per_req": 2e-6, "per_ctx": 3e-9, "per_max": 5e-8}
MIXED_TRUE = (3e-4, 1.5e-6, 1e-9, 5e-8)  # a, per decode row, per decode context, per context before a chunk
EAGER_TRUE = (1e-3, 1e-7, 4e-6, 2e-9, 3e-8)  # a, per token, then as MIXED_TRUE


def _profile() -> dict:
    p = json.loads(PROFILE.read_text())
    p.pop("step_fits", None)
    return p


def _synthetic_columns(profile: dict, rng: np.random.Generator, noise: float = 0.0) -> dict[str, list[float]]:
    """Steps of every kind whose wall is the op tables plus the known leftovers (graph lines
    differ per size), some with a 'host hiccup' outlier."""
    device = device_only_model(profile)
    cols: dict[str, list[float]] = {f: [] for f in (*SAMPLE_FIELDS, "wall_s")}
    shapes = []
    for n in range(1, 257):
        for _ in range(3):
            ctx = rng.integers(16, 3000, size=n)
            shapes.append(BatchShape.from_lists([1] * n, ctx.tolist()))
    for _ in range(600):
        n = int(rng.choice([0, 1, 2, 3, 4, 6, 8, 12, 20, 40, 70, 100, 150, 199]))  # every knot interval
        t = int(rng.choice([10, 100, 300, 700, 1500, 1900, 3000, 6000]))
        before = int(rng.choice([0, 0, 500, 3000]))  # a fresh prompt or a later chunk of one
        ctx = rng.integers(16, 3000, size=n)
        shapes.append(BatchShape.from_lists([1] * n + [t], ctx.tolist() + [t + before]))
    for s in shapes:
        kind, size = device.step_kind(s)
        timing = device.step_time(s)
        if kind == "graph":
            g = GRAPH_TRUE
            wall = (timing.total - timing.breakdown["attn_decode"] + g["a"] * (1 + size / 256) + g["per_req"] * s.num_reqs
                    + g["per_ctx"] * s.decode_context + g["per_max"] * s.max_decode_context)
        elif kind == "mixed":
            a, b, c, e = MIXED_TRUE
            wall = (timing.total + a + b * s.num_decode + c * s.decode_context + e * (s.prefill_context - s.prefill_tokens)
                    + (2e-4 if s.num_decode == 1 else 0.0))  # not linear in the decode rows
        else:
            a, d, b, c, e = EAGER_TRUE
            wall = (timing.total + a + d * s.num_tokens + b * s.num_reqs + c * s.decode_context
                    + e * (s.prefill_context - s.prefill_tokens))
        wall *= 1 + noise * rng.standard_normal()
        if rng.random() < 0.02:
            wall += 5e-3  # an outlier
        cols["pass_"].append(0)
        for f in SAMPLE_FIELDS[1:]:
            cols[f].append(getattr(s, f))
        cols["wall_s"].append(wall)
    return cols


def test_robust_lstsq_ignores_an_outlier() -> None:
    x = np.arange(20.0)
    y = 2.0 + 0.5 * x
    y[7] += 100.0
    coef, kept = robust_lstsq(np.column_stack([np.ones(20), x]), y)
    assert coef == pytest.approx([2.0, 0.5]) and kept == 19


@pytest.mark.skipif(not PROFILE.exists(), reason="no committed profile")
def test_fits_recover_the_leftovers_and_the_model_uses_them() -> None:
    profile = _profile()
    cols = _synthetic_columns(profile, np.random.default_rng(0))
    fits, summary = fit_step_tables(profile, cols)
    assert set(fits) == {"graph_decode", "mixed_graph", "eager"}
    sizes = fits["graph_decode"]["graph_size"]
    assert sizes == sorted(profile["overhead"]["graph_sizes"])
    for size, coef in zip(sizes, fits["graph_decode"]["coef"]):
        if size >= 16:  # small sizes see one or two batch sizes (at 1, sum = max): terms not separable
            assert coef == pytest.approx([GRAPH_TRUE["a"] * (1 + size / 256), GRAPH_TRUE["per_req"],
                                          GRAPH_TRUE["per_ctx"], GRAPH_TRUE["per_max"]], rel=1e-4, abs=1e-12)
    assert fits["eager"]["coef"] == pytest.approx(list(EAGER_TRUE), rel=1e-4, abs=1e-12)
    mixed = CalibratedCostModel({**profile, "step_fits": fits})
    for nd, extra in ((0, 0.0), (1, 2e-4), (2, 0.0), (4, 0.0), (100, 0.0)):
        shape = BatchShape.from_lists([1] * nd + [300], [500] * nd + [800])  # a chunk after 500 tokens
        t = mixed.step_time(shape)
        a, b, c, e = MIXED_TRUE
        want = sum(v for k, v in t.breakdown.items() if k != "cpu_overhead") + a + b * nd + c * 500 * nd + e * 500 + extra
        assert t.total == pytest.approx(want, rel=1e-6)
    assert len(fits["graph_decode"]["coef"][0]) == 4 and len(fits["eager"]["coef"]) == 5
    # exact data (outliers aside): the fitted model reproduces every step
    assert max(max(v["median_abs_rel_err"]) for v in summary.values()) < 1e-6
    model = CalibratedCostModel({**profile, "step_fits": fits})
    step = BatchShape.from_lists([1] * 20, [1000] * 19 + [9000])
    t = model.step_time(step)
    assert t.breakdown["attn_decode"] == pytest.approx(GRAPH_TRUE["per_ctx"] * (19000 + 9000)
                                                       + GRAPH_TRUE["per_max"] * 9000, rel=1e-4)
    assert t.total == pytest.approx(sum(t.breakdown.values()))
    # the vectorised decode run agrees with step-by-step
    many = model.decode_step_times(20, 28000, 5, 9000)
    one = [CalibratedCostModel({**profile, "step_fits": fits}).step_time(
        BatchShape.decode(20, 28000 + 20 * j, 9000 + j)).total for j in range(5)]
    assert many == pytest.approx(one, rel=1e-12)


@pytest.mark.skipif(not PROFILE.exists(), reason="no committed profile")
def test_samples_round_trip_and_sizes_without_points_keep_the_old_terms() -> None:
    profile = _profile()
    cols = _synthetic_columns(profile, np.random.default_rng(1), noise=0.01)
    back = columns_from_samples(json.loads(json.dumps(samples_columns(cols))))
    assert back["num_reqs"] == cols["num_reqs"]
    assert back["wall_s"] == pytest.approx(cols["wall_s"], abs=1e-7)
    fits, _ = fit_step_tables(profile, back)
    fits["graph_decode"] = {k: v[1:] for k, v in fits["graph_decode"].items()}  # drop size 1
    old = CalibratedCostModel(profile).step_time(BatchShape.decode(1, 500))
    new = CalibratedCostModel({**profile, "step_fits": fits}).step_time(BatchShape.decode(1, 500))
    assert new == old


def test_pooled_sweeps_are_levelled_to_the_median_process_and_refuse_another_machine() -> None:
    """``profile.pool_sweeps``: three processes' sweeps, one of them run slow throughout (+150 us a
    step, a 'slow period', over 2 % noise), fit as the two clean sweeps would: each (pass, process) group is brought to
    the median process's level. A plain concatenation carries a third of the slowdown. Op tables
    are the median of the processes', whatever the order; profiles of another model, executor or
    grid are refused."""
    from experiments.profile import pool_sweeps

    rng = np.random.default_rng(3)
    sweeps = []
    for _ in range(3):
        p = _profile()
        p["samples"] = {"step_sweep": samples_columns(_synthetic_columns(p, rng, noise=0.02))}
        sweeps.append(p)
    slow = json.loads(json.dumps(sweeps[2]))
    slow["samples"]["step_sweep"]["wall_us"] = [w + 150.0 for w in slow["samples"]["step_sweep"]["wall_us"]]
    pooled = pool_sweeps(json.loads(json.dumps(sweeps[0])), [json.loads(json.dumps(sweeps[1])), slow],
                         log=lambda s: None)
    offsets = pooled["meta"]["pooled_sweeps"]["pass_offsets_us"]["0"]
    assert offsets[2] - max(offsets[:2]) == pytest.approx(150.0, abs=20.0)
    concat = {k: [] for k in columns_from_samples(sweeps[0]["samples"]["step_sweep"])}
    for i, sw in enumerate((sweeps[0], sweeps[1], slow)):
        for k, v in columns_from_samples(sw["samples"]["step_sweep"]).items():
            concat[k] += [x + i for x in v] if k == "pass_" else v
    naive = CalibratedCostModel({**sweeps[0], "step_fits": fit_step_tables(sweeps[0], concat)[0]})
    model = CalibratedCostModel(pooled)
    clean = {k: [] for k in concat}
    for i, sw in enumerate(sweeps[:2]):
        for k, v in columns_from_samples(sw["samples"]["step_sweep"]).items():
            clean[k] += [x + i for x in v] if k == "pass_" else v
    truth = CalibratedCostModel({**sweeps[0], "step_fits": fit_step_tables(sweeps[0], clean)[0]})
    cols = columns_from_samples(sweeps[0]["samples"]["step_sweep"])
    shapes = [BatchShape(*(int(cols[f][i]) for f in SAMPLE_FIELDS[1:])) for i in range(0, len(cols["wall_s"]), 3)]

    def mean_gap_us(m: CalibratedCostModel) -> float:
        return float(np.mean([m.step_time(x).total - truth.step_time(x).total for x in shapes])) * 1e6

    assert abs(mean_gap_us(model)) < 10.0  # the clean level (0 +- the fit's noise)
    assert mean_gap_us(naive) > 30.0  # a plain concatenation carries ~50 us of the slow process
    # the tables are the median of the processes' and the result does not depend on the order
    for k, sw in enumerate(sweeps):
        sw["attn_prefill"]["seconds"] = [x * (1 + 0.01 * k) for x in sw["attn_prefill"]["seconds"]]
    orders = [(0, 1, 2), (2, 0, 1)]
    runs = [pool_sweeps(json.loads(json.dumps(sweeps[a])), [json.loads(json.dumps(sweeps[b])),
                                                              json.loads(json.dumps(sweeps[c]))], log=lambda s: None)
            for a, b, c in orders]
    assert runs[0]["attn_prefill"]["seconds"] == pytest.approx(sweeps[1]["attn_prefill"]["seconds"], rel=1e-12)
    assert runs[1]["attn_prefill"]["seconds"] == runs[0]["attn_prefill"]["seconds"]
    a, b = (CalibratedCostModel(r) for r in runs)
    assert [a.step_time(x).total for x in shapes] == pytest.approx([b.step_time(x).total for x in shapes], rel=1e-9)
    other = json.loads(json.dumps(sweeps[1]))
    other["attn_prefill"]["chunk_tokens"] = other["attn_prefill"]["chunk_tokens"][::-1]
    with pytest.raises(ValueError, match="grid"):
        pool_sweeps(json.loads(json.dumps(sweeps[0])), [other])
    other = json.loads(json.dumps(sweeps[1]))
    other["model"] = "Llama-3.1-8B"
    with pytest.raises(ValueError, match="model"):
        pool_sweeps(json.loads(json.dumps(sweeps[0])), [other])
    other = json.loads(json.dumps(sweeps[1]))
    other["overhead"]["mixed_graph_sizes"] = [16, 32]
    with pytest.raises(ValueError, match="mixed_graph_sizes"):
        pool_sweeps(json.loads(json.dumps(sweeps[0])), [other])
