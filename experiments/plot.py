"""Standard figures of a run or sweep directory, as PNG and PDF in DIR/plots.

    python -m experiments.plot outputs/sweeps/2025-01-01_12-00-00 [--slo-ttft-ms 2000 --slo-tpot-ms 100]

- ``latency_vs_load``: p50 (dashed) and p99 (solid) TTFT, TPOT and E2E latency against the
  offered rate (top) and the achieved throughput (bottom), one line per configuration.
  Runs are grouped by their overrides other than the rate (``workload.qps``, ``workload.speed``).
- ``slo_attainment``: the share of requests meeting the SLO (both bounds, TTFT only, TPOT only)
  against the rate; a configuration's goodput (DistServe) is the highest rate with at least
  ``--attainment`` (90%) of requests meeting both bounds, read off by linear interpolation
  and marked. Attainment is recomputed from each run's requests.parquet with the CLI's
  bounds, so one sweep can be judged under several SLOs.
- ``timeline``: one run (``--run``, default the run with the highest offered rate) over
  time: running batch and waiting queue, prefill vs decode tokens per step, KV usage,
  cumulative preemptions.
- ``breakdown``: mean GPU time per engine step split by operation, one bar per run.

Only result files are read (metrics.json, requests.parquet, steps.parquet, breakdown.json).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display needed (and none on a cluster node)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from core.results import BREAKDOWN_FILE, REQUESTS_FILE, STEPS_FILE  # noqa: E402
from experiments.aggregate import collect  # noqa: E402

# Overrides that set the load rather than the configuration: they are the x axis, not a line.
RATE_KEYS = ("workload.qps", "workload.speed")
_FINISHED = ("FINISHED_LENGTH", "FINISHED_STOPPED")
_LATENCIES = (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2el", "E2E latency"))
_TIMELINE_BINS = 150  # coarse enough that per-step token means are not dominated by single prefills


def group_columns(df: pd.DataFrame) -> list[str]:
    """Override columns that distinguish configurations: those that vary, except the rate."""
    return [c for c in df.attrs.get("overrides", [])
            if c not in RATE_KEYS and df[c].astype(str).nunique(dropna=False) > 1]


def label_groups(df: pd.DataFrame) -> pd.Series:
    """A legend label per run, e.g. ``max_num_batched_tokens=512, cache=default`` ("all runs"
    if there is one group). Keys lose their path (``scheduler.``) unless that makes two equal."""
    cols = group_columns(df)
    if not cols:
        return pd.Series("all runs", index=df.index)
    short = [c.rsplit(".", 1)[-1] for c in cols]
    names = short if len(set(short)) == len(short) else cols
    return df[cols].apply(lambda row: ", ".join(f"{n}={'-' if pd.isna(v) else v}" for n, v in zip(names, row)),
                          axis=1)


def _groups(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame, str]]:
    """(label, runs sorted by offered rate, color) per configuration, ordered by the
    configuration's values (numbers as numbers: 256 before 1024)."""
    labels = label_groups(df)
    ordered = labels[df.sort_values(group_columns(df), kind="stable").index] if group_columns(df) else labels
    colors = plt.get_cmap("tab10").colors
    return [(label, df[labels == label].sort_values("offered_qps"), colors[i % len(colors)])
            for i, label in enumerate(dict.fromkeys(ordered))]


def _save(fig: Figure, out: Path, name: str) -> list[Path]:
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    plt.close(fig)
    return paths


def _legend_below(fig: Figure, handles: list, ncol: int) -> None:
    fig.legend(handles=handles, loc="lower center", ncol=ncol, frameon=False, bbox_to_anchor=(0.5, -0.01))


def _plain_log_y(ax: plt.Axes) -> None:
    """Log y axis labelled with plain numbers (50, 200, 1,000 rather than 5x10^1); on an
    axis spanning under ~1.5 decades the 2x and 5x minor ticks are labelled too, so that
    the axis never shows a lone label."""
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()

    def plain(y: float, _pos: int) -> str:
        return f"{y:,.0f}" if y >= 1 else f"{y:g}"

    def minor(y: float, pos: int) -> str:
        mantissa = round(y / 10 ** np.floor(np.log10(y)), 6)
        return plain(y, pos) if np.log10(hi / lo) < 1.5 and mantissa in (2.0, 5.0) else ""

    ax.yaxis.set_major_formatter(FuncFormatter(plain))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))


# ---- latency vs load ---------------------------------------------------------------------------

def plot_latency_vs_load(df: pd.DataFrame, out: Path) -> list[Path]:
    groups = _groups(df)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.6), sharey="col")
    xs = (("offered_qps", "offered load (req/s)"), ("request_throughput", "achieved throughput (req/s)"))
    for row, (xcol, xlabel) in enumerate(xs):
        for col, (key, name) in enumerate(_LATENCIES):
            ax = axes[row, col]
            for label, g, color in groups:
                ax.plot(g[xcol], g[f"p99_{key}_ms"], "-o", color=color, ms=4)
                ax.plot(g[xcol], g[f"median_{key}_ms"], "--o", color=color, ms=3, alpha=0.8, mfc="white")
            _plain_log_y(ax)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{name} (ms)")
            ax.grid(True, which="both", alpha=0.3)
            if row == 0:
                ax.set_title(name)
    handles = [Line2D([], [], color=c, marker="o", label=label) for label, _, c in groups]
    handles += [Line2D([], [], color="gray", ls="-", label="p99"), Line2D([], [], color="gray", ls="--", label="p50")]
    fig.suptitle("Latency vs load")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    _legend_below(fig, handles, ncol=min(len(handles), 4))
    return _save(fig, out, "latency_vs_load")


# ---- SLO attainment and goodput ----------------------------------------------------------------

def slo_attainment(run_dir: Path, ttft_ms: float, tpot_ms: float) -> tuple[float, float, float]:
    """Share of *all* requests meeting (both bounds, TTFT bound, TPOT bound).

    An unfinished or aborted request misses; a single-token request (no TPOT) meets any
    TPOT bound, as in vLLM's goodput.
    """
    req = pd.read_parquet(run_dir / REQUESTS_FILE, columns=["status", "ttft", "tpot"])
    if req.empty:
        return (np.nan,) * 3
    done = req["status"].isin(_FINISHED).to_numpy()
    ttft_ok = done & (req["ttft"].to_numpy() * 1000.0 <= ttft_ms)
    tpot_ok = done & (np.nan_to_num(req["tpot"].to_numpy(), nan=0.0) * 1000.0 <= tpot_ms)
    return float((ttft_ok & tpot_ok).mean()), float(ttft_ok.mean()), float(tpot_ok.mean())


def goodput(rates: Sequence[float], attainment: Sequence[float], target: float) -> tuple[float, str]:
    """Highest rate whose attainment is still >= ``target``, interpolated at the crossing.

    Returns (rate, how): ``how`` is "" at a crossing, ">=" when every rate meets the target
    (the goodput lies beyond the sweep) and "<" when none does (rate = the lowest swept).
    Attainment is scanned from low to high rate and the first drop below target counts.
    """
    r, a = np.asarray(rates, float), np.asarray(attainment, float)
    if not len(r) or a[0] < target:
        return (float(r[0]) if len(r) else np.nan), "<"
    below = np.flatnonzero(a < target)
    if not len(below):
        return float(r[-1]), ">="
    i = below[0]
    r0, r1, a0, a1 = r[i - 1], r[i], a[i - 1], a[i]
    return float(r0 + (a0 - target) / (a0 - a1) * (r1 - r0)), ""


def plot_slo_attainment(df: pd.DataFrame, root: Path, out: Path, ttft_ms: float, tpot_ms: float,
                        target: float) -> list[Path]:
    data = df.copy()  # copy() keeps df.attrs (the override columns), which a join would drop
    data[["both", "ttft", "tpot"]] = [slo_attainment(root / run, ttft_ms, tpot_ms) for run in df["run"]]
    panels = (("both", f"TTFT <= {ttft_ms:g} ms and TPOT <= {tpot_ms:g} ms"),
              ("ttft", f"TTFT <= {ttft_ms:g} ms"), ("tpot", f"TPOT <= {tpot_ms:g} ms"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), sharey=True)
    handles = []
    for label, g, color in _groups(data):
        rate, how = goodput(g["offered_qps"], g["both"], target)
        for ax, (col, _) in zip(axes, panels):
            ax.plot(g["offered_qps"], 100.0 * g[col], "-o", color=color, ms=4)
        if how != "<":
            axes[0].axvline(rate, color=color, ls=":", lw=1.5)
            axes[0].plot([rate], [100.0 * target], marker="*", ms=13, color=color, mec="black", mew=0.6, zorder=5)
        handles.append(Line2D([], [], color=color, marker="o",
                              label=f"{label}  (goodput {how}{rate:.3g} req/s)"))
    for ax, (_, title) in zip(axes, panels):
        ax.axhline(100.0 * target, color="gray", ls="--", lw=1)
        ax.set_title(title)
        ax.set_xlabel("offered load (req/s)")
        ax.set_ylim(-3, 103)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("requests meeting the SLO (%)")
    handles.append(Line2D([], [], color="gray", ls="--", label=f"{100 * target:g}% target"))
    fig.suptitle(f"SLO attainment vs load (goodput = highest load with >= {100 * target:g}% attainment, marked *)")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    _legend_below(fig, handles, ncol=min(len(handles), 3))
    return _save(fig, out, "slo_attainment")


# ---- one run's timeline ------------------------------------------------------------------------

def _binned_integral(steps: pd.DataFrame, values: dict[str, np.ndarray], edges: np.ndarray) -> dict[str, np.ndarray]:
    """Per time bin, the sum of each quantity, every step row's amount spread uniformly
    over [time, time + duration].

    A fast-forwarded row covers ``num_steps`` decode steps and carries their summed token
    counts, so spreading it over its span puts each step's share in the right bin. Rows of
    one replica never overlap, so the running total is piecewise linear through the row
    boundaries and ``np.interp`` evaluates it at the bin edges; replicas are summed.
    """
    totals = {name: np.zeros(len(edges) - 1) for name in values}
    for _, rows in steps.groupby("replica", sort=False):
        idx = rows.index.to_numpy()
        start = rows["time"].to_numpy()
        knots = np.column_stack([start, start + rows["duration"].to_numpy()]).ravel()
        for name, amount in values.items():
            cum = np.cumsum(amount[idx])
            before = np.concatenate([[0.0], cum[:-1]])
            level = np.column_stack([before, cum]).ravel()
            totals[name] += np.diff(np.interp(edges, knots, level, left=0.0, right=cum[-1]))
    return totals


def plot_timeline(root: Path, run: str, out: Path) -> list[Path]:
    steps = pd.read_parquet(root / run / STEPS_FILE).sort_values(["replica", "time"]).reset_index(drop=True)
    if steps.empty:
        raise ValueError(f"{root / run / STEPS_FILE} has no steps (was the run recorded with record_steps?)")
    end = float((steps["time"] + steps["duration"]).max())
    edges = np.linspace(0.0, end, _TIMELINE_BINS + 1)
    width = edges[1] - edges[0]
    dur = steps["duration"].to_numpy()
    sums = _binned_integral(steps, {
        "busy": dur, "steps": steps["num_steps"].to_numpy(dtype=float),
        "prefill": steps["num_prefill_tokens"].to_numpy(dtype=float),
        "decode": steps["num_decode_tokens"].to_numpy(dtype=float),
        "running": steps["batch_size"].to_numpy() * dur, "waiting": steps["num_waiting"].to_numpy() * dur,
        "kv": steps["kv_usage"].to_numpy() * dur,
    }, edges)
    t = 0.5 * (edges[:-1] + edges[1:])
    with np.errstate(invalid="ignore", divide="ignore"):
        per_step = {k: sums[k] / sums["steps"] for k in ("prefill", "decode")}
        kv = 100.0 * sums["kv"] / sums["busy"]  # NaN (a gap) in idle bins

    fig, axes = plt.subplots(4, 1, figsize=(12, 10), sharex=True)
    ax = axes[0]
    ax.plot(t, sums["running"] / width, label="running (batch size)", color="tab:blue")
    ax.plot(t, sums["waiting"] / width, label="waiting (queue length)", color="tab:orange")
    ax.set_ylabel("requests")
    ax.legend(loc="upper right", framealpha=0.9)
    ax = axes[1]
    for key, color in (("decode", "tab:green"), ("prefill", "tab:red")):
        values = np.where(per_step[key] > 0, per_step[key], np.nan)  # no tokens (or idle): a gap on the log axis
        ax.plot(t, values, color=color, lw=1.3, label=key, drawstyle="steps-mid")
    ax.set_yscale("log")
    ax.set_ylim(bottom=1.0)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _pos: f"{y:,.0f}"))
    ax.set_ylabel("tokens per step")
    ax.legend(loc="upper right", framealpha=0.9)
    ax = axes[2]
    ax.plot(t, kv, color="tab:purple")
    ax.set_ylabel("KV cache used (%)")
    ax.set_ylim(0, 105)
    ax = axes[3]
    order = steps.sort_values("time", kind="stable")
    preempted = np.concatenate([[0], order["num_preempted"].cumsum().to_numpy()])
    ax.step(np.concatenate([[0.0], order["time"].to_numpy()]), preempted, where="post", color="tab:brown")
    ax.set_ylim(0, max(1, preempted[-1]) * 1.08)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("preemptions (cumulative)")
    if preempted[-1] == 0:
        ax.text(0.5, 0.5, "no preemptions", transform=ax.transAxes, ha="center", va="center", color="gray")
    ax.set_xlabel("simulated time (s)")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.set_xlim(0, end)
    name = (root / run).resolve().name
    replicas = steps["replica"].nunique()
    scope = f"; {replicas} replicas: requests summed, tokens per step and KV averaged" if replicas > 1 else ""
    fig.suptitle(f"Timeline of {name}  (means over {width:.2g} s bins{scope})")
    fig.tight_layout()
    return _save(fig, out, "timeline")


# ---- time breakdown ----------------------------------------------------------------------------

# The cost model's ops (simulator.cost_model.base.OPS, plus the backend's "swap") in bar
# order, coloured by family: GEMMs blue, attention red/orange, other kernels purple,
# data movement green/brown, host overhead grey. Unknown ops follow in grey-blue shades.
_OP_COLORS = {
    "qkv_proj": "#08519c", "o_proj": "#3182bd", "mlp": "#6baed6", "lm_head": "#bdd7e7",
    "attn_prefill": "#cb181d", "attn_decode": "#fd8d3c",
    "norm_rotary": "#9e9ac8", "sampling": "#6a51a3",
    "communication": "#31a354", "swap": "#8c510a", "cpu_overhead": "#969696",
}


def plot_breakdown(df: pd.DataFrame, root: Path, out: Path) -> list[Path]:
    """Stacked bars of time per engine step by operation (breakdown.json / num_steps), one per run."""
    labels = label_groups(df)
    rows = {}
    for i, row in df.sort_values([*group_columns(df), "offered_qps"], kind="stable").iterrows():
        path = root / row["run"] / BREAKDOWN_FILE
        if not path.exists() or not row["num_steps"]:
            continue
        ops = json.loads(path.read_text())
        rate = f"{row['offered_qps']:.3g} req/s"
        rows[rate if labels[i] == "all runs" else f"{labels[i]} @ {rate}"] = \
            {op: 1000.0 * s / row["num_steps"] for op, s in ops.items()}
    if not rows:
        return []
    table = pd.DataFrame.from_dict(rows, orient="index").fillna(0.0)  # configurations together, by rising load
    used = [op for op in table.columns if table[op].sum() > 0]
    order = [op for op in _OP_COLORS if op in used] + sorted(op for op in used if op not in _OP_COLORS)
    extra = plt.get_cmap("Greys")(np.linspace(0.3, 0.8, max(1, len(order) - len(_OP_COLORS))))
    fig, ax = plt.subplots(figsize=(11, 1.4 + 0.3 * len(table)))
    left = np.zeros(len(table))
    for j, op in enumerate(order):
        color = _OP_COLORS.get(op, extra[(j - len(_OP_COLORS)) % len(extra)])
        ax.barh(table.index, table[op], left=left, color=color, label=op, height=0.72)
        left += table[op].to_numpy()
    ax.invert_yaxis()
    ax.set_xlabel("time per engine step (ms)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, title="operation")
    ax.set_title("Mean engine step time by operation")
    fig.tight_layout()
    return _save(fig, out, "breakdown")


def plot_all(root: str | Path, ttft_ms: float = 2000.0, tpot_ms: float = 100.0, target: float = 0.9,
             run: str | None = None) -> list[Path]:
    """Every figure for the runs under ``root``; returns the files written (in root/plots)."""
    root = Path(root)
    df = collect(root)
    out = root / "plots"
    out.mkdir(exist_ok=True)
    timeline_run = run if run is not None else df.loc[df["offered_qps"].idxmax(), "run"]
    return (plot_latency_vs_load(df, out) + plot_slo_attainment(df, root, out, ttft_ms, tpot_ms, target)
            + plot_timeline(root, timeline_run, out) + plot_breakdown(df, root, out))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="a run or sweep output directory")
    parser.add_argument("--slo-ttft-ms", type=float, default=2000.0, help="TTFT bound (ms), default 2000")
    parser.add_argument("--slo-tpot-ms", type=float, default=100.0, help="TPOT bound (ms), default 100")
    parser.add_argument("--attainment", type=float, default=0.9,
                        help="attainment that defines goodput (fraction), default 0.9")
    parser.add_argument("--run", help="run for the timeline, relative to DIR (default: highest offered load)")
    args = parser.parse_args(argv)
    paths = plot_all(args.dir, args.slo_ttft_ms, args.slo_tpot_ms, args.attainment, args.run)
    print("\n".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
