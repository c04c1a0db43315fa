"""``experiments.bench_attention --quick``: the decode-kernel benchmark runs end to end.

On a machine without a GPU it runs under the Triton CPU interpreter in a subprocess
(``TRITON_INTERPRET=1`` must be set before the kernels are imported, as in
``test_kernels.py``); on a GPU it runs the quick sizes on the device. The timings are
meaningless on a CPU; what is checked is the bookkeeping the device run relies on: the
grid of points, the runner's split-K choice, the bytes formula, the reference check and
the JSON's fields.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
pytest.importorskip("triton.runtime.interpreter")

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_bench_attention_quick(tmp_path: Path) -> None:
    out = tmp_path / "bench_attention.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-m", "experiments.bench_attention", "--quick", "--out", str(out)],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("headline batch 2, context 512:")

    result = json.loads(out.read_text())
    for key in ("device", "torch", "triton", "date", "commit"):
        assert result[key]
    points = result["points"]
    assert [(p["batch"], p["context"]) for p in points] == [(1, 40), (1, 512), (2, 40), (2, 512)]
    # The runner's decode-graph choice: no split below 512 keys, at least GRAPH_MIN_SPLITS = 2 from 512.
    assert {p["context"]: p["num_splits"] for p in points} == {40: 1, 512: 2}
    assert all(p["split_choice"] == "graph" for p in points)
    assert [(p["num_splits"], p["split_choice"]) for p in result["split_sweep"]] == [(1, "forced"), (4, "forced")]
    head = result["headline"]
    assert (head["batch"], head["context"], head["num_splits"]) == (2, 512, 2)
    # K and V of 2 x 512 tokens (8 kv heads x 128 x bf16), plus q and out (32 heads x 128 x bf16).
    assert head["bytes"] == 2 * 512 * 2 * 8 * 128 * 2 + 2 * 2 * 32 * 128 * 2
    for p in points + result["split_sweep"]:
        assert p["median_us"] >= p["min_us"] > 0
        assert p["fraction_of_bandwidth"] == pytest.approx(p["bytes"] / (p["median_us"] * 1e-6) / 3.0e12)
        assert p["check_max_abs_err"] <= result["check"]["tolerance"]
    assert result["check"]["failed"] == 0
