"""Tests of the executor's Triton kernels against their torch references.

Two layers: the references are checked against independent formulations (dense SDPA,
HF transformers), then each Triton kernel is checked against its reference
(``TestTritonPath``). The Triton tests need the kernels' Triton code to run: on CUDA they
do directly; without a GPU, ``test_triton_path_in_interpreter`` reruns the class in a
subprocess with ``TRITON_INTERPRET=1`` (which must be set before the kernels are
decorated, i.e. before import, so it cannot be switched on inside this process).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from executor.kernels import (  # noqa: E402
    apply_rotary,
    choose_num_splits,
    paged_attention,
    qk_norm_rope_store,
    rms_norm,
    rope_cos_sin_cache,
    rope_inv_freq,
    silu_mul,
    store_kv,
)
from executor.kernels import reference as ref  # noqa: E402
from executor.kernels._dispatch import TRITON_INTERPRET  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RUNS_TRITON = DEVICE == "cuda" or TRITON_INTERPRET
REPO_ROOT = Path(__file__).resolve().parents[2]
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def make_attention_batch(q_lens: list[int], seq_lens: list[int], *, block_size: int,
                         num_kv_heads: int, queries_per_kv: int, head_dim: int,
                         dtype: torch.dtype, pad_tokens: int = 0, seed: int = 0
                         ) -> dict[str, torch.Tensor]:
    """Random q and caches with each request's blocks scattered over the pool; block-table
    padding holds an out-of-range id so any unmasked read of it would fault."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_req = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_req) + 2
    perm = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.full((len(q_lens), max(blocks_per_req) + 1), 10**6, dtype=torch.int32)
    used = 0
    for r, n in enumerate(blocks_per_req):
        block_tables[r, :n] = perm[used:used + n]
        used += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    num_tokens = sum(q_lens) + pad_tokens
    batch = {
        "q": torch.randn(num_tokens, num_kv_heads * queries_per_kv, head_dim, generator=gen),
        "k_cache": torch.randn(shape, generator=gen),
        "v_cache": torch.randn(shape, generator=gen),
    }
    batch = {name: t.to(dtype) for name, t in batch.items()}
    batch["query_start_loc"] = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()],
                                            dtype=torch.int32)
    batch["seq_lens"] = torch.tensor(seq_lens, dtype=torch.int32)
    batch["block_tables"] = block_tables
    return {name: t.to(DEVICE) for name, t in batch.items()}


def run_attention(batch: dict[str, torch.Tensor], **kwargs: int | None) -> torch.Tensor:
    q_lens = batch["query_start_loc"].diff()
    return paged_attention(
        batch["q"], batch["k_cache"], batch["v_cache"], batch["query_start_loc"],
        batch["seq_lens"], batch["block_tables"], batch["q"].shape[-1] ** -0.5,
        max_query_len=int(q_lens.max()), max_seq_len=int(batch["seq_lens"].max()), **kwargs)


def reference_attention(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return ref.paged_attention_ref(
        batch["q"], batch["k_cache"], batch["v_cache"], batch["query_start_loc"],
        batch["seq_lens"], batch["block_tables"], batch["q"].shape[-1] ** -0.5)


# ---------------------------------------------------------------- references vs. independent


def test_paged_attention_reference_matches_dense_sdpa() -> None:
    """Paging + causal offset + GQA of the reference agree with SDPA on contiguous K/V."""
    torch.manual_seed(0)
    block_size, kv_heads, qpk, head_dim = 16, 2, 4, 32
    q_lens, contexts = [1, 7, 5], [40, 9, 0]
    k_cache = torch.zeros(12, block_size, kv_heads, head_dim)
    v_cache = torch.zeros_like(k_cache)
    block_tables = torch.tensor([[5, 0, 9], [3, 11, 0], [7, 0, 0]], dtype=torch.int32)
    qs, outs = [], []
    for r, (q_len, ctx) in enumerate(zip(q_lens, contexts)):
        seq_len = ctx + q_len
        k, v = torch.randn(2, seq_len, kv_heads, head_dim)
        q = torch.randn(q_len, kv_heads * qpk, head_dim)
        pos = torch.arange(seq_len)
        slots = block_tables[r, pos // block_size].long() * block_size + pos % block_size
        ref.store_kv_ref(k, v, k_cache, v_cache, slots)
        mask = pos[None, :] <= (ctx + torch.arange(q_len))[:, None]
        dense = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), k.repeat_interleave(qpk, 1).transpose(0, 1),
            v.repeat_interleave(qpk, 1).transpose(0, 1), attn_mask=mask, scale=0.3)
        qs.append(q)
        outs.append(dense.transpose(0, 1))
    query_start_loc = torch.tensor([0, 1, 8, 13], dtype=torch.int32)
    seq_lens = torch.tensor([c + n for c, n in zip(contexts, q_lens)], dtype=torch.int32)
    got = ref.paged_attention_ref(torch.cat(qs), k_cache, v_cache, query_start_loc, seq_lens,
                                  block_tables, 0.3)
    torch.testing.assert_close(got, torch.cat(outs), atol=1e-5, rtol=1e-5)


def test_store_kv_reference_skips_negative_slots() -> None:
    k_cache = torch.zeros(3, 4, 1, 2)
    v_cache = torch.zeros_like(k_cache)
    key = torch.arange(6.0).view(3, 1, 2)
    ref.store_kv_ref(key, -key, k_cache, v_cache, torch.tensor([5, -1, 0]))
    assert torch.equal(k_cache[1, 1], key[0]) and torch.equal(k_cache[0, 0], key[2])
    assert torch.equal(v_cache[1, 1], -key[0])
    assert k_cache.count_nonzero() == 3  # key[0] holds a zero; key[1] was skipped


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_reference_matches_hf(dtype: torch.dtype) -> None:
    modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    hf = modeling_llama.LlamaRMSNorm(48, eps=1e-6).to(dtype)
    with torch.no_grad():
        hf.weight.normal_()
    x, residual = torch.randn(2, 5, 48, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(ref.rms_norm_ref(x, hf.weight, 1e-6), hf(x))
        normed, new_residual = ref.rms_norm_ref(x, hf.weight, 1e-6, residual)
        assert torch.equal(new_residual, residual + x)
        assert torch.equal(normed, hf(residual + x))


@pytest.mark.parametrize("rope_scaling", [None, LLAMA3_SCALING])
def test_rope_cache_matches_hf(rope_scaling: dict | None) -> None:
    transformers = pytest.importorskip("transformers")
    modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    config = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=64,
                                      rope_theta=500000.0, rope_scaling=rope_scaling,
                                      max_position_embeddings=131072)
    hf = modeling_llama.LlamaRotaryEmbedding(config)
    assert torch.equal(rope_inv_freq(64, 500000.0, rope_scaling), hf.inv_freq)
    positions = torch.tensor([[0, 1, 17, 4095, 9000, 100000]])
    hf_cos, hf_sin = hf(torch.zeros(1, dtype=torch.float32), positions)
    cos, sin = rope_cos_sin_cache(64, 100001, 500000.0, rope_scaling)
    assert torch.equal(cos[positions[0]], hf_cos[0, :, :32])
    assert torch.equal(sin[positions[0]], hf_sin[0, :, :32])


def test_rope_rejects_unsupported_scaling() -> None:
    with pytest.raises(NotImplementedError):
        rope_inv_freq(64, 10000.0, {"rope_type": "yarn", "factor": 4.0})


def test_rotary_reference_matches_hf() -> None:
    modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    q, k = torch.randn(5, 4, 64), torch.randn(5, 2, 64)
    positions = torch.tensor([0, 3, 16, 17, 200])
    cos, sin = rope_cos_sin_cache(64, 256, 10000.0)
    full_cos = torch.cat([cos, cos], dim=-1)[positions]
    full_sin = torch.cat([sin, sin], dim=-1)[positions]
    hf_q, hf_k = modeling_llama.apply_rotary_pos_emb(q, k, full_cos, full_sin, unsqueeze_dim=1)
    got_q, got_k = ref.rotary_ref(q.clone(), k.clone(), positions, cos, sin)
    torch.testing.assert_close(got_q, hf_q, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_k, hf_k, atol=1e-6, rtol=1e-6)


def test_silu_mul_reference_matches_hf_mlp_activation() -> None:
    """HF's ``act_fn(gate_proj(x)) * up_proj(x)`` on the two halves of the fused output."""
    activations = pytest.importorskip("transformers.activations")
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 2, 2 * 40, dtype=dtype)
        expected = activations.ACT2FN["silu"](x[..., :40]) * x[..., 40:]
        assert torch.equal(ref.silu_mul_ref(x), expected)


def test_qk_norm_rope_store_reference_matches_hf_qwen3() -> None:
    """Per-head q/k RMSNorm then HF's rotary, as Qwen3's attention does; k/v land in the
    cache at their slots (slot -1 skipped)."""
    qwen3 = pytest.importorskip("transformers.models.qwen3.modeling_qwen3")
    tokens, heads, kv_heads, head_dim, block_size = 5, 4, 2, 64, 4
    q, k, v = torch.randn(tokens, heads, head_dim), *torch.randn(2, tokens, kv_heads, head_dim)
    q_norm, k_norm = qwen3.Qwen3RMSNorm(head_dim, eps=1e-6), qwen3.Qwen3RMSNorm(head_dim, eps=1e-6)
    with torch.no_grad():
        q_norm.weight.normal_()
        k_norm.weight.normal_()
    positions = torch.tensor([0, 3, 16, 17, 200])
    cos, sin = rope_cos_sin_cache(head_dim, 256, 1000000.0)
    full_cos = torch.cat([cos, cos], dim=-1)[positions]
    full_sin = torch.cat([sin, sin], dim=-1)[positions]
    with torch.no_grad():
        hf_q, hf_k = qwen3.apply_rotary_pos_emb(q_norm(q), k_norm(k), full_cos, full_sin, unsqueeze_dim=1)
    k_cache = torch.zeros(3, block_size, kv_heads, head_dim)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([0, 5, -1, 11, 2])
    got_q, got_k = ref.qk_norm_rope_store_ref(q.clone(), k.clone(), v, positions, cos, sin,
                                              q_norm.weight.detach(), k_norm.weight.detach(),
                                              1e-6, k_cache, v_cache, slots)
    torch.testing.assert_close(got_q, hf_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_k, hf_k, atol=1e-5, rtol=1e-5)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(k_cache[slot // block_size, slot % block_size], got_k[t])
            assert torch.equal(v_cache[slot // block_size, slot % block_size], v[t])
    assert k_cache.abs().sum(-1).count_nonzero() == 4 * kv_heads  # the skipped token wrote nothing


def test_choose_num_splits() -> None:
    # A few long decodes leave most SMs idle: split, power of two, >= 256 keys per split.
    assert choose_num_splits(8, 8, 8192, num_sms=132) == 16
    assert choose_num_splits(1, 8, 100_000, num_sms=132) == 32
    assert choose_num_splits(2, 1, 1024, num_sms=132) == 4
    # Enough programs, or contexts too short to share: one pass.
    assert choose_num_splits(64, 8, 8192, num_sms=132) == 1
    assert choose_num_splits(1, 8, 511, num_sms=132) == 1


# ---------------------------------------------------------------- Triton kernels vs. references


@pytest.mark.skipif(RUNS_TRITON, reason="this process runs the Triton path itself")
def test_triton_path_in_interpreter() -> None:
    """Run TestTritonPath under the Triton CPU interpreter in a fresh process."""
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", f"{__file__}::TestTritonPath", "-o", "addopts=",
         "-p", "no:cacheprovider", "-W", "error::RuntimeWarning"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and " skipped" not in proc.stdout, proc.stdout[-2000:]


@pytest.mark.skipif(not RUNS_TRITON,
                    reason="no GPU: runs in the interpreter via test_triton_path_in_interpreter")
class TestTritonPath:
    """Each kernel against its reference on the device (or the interpreter)."""

    @pytest.mark.parametrize("block_size", [16, 32])
    @pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
    def test_store_kv(self, block_size: int, slot_dtype: torch.dtype) -> None:
        num_blocks, kv_heads, head_dim = 4, 2, 64
        # key/value are views of a fused QKV row, as the model produces them.
        qkv = torch.randn(6, 4 * kv_heads * head_dim, dtype=torch.bfloat16, device=DEVICE)
        key = qkv[:, 2 * kv_heads * head_dim:3 * kv_heads * head_dim].view(6, kv_heads, head_dim)
        value = qkv[:, 3 * kv_heads * head_dim:].view(6, kv_heads, head_dim)
        slots = torch.tensor([0, block_size - 1, block_size, -1, 3 * block_size + 5, -1],
                             dtype=slot_dtype, device=DEVICE)
        caches = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, device=DEVICE)
        expected = caches.clone()
        store_kv(key, value, caches[0], caches[1], slots)
        ref.store_kv_ref(key, value, expected[0], expected[1], slots)
        assert torch.equal(caches, expected)

    @pytest.mark.parametrize(
        "block_size,kv_heads,queries_per_kv,head_dim,dtype,num_splits", [
            (16, 2, 1, 64, torch.float32, 1),
            (16, 1, 4, 128, torch.float32, 4),
            (32, 1, 8, 64, torch.bfloat16, 1),
            (32, 2, 4, 64, torch.float16, 2),
            (16, 1, 8, 128, torch.bfloat16, 8),
            (32, 1, 7, 64, torch.float32, 2),   # Qwen2-7B's 28/4 heads: a non-power-of-2 group
            (16, 1, 2, 256, torch.float32, 1),
            (16, 1, 2, 96, torch.bfloat16, 2),  # head_dim padded to 128 inside the kernel
        ])
    def test_paged_attention_mixed_batch(self, block_size: int, kv_heads: int,
                                         queries_per_kv: int, head_dim: int,
                                         dtype: torch.dtype, num_splits: int) -> None:
        """Decode across a block boundary, a decode at one, a chunk over a cached prefix, a
        fresh prefill and an empty padding request, with padding token rows, one launch."""
        q_lens = [1, 20, 9, 0, 1]
        seq_lens = [2 * block_size + 1, block_size + 5 + 20, 9, 0, block_size]
        batch = make_attention_batch(q_lens, seq_lens, block_size=block_size,
                                     num_kv_heads=kv_heads, queries_per_kv=queries_per_kv,
                                     head_dim=head_dim, dtype=dtype, pad_tokens=3)
        out = torch.full_like(batch["q"], float("nan"))
        got = run_attention(batch, num_splits=num_splits, out=out)
        assert got is out
        real = sum(q_lens)
        torch.testing.assert_close(got[:real], reference_attention(batch)[:real],
                                   atol=TOL[dtype], rtol=TOL[dtype])
        assert got[real:].isnan().all()  # padding rows are not written

    @pytest.mark.parametrize("num_splits", [1, 8])
    def test_paged_attention_long_decode(self, num_splits: int) -> None:
        """Decode-only batch where splits cover many tiles, one key, or nothing at all."""
        batch = make_attention_batch([1, 1, 1], [600, 37, 1], block_size=16, num_kv_heads=2,
                                     queries_per_kv=4, head_dim=64, dtype=torch.bfloat16)
        torch.testing.assert_close(run_attention(batch, num_splits=num_splits),
                                   reference_attention(batch), atol=2e-2, rtol=2e-2)

    @pytest.mark.parametrize("dtype,num_splits", [(torch.bfloat16, 1), (torch.bfloat16, 4), (torch.float32, 2)])
    def test_paged_attention_fp8_kv_cache(self, dtype: torch.dtype, num_splits: int) -> None:
        """An fp8 (e4m3) KV cache: the kernel converts K/V tiles to q's dtype on load and
        must equal the reference on the same fp8 values; fp8 rounding itself stays within
        a few percent of the unquantized result."""
        batch = make_attention_batch([1, 17, 1], [40, 17 + 33, 300], block_size=16, num_kv_heads=2,
                                     queries_per_kv=4, head_dim=64, dtype=dtype)
        exact = reference_attention(batch)
        fp8 = dict(batch, k_cache=batch["k_cache"].to(torch.float8_e4m3fn),
                   v_cache=batch["v_cache"].to(torch.float8_e4m3fn))
        got = run_attention(fp8, num_splits=num_splits)
        torch.testing.assert_close(got, reference_attention(fp8), atol=TOL[dtype], rtol=TOL[dtype])
        assert (got.float() - exact.float()).abs().mean() < 0.05 * exact.float().abs().mean()

    def test_store_kv_into_fp8_cache(self) -> None:
        key = torch.randn(5, 2, 64, dtype=torch.bfloat16, device=DEVICE)
        value = torch.randn(5, 2, 64, dtype=torch.bfloat16, device=DEVICE)
        k_cache = torch.zeros(4, 16, 2, 64, dtype=torch.float8_e4m3fn, device=DEVICE)
        v_cache = torch.zeros_like(k_cache)
        slots = torch.tensor([3, 17, -1, 40, 63], dtype=torch.int32, device=DEVICE)
        store_kv(key, value, k_cache, v_cache, slots)
        ek, ev = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
        ref.store_kv_ref(key, value, ek, ev, slots)
        for got, want in ((k_cache, ek), (v_cache, ev)):
            if DEVICE == "cuda":  # the GPU converts with round-to-nearest-even, as torch does
                assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
            else:  # the CPU interpreter's bf16 -> fp8 conversion rounds a few values differently
                same = (got.view(torch.uint8) == want.view(torch.uint8)).float().mean()
                assert same > 0.99, same
                torch.testing.assert_close(got.float(), want.float(), rtol=0.5, atol=2.0**-9)
        assert (k_cache.float()[0, 3] != 0).any() and (k_cache.float()[0, 2] == 0).all()

    def test_paged_attention_heuristic_path(self) -> None:
        batch = make_attention_batch([1, 12], [300, 40], block_size=32, num_kv_heads=1,
                                     queries_per_kv=4, head_dim=64, dtype=torch.float32)
        torch.testing.assert_close(run_attention(batch), reference_attention(batch),
                                   atol=1e-4, rtol=1e-4)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_rms_norm(self, dtype: torch.dtype) -> None:
        x, residual = torch.randn(2, 7, 96, dtype=dtype, device=DEVICE).unbind(0)
        weight = torch.randn(96, dtype=dtype, device=DEVICE)
        tol = {"atol": TOL[dtype], "rtol": TOL[dtype]}
        torch.testing.assert_close(rms_norm(x, weight, 1e-6),
                                   ref.rms_norm_ref(x, weight, 1e-6), **tol)
        normed, new_residual = rms_norm(x, weight, 1e-6, residual)
        ref_normed, ref_residual = ref.rms_norm_ref(x, weight, 1e-6, residual)
        # Not bitwise for bf16: the interpreter truncates fp32 -> bf16 (GPUs round to nearest).
        torch.testing.assert_close(new_residual, ref_residual, **tol)
        torch.testing.assert_close(normed, ref_normed, **tol)

    def test_rms_norm_per_head_on_strided_view(self) -> None:
        """Qwen3's q-norm: over head_dim of q = qkv[:, :q_size].view(T, H, D), no copy."""
        qkv = torch.randn(5, 8 * 64, dtype=torch.bfloat16, device=DEVICE)
        q = qkv[:, :4 * 64].view(5, 4, 64)
        weight = torch.randn(64, dtype=torch.bfloat16, device=DEVICE)
        got = rms_norm(q, weight, 1e-6)
        assert got.shape == q.shape
        torch.testing.assert_close(got, ref.rms_norm_ref(q, weight, 1e-6), atol=2e-2,
                                   rtol=2e-2)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    def test_rotary_in_place_on_fused_qkv(self, dtype: torch.dtype) -> None:
        tokens, heads, kv_heads, head_dim = 6, 4, 2, 64
        qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype,
                          device=DEVICE)
        expected = qkv.clone()
        q_end, k_end = heads * head_dim, (heads + kv_heads) * head_dim
        positions = torch.tensor([0, 1, 15, 16, 500, 8191], device=DEVICE)
        cos, sin = rope_cos_sin_cache(head_dim, 8192, 500000.0, LLAMA3_SCALING, device=DEVICE)
        apply_rotary(qkv[:, :q_end].view(tokens, heads, head_dim),
                     qkv[:, q_end:k_end].view(tokens, kv_heads, head_dim), positions, cos, sin)
        ref.rotary_ref(expected[:, :q_end].view(tokens, heads, head_dim),
                       expected[:, q_end:k_end].view(tokens, kv_heads, head_dim),
                       positions, cos, sin)
        torch.testing.assert_close(qkv, expected, atol=TOL[dtype], rtol=TOL[dtype])
        assert torch.equal(qkv[:, k_end:], expected[:, k_end:])  # v untouched

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("inter", [96, 1100])  # masked tail; several column blocks
    def test_silu_mul(self, dtype: torch.dtype, inter: int) -> None:
        x = 2 * torch.randn(2, 3, 2 * inter, dtype=dtype, device=DEVICE)
        got = silu_mul(x)
        assert got.shape == (2, 3, inter) and got.dtype == dtype
        torch.testing.assert_close(got, ref.silu_mul_ref(x), atol=TOL[dtype], rtol=TOL[dtype])
        assert silu_mul(x[:0]).shape == (0, 3, inter)

    @pytest.mark.parametrize(
        "heads,kv_heads,head_dim,dtype,norm,slot_dtype", [
            (4, 2, 64, torch.float32, True, torch.int64),
            (4, 2, 64, torch.bfloat16, True, torch.int32),
            (6, 3, 96, torch.float32, True, torch.int32),  # non-power-of-2 heads and half dim
            (4, 1, 64, torch.bfloat16, False, torch.int64),  # Llama / Qwen2: rotary + store
        ])
    def test_qk_norm_rope_store_on_fused_qkv(self, heads: int, kv_heads: int, head_dim: int,
                                             dtype: torch.dtype, norm: bool,
                                             slot_dtype: torch.dtype) -> None:
        """q/k/v are views of one fused QKV output, as the model produces them; the
        result equals the unfused reference (norm, rotary, store) on q, k and both caches."""
        tokens, block_size, num_blocks = 6, 16, 4
        q_end, k_end = heads * head_dim, (heads + kv_heads) * head_dim
        qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=DEVICE)

        def views(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            return (t[:, :q_end].view(tokens, heads, head_dim),
                    t[:, q_end:k_end].view(tokens, kv_heads, head_dim),
                    t[:, k_end:].view(tokens, kv_heads, head_dim))

        weights = ((1 + 0.3 * torch.randn(2, head_dim, device=DEVICE)).to(dtype).unbind(0)
                   if norm else (None, None))
        positions = torch.tensor([0, 1, 15, 16, 500, 4095], device=DEVICE)
        cos, sin = rope_cos_sin_cache(head_dim, 4096, 1000000.0, device=DEVICE)
        slots = torch.tensor([0, block_size - 1, -1, block_size, 3 * block_size + 5, -1],
                             dtype=slot_dtype, device=DEVICE)
        caches = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=DEVICE)
        expected_caches = caches.clone()
        original = qkv.clone()
        q, k, v = views(qkv)
        got_q, got_k = qk_norm_rope_store(q, k, v, positions, cos, sin, *weights, 1e-6,
                                          caches[0], caches[1], slots)
        assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr()  # in place
        rq, rk, rv = views(original.clone())
        exp_q, exp_k = ref.qk_norm_rope_store_ref(rq, rk, rv, positions, cos, sin, *weights, 1e-6,
                                                  expected_caches[0], expected_caches[1], slots)
        tol = {"atol": TOL[dtype], "rtol": TOL[dtype]}
        torch.testing.assert_close(got_q, exp_q, **tol)
        torch.testing.assert_close(got_k, exp_k, **tol)
        torch.testing.assert_close(caches, expected_caches, **tol)
        assert torch.equal(qkv[:, k_end:], original[:, k_end:])  # v untouched
        assert torch.equal(caches[1], expected_caches[1])  # v stored bit for bit

    @pytest.mark.parametrize("arch", ["Qwen3ForCausalLM", "LlamaForCausalLM"])
    def test_model_forward_triton_ops_match_torch_ops(self, tmp_path: Path, arch: str) -> None:
        """A tiny model's mixed prefill + decode batches give the same logits through the
        Triton kernel ops (fused prologue, SwiGLU) as through the torch reference ops."""
        from executor.layers import TORCH_OPS, AttentionMetadata, set_kernel_ops, triton_ops
        from executor.loader import load_model
        from executor.make_random_model import write_random_model

        path = write_random_model(tmp_path / "m", arch, "tiny", dtype="float32", std=0.1)
        model = load_model(path, device=DEVICE).model
        cfg = model.config
        shape = (8, 16, cfg.num_key_value_heads, cfg.head_dim)

        def run(ops):  # prefill 20 + 7 tokens, then a decode of each request
            caches = [(torch.zeros(shape, device=DEVICE), torch.zeros(shape, device=DEVICE))
                      for _ in range(cfg.num_hidden_layers)]
            model.bind_kv_cache(caches)
            previous = set_kernel_ops(ops)
            gen = torch.Generator().manual_seed(0)
            try:
                out = []
                for computed, new in (([0, 0], [20, 7]), ([20, 7], [1, 1])):
                    md = AttentionMetadata.build(computed, new, [[3, 1], [6, 0]], 16, DEVICE)
                    ids = torch.randint(3, 500, (sum(new),), generator=gen).to(DEVICE)
                    pos = torch.tensor([p for c, n in zip(computed, new) for p in range(c, c + n)],
                                       device=DEVICE)
                    with torch.no_grad():
                        out.append(model.compute_logits(model(ids, pos, md)))
                return torch.cat(out)
            finally:
                set_kernel_ops(previous)

        torch.testing.assert_close(run(triton_ops()), run(TORCH_OPS), atol=1e-3, rtol=1e-3)
