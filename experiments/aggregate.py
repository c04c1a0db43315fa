"""Gather every run under a directory into one table: its overrides, then its metrics.

    python -m experiments.aggregate outputs/sweeps/2025-01-01_12-00-00

Finds each ``metrics.json`` below DIR (any depth: sweeps of sweeps, copied result trees),
reads the run's ``.hydra/overrides.yaml`` (what distinguishes it from the defaults) and
``.hydra/config.yaml`` (for the offered load and the GPU count), and writes
``DIR/runs.parquet`` and ``DIR/runs.csv`` with one row per run and prints a compact view.
Only result files are read, never simulator state, so a real-GPU run aggregates the same way.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from core.results import METRICS_FILE, REQUESTS_FILE, read_metrics
from experiments.config import to_workload_config

TABLE_PARQUET = "runs.parquet"
TABLE_CSV = "runs.csv"
# Arrival processes whose rate is the configured qps; other runs get their measured rate.
_RATE_DRIVEN = ("poisson", "gamma", "fixed")
# The columns of the printed view, after the overrides (all columns go to the files).
SUMMARY_COLUMNS = ("offered_qps", "request_throughput", "output_throughput", "median_ttft_ms", "p99_ttft_ms",
                   "median_tpot_ms", "p99_tpot_ms", "p99_e2el_ms", "slo_attainment", "num_preemptions",
                   "prefix_cache_hit_rate")


def find_runs(root: str | Path) -> list[Path]:
    """Directories at or below ``root`` that hold a ``metrics.json``, sorted by path."""
    return sorted(p.parent for p in Path(root).rglob(METRICS_FILE))


def read_overrides(run_dir: Path) -> dict[str, Any]:
    """The run's command-line overrides as {key: typed value} (group choices are strings).

    Parsed with Hydra's own grammar, so ``workload.qps=2`` gives the int 2 and quoted values
    lose their quotes; a run launched without overrides gives {}.
    """
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return {}
    lines = [str(o) for o in OmegaConf.load(path)]
    parsed = OverridesParser.create().parse_overrides(lines)
    return {o.key_or_group: o.value() for o in parsed}


def read_config(run_dir: Path) -> DictConfig | None:
    path = run_dir / ".hydra" / "config.yaml"
    return OmegaConf.load(path) if path.exists() else None


def offered_qps(cfg: DictConfig | None, run_dir: Path) -> float:
    """Requests/s the workload offered: the configured rate for Poisson / gamma / fixed
    arrivals, else (traces, closed loops) the measured arrival rate of requests.parquet."""
    if cfg is not None:
        workload = to_workload_config(cfg)
        if workload.arrival_kind in _RATE_DRIVEN:
            return workload.rate
    arrivals = pd.read_parquet(run_dir / REQUESTS_FILE, columns=["arrival_time"])["arrival_time"]
    span = float(arrivals.max() - arrivals.min())
    return (len(arrivals) - 1) / span if span > 0 else float("nan")


def _uniform_column(values: pd.Series) -> pd.Series:
    """A column parquet can store: mixed or nested override values become strings."""
    kinds = {type(v) for v in values.dropna()}
    if kinds <= {int, float} or (len(kinds) == 1 and kinds <= {str, bool}):
        return values
    return values.map(lambda v: v if v is None else json.dumps(v) if isinstance(v, (list, dict)) else str(v))


def collect(root: str | Path) -> pd.DataFrame:
    """One row per run under ``root``: ``run`` (its path relative to root), one column per
    override key (in first-seen order), ``offered_qps``, ``num_gpus``, then every metric.

    ``df.attrs["overrides"]`` lists the override columns (plots group runs by them).
    """
    root = Path(root)
    runs = find_runs(root)
    if not runs:
        raise FileNotFoundError(f"no {METRICS_FILE} found under {root}: is it a run or sweep directory?")
    rows, keys = [], {}
    for run_dir in runs:
        overrides = read_overrides(run_dir)
        keys.update(dict.fromkeys(overrides))
        cfg = read_config(run_dir)
        gpus = int(cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.dp) if cfg is not None else np.nan
        rows.append({"run": str(run_dir.relative_to(root)), **overrides,
                     "offered_qps": offered_qps(cfg, run_dir), "num_gpus": gpus, **read_metrics(run_dir)})
    override_cols = list(keys)
    df = pd.DataFrame(rows)
    df = df[["run", *override_cols, *[c for c in df.columns if c != "run" and c not in keys]]]
    for col in override_cols:
        df[col] = _uniform_column(df[col])
    df.attrs["overrides"] = override_cols
    return df


def write_table(df: pd.DataFrame, root: str | Path) -> tuple[Path, Path]:
    root = Path(root)
    parquet, csv = root / TABLE_PARQUET, root / TABLE_CSV
    df.to_parquet(parquet, index=False)
    df.to_csv(csv, index=False)
    return parquet, csv


def _column_format(values: pd.Series) -> Callable[[float], str]:
    """One format per column, chosen from its largest value: thousands without decimals,
    ordinary magnitudes with 2, small ones (options like 0.003) to 3 significant digits."""
    finite = values[np.isfinite(values)].abs()
    top = float(finite.max()) if len(finite) else 0.0
    spec = ",.0f" if top >= 1000 else ".2f" if top >= 1 else ".3g"
    return lambda x: "-" if x != x else format(x, spec)


def compact_view(df: pd.DataFrame) -> str:
    """Overrides that vary, then the headline metrics, sorted by overrides; floats rounded."""
    varying = [c for c in df.attrs.get("overrides", []) if df[c].astype(str).nunique(dropna=False) > 1]
    cols = varying + [c for c in SUMMARY_COLUMNS if c in df.columns]
    view = df[cols].sort_values(varying or cols[:1], kind="stable")
    for c in ("slo_attainment", "prefix_cache_hit_rate"):
        if c in view:
            view[c] = view[c] * 100.0
    view = view.rename(columns={"slo_attainment": "slo_attain_%", "prefix_cache_hit_rate": "prefix_hit_%"})
    formats = {c: _column_format(view[c]) for c in view.columns if pd.api.types.is_float_dtype(view[c])}
    return view.to_string(index=False, formatters=formats, na_rep="-")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="a run or sweep output directory")
    args = parser.parse_args(argv)
    df = collect(args.dir)
    parquet, csv = write_table(df, args.dir)
    print(compact_view(df))
    print(f"\n{len(df)} runs -> {parquet} and {csv}")


if __name__ == "__main__":
    main()
