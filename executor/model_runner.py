"""ModelRunner: runs one core ``SchedulerOutput`` on the model and returns a ``StepResult``.

Per step: copy swapped blocks, build the flattened batch (token ids, positions, KV slots,
attention metadata) on the host, copy it to the device once, run the forward (a CUDA-graph
replay for pure-decode batches, eager otherwise), compute logits only for the rows that
sample, sample, and return the tokens with the measured duration. ``launch`` queues all of
that and returns at once (``PendingStep``), so an async engine (``core.async_engine``) can
schedule the next step while the device works; ``execute`` waits for the tokens.

Host preparation is on the critical path of every step, so it avoids per-request tensor
work: block tables live in a persistent numpy array with one row per running request
(only a table's new tail is copied when it grows), positions and slots are numpy
expressions over the whole batch, and every per-step array is written into one pinned
int32 buffer that goes to the GPU in a single ``cudaMemcpyAsync``. Per-request sampling
parameters are read once, when a request first gets a row, into per-row arrays.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import numpy as np
import torch

from core.request import Request, RequestStatus
from core.sampling_params import SamplingParams
from core.scheduler_output import SchedulerOutput, StepResult
from executor import memory
from executor.config import ModelConfig
from executor.cuda_graphs import (CudaGraphSet, default_capture_sizes, default_mixed_capture_sizes,
                                  select_capture_sizes)
from executor.layers import AttentionMetadata, KernelOps, paged_attention_torch, set_kernel_ops
from executor.loader import LoadedModel
from executor.sampler import SamplingBatch, sample


def _align(n: int, to: int = 16) -> int:
    return -(-n // to) * to


# Decode graphs split each request's key range at least this many ways (when contexts may
# be long enough to share): the graph is captured for ``max_model_len`` but replays batches
# whose contexts vary widely, and one program per (request, kv head) leaves the longest
# contexts as a tail. On the H100 the offline benchmark ran at 15,730 tok/s with 2 (warm
# cache) and, as the default, at 16,568 tok/s (fresh machine, with the fused kernels).
GRAPH_MIN_SPLITS = 2


def graph_num_splits(heuristic: int, max_model_len: int) -> int:
    """The split-K factor a decode graph is captured with: ``choose_num_splits``'s choice,
    raised to ``GRAPH_MIN_SPLITS`` when ``max_model_len`` gives each split >= 256 keys."""
    from executor.kernels.paged_attention import MIN_KEYS_PER_SPLIT

    if max_model_len >= GRAPH_MIN_SPLITS * MIN_KEYS_PER_SPLIT:
        return max(heuristic, GRAPH_MIN_SPLITS)
    return heuristic


@dataclass
class StepMetadata(AttentionMetadata):
    """``AttentionMetadata`` plus a fixed split-K choice for the paged-attention kernel
    (None lets the kernel choose; CUDA graphs pass the choice made at capture)."""

    num_splits: int | None = None


def runner_kernel_ops() -> KernelOps:
    """The Triton kernels (which run their torch references on CPU tensors), with the
    runner's split-K choice passed through, and the torch attention for sliding-window
    layers (the Triton kernel has no window)."""
    from executor import kernels
    from executor.layers import triton_ops

    base = triton_ops()

    def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        metadata: AttentionMetadata, scale: float, sliding_window: int | None) -> torch.Tensor:
        if sliding_window is not None:
            return paged_attention_torch(q, k_cache, v_cache, metadata, scale, sliding_window)
        return kernels.paged_attention(q, k_cache, v_cache, metadata.query_start_loc, metadata.seq_lens,
                                       metadata.block_tables, scale, max_query_len=metadata.max_query_len,
                                       max_seq_len=metadata.max_seq_len,
                                       num_splits=getattr(metadata, "num_splits", None))

    return dataclasses.replace(base, name="runner", paged_attention=paged_attention)


@dataclass
class RunnerStats:
    """Counters over the runner's life (the benchmarks read them)."""

    steps: int = 0
    graph_steps: int = 0  # pure-decode graph replays
    mixed_graph_steps: int = 0  # replays of a graph for a step with prefill tokens
    eager_steps: int = 0
    tokens: int = 0
    sampled_tokens: int = 0
    context_tokens: int = 0  # sum over steps of every request's sequence length (KV read)
    prepare_seconds: float = 0.0  # host time from execute() entry to the input copy
    execute_seconds: float = 0.0  # sum of StepResult.duration
    swap_blocks: int = 0
    max_batch: int = 0
    graph_sizes: dict[int, int] = field(default_factory=dict)
    mixed_graph_sizes: dict[int, int] = field(default_factory=dict)
    # One entry per executed step when ``record_steps`` (benchmarks): its context tokens.
    record_steps: bool = False
    step_context_tokens: list[int] = field(default_factory=list)


class ModelRunner:
    """Owns the model, its paged KV cache (and the host pool for swapping) and CUDA graphs.

    ``requests`` must be the scheduler's live request table (``bind``): the runner reads a
    request's ``SamplingParams`` from it the first time the request is scheduled.
    """

    def __init__(self, loaded: LoadedModel, *, block_size: int = 16, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 8192, max_model_len: int = 8192,
                 gpu_memory_utilization: float = 0.9, num_gpu_blocks: int | None = None,
                 num_cpu_blocks: int = 0, enforce_eager: bool = False,
                 cuda_graph_sizes: list[int] | None = None, kernel_ops: KernelOps | None = None,
                 seed: int | None = 0, emulate_cuda_graphs: bool = False,
                 attention_num_splits: int | None = None, kv_cache_dtype: str | torch.dtype = "auto",
                 mixed_cuda_graph_sizes: list[int] | None = None) -> None:
        self.model = loaded.model
        self.config: ModelConfig = loaded.config
        # Tensor parallelism (``executor.parallel``): every rank runs every step on its shard;
        # rank 0 (the driver) samples, the others stop after the logits all-gather.
        self.tp = getattr(self.model, "tp", None)
        self.is_driver = self.tp is None or self.tp.rank == 0
        self.device = next(self.model.parameters()).device
        self.is_cuda = self.device.type == "cuda"
        cfg = self.config
        if max_model_len > cfg.max_position_embeddings:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's max_position_embeddings="
                             f"{cfg.max_position_embeddings}")
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        # Block-table rows are padded to a multiple of 16 entries, and every region of the
        # staging buffer starts 64-byte aligned: Triton specialises kernels on pointer
        # alignment and on ints divisible by 16, so unaligned views would compile new
        # kernel variants in the middle of a run.
        self.max_blocks_per_seq = _align(-(-max_model_len // block_size))
        # The runner's kernels are active only inside its own calls (profile, capture,
        # execute); the module-level default stays whatever the caller set.
        self.ops = kernel_ops or runner_kernel_ops()
        if seed is not None:
            torch.manual_seed(seed)
        self._rng = np.random.default_rng(seed)  # per-step seeds of the fused sampler
        self.attention_num_splits = attention_num_splits  # forced split-K of the decode graphs
        lm_head = getattr(self.model, "lm_head", None)
        embed = getattr(getattr(self.model, "model", None), "embed_tokens", None)
        # The LM-head weight, so logits stay in the model dtype (the sampler upcasts only
        # where it needs to); None falls back to ``model.compute_logits``.
        self._lm_head_weight = (None if self.tp is not None else lm_head.weight if lm_head is not None else
                                embed.weight if embed is not None else None)
        self.requests: dict[str, Request] = {}
        self.stats = RunnerStats()
        self.kv_dtype = memory.resolve_kv_cache_dtype(kv_cache_dtype, cfg.dtype)
        self.block_bytes = memory.kv_block_bytes(cfg, block_size, self.kv_dtype)
        self.weight_bytes = memory.weight_bytes(self.model)
        self.memory_profile: memory.MemoryProfile | None = None

        # Which decode batches get graphs (decided now: it sizes the staging buffer).
        sliding = any(w is not None for w in cfg.sliding_windows)
        # ``emulate_cuda_graphs`` (a testing aid) runs the padded fixed-layout graph path
        # eagerly, on any device, so its bookkeeping is checked where no GPU exists.
        self.emulate_graphs = emulate_cuda_graphs and not self.is_cuda
        self.use_graphs = (self.is_cuda or self.emulate_graphs) and not enforce_eager and not sliding
        max_decode_batch = min(max_num_seqs, max_num_batched_tokens)
        self.capture_sizes = ((select_capture_sizes(cuda_graph_sizes, max_decode_batch) if cuda_graph_sizes
                               else default_capture_sizes(max_decode_batch)) if self.use_graphs else [])
        # Steps with prefill tokens replay a graph too, up to a few thousand tokens, where
        # launching ~10 kernels a layer from Python costs more than the GPU work (tensor
        # parallelism keeps them eager: its collectives are not captured for them).
        use_mixed = self.use_graphs and self.tp is None
        # No step can carry more tokens than its requests can hold: a 16k budget with 8
        # sequences of at most 256 tokens makes steps of at most 2,048 tokens.
        self.max_step_tokens = min(max_num_batched_tokens, max_num_seqs * max_model_len)
        self.mixed_capture_sizes = ((select_capture_sizes(mixed_cuda_graph_sizes, self.max_step_tokens)
                                     if mixed_cuda_graph_sizes is not None
                                     else default_mixed_capture_sizes(self.max_step_tokens)) if use_mixed else [])
        g_max = max(self.capture_sizes, default=0)
        self._alloc_staging(max(max_num_batched_tokens, g_max, *self.mixed_capture_sizes), max(max_num_seqs, g_max))
        self._init_rows(max(max_num_seqs, 1))

        # KV cache: profile the peak of the largest step, then give the rest to the pool.
        if num_gpu_blocks is None:
            if self.is_cuda:
                self.memory_profile = self._profile(gpu_memory_utilization)
                num_gpu_blocks = self.memory_profile.num_blocks
            else:
                num_gpu_blocks = memory.default_cpu_num_blocks(self.block_bytes, self.max_blocks_per_seq)
        if self.tp is not None:  # every rank's shard must hold the same block ids: the smallest pool
            num_gpu_blocks = self.tp.min_int(num_gpu_blocks)
        if num_gpu_blocks < 1:
            detail = f": {self.memory_profile.describe()}" if self.memory_profile else ""
            raise ValueError(f"no room for a KV cache{detail}; raise gpu_memory_utilization, lower "
                             "max_num_batched_tokens / max_num_seqs, or use a smaller model")
        self.num_gpu_blocks = int(num_gpu_blocks)
        self.num_cpu_blocks = int(num_cpu_blocks)
        self.kv_pool = memory.allocate_kv_pool(cfg, self.num_gpu_blocks, block_size, self.device, self.kv_dtype)
        self.model.bind_kv_cache(memory.layer_views(self.kv_pool))
        self.host_pool = (memory.allocate_kv_pool(cfg, self.num_cpu_blocks, block_size, torch.device("cpu"),
                                                  self.kv_dtype, pin_memory=self.is_cuda)
                          if self.num_cpu_blocks else None)

        self.graphs = CudaGraphSet()
        self.mixed_graphs = CudaGraphSet()
        if self.is_cuda:  # start, inputs copied, tokens copied back: one set per step in flight
            self._events = [[torch.cuda.Event(enable_timing=True) for _ in range(3)] for _ in range(2)]
        # The last launched step's sampled tokens (device), its request ids and which of them
        # sampled (None: all): the ids of the next step's PLACEHOLDER tokens.
        self._last_tokens: torch.Tensor | None = None
        self._last_samplers: tuple[list[str], np.ndarray | None] = ([], None)
        if self.use_graphs:
            self._capture_graphs()
        if self.is_cuda:
            self._warmup_kernels()

    # --- request table ------------------------------------------------------------------
    def bind(self, requests: dict[str, Request]) -> None:
        """Share the scheduler's live request table (``engine.scheduler.requests``)."""
        self.requests = requests

    # --- buffers ------------------------------------------------------------------------
    def _alloc_staging(self, max_tokens: int, max_reqs: int) -> None:
        """One int32 staging buffer (pinned on CUDA) and its device twin, big enough for the
        largest eager step and for every graph's fixed layout."""
        n = 3 * max_tokens + 2 * max_reqs + 1 + max_reqs * self.max_blocks_per_seq + 6 * max_reqs + 16 * 12
        self.staging_capacity = n
        # Two host buffers on CUDA, used in turn: with a step in flight (``launch``), the
        # previous step's copy may still be queued behind the device's work when the next
        # step is prepared. (On the CPU every step completes inside ``launch``.)
        bufs = [torch.zeros(n, dtype=torch.int32, pin_memory=self.is_cuda) for _ in range(2 if self.is_cuda else 1)]
        self._host_bufs = [(b, b.numpy(), b.numpy().view(np.float32)) for b in bufs]
        self._use_host_buf(0)
        self.dev_buf = torch.zeros(n, dtype=torch.int32, device=self.device) if self.is_cuda else self.host_buf
        self.dev_buf_f32 = self.dev_buf.view(torch.float32)
        # Sampled tokens come back through pinned buffers, one per step in flight.
        self._token_bufs = ([torch.zeros(max_reqs, dtype=torch.int64, pin_memory=True) for _ in range(2)]
                            if self.is_cuda else [])
        self._launches = 0

    def _use_host_buf(self, index: int) -> None:
        self.host_buf, self.host_np, self.host_np_f32 = self._host_bufs[index]

    def _init_rows(self, n: int) -> None:
        """Persistent per-request rows: block table, sampling parameters."""
        self.bt_rows = np.zeros((n, self.max_blocks_per_seq), dtype=np.int32)
        self.row_temp = np.zeros(n, dtype=np.float32)
        self.row_top_k = np.zeros(n, dtype=np.int32)
        self.row_top_p = np.ones(n, dtype=np.float32)
        self.row_seeded = np.zeros(n, dtype=bool)
        self.row_rid: list[str | None] = [None] * n
        self.free_rows = list(range(n - 1, -1, -1))
        self.row_of: dict[str, list[Any]] = {}  # rid -> [row, block table list object, entries copied]
        self.generators: dict[str, torch.Generator] = {}

    def _grow_rows(self) -> None:
        old = self.bt_rows.shape[0]
        new = 2 * old
        self.bt_rows = np.concatenate([self.bt_rows, np.zeros_like(self.bt_rows)])
        self.row_temp = np.concatenate([self.row_temp, np.zeros(old, np.float32)])
        self.row_top_k = np.concatenate([self.row_top_k, np.zeros(old, np.int32)])
        self.row_top_p = np.concatenate([self.row_top_p, np.ones(old, np.float32)])
        self.row_seeded = np.concatenate([self.row_seeded, np.zeros(old, bool)])
        self.row_rid.extend([None] * old)
        self.free_rows.extend(range(new - 1, old - 1, -1))

    def _release(self, rid: str, finished: bool) -> None:
        entry = self.row_of.pop(rid, None)
        if entry is not None:
            self.row_rid[entry[0]] = None
            self.free_rows.append(entry[0])
        if finished:
            self.generators.pop(rid, None)

    def _sweep(self) -> None:
        """Free rows of requests that ended without the runner hearing of it (the engine
        does not execute an empty step, so its ``finished_req_ids`` never reach us)."""
        requests = self.requests
        for rid in list(self.row_of):
            req = requests.get(rid)
            if req is None or req.status != RequestStatus.RUNNING:
                self._release(rid, finished=req is None or req.is_finished)
        for rid in list(self.generators):
            if rid not in requests:
                del self.generators[rid]

    def _assign_row(self, rid: str, table: list[int]) -> list[Any]:
        if not self.free_rows:
            self._sweep()
            if not self.free_rows:
                self._grow_rows()
        row = self.free_rows.pop()
        n = min(len(table), self.max_blocks_per_seq)
        self.bt_rows[row, :n] = table[:n]
        req = self.requests.get(rid)
        if req is None:
            raise RuntimeError(f"request {rid!r} is not in the runner's request table: call "
                               "RealBackend.bind(engine.scheduler.requests) after building the engine")
        sp: SamplingParams = req.sampling_params
        self.row_temp[row] = sp.temperature
        self.row_top_k[row] = sp.top_k
        self.row_top_p[row] = sp.top_p
        self.row_seeded[row] = sp.seed is not None and sp.temperature > 0
        if sp.seed is not None and rid not in self.generators:
            self.generators[rid] = torch.Generator(device=self.device).manual_seed(sp.seed)
        self.row_rid[row] = rid
        entry = [row, table, n]
        self.row_of[rid] = entry
        return entry

    def _rows_for(self, out: SchedulerOutput) -> np.ndarray:
        for rid in out.finished_req_ids:
            self._release(rid, finished=True)
        for rid in out.preempted_req_ids:
            self._release(rid, finished=False)
        row_of = self.row_of
        bt = self.bt_rows
        max_b = self.max_blocks_per_seq
        rows = []
        append = rows.append
        for rid, table in zip(out.req_ids, out.block_tables):
            e = row_of.get(rid)
            if e is None:
                e = self._assign_row(rid, table)
                bt = self.bt_rows  # may have grown
            elif e[1] is not table:  # a new table (swapped in): rewrite the row
                n = min(len(table), max_b)
                bt[e[0], :n] = table[:n]
                e[1] = table
                e[2] = n
            else:
                n = len(table)
                if n != e[2]:  # the table grew: copy the new tail only
                    old = e[2]
                    if n > max_b:
                        n = max_b
                    bt[e[0], old:n] = table[old:n]
                    e[2] = n
            append(e[0])
        return np.array(rows, dtype=np.int64)

    # --- profiling ----------------------------------------------------------------------
    def _dummy_batch(self, num_reqs: int, num_tokens: int) -> tuple[list[int], list[int]]:
        """``num_tokens`` split as evenly as possible (the remainder one token each), so no
        request is longer than it must be: with ``num_tokens <= num_reqs * max_model_len`` none
        exceeds ``max_model_len`` (a longer one would read rotary tables past their end)."""
        per, rem = divmod(num_tokens, num_reqs)
        return [per + (i < rem) for i in range(num_reqs)], [0] * num_reqs

    @contextlib.contextmanager
    def _own_ops(self) -> Iterator[None]:
        previous = set_kernel_ops(self.ops)
        try:
            yield
        finally:
            set_kernel_ops(previous)

    def _profile(self, gpu_memory_utilization: float) -> memory.MemoryProfile:
        with self._own_ops(), torch.inference_mode():
            return self._profile_run(gpu_memory_utilization)

    def _profile_run(self, gpu_memory_utilization: float) -> memory.MemoryProfile:
        """A forward of the largest step (``max_step_tokens`` tokens over ``max_num_seqs``
        requests, plus logits and top-k/top-p sampling of every request) on a one-block dummy
        cache; its peak sizes the KV pool."""
        cfg = self.config
        # An engine dropped by its owner but caught in a reference cycle still holds its KV
        # pool until the collector runs: collect first, or the profile counts that pool as
        # in use (a second 0.9-utilization LLM in one process then got 0 blocks).
        gc.collect()
        dummy = memory.allocate_kv_pool(cfg, 1, self.block_size, self.device, self.kv_dtype)
        self.model.bind_kv_cache(memory.layer_views(dummy))
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        num_tokens = self.max_step_tokens
        num_reqs = min(self.max_num_seqs, num_tokens)
        new, computed = self._dummy_batch(num_reqs, num_tokens)
        seq_max = max(new)
        tables_width = _align(-(-seq_max // self.block_size))
        slots = torch.full((num_tokens,), -1, dtype=torch.int32, device=self.device)
        starts = torch.tensor([0, *np.cumsum(new).tolist()], dtype=torch.int32, device=self.device)
        md = StepMetadata(slot_mapping=slots, query_start_loc=starts,
                          seq_lens=torch.tensor(new, dtype=torch.int32, device=self.device),
                          block_tables=torch.zeros(num_reqs, tables_width, dtype=torch.int32, device=self.device),
                          max_query_len=seq_max, max_seq_len=seq_max)
        ids = torch.zeros(num_tokens, dtype=torch.int32, device=self.device)
        positions = torch.cat([torch.arange(n, dtype=torch.int32, device=self.device) for n in new])
        hidden = self.model(ids, positions, md)
        logits = self.model.compute_logits(hidden[starts[1:].long() - 1])
        n = logits.shape[0]
        batch = SamplingBatch(all_greedy=False, any_greedy=True,
                              temperature=torch.full((n,), 0.7, device=self.device),
                              top_k=torch.full((n,), 50, dtype=torch.int32, device=self.device),
                              top_p=torch.full((n,), 0.9, device=self.device), max_top_k=50)
        sample(logits, batch)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        prof = memory.num_blocks_from_profile(self.device, gpu_memory_utilization, self.block_bytes,
                                              self.weight_bytes, peak)
        del hidden, logits, md, dummy, ids, positions, slots, starts, batch
        torch.cuda.empty_cache()
        return prof

    # --- CUDA graphs --------------------------------------------------------------------
    @staticmethod
    def _layout(num_tokens: int, num_reqs: int, width: int, num_sample: int) -> tuple[int, ...]:
        """Offsets (int32 elements, each 16-aligned) of a step's regions in the staging
        buffer: ids at 0, then positions, slots, query_start_loc, seq_lens, block tables,
        logits rows, temperatures, top-k, top-p; the last value is the end."""
        o_pos = _align(num_tokens)
        o_slot = o_pos + o_pos
        o_qsl = o_slot + o_pos
        o_seq = o_qsl + _align(num_reqs + 1)
        o_bt = o_seq + _align(num_reqs)
        o_lidx = o_bt + num_reqs * width
        o_temp = o_lidx + _align(num_sample)
        o_topk = o_temp + _align(num_sample)
        o_topp = o_topk + _align(num_sample)
        return o_pos, o_slot, o_qsl, o_seq, o_bt, o_lidx, o_temp, o_topk, o_topp, o_topp + num_sample

    @staticmethod
    def _placeholder_offset(layout_end: int) -> int:
        """Where a step's placeholder region starts (positions, then source indices):
        after its other regions."""
        return _align(layout_end)

    def _graph_inputs(self, size: int, num_splits: int) -> tuple[torch.Tensor, torch.Tensor, StepMetadata]:
        o_pos, o_slot, o_qsl, o_seq, o_bt, *_ = self._layout(size, size, self.max_blocks_per_seq, 0)
        d = self.dev_buf
        md = StepMetadata(slot_mapping=d[o_slot:o_slot + size], query_start_loc=d[o_qsl:o_qsl + size + 1],
                          seq_lens=d[o_seq:o_seq + size],
                          block_tables=d[o_bt:o_bt + size * self.max_blocks_per_seq].view(
                              size, self.max_blocks_per_seq),
                          max_query_len=1, max_seq_len=self.max_model_len, num_splits=num_splits)
        return d[:size], d[o_pos:o_pos + size], md

    def _mixed_reqs(self, num_tokens: int) -> int:
        """Request capacity of the mixed graph of ``num_tokens`` tokens."""
        return min(self.max_num_seqs, num_tokens)

    def _mixed_graph_inputs(self, size: int) -> tuple[torch.Tensor, torch.Tensor, StepMetadata]:
        reqs = self._mixed_reqs(size)
        width = self.max_blocks_per_seq
        o_pos, o_slot, o_qsl, o_seq, o_bt, *_ = self._layout(size, reqs, width, 0)
        d = self.dev_buf
        # Split-K as in the decode graphs: a decode row beside a chunk must not leave one
        # program walking its whole context while the rest of the GPU idles.
        md = StepMetadata(slot_mapping=d[o_slot:o_slot + size], query_start_loc=d[o_qsl:o_qsl + reqs + 1],
                          seq_lens=d[o_seq:o_seq + reqs],
                          block_tables=d[o_bt:o_bt + reqs * width].view(reqs, width),
                          max_query_len=size, max_seq_len=self.max_model_len,
                          num_splits=self.attention_num_splits or graph_num_splits(1, self.max_model_len))
        return d[:size], d[o_pos:o_pos + size], md

    def _capture_graphs(self) -> None:
        with self._own_ops(), torch.inference_mode():
            self._capture_graphs_run()

    def _capture_graphs_run(self) -> None:
        """Capture the mixed-step forwards, then the decode forward for every size, largest
        first (the shared pool then only grows once), after the KV pool is allocated."""
        from executor.kernels import choose_num_splits

        cfg = self.config
        num_sms = (torch.cuda.get_device_properties(self.device).multi_processor_count if self.is_cuda else 1)
        t0 = time.perf_counter()
        h = self.host_np
        width = self.max_blocks_per_seq
        for size in sorted(self.mixed_capture_sizes, reverse=True):
            reqs = self._mixed_reqs(size)
            o_pos, o_slot, o_qsl, o_seq, o_bt, *_, end = self._layout(size, reqs, width, 0)
            # `size` tokens in requests of at most max_model_len tokens on block 0 (writing
            # nothing), the rest empty; the last capture size may exceed what a step can hold
            # (the first size >= the cap is kept): its spare tokens belong to no request.
            lens = [min(self.max_model_len, size - start) for start in range(0, size, self.max_model_len)][:reqs]
            h[:end] = 0
            h[o_slot:o_slot + size] = -1
            h[o_qsl + 1:o_qsl + reqs + 1] = sum(lens)
            h[o_qsl + 1:o_qsl + len(lens) + 1] = np.cumsum(lens)
            h[o_seq:o_seq + len(lens)] = lens
            h[o_pos:o_pos + sum(lens)] = np.concatenate([np.arange(n) for n in lens])
            if self.is_cuda:
                self.dev_buf[:end].copy_(self.host_buf[:end])
            ids, positions, md = self._mixed_graph_inputs(size)
            self.mixed_graphs.capture(size, lambda ids=ids, positions=positions, md=md: self.model(ids, positions, md),
                                      md.num_splits, emulate=self.emulate_graphs)
        self.graphs.pool = self.mixed_graphs.pool
        for size in sorted(self.capture_sizes, reverse=True):
            o_pos, o_slot, o_qsl, o_seq, o_bt, _, _, _, _, end = self._layout(size, size, self.max_blocks_per_seq, 0)
            h[:size] = 0
            h[o_pos:o_pos + size] = 0
            h[o_slot:o_slot + size] = -1
            h[o_qsl:o_qsl + size + 1] = np.arange(size + 1)
            h[o_seq:o_seq + size] = 1
            h[o_bt:end] = 0
            if self.is_cuda:
                self.dev_buf[:end].copy_(self.host_buf[:end])
            num_splits = self.attention_num_splits or graph_num_splits(
                choose_num_splits(size, cfg.num_key_value_heads, self.max_model_len, num_sms), self.max_model_len)
            ids, positions, md = self._graph_inputs(size, num_splits)
            self.graphs.capture(size, lambda ids=ids, positions=positions, md=md: self.model(ids, positions, md),
                                num_splits, emulate=self.emulate_graphs)
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
        self.graph_capture_seconds = time.perf_counter() - t0

    def _warmup_kernels(self) -> None:
        """Compile, now rather than mid-run, the kernel variants a run can meet that the
        profile pass and the graph captures did not: paged attention with a short or a
        long query tile (decode-like / prefill-like) at every split-K factor, and the fused
        sampler. Each forward is one request of <= 64 tokens on block 0, writing nothing."""
        from executor.sampler import gumbel_sample

        t0 = time.perf_counter()
        dev = self.device
        with self._own_ops(), torch.inference_mode():
            for q_len in (1, 64):
                width = _align(-(-q_len // self.block_size))
                for splits in (1, 2, 4, 8, 16):
                    md = StepMetadata(slot_mapping=torch.full((q_len,), -1, dtype=torch.int32, device=dev),
                                      query_start_loc=torch.tensor([0, q_len], dtype=torch.int32, device=dev),
                                      seq_lens=torch.tensor([q_len], dtype=torch.int32, device=dev),
                                      block_tables=torch.zeros(1, width, dtype=torch.int32, device=dev),
                                      max_query_len=q_len, max_seq_len=q_len, num_splits=splits)
                    self.model(torch.zeros(q_len, dtype=torch.int32, device=dev),
                               torch.arange(q_len, dtype=torch.int32, device=dev), md)
            if self.is_cuda:
                logits = torch.zeros(2, self.config.vocab_size, dtype=self.config.dtype, device=dev)
                gumbel_sample(logits, torch.tensor([0.0, 1.0], device=dev), 0)
                torch.cuda.synchronize(dev)
        self.warmup_seconds = time.perf_counter() - t0

    # --- one step ---------------------------------------------------------------------
    def execute(self, out: SchedulerOutput) -> StepResult:
        """Run one scheduled step; returns the sampled tokens and the measured duration."""
        return self.launch(out).result()

    def launch(self, out: SchedulerOutput) -> PendingStep:
        """Queue one step on the device and return without waiting for it.

        A ``PLACEHOLDER`` as a request's last new token (async scheduling) stands for the
        token that request sampled in the previously launched step; it is taken from the
        device. ``result()`` of the returned object waits for the step's tokens.
        """
        previous = set_kernel_ops(self.ops)
        try:
            with torch.inference_mode():
                return self._launch(out)
        finally:
            set_kernel_ops(previous)

    def _launch(self, out: SchedulerOutput) -> PendingStep:
        is_cuda = self.is_cuda
        t_start = time.perf_counter()
        slot = self._launches & 1
        self._launches += 1
        if is_cuda:
            self._use_host_buf(slot)
            ev_start, ev_prep, ev_end = self._events[slot]
            ev_start.record()
        if out.blocks_to_swap_out or out.blocks_to_swap_in:
            self._swap(out)
        num_reqs = len(out.req_ids)
        if num_reqs == 0:
            return PendingStep.ready(StepResult([], time.perf_counter() - t_start))

        # ---- host preparation ----
        rows = self._rows_for(out)
        bs = self.block_size
        num_tokens = out.total_num_scheduled_tokens
        computed = np.array(out.num_computed_tokens, dtype=np.int64)
        decode = num_tokens == num_reqs
        graph = None
        mixed = False
        if decode:
            if self.use_graphs and num_reqs <= self.graphs.max_size:
                graph = self.graphs.graphs[self.graphs.padded_size(num_reqs)]
            positions = computed
            seq_lens = computed + 1
            token_rows = rows
            ids = np.array([t[0] for t in out.new_token_ids], dtype=np.int64)
            max_query_len = 1
        else:
            num_new = np.array(out.num_new_tokens, dtype=np.int64)
            seq_lens = computed + num_new
            req_of_token = np.repeat(np.arange(num_reqs), num_new)
            starts = np.cumsum(num_new) - num_new
            positions = np.arange(num_tokens, dtype=np.int64) + (computed - starts)[req_of_token]
            token_rows = rows[req_of_token]
            ids = np.fromiter(chain.from_iterable(out.new_token_ids), dtype=np.int64, count=num_tokens)
            max_query_len = int(num_new.max())
            if num_tokens <= self.mixed_graphs.max_size:
                graph = self.mixed_graphs.graphs[self.mixed_graphs.padded_size(num_tokens)]
                mixed = True
        slots = self.bt_rows[token_rows, positions // bs].astype(np.int64) * bs + positions % bs
        max_seq_len = int(seq_lens.max())
        placeholders = np.flatnonzero(ids < 0)

        samples = out.samples
        all_sample = all(samples)
        if all_sample:
            sample_idx = None
            num_sample = num_reqs
            srows = rows
        else:
            sample_idx = np.flatnonzero(np.array(samples, dtype=bool))
            num_sample = len(sample_idx)
            srows = rows[sample_idx]

        if mixed:
            padded = graph.size
            width = self.max_blocks_per_seq
            t_pad, r_pad = padded, self._mixed_reqs(padded)
        elif graph is not None:
            padded = graph.size
            width = self.max_blocks_per_seq
            t_pad = r_pad = padded
        else:
            padded = num_reqs
            width = _align(-(-max_seq_len // bs))
            t_pad, r_pad = num_tokens, num_reqs
        o_pos, o_slot, o_qsl, o_seq, o_bt, o_lidx, o_temp, o_topk, o_topp, o_end = self._layout(
            t_pad, r_pad, width, num_sample)
        h = self.host_np
        h[:num_tokens] = ids
        h[o_pos:o_pos + num_tokens] = positions
        h[o_slot:o_slot + num_tokens] = slots
        qsl = h[o_qsl:o_qsl + r_pad + 1]
        qsl[0] = 0
        if decode:
            qsl[1:] = np.arange(1, r_pad + 1)
        else:
            np.cumsum(num_new, out=qsl[1:num_reqs + 1])
        h[o_seq:o_seq + num_reqs] = seq_lens
        bt_view = h[o_bt:o_bt + r_pad * width].reshape(r_pad, width)
        if width == self.max_blocks_per_seq:
            np.take(self.bt_rows, rows, axis=0, out=bt_view[:num_reqs])
        else:
            bt_view[:num_reqs] = self.bt_rows[rows, :width]
        if mixed:  # padding tokens belong to no request; padding requests are empty
            h[num_tokens:padded] = 0
            h[o_pos + num_tokens:o_pos + padded] = 0
            h[o_slot + num_tokens:o_slot + padded] = -1
            qsl[num_reqs + 1:] = num_tokens
            h[o_seq + num_reqs:o_seq + r_pad] = 0
            bt_view[num_reqs:] = 0
        elif padded > num_reqs:  # graph padding rows: token 0 at position 0, no KV write, 1-token context
            h[num_reqs:padded] = 0
            h[o_pos + num_reqs:o_pos + padded] = 0
            h[o_slot + num_reqs:o_slot + padded] = -1
            h[o_seq + num_reqs:o_seq + padded] = 1
            bt_view[num_reqs:] = 0
        num_ph = len(placeholders)
        o_ph = self._placeholder_offset(o_end)
        if num_ph:
            self._stage_placeholders(out, placeholders, None if decode else req_of_token, h, o_ph)

        # ---- forward: copy the forward's inputs, launch, and prepare the rest meanwhile ----
        d = self.dev_buf
        if is_cuda:
            d[:o_lidx].copy_(self.host_buf[:o_lidx], non_blocking=True)
            if num_ph:
                d[o_ph:o_ph + 2 * num_ph].copy_(self.host_buf[o_ph:o_ph + 2 * num_ph], non_blocking=True)
            ev_prep.record()
        if num_ph:  # the ids that were PLACEHOLDERs: the previous step's samples, on the device
            where = d[o_ph:o_ph + num_ph].long()
            src = d[o_ph + num_ph:o_ph + 2 * num_ph].long()
            d[where] = self._last_tokens.index_select(0, src).to(d.dtype)
        t_prep = time.perf_counter()
        if mixed:
            hidden = graph.replay()
            self.stats.mixed_graph_steps += 1
            self.stats.mixed_graph_sizes[padded] = self.stats.mixed_graph_sizes.get(padded, 0) + 1
        elif graph is not None:
            hidden = graph.replay()
            self.stats.graph_steps += 1
            self.stats.graph_sizes[padded] = self.stats.graph_sizes.get(padded, 0) + 1
        else:
            md = StepMetadata(slot_mapping=d[o_slot:o_slot + num_tokens],
                              query_start_loc=d[o_qsl:o_qsl + num_reqs + 1],
                              seq_lens=d[o_seq:o_seq + num_reqs],
                              block_tables=d[o_bt:o_bt + num_reqs * width].view(num_reqs, width),
                              max_query_len=max_query_len, max_seq_len=max_seq_len)
            hidden = self.model(d[:num_tokens], d[o_pos:o_pos + num_tokens], md)
            self.stats.eager_steps += 1

        # Sampling parameters of the sampling rows (the GPU is busy with the forward).
        temps = self.row_temp[srows]
        all_greedy = not temps.any()
        batch = SamplingBatch()
        copy_end = o_lidx
        if sample_idx is not None:
            starts_np = qsl[1:num_reqs + 1]
            h[o_lidx:o_lidx + num_sample] = starts_np[sample_idx] - 1
            copy_end = o_lidx + num_sample
        use_k = use_p = False
        if not all_greedy:
            hf = self.host_np_f32
            hf[o_temp:o_temp + num_sample] = temps
            copy_end = o_temp + num_sample
            top_k = self.row_top_k[srows]
            top_p = self.row_top_p[srows]
            use_k = bool(top_k.any())
            use_p = bool((top_p < 1.0).any())
            if use_k:
                h[o_topk:o_topk + num_sample] = top_k
                copy_end = o_topk + num_sample
            if use_p:
                hf[o_topp:o_topp + num_sample] = top_p
                copy_end = o_topp + num_sample
            batch.all_greedy = False
            batch.seed = int(self._rng.integers(1 << 31))
            batch.any_greedy = bool((temps == 0).any())
            batch.max_top_k = int(top_k.max()) if use_k else 0
            if self.row_seeded[srows].any():
                row_rid = self.row_rid
                gens = self.generators
                batch.generators = {i: gens[row_rid[r]] for i, r in enumerate(srows.tolist())
                                    if row_rid[r] in gens and self.row_temp[r] > 0}
        if is_cuda and copy_end > o_lidx:
            d[o_lidx:copy_end].copy_(self.host_buf[o_lidx:copy_end], non_blocking=True)
        if not all_greedy:
            df = self.dev_buf_f32
            batch.temperature = df[o_temp:o_temp + num_sample]
            if use_k:
                batch.top_k = d[o_topk:o_topk + num_sample]
            if use_p:
                batch.top_p = df[o_topp:o_topp + num_sample]

        # ---- logits of the sampling rows only, then sampling ----
        if sample_idx is None:
            if decode:
                hidden = hidden[:num_reqs]
            else:
                hidden = hidden.index_select(0, d[o_qsl + 1:o_qsl + num_reqs + 1] - 1)
        else:
            hidden = hidden.index_select(0, d[o_lidx:o_lidx + num_sample])
        weight = self._lm_head_weight
        if weight is not None:
            logits = torch.nn.functional.linear(hidden, weight)
        elif self.tp is not None:
            logits = self.model.logits(hidden)  # all-gathered over the tensor-parallel group
            if not self.is_driver:  # a tensor-parallel worker: rank 0 samples
                self.stats.steps += 1
                self.stats.tokens += num_tokens
                return PendingStep.ready(StepResult([[] for _ in range(num_reqs)], time.perf_counter() - t_start))
        else:
            logits = self.model.compute_logits(hidden)
        tokens = sample(logits, batch)
        self._last_tokens = tokens
        self._last_samplers = (out.req_ids, sample_idx)
        if is_cuda:
            host_tokens = self._token_bufs[slot][:num_sample]
            host_tokens.copy_(tokens, non_blocking=True)
            ev_end.record()
        else:
            host_tokens = tokens

        # Bookkeeping while the GPU works.
        st = self.stats
        st.steps += 1
        st.tokens += num_tokens
        st.sampled_tokens += num_sample
        ctx = int(seq_lens.sum())
        st.context_tokens += ctx
        if st.record_steps:
            st.step_context_tokens.append(ctx)
        if num_reqs > st.max_batch:
            st.max_batch = num_reqs
        st.prepare_seconds += t_prep - t_start
        return PendingStep(self, host_tokens, sample_idx, num_reqs, t_start, slot)

    def _stage_placeholders(self, out: SchedulerOutput, positions: np.ndarray, req_of_token: Any,
                            h: np.ndarray, offset: int) -> None:
        """Write the placeholder token positions and, after them, each one's index in the
        previous step's samples (``req_of_token`` is None for a pure-decode step)."""
        # Built here, not per launch: only a step with placeholders (async scheduling) needs it.
        last_ids, last_idx = self._last_samplers
        index = ({rid: i for i, rid in enumerate(last_ids)} if last_idx is None else
                 {last_ids[j]: i for i, j in enumerate(last_idx.tolist())})
        req_ids = out.req_ids
        reqs = (positions if req_of_token is None else req_of_token[positions]).tolist()
        try:
            src = [index[req_ids[i]] for i in reqs]
        except KeyError as e:
            raise RuntimeError(f"request {e.args[0]!r} has a placeholder token but sampled nothing in the "
                               "previously launched step") from None
        n = len(src)
        h[offset:offset + n] = positions
        h[offset + n:offset + 2 * n] = src


    # --- swap -------------------------------------------------------------------------
    def _swap(self, out: SchedulerOutput) -> None:
        """Copy blocks between the device pool and the host pool (before the forward:
        swapped-out blocks may be reused by this very step)."""
        if self.host_pool is None:
            raise RuntimeError("the scheduler asked for a swap but the runner has no host KV pool "
                               "(num_cpu_blocks=0)")
        pool, host = self.kv_pool, self.host_pool
        if out.blocks_to_swap_out:
            dev_ids = torch.tensor([g for g, _ in out.blocks_to_swap_out], dtype=torch.int64, device=self.device)
            host_ids = torch.tensor([c for _, c in out.blocks_to_swap_out], dtype=torch.int64)
            host[:, :, host_ids] = pool[:, :, dev_ids].to("cpu")
        if out.blocks_to_swap_in:
            dev_ids = torch.tensor([g for g, _ in out.blocks_to_swap_in], dtype=torch.int64, device=self.device)
            host_ids = torch.tensor([c for _, c in out.blocks_to_swap_in], dtype=torch.int64)
            pool[:, :, dev_ids] = host[:, :, host_ids].to(self.device)
        self.stats.swap_blocks += len(out.blocks_to_swap_out) + len(out.blocks_to_swap_in)

    def reset(self) -> None:
        """Forget every request (rows, generators); the KV pool's contents stay."""
        for rid in list(self.row_of):
            self._release(rid, finished=True)
        self.generators.clear()
        self._last_tokens = None
        self._last_samplers = ([], None)


def kv_cache_summary(runner: ModelRunner) -> dict[str, Any]:
    """Sizes for logs and benchmark JSON."""
    return {
        "num_gpu_blocks": runner.num_gpu_blocks,
        "num_cpu_blocks": runner.num_cpu_blocks,
        "block_size": runner.block_size,
        "kv_cache_dtype": str(runner.kv_dtype).removeprefix("torch."),
        "kv_cache_gib": runner.num_gpu_blocks * runner.block_bytes / memory.GiB,
        "kv_tokens": runner.num_gpu_blocks * runner.block_size,
        "max_concurrency_at_max_len": runner.num_gpu_blocks * runner.block_size / runner.max_model_len,
        "cuda_graph_sizes": list(runner.graphs.sizes),
        "mixed_cuda_graph_sizes": list(runner.mixed_graphs.sizes),
        "graph_capture_seconds": getattr(runner, "graph_capture_seconds", 0.0),
        "kernel_warmup_seconds": getattr(runner, "warmup_seconds", 0.0),
        "memory_profile": runner.memory_profile.describe() if runner.memory_profile else None,
    }


class PendingStep:
    """A launched step; ``result()`` waits for its tokens (once) and returns the StepResult."""

    __slots__ = ("runner", "tokens", "sample_idx", "num_reqs", "t_start", "slot", "_result")

    def __init__(self, runner: ModelRunner | None, tokens: Any, sample_idx: Any, num_reqs: int,
                 t_start: float, slot: int) -> None:
        self.runner = runner
        self.tokens = tokens  # pinned host tensor (CUDA) or the CPU tensor itself
        self.sample_idx = sample_idx  # indices of the sampling requests; None: all of them
        self.num_reqs = num_reqs
        self.t_start = t_start
        self.slot = slot
        self._result: StepResult | None = None

    @classmethod
    def ready(cls, result: StepResult) -> PendingStep:
        """A step that completed inside ``launch`` (nothing to wait for)."""
        step = cls(None, None, None, 0, 0.0, 0)
        step._result = result
        return step

    def result(self) -> StepResult:
        if self._result is None:
            self._result = self._collect()
        return self._result

    def _collect(self) -> StepResult:
        runner = self.runner
        assert runner is not None
        breakdown = None
        if runner.is_cuda:
            ev_start, ev_prep, ev_end = runner._events[self.slot]
            ev_end.synchronize()  # this step only: a step launched after it may still run
            duration = ev_start.elapsed_time(ev_end) / 1e3
            prep = ev_start.elapsed_time(ev_prep) / 1e3
            breakdown = {"prepare": prep, "device": duration - prep}
        else:
            duration = time.perf_counter() - self.t_start
        token_list = self.tokens.tolist()
        if self.sample_idx is None:
            sampled = [[t] for t in token_list]
        else:
            sampled = [[] for _ in range(self.num_reqs)]
            for i, t in zip(self.sample_idx.tolist(), token_list):
                sampled[i] = [t]
        runner.stats.execute_seconds += duration
        return StepResult(sampled, duration, breakdown)
