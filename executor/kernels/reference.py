"""Pure-torch references for every kernel in this package.

They define what the kernels compute: the tests compare each Triton kernel with its
reference, and the kernels' dispatchers run the reference for CPU tensors. They favour
clarity over speed (per-request Python loops, host syncs) and are never used on the GPU
path.
"""
from __future__ import annotations

import torch


def store_kv_ref(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write ``key[t]``/``value[t]`` to cache slot ``slot_mapping[t]``; slot -1 skips token t."""
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = key[keep].to(k_cache.dtype)
    v_cache[blocks, offsets] = value[keep].to(v_cache.dtype)


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                        block_tables: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of each request's new tokens over its paged context, in fp32.

    Request ``r`` owns query rows ``query_start_loc[r]:query_start_loc[r+1]``; its keys are
    positions ``0 .. seq_lens[r]-1`` gathered through ``block_tables[r]``, and its query
    row ``j`` sits at position ``seq_lens[r] - q_len + j``. Rows past
    ``query_start_loc[-1]`` (batch padding) are left unspecified.
    """
    num_heads = q.shape[1]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for r, seq_len in enumerate(lens):
        begin, end = starts[r], starts[r + 1]
        q_len = end - begin
        if q_len == 0:
            continue
        num_blocks = -(-seq_len // block_size)
        blocks = block_tables[r, :num_blocks].long()
        k = k_cache[blocks].flatten(0, 1)[:seq_len].float()
        v = v_cache[blocks].flatten(0, 1)[:seq_len].float()
        k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)
        v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[begin:end].float(), k) * scale
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        allowed = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        out[begin:end] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
    return out


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None
                 ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """HF Llama's RMSNorm over the last dim, with the decoder layer's residual add first.

    With ``residual``, returns ``(norm(x + residual), x + residual)``, the sum rounded to the
    input dtype before the norm as HF's ``residual + hidden_states`` does.
    """
    if residual is not None:
        x = x + residual
    input_dtype = x.dtype
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    normed = weight * hidden.to(input_dtype)
    return normed if residual is None else (normed, x)


def rotary_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style (HF ``rotate_half``) rotary embedding of ``q`` and ``k`` in place.

    Computes in fp32 and rounds once to the input dtype (HF rounds cos/sin and each product
    to the model dtype; the difference is within one rounding of that dtype).
    """
    c = cos[positions].float()[:, None, :]
    s = sin[positions].float()[:, None, :]
    for x in (q, k):
        x1, x2 = x.float().chunk(2, dim=-1)
        x.copy_(torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1))
    return q, k


def silu_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU on a fused gate/up output ``[..., 2I]``: ``silu(gate) * up`` (HF's
    ``act_fn(gate_proj(x)) * up_proj(x)``, with its roundings in the input dtype)."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def qk_norm_rope_store_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
                           eps: float, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused attention prologue: per-head RMSNorm of q and k (Qwen3; skipped without
    weights), rotary embedding, then the KV-cache store of the rotated k and of v.

    The norms return new tensors (as the model's ``q_norm``/``k_norm`` modules do); the
    rotation then works in place on those (or on ``q``/``k`` themselves without norm).
    """
    if q_weight is not None:
        q, k = rms_norm_ref(q, q_weight, eps), rms_norm_ref(k, k_weight, eps)
    q, k = rotary_ref(q, k, positions, cos, sin)
    store_kv_ref(k, v, k_cache, v_cache, slot_mapping)
    return q, k
