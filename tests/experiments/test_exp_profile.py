"""The profile's interleaved eager rounds: which rounds count as steady, what a round's
summary and the ``samples`` section hold, the fail-soft clock probe. Synthetic steps only
(no model); the CPU pipeline test in ``test_exp_validate`` runs the real pass."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

pytest.importorskip("torch")

import torch

from experiments.profile import (
    ClockProbe,
    EagerRounds,
    round_summary,
    samples_section,
    steady_rounds,
)

FAST = {16: 0.012, 64: 0.0125, 1000: 0.030}  # seconds, per prompt size


def _rounds(slow_decoders: set[int], n: int = 6, slow: float = 1.5) -> EagerRounds:
    """``n`` rounds of mixed steps (three sizes) and after-graph / after-idle pairs (one
    size); the decoder segments of ``slow_decoders`` run ``slow`` times slower, except the
    device-bound 1000-token step, as in session 3."""
    steps = EagerRounds(seed=0)
    for r in range(n):
        steps.rounds.append({"round": r, "segments": ["decoders", "idle"], "start_s": float(r),
                             "end_s": r + 0.9, "clock_start": {"load1": 1.0}, "clock_end": {"load1": 1.0}})
        f = slow if r in slow_decoders else 1.0
        jitter = 1.0 + 0.01 * (r % 3)
        for series, t, wall in (("mixed", 16, FAST[16] * f), ("mixed", 64, FAST[64] * f),
                                ("mixed", 1000, FAST[1000]), ("after_graph", 64, FAST[64] * f + 0.001),
                                ("after_graph_b2b", 64, FAST[64] * f), ("after_idle", 16, 0.0105),
                                ("after_idle_b2b", 16, 0.010)):
            out = SimpleNamespace(total_num_scheduled_tokens=t + (0 if "idle" in series else 16),
                                  req_ids=["x"] * (1 if "idle" in series else 17))
            steps.series.append(series)
            steps.round.append(r)
            steps.records.append((out, wall * jitter, wall * jitter - 1e-4))
            steps.start_s.append(r + 0.01 * len(steps.series))
    return steps


@pytest.mark.parametrize("slow", [{1, 2}, {0, 1, 2, 3}], ids=["a third slow", "two thirds slow"])
def test_slow_rounds_are_left_out_even_as_a_majority(slow: set[int]) -> None:
    steps = _rounds(slow)
    steady, drift = steady_rounds(steps)
    assert steady["decoders"] == [r for r in range(6) if r not in slow]
    assert steady["idle"] == list(range(6))
    assert all(drift["decoders"][r] > 1.3 for r in slow)
    kept = steps.select("mixed", steady["decoders"])
    walls_16 = [w for o, w, _ in kept if o.total_num_scheduled_tokens == 32]
    assert max(walls_16) < FAST[16] * 1.03  # the fit's median sees only the fast level
    assert len(steps.select("mixed")) == 18 and len(kept) == 3 * (6 - len(slow))


def test_no_clear_fast_level_keeps_every_round() -> None:
    steps = _rounds(set(), n=3)
    steps.records = [(o, w * (1.0 + 0.3 * r), d) for (o, w, d), r in zip(steps.records, steps.round)]
    steady, _ = steady_rounds(steps)
    assert steady["decoders"] == [0, 1, 2]


def test_round_summary_and_samples_section_are_compact_json() -> None:
    steps = _rounds({2})
    steady, drift = steady_rounds(steps)
    rows = round_summary(steps, steady, drift)
    assert [r["steady"]["decoders"] for r in rows] == [True, True, False, True, True, True]
    assert rows[0]["after_graph_median_diff_ms"] == pytest.approx(1.0, abs=0.02)
    assert rows[0]["after_idle_median_diff_ms"] == pytest.approx(0.5, abs=0.02)
    first = {"mixed_cold": steps.select("mixed")}
    sec = json.loads(json.dumps(samples_section(first, steps, steady, rows)))
    cols = sec["eager_rounds"]["steps"]
    assert len({len(v) for v in cols.values()}) == 1 and len(cols["wall_ms"]) == len(steps.records)
    assert cols["wall_ms"][0] == round(steps.records[0][1] * 1e3, 3)
    assert sec["engine_steps"]["mixed_cold"]["tokens"][:3] == [32, 80, 1016]
    assert sec["eager_rounds"]["steady_rounds"] == {"decoders": [0, 1, 3, 4, 5], "idle": list(range(6))}


def test_clock_probe_fails_soft_on_the_cpu() -> None:
    probe = ClockProbe(torch.device("cpu"))
    reading = probe.read()
    assert not any(k.startswith("gpu_") for k in reading)
    assert all(isinstance(v, float) for k, v in reading.items() if k.startswith("cpu_mhz"))
