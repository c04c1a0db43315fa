"""Building blocks of the paged-KV decoder and the seam where Triton kernels plug in.

A forward pass sees one *flattened* mixed batch: the new tokens of every scheduled request
laid end to end (``T`` tokens, ``R`` requests), whether they are a prefill chunk, a whole
prompt or one decode token. ``AttentionMetadata`` tells attention where each request's
queries start, how long its sequence is, and which cache blocks hold its KV.

The hot ops (RMSNorm with optional residual add, rotary embedding, KV-cache store, paged
attention, SwiGLU, and optionally the fused attention prologue: q/k norm + rotary + KV store)
are called only through the active ``KernelOps``. ``TORCH_OPS`` is the
plain-PyTorch implementation: slow but obviously correct, the model's reference;
``set_kernel_ops(triton_ops())`` swaps in the ``executor.kernels`` Triton kernels without
touching model code.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from executor.config import RopeConfig


@dataclass
class AttentionMetadata:
    """Where the tokens of a flattened batch live, per request.

    Request ``i`` owns query rows ``query_start_loc[i]:query_start_loc[i+1]``; they are
    the *last* ``query_len`` tokens of its sequence of ``seq_lens[i]`` tokens (cached
    context first, then this step's new tokens), so a query at row ``r`` of the chunk sits
    at sequence position ``seq_len - query_len + r``. ``block_tables[i, j]`` is the cache
    block holding positions ``[j*block_size, (j+1)*block_size)``; rows are padded with 0
    past ``ceil(seq_len / block_size)``. ``slot_mapping[t]`` is the flat cache slot
    (``block * block_size + offset``) that token ``t``'s new K/V is written to; a negative
    slot means "padding token, do not write" (CUDA-graph batches are padded).
    ``max_query_len`` / ``max_seq_len`` are host ints so kernels can size grids without a
    device sync.
    """

    slot_mapping: torch.Tensor  # [T] int64
    query_start_loc: torch.Tensor  # [R + 1] int32
    seq_lens: torch.Tensor  # [R] int32
    block_tables: torch.Tensor  # [R, max_blocks] int32
    max_query_len: int
    max_seq_len: int

    @classmethod
    def build(cls, num_computed_tokens: Sequence[int], num_new_tokens: Sequence[int],
              block_tables: Sequence[Sequence[int]], block_size: int,
              device: torch.device | str = "cpu") -> AttentionMetadata:
        """Metadata for requests that each compute ``num_new_tokens[i]`` tokens after
        ``num_computed_tokens[i]`` already-cached ones (the ``SchedulerOutput`` view)."""
        seq_lens = [c + n for c, n in zip(num_computed_tokens, num_new_tokens)]
        for i, (s, table) in enumerate(zip(seq_lens, block_tables)):
            if len(table) * block_size < s:
                raise ValueError(f"request {i}: {len(table)} blocks cannot hold {s} tokens")
        slots = [table[p // block_size] * block_size + p % block_size
                 for c, s, table in zip(num_computed_tokens, seq_lens, block_tables) for p in range(c, s)]
        max_blocks = max((len(t) for t in block_tables), default=0)
        padded = [list(t) + [0] * (max_blocks - len(t)) for t in block_tables]
        starts = [0]
        for n in num_new_tokens:
            starts.append(starts[-1] + n)
        return cls(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device).reshape(len(padded), max_blocks),
            max_query_len=max(num_new_tokens, default=0),
            max_seq_len=max(seq_lens, default=0),
        )


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float,
                   residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim, statistics in fp32, then scaled in the input dtype (as HF).

    With ``residual`` it first adds it (rounded to the input dtype, like HF's
    ``residual + hidden``) and returns ``(norm(x + residual), x + residual)``: the decoder
    layer's add-then-norm, one fused kernel on the GPU.
    """
    if residual is not None:
        x = x + residual
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    normed = weight * xf.to(x.dtype)
    return normed if residual is None else (normed, x)


def rotary_embedding_torch(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                           cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style (HF ``rotate_half``) RoPE. ``q`` [T, Hq, D], ``k`` [T, Hk, D], ``positions``
    [T]; ``cos``/``sin`` [max_pos, D/2] fp32. Math in fp32, rounded once to the input dtype."""
    c = cos[positions].float()[:, None, :]
    s = sin[positions].float()[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def store_kv_torch(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Write ``k``/``v`` [T, Hk, D] into the caches [num_blocks, block_size, Hk, D] at the
    flat slots of ``slot_mapping``, cast to the cache dtype; tokens with a negative slot are
    skipped."""
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[valid].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[valid].to(v_cache.dtype)


def paged_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          metadata: AttentionMetadata, scale: float,
                          sliding_window: int | None) -> torch.Tensor:
    """Attention of each request's queries over its whole sequence, read from the cache.

    The new tokens' K/V must already be stored. Gathers each request's blocks, then does
    masked softmax attention in fp32: causal within the chunk, full over cached context,
    optionally limited to the last ``sliding_window`` positions. Returns [T, Hq, D].
    """
    out = torch.zeros_like(q)
    block_size = k_cache.shape[1]
    group = q.shape[1] // k_cache.shape[2]
    starts = metadata.query_start_loc.tolist()
    for i, seq_len in enumerate(metadata.seq_lens.tolist()):
        start, end = starts[i], starts[i + 1]
        if end == start:
            continue
        blocks = metadata.block_tables[i, : math.ceil(seq_len / block_size)].long()
        k = k_cache[blocks].flatten(0, 1)[:seq_len].float().repeat_interleave(group, dim=1)
        v = v_cache[blocks].flatten(0, 1)[:seq_len].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[start:end].float(), k) * scale
        q_pos = torch.arange(seq_len - (end - start), seq_len, device=q.device)[:, None]
        k_pos = torch.arange(seq_len, device=q.device)[None, :]
        visible = k_pos <= q_pos
        if sliding_window is not None:
            visible &= k_pos > q_pos - sliding_window
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        out[start:end] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
    return out


def silu_and_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU on the fused gate/up projection output [T, 2I] -> [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@dataclass(frozen=True)
class KernelOps:
    """The hot ops a decoder layer calls; one instance is active at a time.

    Signatures (a replacement must honour them; in-place variants may return their inputs):
    ``rms_norm(x, weight, eps, residual=None) -> y | (y, x + residual)``;
    ``rotary_embedding(q, k, positions, cos, sin) -> (q, k)``;
    ``store_kv(k, v, k_cache, v_cache, slot_mapping) -> None`` (writes the caches);
    ``paged_attention(q, k_cache, v_cache, metadata, scale, sliding_window) -> out``;
    ``silu_and_mul(gate_up) -> silu(gate) * up``;
    ``qk_norm_rope_store(q, k, v, positions, cos, sin, q_weight, k_weight, eps, k_cache,
    v_cache, slot_mapping) -> (q, k)``: optional (None: the layer calls ``rms_norm`` on each
    head of q and k when it has q/k norms, then ``rotary_embedding`` and ``store_kv``); when
    set it does all of that in one call (weights None: no norm).
    """

    name: str
    rms_norm: Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]]
    rotary_embedding: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                               tuple[torch.Tensor, torch.Tensor]]
    store_kv: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
    paged_attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, float, int | None],
                              torch.Tensor]
    silu_and_mul: Callable[[torch.Tensor], torch.Tensor] = silu_and_mul_torch
    qk_norm_rope_store: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None


TORCH_OPS = KernelOps(
    name="torch",
    rms_norm=rms_norm_torch,
    rotary_embedding=rotary_embedding_torch,
    store_kv=store_kv_torch,
    paged_attention=paged_attention_torch,
    silu_and_mul=silu_and_mul_torch,
    qk_norm_rope_store=None,
)


def triton_ops() -> KernelOps:
    """The ``executor.kernels`` Triton implementations behind this module's signatures.

    Imported on demand so the torch path needs no Triton. The kernels dispatch CPU tensors
    to their own torch references, so this set also runs (slowly) in CPU tests.
    """
    from executor import kernels

    def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        metadata: AttentionMetadata, scale: float,
                        sliding_window: int | None) -> torch.Tensor:
        if sliding_window is not None:
            raise NotImplementedError("the Triton paged-attention kernel has no sliding window; "
                                      "use the torch kernel ops for sliding-window models")
        return kernels.paged_attention(q, k_cache, v_cache, metadata.query_start_loc, metadata.seq_lens,
                                       metadata.block_tables, scale, max_query_len=metadata.max_query_len,
                                       max_seq_len=metadata.max_seq_len)

    return KernelOps(name="triton", rms_norm=kernels.rms_norm, rotary_embedding=kernels.apply_rotary,
                     store_kv=kernels.store_kv, paged_attention=paged_attention,
                     silu_and_mul=kernels.silu_mul, qk_norm_rope_store=kernels.qk_norm_rope_store)


_active_ops: KernelOps = TORCH_OPS


def set_kernel_ops(ops: KernelOps) -> KernelOps:
    """Route every layer's hot ops through ``ops``; returns the previous set so callers
    (tests, benchmarks comparing backends) can restore it."""
    global _active_ops
    previous, _active_ops = _active_ops, ops
    return previous


def get_kernel_ops() -> KernelOps:
    return _active_ops


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor,
                residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``norm(x)``, or ``(norm(x + residual), x + residual)`` when given a residual."""
        return _active_ops.rms_norm(x, self.weight, self.eps, residual)


class RotaryEmbedding(nn.Module):
    """Holds fp32 cos/sin tables [max_position_embeddings, head_dim / 2].

    They are computed with transformers' fp32 formula, so positions match HF exactly, and
    stay fp32 whatever the model dtype (the rotation rounds once, to the activations' dtype).
    They are non-persistent buffers: they move with ``.to(device)`` but are not weights.
    """

    cos_cache: torch.Tensor
    sin_cache: torch.Tensor

    def __init__(self, head_dim: int, max_position_embeddings: int, rope: RopeConfig) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        self.rope = rope
        self.register_buffer("cos_cache", torch.empty(max_position_embeddings, head_dim // 2), persistent=False)
        self.register_buffer("sin_cache", torch.empty(max_position_embeddings, head_dim // 2), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re)compute the tables in fp32 on the buffers' device; the loader calls this after
        ``to_empty`` materializes a meta-device model (and after its dtype cast)."""
        device = self.cos_cache.device
        if device.type == "meta":
            return
        inv_freq = self.rope.inv_freq(self.head_dim)
        freqs = torch.arange(self.max_position_embeddings, dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.cos_cache = freqs.cos().to(device)
        self.sin_cache = freqs.sin().to(device)

    def forward(self, positions: torch.Tensor, q: torch.Tensor,
                k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _active_ops.rotary_embedding(q, k, positions, self.cos_cache, self.sin_cache)


class PagedAttention(nn.Module):
    """Stores this step's K/V into the layer's paged cache, then attends over the cache.

    The cache is not a parameter or buffer: the model runner allocates it (its size comes
    from free-memory profiling) and binds it with ``kv_cache = (k_cache, v_cache)``, each
    [num_blocks, block_size, num_kv_heads, head_dim].
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int,
                 sliding_window: int | None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.sliding_window = sliding_window
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def bound_cache(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kv_cache is None:
            raise RuntimeError("no KV cache bound: call model.bind_kv_cache(...) before forward")
        return self.kv_cache

    def forward(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                metadata: AttentionMetadata, kv_stored: bool = False) -> torch.Tensor:
        """``q`` [T, Hq, D], ``k``/``v`` [T, Hk, D] -> [T, Hq, D]. ``kv_stored``: this step's
        K/V are already in the cache (written by the fused prologue); k/v are not used."""
        k_cache, v_cache = self.bound_cache()
        if not kv_stored:
            _active_ops.store_kv(k, v, k_cache, v_cache, metadata.slot_mapping)
        return _active_ops.paged_attention(q, k_cache, v_cache, metadata, self.scale, self.sliding_window)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU on the fused gate/up projection output [T, 2I] -> [T, I], through the active
    kernel ops (one fused kernel on the GPU)."""
    return _active_ops.silu_and_mul(gate_up)
