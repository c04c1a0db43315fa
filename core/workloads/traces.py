"""Readers for public LLM-serving traces, and where to find them.

Each reader returns a ``TraceData``: per-request prompt/output lengths, arrival timestamps
in seconds when the trace has them, and (Mooncake) the prefix-block hash ids. Readers are
strict: a malformed row raises ``ValueError("<file>:<line>: <reason>")`` rather than being
silently dropped, because a quietly shortened trace changes the load a study measures.
The only rows skipped on purpose are BurstGPT failures, and they are counted.

Files live in ``shared/traces`` (see its README): ``locate_traces_dir`` finds it.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from core.workloads._checks import check_int, check_optional_int

if TYPE_CHECKING:
    from pandas import DataFrame

TRACES_ENV_VAR = "SERVELAB_TRACES"

MOONCAKE_BLOCK_SIZE = 512  # tokens per hash id in the Mooncake FAST'25 traces

# Files under the traces directory read when a config names only the kind. BurstGPT is
# not shipped (too large), so it always needs an explicit path.
DEFAULT_TRACE_FILES: dict[str, str] = {
    "azure_conv": "azure-2023/AzureLLMInferenceTrace_conv.csv",
    "azure_code": "azure-2023/AzureLLMInferenceTrace_code.csv",
    "mooncake": "mooncake/conversation_trace.jsonl",
    "sharegpt": "sharegpt-lengths/sharegpt_8k_filtered_stats_llama2_tokenizer.csv",
}
TRACE_KINDS = ("azure_conv", "azure_code", "mooncake", "sharegpt", "burstgpt")

BURSTGPT_COLUMNS = ("Timestamp", "Model", "Request tokens", "Response tokens", "Total tokens", "Log Type")


@dataclass(frozen=True, eq=False)
class TraceData:
    """One trace, row-aligned arrays (row i = request i, in file order).

    ``timestamps_s`` is None for length-only data (ShareGPT). ``hash_ids[i]`` lists the
    ``hash_block_size``-token prefix blocks of prompt i (Mooncake only). ``skipped`` counts
    rows dropped on purpose, by reason.
    """

    path: Path
    input_lens: np.ndarray
    output_lens: np.ndarray
    timestamps_s: np.ndarray | None = None
    hash_ids: list[list[int]] | None = None
    hash_block_size: int | None = None
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_lens)


def locate_traces_dir() -> Path:
    """The shared traces directory: ``$SERVELAB_TRACES``, else ``shared/traces`` next to the repo.

    The repo root is the parent of the ``core`` package directory; the traces normally sit
    in ``<repo root>/../shared/traces``, and in ``<repo root>/shared/traces`` on copies
    that carry ``shared/`` inside the tree (the device machines).
    """
    env = os.environ.get(TRACES_ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"${TRACES_ENV_VAR} is set to {env!r}, which is not a directory")
        return path
    repo_root = Path(__file__).resolve().parents[2]
    candidates = [repo_root.parent / "shared" / "traces", repo_root / "shared" / "traces"]
    for path in candidates:
        if path.is_dir():
            return path
    looked = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(f"no traces directory found: ${TRACES_ENV_VAR} is unset and none of "
                            f"[{looked}] exists; set ${TRACES_ENV_VAR} to the folder holding the traces")


def resolve_trace_path(kind: str, path: str | os.PathLike[str] | None = None) -> Path:
    """The file to read for ``kind``: ``path`` if given (relative paths are taken inside the
    traces directory, since Hydra changes the working directory), else the kind's default."""
    if kind not in TRACE_KINDS:
        raise ValueError(f"trace kind must be one of {TRACE_KINDS}, got {kind!r}")
    if path is None:
        if kind not in DEFAULT_TRACE_FILES:
            raise ValueError(f"no {kind} file ships in shared/traces; give trace_path "
                             f"(a CSV with columns {', '.join(BURSTGPT_COLUMNS)})")
        return locate_traces_dir() / DEFAULT_TRACE_FILES[kind]
    path = Path(path).expanduser()
    return path if path.is_absolute() else locate_traces_dir() / path


# --- CSV fast path -------------------------------------------------------------------
# The shipped CSV traces are plain: no quotes, one value per cell, the same number of
# cells on every line. For such files, columns of decimal integers and of
# "YYYY-MM-DD HH:MM:SS[.fff]" timestamps are parsed here with numpy alone: importing
# pandas costs more CPU than the rest of building a 10,000-request workload. Anything
# else (and every malformed file) goes to the pandas reader below, which gives the same
# values and names the offending line.

# Up to 15 digits: exact in float64, which the pandas path converts through.
_INT_COLUMN = re.compile(r"(?:[0-9]{1,15}\n)*[0-9]{1,15}")
_STAMP = r"[0-9]{4}-[0-9]{2}-[0-9]{2} (?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,9})?"
_STAMP_COLUMN = re.compile(rf"(?:{_STAMP}\n)*{_STAMP}")
_NS_PER_S = 10**9


def _plain_csv(path: Path, columns: Sequence[str], max_rows: int | None) -> dict[str, list[str]] | None:
    """The cells of ``columns`` in the first ``max_rows`` data lines, or None if the file
    is not plain (see above) or cannot be read: the pandas reader then decides."""
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    text = text.replace("\r\n", "\n")
    if '"' in text or "\r" in text or text.startswith("\ufeff"):
        return None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    if len(lines) < 2:
        return None
    header = lines[0].split(",")
    rows = lines[1:] if max_rows is None else lines[1:1 + max_rows]
    if len(set(header)) != len(header) or any(c not in header for c in columns):
        return None
    commas = len(header) - 1
    if any(line.count(",") != commas for line in rows):
        return None
    cells = ",".join(rows).split(",")
    return {c: cells[header.index(c)::len(header)] for c in columns}


def _plain_ints(cells: list[str], minimum: int) -> np.ndarray | None:
    """Decimal integer cells >= ``minimum`` as int64, or None."""
    if _INT_COLUMN.fullmatch("\n".join(cells)) is None:
        return None
    values = np.fromiter(map(int, cells), dtype=np.int64, count=len(cells))
    return values if values.min() >= minimum else None


def _plain_seconds(cells: list[str]) -> np.ndarray | None:
    """Datetime cells as float seconds after the first one, or None.

    Bit for bit what ``(stamps - stamps[0]).dt.total_seconds()`` gives in pandas: whole
    seconds plus the remainder divided separately. Beyond 2**53 ns pandas adjusts the
    last bit, so such spans go to pandas.
    """
    if _STAMP_COLUMN.fullmatch("\n".join(cells)) is None:
        return None
    try:
        ns = np.array(cells, dtype="datetime64[ns]").view(np.int64)
    except ValueError:  # a day, month or year out of range: pandas names the line
        return None
    ns = ns - ns[0]
    if np.abs(ns).max() > 2**53:
        return None
    whole, rest = np.divmod(ns, _NS_PER_S)
    return whole + rest / _NS_PER_S


# --- CSV via pandas ------------------------------------------------------------------
# Rows are read as strings with blank lines kept, so DataFrame row i is physical line i + 2
# (line 1 is the header) and every error can name its line.

def _read_csv(path: Path, columns: Sequence[str], max_rows: int | None) -> DataFrame:
    import pandas as pd  # here, not at module level: see the fast path above

    if not path.is_file():
        raise FileNotFoundError(f"trace file not found: {path}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False, nrows=max_rows)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}:1: empty file, expected a header with columns {list(columns)}") from None
    except pd.errors.ParserError as exc:
        raise ValueError(f"{path}: malformed CSV: {exc}") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{path}:1: header lacks column(s) {missing}; found {list(df.columns)}")
    if len(df) == 0:
        raise ValueError(f"{path}: no data rows")
    empty = (df[list(columns)] == "").all(axis=1).to_numpy()
    if empty.any():
        raise ValueError(f"{path}:{int(np.flatnonzero(empty)[0]) + 2}: empty line")
    return df


def _numeric_column(df: DataFrame, col: str, path: Path, minimum: float, integer: bool) -> np.ndarray:
    import pandas as pd

    raw = df[col]
    values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values) | (values < minimum)
    if integer:
        bad |= values != np.floor(values)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        kind = "an integer" if integer else "a finite number"
        raise ValueError(f"{path}:{i + 2}: column {col!r} must be {kind} >= {minimum:g}, got {raw.iloc[i]!r}")
    return values.astype(np.int64) if integer else values


def _check_sorted(times: np.ndarray, path: Path, first_line: Sequence[int] | None = None) -> None:
    """Timestamps must not go back: replaying an unsorted trace would reorder its requests."""
    back = np.flatnonzero(np.diff(times) < 0)
    if back.size:
        i = int(back[0]) + 1
        line = first_line[i] if first_line is not None else i + 2
        raise ValueError(f"{path}:{line}: timestamp goes back in time ({times[i]!r} after {times[i - 1]!r})")


# --- readers -------------------------------------------------------------------------

def read_azure_trace(path: str | os.PathLike[str], max_rows: int | None = None) -> TraceData:
    """Azure LLM inference trace 2023 (code or conv): ``TIMESTAMP,ContextTokens,GeneratedTokens``.

    Timestamps are wall-clock datetimes; they are returned as seconds after the first row.
    """
    path = Path(path)
    max_rows = check_optional_int("read_azure_trace", "max_rows", max_rows, 1)
    columns = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
    plain = _plain_csv(path, columns, max_rows)
    if plain is not None:
        times = _plain_seconds(plain["TIMESTAMP"])
        inputs = _plain_ints(plain["ContextTokens"], 1)
        outputs = _plain_ints(plain["GeneratedTokens"], 1)
        if times is not None and inputs is not None and outputs is not None:
            _check_sorted(times, path)
            return TraceData(path=path, input_lens=inputs, output_lens=outputs, timestamps_s=times)
    import pandas as pd

    df = _read_csv(path, columns, max_rows)
    stamps = pd.to_datetime(df["TIMESTAMP"], format="ISO8601", errors="coerce")
    if stamps.isna().any():
        i = int(np.flatnonzero(stamps.isna().to_numpy())[0])
        raise ValueError(f"{path}:{i + 2}: column 'TIMESTAMP' must be a 'YYYY-MM-DD HH:MM:SS.fff' datetime, "
                         f"got {df['TIMESTAMP'].iloc[i]!r}")
    times = (stamps - stamps.iloc[0]).dt.total_seconds().to_numpy(dtype=np.float64)
    _check_sorted(times, path)
    return TraceData(path=path,
                     input_lens=_numeric_column(df, "ContextTokens", path, 1, integer=True),
                     output_lens=_numeric_column(df, "GeneratedTokens", path, 1, integer=True),
                     timestamps_s=times)


def read_sharegpt_lengths(path: str | os.PathLike[str], max_rows: int | None = None) -> TraceData:
    """ShareGPT lengths (Sarathi-Serve / Vidur): ``num_prefill_tokens,num_decode_tokens,...``; no timestamps."""
    path = Path(path)
    max_rows = check_optional_int("read_sharegpt_lengths", "max_rows", max_rows, 1)
    columns = ("num_prefill_tokens", "num_decode_tokens")
    plain = _plain_csv(path, columns, max_rows)
    if plain is not None:
        inputs = _plain_ints(plain["num_prefill_tokens"], 1)
        outputs = _plain_ints(plain["num_decode_tokens"], 1)
        if inputs is not None and outputs is not None:
            return TraceData(path=path, input_lens=inputs, output_lens=outputs)
    df = _read_csv(path, columns, max_rows)
    return TraceData(path=path,
                     input_lens=_numeric_column(df, "num_prefill_tokens", path, 1, integer=True),
                     output_lens=_numeric_column(df, "num_decode_tokens", path, 1, integer=True))


def read_burstgpt_trace(path: str | os.PathLike[str], max_rows: int | None = None,
                        model: str | None = None, log_type: str | None = None) -> TraceData:
    """BurstGPT CSV (``Timestamp`` in seconds, ``Model``, ``Request tokens``, ``Response tokens``,
    ``Total tokens``, ``Log Type``).

    Every row is validated; then rows not matching ``model`` / ``log_type`` (when given)
    are dropped, and so are failed requests (0 response tokens) and empty prompts (0
    request tokens), which are counted in ``skipped``. ``max_rows`` limits the file rows read.
    """
    path = Path(path)
    max_rows = check_optional_int("read_burstgpt_trace", "max_rows", max_rows, 1)
    df = _read_csv(path, BURSTGPT_COLUMNS, max_rows)
    times = _numeric_column(df, "Timestamp", path, 0, integer=False)
    _check_sorted(times, path)
    request = _numeric_column(df, "Request tokens", path, 0, integer=True)
    response = _numeric_column(df, "Response tokens", path, 0, integer=True)
    _numeric_column(df, "Total tokens", path, 0, integer=True)
    keep = np.ones(len(df), dtype=bool)
    if model is not None:
        keep &= (df["Model"] == model).to_numpy()
    if log_type is not None:
        keep &= (df["Log Type"] == log_type).to_numpy()
    failed = keep & (response == 0)
    empty = keep & (response > 0) & (request == 0)
    keep &= ~failed & ~empty
    if not keep.any():
        raise ValueError(f"{path}: no usable rows (model={model!r}, log_type={log_type!r}; "
                         f"{int(failed.sum())} failed, {int(empty.sum())} empty prompts)")
    return TraceData(path=path, input_lens=request[keep], output_lens=response[keep], timestamps_s=times[keep],
                     skipped={"failed (0 response tokens)": int(failed.sum()),
                              "empty prompt (0 request tokens)": int(empty.sum())})


def _json_int(rec: dict, key: str, minimum: int, where: str) -> int:
    value = rec[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where}: {key!r} must be an integer >= {minimum}, got {value!r}")
    return value


def read_mooncake_trace(path: str | os.PathLike[str], max_rows: int | None = None,
                        block_size: int = MOONCAKE_BLOCK_SIZE) -> TraceData:
    """Mooncake FAST'25 JSONL: ``{"timestamp": ms, "input_length", "output_length", "hash_ids"}``.

    Each hash id names one ``block_size``-token prompt block (the last one partial), so
    ``len(hash_ids) == ceil(input_length / block_size)`` is required. Blank lines are skipped.
    """
    path = Path(path)
    max_rows = check_optional_int("read_mooncake_trace", "max_rows", max_rows, 1)
    block_size = check_int("read_mooncake_trace", "block_size", block_size, 1)
    if not path.is_file():
        raise FileNotFoundError(f"trace file not found: {path}")
    times: list[float] = []
    inputs: list[int] = []
    outputs: list[int] = []
    hash_ids: list[list[int]] = []
    lines: list[int] = []
    keys = ("timestamp", "input_length", "output_length", "hash_ids")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if max_rows is not None and len(inputs) >= max_rows:
                break
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: invalid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            missing = [k for k in keys if k not in rec]
            if missing:
                raise ValueError(f"{where}: missing key(s) {missing}")
            ts = rec["timestamp"]
            if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts) or ts < 0:
                raise ValueError(f"{where}: 'timestamp' must be a finite number of ms >= 0, got {ts!r}")
            n_in = _json_int(rec, "input_length", 1, where)
            n_out = _json_int(rec, "output_length", 1, where)
            ids = rec["hash_ids"]
            if not isinstance(ids, list) or not all(type(h) is int and h >= 0 for h in ids):
                raise ValueError(f"{where}: 'hash_ids' must be a list of integers >= 0")
            if len(ids) != -(-n_in // block_size):
                raise ValueError(f"{where}: {len(ids)} hash_ids for input_length {n_in}, expected "
                                 f"ceil({n_in}/{block_size}) = {-(-n_in // block_size)}")
            times.append(ts / 1000.0)
            inputs.append(n_in)
            outputs.append(n_out)
            hash_ids.append(ids)
            lines.append(lineno)
    if not inputs:
        raise ValueError(f"{path}: no data rows")
    timestamps = np.asarray(times, dtype=np.float64)
    _check_sorted(timestamps, path, lines)
    return TraceData(path=path, input_lens=np.asarray(inputs, dtype=np.int64),
                     output_lens=np.asarray(outputs, dtype=np.int64), timestamps_s=timestamps,
                     hash_ids=hash_ids, hash_block_size=block_size)


__all__ = ["TRACES_ENV_VAR", "MOONCAKE_BLOCK_SIZE", "DEFAULT_TRACE_FILES", "TRACE_KINDS", "BURSTGPT_COLUMNS",
           "TraceData", "locate_traces_dir", "resolve_trace_path", "read_azure_trace", "read_sharegpt_lengths",
           "read_burstgpt_trace", "read_mooncake_trace"]
