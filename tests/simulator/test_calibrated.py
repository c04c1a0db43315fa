"""CalibratedCostModel v2: the switch penalties (its state), the lone latency line and the
eager-tile decode grid; built on ``test_cost_model``'s synthetic v2 profile."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from simulator.cost_model import BatchShape, CalibratedCostModel
from tests.simulator.test_cost_model import synthetic_profile_v2

AFTER_GRAPH, AFTER_IDLE = 3e-3, 5e-3
SMALL_EAGER = BatchShape.from_lists([1, 1, 100], [50, 70, 100])  # launch bound: floor ~10 ms, device < 1 ms
DECODE = BatchShape.decode(4, 4 * 500)


def _model(**overhead: float) -> CalibratedCostModel:
    p = synthetic_profile_v2()
    p["overhead"].update(overhead)
    return CalibratedCostModel(p)


def test_eager_step_pays_the_penalty_of_what_it_follows() -> None:
    cm = _model(eager_after_graph_s=AFTER_GRAPH, eager_after_idle_s=AFTER_IDLE)
    warm = _model().step_time(SMALL_EAGER).total  # no penalties: every step costs the back-to-back time
    assert cm.step_time(SMALL_EAGER).total == pytest.approx(warm + AFTER_IDLE)  # a run starts idle
    assert cm.step_time(SMALL_EAGER).total == pytest.approx(warm)  # after an eager step
    cm.step_time(DECODE)
    assert cm.step_time(SMALL_EAGER).total == pytest.approx(warm + AFTER_GRAPH)
    cm.step_time(DECODE)
    cm.note_idle(0.2)
    t = cm.step_time(SMALL_EAGER)
    assert t.total == pytest.approx(warm + AFTER_IDLE)
    assert t.breakdown["cpu_overhead"] == pytest.approx(_model().step_time(SMALL_EAGER).breakdown["cpu_overhead"]
                                                        + AFTER_IDLE)
    cm.note_idle(0.0)  # no idling: nothing changes
    assert cm.step_time(SMALL_EAGER).total == pytest.approx(warm)


def test_penalty_hides_behind_a_device_bound_step_and_spares_graph_steps() -> None:
    cm = _model(eager_after_graph_s=AFTER_GRAPH, eager_after_idle_s=AFTER_IDLE)
    big = BatchShape.from_lists([8192] + [1] * 9, [8192] + [100] * 9)
    assert cm.step_time(big).total == pytest.approx(_model().step_time(big).total)  # device 20 ms > floor + 5 ms
    cm.note_idle(1.0)
    assert cm.step_time(DECODE).total == _model().step_time(DECODE).total


@pytest.mark.parametrize("batch_size", [4, 100])  # a graph run, and eager pure decode (above graph_max_batch)
def test_decode_step_times_advance_the_state_like_the_steps(batch_size: int) -> None:
    fast, slow = (_model(eager_after_graph_s=AFTER_GRAPH, eager_after_idle_s=AFTER_IDLE) for _ in range(2))
    for cm in (fast, slow):
        cm.step_time(SMALL_EAGER)
    k, ctx, longest = 20, batch_size * 300, 900
    times = fast.decode_step_times(batch_size, ctx, k, longest)
    expected = [slow.step_time(BatchShape.decode(batch_size, ctx + j * batch_size, longest + j)).total
                for j in range(k)]
    np.testing.assert_allclose(times, expected, rtol=1e-12, atol=0)
    assert fast.step_time(SMALL_EAGER).total == slow.step_time(SMALL_EAGER).total


def test_lone_latency_line_replaces_the_latency_batch_line() -> None:
    p = synthetic_profile_v2()
    lone = {"batch": 32, "short_context": 128, "context": [128, 8192], "seconds": [5e-6, 1e-4]}
    p["attn_decode"]["lone_latency"] = lone
    cm = CalibratedCostModel(p)
    t = cm.step_time(BatchShape.decode(20, 20 * 128, 8192)).breakdown["attn_decode"]
    grid32 = 10e-6 + 2e-7 * 32 + 4e-11 * 32 * 128
    assert t == pytest.approx(max(grid32, 1e-4), rel=1e-12)
    base = CalibratedCostModel(synthetic_profile_v2()).step_time(BatchShape.decode(20, 20 * 128, 8192))
    assert base.breakdown["attn_decode"] == pytest.approx(10e-6 + 2e-7 * 32 + 4e-11 * 32 * 8192, rel=1e-12)


def test_eager_tile_grid_prices_decode_rows_beside_a_chunk_only() -> None:
    p = synthetic_profile_v2()
    eager = copy.deepcopy({k: p["attn_decode"][k] for k in ("batch", "context", "seconds")})
    eager["seconds"] = [2 * s for s in eager["seconds"]]
    p["attn_decode_eager"] = eager
    cm, base = CalibratedCostModel(p), CalibratedCostModel(synthetic_profile_v2())
    mixed = BatchShape.from_lists([1] * 8 + [16], [1024] * 8 + [16])
    assert (cm.step_time(mixed).breakdown["attn_decode"]
            == pytest.approx(2 * base.step_time(mixed).breakdown["attn_decode"], rel=1e-12))
    pure_eager = BatchShape.decode(100, 100 * 50)  # above graph_max_batch, but no chunk: the decode tile
    assert cm.step_time(pure_eager).breakdown["attn_decode"] == base.step_time(pure_eager).breakdown["attn_decode"]


def test_mixed_graph_grid_and_split_latency_price_decode_rows_in_a_mixed_graph() -> None:
    """A mixed-step graph splits its decode rows' keys (executor/cuda_graphs.py): their time is
    ``attn_decode_mixed`` and the longest row's programs walk max_context / splits keys; eager
    steps (above the mixed sizes) keep the unsplit chunk-tile grid and latency line."""
    lone = {"batch": 32, "short_context": 128, "context": [128, 16384], "seconds": [5e-6, 1e-3]}
    grid = {k: synthetic_profile_v2()["attn_decode"][k] for k in ("batch", "context", "seconds")}

    def profile(mixed: bool) -> dict:
        p = synthetic_profile_v2()
        p["attn_decode"]["lone_latency"] = lone
        p["overhead"]["mixed_graph_sizes"] = [512, 1024]
        p["attn_decode_eager"] = {**grid, "seconds": [2 * s for s in grid["seconds"]]}
        if mixed:
            p["attn_decode_mixed"] = {**grid, "seconds": [0.5 * s for s in grid["seconds"]], "splits": 4}
        return p

    cm, old = CalibratedCostModel(profile(True)), CalibratedCostModel(profile(False))
    assert cm.mixed_splits == 4 and old.mixed_splits == 1
    short = BatchShape.from_lists([1, 1, 300], [500, 700, 300])  # grids, not the latency line
    t_new, t_old = (m.step_time(short).breakdown["attn_decode"] for m in (cm, old))
    assert t_new == pytest.approx(t_old / 4, rel=1e-12)  # 0.5x vs 2x the same grid
    long = BatchShape.from_lists([1, 300], [16384, 300])  # one long row: the latency line binds
    attn_p = cm.step_time(long).breakdown["attn_prefill"]
    line = np.interp([16384, 4096], lone["context"], lone["seconds"])
    assert old.step_time(long).breakdown["attn_decode"] == pytest.approx(line[0] - attn_p, rel=1e-9)
    assert cm.step_time(long).breakdown["attn_decode"] == pytest.approx(line[1] - attn_p, rel=1e-9)
    eager = BatchShape.from_lists([1, 2000], [16384, 2000])  # 2001 tokens: above the mixed sizes
    assert cm.step_time(eager).breakdown["attn_decode"] == old.step_time(eager).breakdown["attn_decode"]


FUSED2 = __import__("pathlib").Path(__file__).resolve().parents[2] / "experiments/profiles/qwen3_0_6b_h200_v2_fused2.json"


@pytest.mark.skipif(not FUSED2.exists(), reason="no fused2 profile")
def test_the_first_profile_with_the_new_measurements_activates_every_optional_term() -> None:
    """qwen3_0_6b_h200_v2_fused2 (the current profile.py on a GPU) has the paired switch
    penalties, the lone latency line and the eager-tile grid; the model reads all of them."""
    import json

    prof = json.loads(FUSED2.read_text())
    m = CalibratedCostModel(prof)
    assert m.eager_after["graph"] == prof["overhead"]["eager_after_graph_s"] > 0
    assert m.eager_after["idle"] == prof["overhead"]["eager_after_idle_s"] > 0
    assert m._latency_line.xs == [float(c) for c in prof["attn_decode"]["lone_latency"]["context"]]
    assert m._eager_grid is not m._grid
    # a graph of 32 with one long request costs less than 32 requests all that long
    one_long = BatchShape.from_lists([1] * 20, [8192] + [512] * 19)
    all_long = BatchShape.decode(20, 20 * 8192)
    assert m.step_time(one_long).total < 0.6 * m.step_time(all_long).total
