"""CUDA graphs for pure-decode batches, and for steps with prefill tokens.

A decode step of a small model is a few hundred kernel launches of a few microseconds
each, so the CPU cannot launch them as fast as the GPU runs them. The runner captures the
model forward once per batch size in ``capture_sizes`` (after the KV cache is allocated)
and replays the graph for any decode batch of at most that size, padded up to it: padding
rows have token 0, position 0, slot -1 (the KV store skips them), a one-token sequence
and an all-zero block table (they read block 0, which the zero-filled pool keeps finite).

The inputs of a graph are fixed device addresses: the runner writes every step's
metadata into one pinned host buffer laid out exactly as the graph's views of the device
buffer expect and copies it with one ``cudaMemcpyAsync`` before ``replay()``.

Steps with prefill tokens (up to ``MIXED_CAPTURE_SIZES[-1]`` tokens) replay a graph of the
next captured token count: real requests first, then empty padding requests (zero query
length, zero context) up to the graph's request capacity, and padding tokens that belong to
no request (slot -1, never written by attention, never sampled; rows are independent).
Those graphs are captured with ``max_query_len`` = the token count (the 64-row query tile)
and the decode graphs' key split (``graph_num_splits``), so a long decode row beside a chunk
is not walked by one program alone.

The paged-attention kernel sizes its grid and its split-K factor from host ints; a graph
freezes them at capture. We capture with ``max_query_len = 1`` and ``max_seq_len =
max_model_len`` (every replayed context is shorter) and pass the split count explicitly
(``choose_num_splits`` for that bound), so the kernel's key-range split covers any context
the graph will see: its per-split tile range is computed on the device from ``seq_lens``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


def default_capture_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to 512 (nano-vllm's list), limited to what a
    batch of ``max_batch`` requests can need (the first size >= max_batch is kept)."""
    return select_capture_sizes([1, 2, 4, 8, *range(16, 513, 16)], max_batch)


#: Token counts of the mixed-step graphs (prefill chunks with or without decode rows): every
#: step of at most 8,192 tokens is padded to the next one (<= 33 % padding from 128 up). Up
#: to 8,192 rather than 2,048: on an H200 an eager 2,000-4,000-token step of Qwen3-0.6B
#: took 13 or 20 ms of CPU launching (which one varied between machines and processes)
#: for ~10 ms of device work.
MIXED_CAPTURE_SIZES = (16, 32, 64, 128, 192, 256, 384, 512, 640, 768, 1024, 1280, 1536, 1792, 2048,
                       2560, 3072, 4096, 5120, 6144, 8192)


def default_mixed_capture_sizes(max_num_batched_tokens: int) -> list[int]:
    return select_capture_sizes(MIXED_CAPTURE_SIZES, max_num_batched_tokens)


def select_capture_sizes(sizes: Sequence[int], max_batch: int) -> list[int]:
    sizes = sorted({int(s) for s in sizes})
    if any(s < 1 for s in sizes):
        raise ValueError(f"CUDA graph capture sizes must be >= 1, got {sizes}")
    kept = [s for s in sizes if s < max_batch]
    above = [s for s in sizes if s >= max_batch]
    if above:
        kept.append(above[0])
    return kept


@dataclass
class CapturedGraph:
    size: int
    graph: torch.cuda.CUDAGraph | None  # None: emulated (the forward runs eagerly on the static inputs)
    hidden: torch.Tensor  # the graph's output [size, hidden]
    num_splits: int
    forward: Callable[[], torch.Tensor] | None = None

    def replay(self) -> torch.Tensor:
        if self.graph is None:
            assert self.forward is not None
            self.hidden = self.forward()
        else:
            self.graph.replay()
        return self.hidden


class CudaGraphSet:
    """Graphs by padded batch size; ``lookup(n)`` gives the smallest captured size >= n."""

    def __init__(self, pool: object = None) -> None:
        self.graphs: dict[int, CapturedGraph] = {}
        self.sizes: list[int] = []
        self.pool = pool  # a memory pool shared with another set (capture the larger graphs first)

    @property
    def max_size(self) -> int:
        return self.sizes[-1] if self.sizes else 0

    def padded_size(self, n: int) -> int:
        for s in self.sizes:  # a short list: a scan beats bisect's call overhead
            if s >= n:
                return s
        return 0

    def capture(self, size: int, forward: Callable[[], torch.Tensor], num_splits: int,
                warmup: int = 1, emulate: bool = False) -> CapturedGraph:
        """Run ``forward`` eagerly ``warmup`` times (compiles the Triton kernels for this
        shape), then capture it into a graph sharing one memory pool with the others.

        ``emulate`` captures nothing: replays run ``forward`` eagerly on the same static
        inputs, so the padded fixed-layout path can be tested on a CPU."""
        if emulate:
            captured = CapturedGraph(size, None, forward(), num_splits, forward)
            self.graphs[size] = captured
            self.sizes = sorted(self.graphs)
            return captured
        for _ in range(warmup):
            forward()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            hidden = forward()
        if self.pool is None:
            self.pool = graph.pool()
        captured = CapturedGraph(size, graph, hidden, num_splits)
        self.graphs[size] = captured
        self.sizes = sorted(self.graphs)
        return captured
