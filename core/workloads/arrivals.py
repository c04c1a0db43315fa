"""When requests arrive.

Open-loop processes turn a seeded generator into sorted arrival times (seconds from the
start of the run); the closed-loop alternative is data (``ClosedLoopSpec``) because its
arrival times depend on when earlier requests finish, which only the simulator or the
executor knows.

Renewal processes (Poisson, Gamma, fixed interval) put the first request at t = 0 so a run
never starts idle, and draw their gaps in fixed-size chunks: a duration cut-off therefore
yields exactly a prefix of the count cut-off's times for the same seed.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from core.workloads._checks import check_float, check_int, check_optional_float, check_optional_int

_GAP_CHUNK = 4096  # gaps drawn per generator call; fixed so cut-offs do not change the stream


def _cut(times: np.ndarray, num_requests: int | None, duration_s: float | None) -> np.ndarray:
    """Keep the arrivals before ``duration_s`` (strictly), then at most ``num_requests``."""
    if duration_s is not None:
        times = times[: int(np.searchsorted(times, duration_s, side="left"))]
    if num_requests is not None:
        times = times[:num_requests]
    return times


class ArrivalProcess(ABC):
    """An open-loop arrival process: sorted arrival times in seconds, starting at 0."""

    @abstractmethod
    def arrival_times(self, rng: np.random.Generator, num_requests: int | None = None,
                      duration_s: float | None = None) -> np.ndarray:
        """Arrival times (float64, non-decreasing) cut at ``num_requests`` and ``duration_s``."""


class _RenewalProcess(ArrivalProcess):
    """Independent, identically distributed inter-arrival gaps."""

    @abstractmethod
    def _gaps(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` inter-arrival gaps in seconds."""

    def arrival_times(self, rng: np.random.Generator, num_requests: int | None = None,
                      duration_s: float | None = None) -> np.ndarray:
        owner = type(self).__name__
        num_requests = check_optional_int(owner, "num_requests", num_requests, 1)
        duration_s = check_optional_float(owner, "duration_s", duration_s, positive=True)
        if num_requests is None and duration_s is None:
            raise ValueError(f"{owner}: an open-loop process needs num_requests or duration_s "
                             "(or both) to end, got neither")
        chunks: list[np.ndarray] = []
        drawn, elapsed = 0, 0.0
        while not ((num_requests is not None and drawn >= num_requests)
                   or (duration_s is not None and elapsed >= duration_s)):
            gaps = self._gaps(rng, _GAP_CHUNK)
            chunks.append(gaps)
            drawn += _GAP_CHUNK
            elapsed += float(gaps.sum())
        gaps = np.concatenate(chunks)
        times = np.empty(drawn, dtype=np.float64)
        times[0] = 0.0
        np.cumsum(gaps[:-1], out=times[1:])
        return _cut(times, num_requests, duration_s)


@dataclass(frozen=True)
class PoissonArrivals(_RenewalProcess):
    """Memoryless arrivals at ``rate`` requests/s (exponential gaps, cv = 1)."""

    rate: float

    def __post_init__(self) -> None:
        check_float("PoissonArrivals", "rate", self.rate, positive=True)

    def _gaps(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.exponential(1.0 / self.rate, size=n)


@dataclass(frozen=True)
class GammaArrivals(_RenewalProcess):
    """Bursty (cv > 1) or smoothed (cv < 1) arrivals at mean ``rate`` requests/s.

    Gaps are Gamma(shape = 1/cv^2, scale = cv^2/rate): mean 1/rate, coefficient of
    variation ``cv``; cv = 1 has the Poisson process's gap distribution.
    """

    rate: float
    cv: float

    def __post_init__(self) -> None:
        check_float("GammaArrivals", "rate", self.rate, positive=True)
        check_float("GammaArrivals", "cv", self.cv, positive=True)

    def _gaps(self, rng: np.random.Generator, n: int) -> np.ndarray:
        shape = 1.0 / (self.cv * self.cv)
        return rng.gamma(shape, 1.0 / (self.rate * shape), size=n)


@dataclass(frozen=True)
class FixedIntervalArrivals(_RenewalProcess):
    """One request every ``interval_s`` seconds (no randomness)."""

    interval_s: float

    def __post_init__(self) -> None:
        check_float("FixedIntervalArrivals", "interval_s", self.interval_s, positive=True)

    def _gaps(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.full(n, self.interval_s, dtype=np.float64)


@dataclass(frozen=True, eq=False)
class TraceArrivals(ArrivalProcess):
    """Replay of recorded timestamps, rebased to the first one and divided by ``speed``.

    ``speed`` = 2 replays the trace twice as fast (the same requests in half the time).
    Cut-offs are optional here: without them the whole trace is replayed.
    """

    timestamps_s: np.ndarray
    speed: float = 1.0

    def __post_init__(self) -> None:
        check_float("TraceArrivals", "speed", self.speed, positive=True)
        ts = np.asarray(self.timestamps_s, dtype=np.float64)
        if ts.ndim != 1 or ts.size == 0:
            raise ValueError(f"TraceArrivals.timestamps_s must be a non-empty 1-D array, got shape {ts.shape}")
        if not np.isfinite(ts).all():
            bad = int(np.flatnonzero(~np.isfinite(ts))[0])
            raise ValueError(f"TraceArrivals.timestamps_s[{bad}] must be finite, got {ts[bad]!r}")
        if ts.size > 1 and (np.diff(ts) < 0).any():
            bad = int(np.flatnonzero(np.diff(ts) < 0)[0]) + 1
            raise ValueError(f"TraceArrivals.timestamps_s must be non-decreasing; "
                             f"timestamps_s[{bad}] = {ts[bad]!r} < {ts[bad - 1]!r}")
        object.__setattr__(self, "timestamps_s", ts)

    def arrival_times(self, rng: np.random.Generator | None = None, num_requests: int | None = None,
                      duration_s: float | None = None) -> np.ndarray:
        num_requests = check_optional_int("TraceArrivals", "num_requests", num_requests, 1)
        duration_s = check_optional_float("TraceArrivals", "duration_s", duration_s, positive=True)
        times = (self.timestamps_s - self.timestamps_s[0]) / self.speed
        return _cut(times, num_requests, duration_s)


@dataclass(frozen=True)
class ClosedLoopSpec:
    """``num_users`` users, each with its own ordered queue of requests.

    The driver (simulator or executor) issues every user's first request at t = 0 and each
    next one ``think_time_s`` after the user's previous request finished; a user whose queue
    is empty stops. This is how multi-turn conversations stay causal: a conversation belongs
    to one user, so turn i is issued only after turn i-1 completed.
    """

    num_users: int
    think_time_s: float = 0.0

    def __post_init__(self) -> None:
        check_int("ClosedLoopSpec", "num_users", self.num_users, 1)
        check_float("ClosedLoopSpec", "think_time_s", self.think_time_s, positive=False)


__all__ = ["ArrivalProcess", "PoissonArrivals", "GammaArrivals", "FixedIntervalArrivals", "TraceArrivals",
           "ClosedLoopSpec"]
