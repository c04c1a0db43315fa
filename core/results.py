"""The files every run leaves behind: metrics.json, requests.parquet, steps.parquet.

Aggregation and plots read only these files, so a simulated run and a real one are
compared through exactly the same code.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

from core.metrics import requests_dataframe, steps_dataframe
from core.request import Request
from core.stats import StepStats

METRICS_FILE = "metrics.json"
REQUESTS_FILE = "requests.parquet"
STEPS_FILE = "steps.parquet"
BREAKDOWN_FILE = "breakdown.json"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; None reads back as "not defined"
    if hasattr(value, "item"):  # numpy scalars
        return _jsonable(value.item())
    return value


def write_results(out_dir: str | Path, requests: Iterable[Request], steps: Iterable[StepStats],
                  metrics: Mapping[str, Any], breakdown: Mapping[str, float] | None = None) -> Path:
    """Write the three result files (and the per-op time breakdown when known) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    requests_dataframe(requests).to_parquet(out / REQUESTS_FILE, index=False)
    steps_dataframe(steps).to_parquet(out / STEPS_FILE, index=False)
    (out / METRICS_FILE).write_text(json.dumps({k: _jsonable(v) for k, v in metrics.items()}, indent=2))
    if breakdown:
        (out / BREAKDOWN_FILE).write_text(json.dumps({k: float(v) for k, v in breakdown.items()}, indent=2))
    return out


def read_metrics(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a servelab run directory?")
    return {k: (math.nan if v is None else v) for k, v in json.loads(path.read_text()).items()}
