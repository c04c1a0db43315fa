"""Paged attention for a whole mixed batch (prefill chunks and decodes) in one launch.

Layout (vLLM-style "unified" attention): ``q`` is ``[num_tokens, num_heads, head_dim]``,
the new tokens of all requests back to back (request ``r`` owns rows
``query_start_loc[r]:query_start_loc[r+1]``); keys and values live in the paged cache
``[num_blocks, block_size, num_kv_heads, head_dim]``, reached through ``block_tables[r]``;
``seq_lens[r]`` counts the request's cached context plus its new tokens, so new token ``j``
sits at position ``seq_lens[r] - q_len + j`` and attends causally to positions up to its own.
A decode, a prefill chunk over a prefix-cached context, and a fresh prefill are then the
same case and share one kernel.

Work split: one program per (query block, kv head, split). A query block is ``BLOCK_Q``
consecutive new tokens of one request times the ``num_heads // num_kv_heads`` query heads
that share the kv head (GQA), tiled together as the ``BLOCK_M`` rows of the matmuls, so a
K/V tile is loaded once per group and a decode with 8 q heads per kv head still fills the
16 rows a tensor-core dot needs. The grid is sized from tensor shapes alone (request ``r``'s
query blocks start at ``query_start_loc[r] // BLOCK_Q + r``, which is enough room for any
length; each program finds its request by binary search), so launching needs no
host-device sync and can be captured in a CUDA graph.

Split-K ("flash decoding"): when the launch has too few programs to fill the GPU and the
contexts are long, each program's key range is cut into ``num_splits`` contiguous parts
handled by separate programs, which write unnormalised partial results (running max,
sum of exponentials, weighted values); a second small kernel merges them with the
log-sum-exp rule. ``choose_num_splits`` documents the heuristic; ``num_splits=`` forces
a path.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from executor.kernels._dispatch import TRITON_INTERPRET, use_triton
from executor.kernels.reference import paged_attention_ref

# A split should cover at least this many keys: fewer and the partials it writes and the
# merge it needs cost more than the parallelism it buys.
MIN_KEYS_PER_SPLIT = 256
MAX_SPLITS = 32
# Split-K aims at this many programs per SM: each program walks its keys serially with
# latency-bound gathers, so on H100 decode keeps speeding up until ~8 programs share an SM.
PROGRAMS_PER_SM = 8
LOG2E = 1.4426950408889634


@triton.jit
def _find_request(query_start_loc_ptr, q_block, num_reqs, BLOCK_Q: tl.constexpr):
    """The request whose query blocks contain global block ``q_block`` (binary search)."""
    lo: tl.int32 = 0
    hi = num_reqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_block = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_block <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit(do_not_specialize=["num_reqs"])
def _paged_attention_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr,
    part_acc_ptr, part_max_ptr, part_sum_ptr,
    query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
    num_reqs, scale_log2,
    stride_q_t, stride_q_h, stride_o_t, stride_o_h,
    stride_k_b, stride_k_s, stride_k_h, stride_v_b, stride_v_s, stride_v_h,
    stride_bt,
    QUERIES_PER_KV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
    TILE_N: tl.constexpr, NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr, KV_CONVERT: tl.constexpr, KV_F16: tl.constexpr,
):
    """Online-softmax attention of one query block (all q heads of one kv head) over one
    split of its causal key range. Scores are kept in log2 units (``scale_log2`` folds
    log2(e) into the softmax scale) so the exponentials are ``exp2``. ``UPCAST_DOT`` feeds
    the dots exact fp32 copies of bf16 operands: Triton's CPU interpreter multiplies bf16
    as raw uint16 bits; on the GPU it is off. ``KV_CONVERT``: the cache holds another dtype
    than q (an fp8 KV cache): K and V tiles are converted as they are loaded, to fp16 when
    ``KV_F16`` (e4m3 -> fp16 is one native conversion per pair on Hopper, e4m3 -> bf16 is
    not; q and p are rounded to fp16 for the dots, which bf16 inputs lose nothing to) and to
    q's dtype otherwise."""
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * QUERIES_PER_KV

    req = _find_request(query_start_loc_ptr, q_block, num_reqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    q_block_local = q_block - (q_start // BLOCK_Q + req)
    if q_block_local * BLOCK_Q >= q_len:
        return  # a spare block of the over-sized grid
    seq_len = tl.load(seq_lens_ptr + req)
    context_len = seq_len - q_len

    # Row m is new token q_pos (within the request) and query head `head`.
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_P)
    offs_n = tl.arange(0, TILE_N)
    q_pos = q_block_local * BLOCK_Q + offs_m // QUERIES_PER_KV
    head = kv_head * QUERIES_PER_KV + offs_m % QUERIES_PER_KV
    row_valid = (offs_m < BLOCK_Q * QUERIES_PER_KV) & (q_pos < q_len)
    d_valid = offs_d < HEAD_DIM
    token = (q_start + q_pos).to(tl.int64)
    q = tl.load(q_ptr + token[:, None] * stride_q_t + head[:, None] * stride_q_h
                + offs_d[None, :], mask=row_valid[:, None] & d_valid[None, :], other=0.0)
    if KV_F16:
        q = q.to(tl.float16)
    if UPCAST_DOT:
        q = q.to(tl.float32)
    last_key = context_len + q_pos  # causal limit of each row

    # Keys visible to this block: up to the causal limit of its last token; this split
    # takes an equal share of those tiles (possibly none).
    kv_len = context_len + tl.minimum((q_block_local + 1) * BLOCK_Q, q_len)
    num_tiles = tl.cdiv(kv_len, TILE_N)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], tl.float32)
    block_table = block_tables_ptr + req.to(tl.int64) * stride_bt
    for tile in range(tile_lo, tile_hi):
        kv_pos = tile * TILE_N + offs_n
        kv_valid = kv_pos < kv_len
        block = tl.load(block_table + kv_pos // BLOCK_SIZE, mask=kv_valid, other=0).to(tl.int64)
        slot = kv_pos % BLOCK_SIZE
        k = tl.load(k_cache_ptr + block[None, :] * stride_k_b + slot[None, :] * stride_k_s
                    + kv_head * stride_k_h + offs_d[:, None],
                    mask=kv_valid[None, :] & d_valid[:, None], other=0.0)
        if KV_F16:
            k = k.to(tl.float16)
        elif KV_CONVERT:
            k = k.to(q_ptr.dtype.element_ty)
        if UPCAST_DOT:
            k = k.to(tl.float32)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2
        visible = row_valid[:, None] & (kv_pos[None, :] <= last_key[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row with nothing visible yet keeps max -inf; subtract 0 instead to avoid NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        v = tl.load(v_cache_ptr + block[:, None] * stride_v_b + slot[:, None] * stride_v_s
                    + kv_head * stride_v_h + offs_d[None, :],
                    mask=kv_valid[:, None] & d_valid[None, :], other=0.0)
        if KV_F16:
            v = v.to(tl.float16)
            p_dot = p.to(tl.float16)
        else:
            if KV_CONVERT:
                v = v.to(q_ptr.dtype.element_ty)
            p_dot = p.to(q_ptr.dtype.element_ty)
        if UPCAST_DOT:
            p_dot = p_dot.to(tl.float32)
            v = v.to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p_dot, v, input_precision=DOT_PRECISION)
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # padding rows have l_i == 0
        tl.store(out_ptr + token[:, None] * stride_o_t + head[:, None] * stride_o_h
                 + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_valid[:, None] & d_valid[None, :])
    else:
        # Every split writes its partials, even an empty one (max -inf, sum 0), so the
        # merge never reads uninitialised memory for a real token.
        part = (token * num_heads + head) * NUM_SPLITS + split
        tl.store(part_max_ptr + part, m_i, mask=row_valid)
        tl.store(part_sum_ptr + part, l_i, mask=row_valid)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM_P + offs_d[None, :], acc,
                 mask=row_valid[:, None])


@triton.jit(do_not_specialize=["num_reqs"])
def _merge_splits_kernel(out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
                         query_start_loc_ptr, num_reqs, stride_o_t, stride_o_h,
                         HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
                         NUM_SPLITS: tl.constexpr):
    """One program per (token, head): rescale each split by 2^(max_split - max_all) and
    normalise by the rescaled sum of exponentials. Padding rows, whose partials were
    never written, are skipped."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    if token >= tl.load(query_start_loc_ptr + num_reqs):
        return
    part = (token * tl.num_programs(1) + head) * NUM_SPLITS + tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, HEAD_DIM_P)
    m = tl.load(part_max_ptr + part)
    l = tl.load(part_sum_ptr + part)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM_P + offs_d[None, :])
    m_all = tl.max(m, axis=0)
    w = tl.exp2(m - m_all)  # empty splits (-inf) weigh 0
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(out_ptr + token * stride_o_t + head * stride_o_h + offs_d,
             out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 for the CPU interpreter)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(num_q_blocks: int, num_kv_heads: int, max_seq_len: int,
                      num_sms: int) -> int:
    """How many key-range splits per program: 1 disables split-K.

    Without splits the launch has ``num_q_blocks * num_kv_heads`` programs, each walking
    its whole context serially. Split only when that is fewer programs than SMs (a small
    batch: a few decodes, or a short chunk over a long context) and the longest context
    has at least ``2 * MIN_KEYS_PER_SPLIT`` keys. Then aim for ``PROGRAMS_PER_SM`` programs
    per SM, giving each split at least ``MIN_KEYS_PER_SPLIT`` keys of the longest context,
    at most ``MAX_SPLITS`` splits, rounded down to a power of two (the merge kernel's
    tile). On an H100 (graph-timed, Llama-3-8B heads, bf16 KV) this took one decode of
    32k context from 987 us to 57 us and 16 decodes of 4k from 157 us to 104 us, and
    stayed within about 10% of the best forced split count for 1 to 64 decodes. All
    inputs are host ints, so the choice costs no sync and is fixed for a captured graph:
    capture with the largest ``max_seq_len`` the graph will replay.
    """
    programs = num_q_blocks * num_kv_heads
    if programs >= num_sms or max_seq_len < 2 * MIN_KEYS_PER_SPLIT:
        return 1
    splits = min(MAX_SPLITS, triton.cdiv(PROGRAMS_PER_SM * num_sms, programs),
                 max_seq_len // MIN_KEYS_PER_SPLIT)
    return 1 << (splits.bit_length() - 1)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                    block_tables: torch.Tensor, scale: float, *, max_query_len: int,
                    max_seq_len: int, num_splits: int | None = None,
                    out: torch.Tensor | None = None, tile_n: int | None = None) -> torch.Tensor:
    """Causal paged attention of a mixed batch; returns ``[num_tokens, num_heads, head_dim]``.

    ``query_start_loc`` int32 ``[num_reqs + 1]`` (cumulative new-token counts),
    ``seq_lens`` int32 ``[num_reqs]`` (context + new tokens), ``block_tables`` int32
    ``[num_reqs, max_blocks_per_req]`` (padded). ``max_query_len`` and ``max_seq_len`` are
    host-side bounds (the caller knows them; reading them from the tensors would sync) that
    pick the tile shape and the split-K path. ``num_splits`` forces the number of key-range
    splits (1 = no split-K, otherwise a power of two); None lets ``choose_num_splits``
    decide. ``out`` may be a preallocated output (e.g. a CUDA-graph buffer). ``tile_n``
    forces the number of keys per tile (a power of two >= 16; a benchmarking knob). Rows past
    ``query_start_loc[-1]`` (batch padding) are not written. Accumulation is fp32;
    fp32 inputs use full-precision (non-TF32) dots.
    """
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert num_splits is None or (num_splits >= 1 and num_splits & (num_splits - 1) == 0)
    if not use_triton(q):
        result = paged_attention_ref(q, k_cache, v_cache, query_start_loc, seq_lens,
                                     block_tables, scale)
        if out is None:
            return result
        num_real = int(query_start_loc[-1])
        out[:num_real] = result[:num_real]
        return out
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_reqs = seq_lens.shape[0]
    queries_per_kv = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    if num_tokens == 0 or num_reqs == 0:
        return out

    # Decode-like batches take the smallest row tile a dot allows (16 rows); batches with
    # longer query runs take 64 rows so each K/V tile serves more query tokens. Tile
    # sizes and the 2-stage pipeline were the fastest of a sweep on H100.
    min_rows = 16 if max_query_len * queries_per_kv <= 16 else 64
    block_m = max(min_rows, triton.next_power_of_2(queries_per_kv))
    block_q = block_m // queries_per_kv
    head_dim_p = triton.next_power_of_2(head_dim)
    if tile_n is None:
        # 64 keys a tile (32 past head_dim 128); 128 for a 1-byte (fp8) cache, whose tiles
        # carry half the bytes (H100, batch 64 x 4096: 75 % of bandwidth vs 63 % at 64).
        tile_n = (128 if k_cache.element_size() == 1 else 64) if head_dim_p <= 128 else 32
    elif tile_n < 16 or tile_n & (tile_n - 1):
        raise ValueError(f"tile_n must be a power of two >= 16, got {tile_n}")
    grid_q_blocks = num_tokens // block_q + num_reqs
    upcast_dot = TRITON_INTERPRET and q.dtype == torch.bfloat16
    if num_splits is None:
        num_splits = choose_num_splits(max(num_reqs, triton.cdiv(num_tokens, block_q)),
                                       num_kv_heads, max_seq_len, _num_sms(q.device))

    if num_splits == 1:
        part_acc = part_max = part_sum = out  # unused: NUM_SPLITS == 1 writes `out`
    else:
        part_max = torch.empty(num_tokens, num_heads, num_splits, dtype=torch.float32,
                               device=q.device)
        part_sum = torch.empty_like(part_max)
        part_acc = torch.empty(num_tokens, num_heads, num_splits, head_dim_p,
                               dtype=torch.float32, device=q.device)
    _paged_attention_kernel[(grid_q_blocks, num_kv_heads, num_splits)](
        out, q, k_cache, v_cache, part_acc, part_max, part_sum,
        query_start_loc, seq_lens, block_tables,
        num_reqs, scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        QUERIES_PER_KV=queries_per_kv, HEAD_DIM=head_dim, HEAD_DIM_P=head_dim_p,
        BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_Q=block_q, TILE_N=tile_n,
        NUM_SPLITS=num_splits,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 or upcast_dot else "tf32",
        UPCAST_DOT=upcast_dot, KV_CONVERT=k_cache.dtype != q.dtype,
        KV_F16=k_cache.element_size() == 1 and q.dtype in (torch.bfloat16, torch.float16) and not upcast_dot,
        num_warps=4, num_stages=2,
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](
            out, part_acc, part_max, part_sum, query_start_loc, num_reqs,
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_P=head_dim_p, NUM_SPLITS=num_splits,
        )
    return out
