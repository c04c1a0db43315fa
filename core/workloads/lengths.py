"""How many prompt and output tokens each request has.

A distribution yields *paired* (input, output) lengths because empirical data is paired:
ShareGPT and trace rows couple a long prompt with its own answer length, and resampling
the two columns independently would destroy that correlation.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from core.workloads._checks import check_int, check_range
from core.workloads.traces import TraceData


class LengthDistribution(ABC):
    """Paired prompt / output lengths, every length >= 1."""

    @abstractmethod
    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``n`` (input_lens, output_lens) pairs as int64 arrays."""


@dataclass(frozen=True)
class FixedLengths(LengthDistribution):
    """Every request has ``input_len`` prompt tokens and ``output_len`` output tokens."""

    input_len: int
    output_len: int

    def __post_init__(self) -> None:
        check_int("FixedLengths", "input_len", self.input_len, 1)
        check_int("FixedLengths", "output_len", self.output_len, 1)

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        n = check_int("FixedLengths", "n", n, 0)
        return np.full(n, self.input_len, dtype=np.int64), np.full(n, self.output_len, dtype=np.int64)


@dataclass(frozen=True)
class UniformLengths(LengthDistribution):
    """Input and output lengths drawn independently and uniformly from inclusive ranges."""

    input_range: tuple[int, int]
    output_range: tuple[int, int]

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_range", check_range("UniformLengths", "input_range", self.input_range))
        object.__setattr__(self, "output_range", check_range("UniformLengths", "output_range", self.output_range))

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        n = check_int("UniformLengths", "n", n, 0)
        lo_in, hi_in = self.input_range
        lo_out, hi_out = self.output_range
        return (rng.integers(lo_in, hi_in, size=n, endpoint=True, dtype=np.int64),
                rng.integers(lo_out, hi_out, size=n, endpoint=True, dtype=np.int64))


@dataclass(frozen=True, eq=False)
class EmpiricalLengths(LengthDistribution):
    """Rows of recorded (input, output) pairs, resampled uniformly with replacement."""

    input_lens: np.ndarray
    output_lens: np.ndarray

    def __post_init__(self) -> None:
        inputs = np.asarray(self.input_lens, dtype=np.int64)
        outputs = np.asarray(self.output_lens, dtype=np.int64)
        if inputs.ndim != 1 or inputs.size == 0 or inputs.shape != outputs.shape:
            raise ValueError(f"EmpiricalLengths needs two non-empty 1-D arrays of equal length, "
                             f"got shapes {inputs.shape} and {outputs.shape}")
        for name, arr in (("input_lens", inputs), ("output_lens", outputs)):
            if (arr < 1).any():
                i = int(np.flatnonzero(arr < 1)[0])
                raise ValueError(f"EmpiricalLengths.{name}[{i}] must be >= 1, got {int(arr[i])}")
        object.__setattr__(self, "input_lens", inputs)
        object.__setattr__(self, "output_lens", outputs)

    @classmethod
    def from_trace(cls, trace: TraceData) -> EmpiricalLengths:
        """The length columns of any trace (ShareGPT, Azure, Mooncake, BurstGPT)."""
        return cls(trace.input_lens, trace.output_lens)

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        n = check_int("EmpiricalLengths", "n", n, 0)
        rows = rng.integers(0, len(self.input_lens), size=n)
        return self.input_lens[rows], self.output_lens[rows]


__all__ = ["LengthDistribution", "FixedLengths", "UniformLengths", "EmpiricalLengths"]
