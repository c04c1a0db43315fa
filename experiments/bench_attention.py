"""Paged-attention decode kernel vs. HBM bandwidth, launched as the decode CUDA graphs do.

Usage: python -m experiments.bench_attention [--reps 100] [--warmup 10] [--out JSON]
       TRITON_INTERPRET=1 python -m experiments.bench_attention --quick   (CPU, tiny sizes)

One layer of Llama-3.1-8B attention (32 q heads, 8 kv heads, head_dim 128, bf16 KV cache,
block size 16) decoding ``batch`` requests of ``context`` tokens each, for batch 1/16/64/256
x context 512/1024/4096/8192; the issue's point is batch 64 at context 4096. Each
request's blocks are distinct and drawn at random from one pool sized for the largest point,
so the kernel gathers scattered blocks as it does in a long-running server. The call is the
runner's decode-graph call: ``max_query_len=1``, ``max_seq_len`` = the graph's
``max_model_len`` (here the point's context, the tightest bound a graph for it would be
captured with), split-K factor ``graph_num_splits(choose_num_splits(...))`` exactly as
``ModelRunner._capture_graphs_run`` computes it, q a strided view of a fused QKV row, and
the output allocated by the kernel. A split-K sweep at the issue's point shows what the
choice costs against forced factors.

Timing: on a GPU the call is captured in a CUDA graph (as in a decode step, where launch
overhead is not the kernel's) and replayed ``--reps`` times after ``--warmup`` replays, each
replay between two CUDA events and after a 256 MiB write that evicts the 50 MB L2, so small
points read HBM rather than cache; the median is reported. On a CPU (Triton interpreter)
the direct call is timed with ``perf_counter``: only the bookkeeping is meaningful there.

Bandwidth = bytes the decode must move / median time, where the bytes are K and V of every
context token of every request (``batch * context * 2 * kv_heads * head_dim * 2``) plus q
and the output (``2 * batch * q_heads * head_dim * 2``); block-table reads (4 B per 16
tokens) and split-K partials are overhead, not counted. The ratio is to 3.0 TB/s, the
H100's measured device-to-device copy bandwidth; the issue's target is >= 70 % at batch 64,
context 4096. Every point's output is checked against ``paged_attention_ref`` on its first
requests; a mismatch fails the run after the JSON is written.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from experiments.bench_common import BANDWIDTH, environment, write_result

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16  # Llama-3.1-8B, the runner's block size
BATCHES, CONTEXTS = (1, 16, 64, 256), (512, 1024, 4096, 8192)
HEADLINE = (64, 4096)
SPLIT_SWEEP = (1, 2, 4, 8, 16)
TILE_SWEEP = (32, 64, 128)
# --quick: tiny sizes the Triton interpreter runs in seconds, still covering one point
# without split-K (context < 512) and one with the graphs' split-K 2.
QUICK_BATCHES, QUICK_CONTEXTS, QUICK_HEADLINE, QUICK_SPLIT_SWEEP = (1, 2), (40, 512), (2, 512), (1, 4)
TARGET_FRACTION = 0.70
CHECK_REQUESTS = 2  # requests per point compared with the torch reference
CHECK_TOL = 2e-2  # bf16, as tests/executor/test_kernels.py
L2_FLUSH_BYTES = 256 * 2**20


@dataclass
class Point:
    """One timed configuration and what it achieved."""

    batch: int
    context: int
    num_splits: int
    split_choice: str  # "graph" (the runner's choice) or "forced"
    median_us: float
    min_us: float
    bytes: int
    gb_per_s: float
    fraction_of_bandwidth: float
    check_max_abs_err: float


def align16(n: int) -> int:
    """Round up to a multiple of 16 (the runner pads block-table widths so)."""
    return -(-n // 16) * 16


def must_move_bytes(batch: int, context: int, itemsize: int = 2, kv_itemsize: int | None = None) -> int:
    """K and V of every context token of every request (``kv_itemsize`` bytes each, default
    ``itemsize``), plus q and the output."""
    kv = batch * context * 2 * NUM_KV_HEADS * HEAD_DIM * (kv_itemsize or itemsize)
    return kv + 2 * batch * NUM_HEADS * HEAD_DIM * itemsize


def graph_splits(batch: int, max_model_len: int, num_sms: int) -> int:
    """The split-K factor of the decode graph for ``batch`` rows (``_capture_graphs_run``)."""
    from executor.kernels import choose_num_splits
    from executor.model_runner import graph_num_splits

    return graph_num_splits(choose_num_splits(batch, NUM_KV_HEADS, max_model_len, num_sms), max_model_len)


def time_call(fn: Callable[[], object], warmup: int, reps: int) -> list[float]:
    """Seconds per call of ``fn``: CUDA-graph replays between events with L2 flushed before
    each (GPU), or plain calls under ``perf_counter`` (CPU interpreter)."""
    import torch

    if not torch.cuda.is_available():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return times
    fn()  # compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(warmup):
        graph.replay()
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        flush.zero_()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) / 1e3 for start, end in events]


class DecodeBench:
    """A K/V pool of random values (bf16, or rounded to fp8 for ``kv_dtype``) and the decode
    batches drawn from it."""

    def __init__(self, num_blocks: int, device: str, seed: int = 0, kv_dtype: Any = None) -> None:
        import torch

        self.device = device
        self.gen = torch.Generator(device=device).manual_seed(seed)
        shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
        dtype = kv_dtype or torch.bfloat16
        self.k_cache = torch.randn(shape, generator=self.gen, device=device, dtype=torch.bfloat16).to(dtype)
        self.v_cache = torch.randn(shape, generator=self.gen, device=device, dtype=torch.bfloat16).to(dtype)
        self.num_sms = (torch.cuda.get_device_properties(device).multi_processor_count
                        if device == "cuda" else 1)

    def run_point(self, batch: int, context: int, num_splits: int | None, warmup: int, reps: int,
                  tile_n: int | None = None) -> Point:
        """Time one decode batch; ``num_splits`` None takes the graph's choice, ``tile_n`` None
        the kernel's key tile."""
        import torch

        from executor.kernels import paged_attention
        from executor.kernels.reference import paged_attention_ref

        dev = self.device
        blocks_per_req = -(-context // BLOCK_SIZE)
        num_blocks = self.k_cache.shape[0]
        chosen = torch.randperm(num_blocks, generator=self.gen, device=dev)[:batch * blocks_per_req]
        block_tables = torch.zeros(batch, align16(blocks_per_req), dtype=torch.int32, device=dev)
        block_tables[:, :blocks_per_req] = chosen.view(batch, blocks_per_req).to(torch.int32)
        qkv = torch.randn(batch, (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM, generator=self.gen, device=dev,
                          dtype=torch.bfloat16)
        q = qkv[:, :NUM_HEADS * HEAD_DIM].view(batch, NUM_HEADS, HEAD_DIM)
        query_start_loc = torch.arange(batch + 1, dtype=torch.int32, device=dev)
        seq_lens = torch.full((batch,), context, dtype=torch.int32, device=dev)
        scale = HEAD_DIM ** -0.5
        choice = ("forced" if num_splits is not None else "graph") + (f" tile {tile_n}" if tile_n else "")
        splits = num_splits or graph_splits(batch, context, self.num_sms)

        def call() -> torch.Tensor:
            return paged_attention(q, self.k_cache, self.v_cache, query_start_loc, seq_lens, block_tables, scale,
                                   max_query_len=1, max_seq_len=context, num_splits=splits, tile_n=tile_n)

        n = min(batch, CHECK_REQUESTS)
        expected = paged_attention_ref(q[:n], self.k_cache, self.v_cache, query_start_loc[:n + 1], seq_lens[:n],
                                       block_tables[:n], scale)
        err = (call()[:n].float() - expected.float()).abs().max().item()
        times = time_call(call, warmup, reps)
        median = statistics.median(times)
        moved = must_move_bytes(batch, context, kv_itemsize=self.k_cache.element_size())
        return Point(batch, context, splits, choice, 1e6 * median, 1e6 * min(times), moved, moved / median / 1e9,
                     moved / median / BANDWIDTH, err)


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few repetitions (CPU interpreter test)")
    ap.add_argument("--warmup", type=int, default=None, help="default 10 (quick: 1)")
    ap.add_argument("--reps", type=int, default=None, help="default 100 (quick: 2)")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                    help="fp8: the cache holds float8 e4m3 (bytes moved count 1 byte per K/V element)")
    ap.add_argument("--out", default=None, help="default: experiments/results/bench_attention[_fp8].json")
    args = ap.parse_args(argv)

    import torch

    from executor.kernels._dispatch import TRITON_INTERPRET

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not TRITON_INTERPRET:
        raise SystemExit("no GPU: set TRITON_INTERPRET=1 (and pass --quick), or the torch reference would be timed")
    batches, contexts, headline, sweep = ((QUICK_BATCHES, QUICK_CONTEXTS, QUICK_HEADLINE, QUICK_SPLIT_SWEEP)
                                          if args.quick else (BATCHES, CONTEXTS, HEADLINE, SPLIT_SWEEP))
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 10)
    reps = args.reps if args.reps is not None else (2 if args.quick else 100)

    t0 = time.perf_counter()
    fp8 = args.kv_cache_dtype == "fp8"
    bench = DecodeBench(max(batches) * -(-max(contexts) // BLOCK_SIZE), device,
                        kv_dtype=torch.float8_e4m3fn if fp8 else None)
    points = []
    for batch in batches:
        for context in contexts:
            points.append(bench.run_point(batch, context, None, warmup, reps))
            p = points[-1]
            print(f"batch {batch:4d} context {context:5d} splits {p.num_splits:2d}: {p.median_us:9.1f} us "
                  f"{p.gb_per_s:7.0f} GB/s ({100 * p.fraction_of_bandwidth:5.1f}%)", flush=True)
    split_sweep = [bench.run_point(*headline, s, warmup, reps) for s in sweep]
    # Key-tile sweep at the headline point (graph split choice): 1-byte K/V tiles move half
    # the bytes of 2-byte ones, so the best tile may differ by cache dtype.
    tile_sweep = [bench.run_point(*headline, None, warmup, reps, tile_n=t) for t in TILE_SWEEP]
    head = next(p for p in points if (p.batch, p.context) == headline)
    failed = [p for p in points + split_sweep + tile_sweep if not p.check_max_abs_err <= CHECK_TOL]
    result = {
        "benchmark": "paged-attention decode kernel, Llama-3.1-8B layer (32 q / 8 kv heads, head_dim 128), "
                     f"bf16 q, {'fp8 e4m3' if fp8 else 'bf16'} KV, block 16, runner's decode-graph launch",
        "kv_cache_dtype": args.kv_cache_dtype,
        **environment(),
        "quick": args.quick,
        "timing": ("CUDA graph replay between events, L2 flushed, median" if device == "cuda"
                   else "Triton interpreter, perf_counter, median"),
        "warmup": warmup, "reps": reps,
        "bandwidth_bytes_per_s": BANDWIDTH,
        "bytes_formula": (f"batch*context*2*kv_heads*head_dim*{1 if fp8 else 2} (K,V) "
                          "+ 2*batch*q_heads*head_dim*2 (q, out)"),
        "headline": {**asdict(head), "target_fraction": TARGET_FRACTION,
                     "meets_target": head.fraction_of_bandwidth >= TARGET_FRACTION},
        "points": [asdict(p) for p in points],
        "split_sweep": [asdict(p) for p in split_sweep],
        "tile_sweep": [asdict(p) for p in tile_sweep],
        "check": {"requests_per_point": CHECK_REQUESTS, "tolerance": CHECK_TOL, "failed": len(failed)},
        "seconds": time.perf_counter() - t0,
    }
    out = write_result(args.out or f"experiments/results/bench_attention{'_fp8' if fp8 else ''}.json", result)
    print(f"wrote {out}")
    print(f"\n{'batch':>5} {'context':>7} {'splits':>6} {'median us':>10} {'GB/s':>7} {'of 3.0 TB/s':>11}")
    for p in points + split_sweep + tile_sweep:
        mark = "" if p.split_choice == "graph" else " " + p.split_choice
        print(f"{p.batch:5d} {p.context:7d} {p.num_splits:6d} {p.median_us:10.1f} {p.gb_per_s:7.0f} "
              f"{100 * p.fraction_of_bandwidth:10.1f}%{mark}")
    print(f"headline batch {headline[0]}, context {headline[1]}: {100 * head.fraction_of_bandwidth:.1f}% of "
          f"{BANDWIDTH / 1e12:.1f} TB/s ({'meets' if result['headline']['meets_target'] else 'misses'} the "
          f"{100 * TARGET_FRACTION:.0f}% target)")
    if failed:
        raise SystemExit(f"{len(failed)} points differ from the reference by more than {CHECK_TOL}: "
                         + ", ".join(f"b{p.batch} c{p.context} s{p.num_splits} err {p.check_max_abs_err:.3g}"
                                     for p in failed))
    return result


if __name__ == "__main__":
    main()
