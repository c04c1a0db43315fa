"""Cost models: batch aggregates, roofline physics, parallelism, calibrated profiles, memory."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from core.scheduler_output import SchedulerOutput
from simulator.cost_model import (
    OPS,
    BatchShape,
    CalibratedCostModel,
    CostModel,
    ParallelConfig,
    PiecewiseLinear,
    RooflineCostModel,
    make_cost_model,
    p2p_send_time,
)
from simulator.hardware import get_hardware
from simulator.memory import kv_block_bytes, num_kv_blocks
from simulator.model_spec import get_model

H100 = get_hardware("h100")
LLAMA8 = get_model("Llama-3.1-8B")
GEMMS = ("qkv_proj", "o_proj", "mlp")


def gemm_time(timing) -> float:
    return sum(timing.breakdown[op] for op in GEMMS)


# ---- BatchShape -------------------------------------------------------------------------

def brute_force_shape(new: list[int], computed: list[int], samples: list[bool]) -> BatchShape:
    """Per-request definition of every aggregate, counting causal pairs one query at a time."""
    dec = [i for i, n in enumerate(new) if n == 1]
    pre = [i for i, n in enumerate(new) if n > 1]
    pairs = sum(sum(computed[i] + j + 1 for j in range(new[i])) for i in pre)
    return BatchShape(len(new), sum(new), sum(samples), len(dec), sum(computed[i] + 1 for i in dec),
                      sum(new[i] for i in pre), sum(computed[i] + new[i] for i in pre), pairs,
                      max((computed[i] + 1 for i in dec), default=0))


@pytest.mark.parametrize("new, computed, samples", [
    ([1, 1, 1], [10, 20, 30], [True, True, True]),  # pure decode
    ([1, 512, 1, 7], [99, 0, 5, 300], [True, False, True, True]),  # decode + chunk + spec-verify
    ([4096], [0], [True]),  # one whole prompt
    ([1, 3, 0], [4, 2, 9], [True, True, False]),  # a request with nothing to compute this step
])
def test_batch_shape_aggregates(new: list[int], computed: list[int], samples: list[bool]) -> None:
    out = SchedulerOutput(step_id=0, req_ids=[str(i) for i in range(len(new))], num_new_tokens=new,
                          num_computed_tokens=computed, samples=samples, total_num_scheduled_tokens=sum(new))
    expected = brute_force_shape(new, computed, samples)
    assert BatchShape.from_scheduler_output(out) == expected
    context = [c + n for n, c in zip(new, computed)]
    assert BatchShape.from_lists(new, context, num_sampling=sum(samples)) == expected
    assert BatchShape.from_lists(new, context).num_sampling == len(new)


def test_batch_shape_rejects_bad_lists() -> None:
    with pytest.raises(ValueError, match="2 entries, context_lens 1"):
        BatchShape.from_lists([1, 1], [5])
    with pytest.raises(ValueError, match=">= num_new_tokens"):
        BatchShape.from_lists([8], [4])


# ---- Roofline ---------------------------------------------------------------------------

@pytest.mark.parametrize("hw_name", ["h100", "h100_measured"])
def test_batch1_decode_is_weight_bandwidth_bound(hw_name: str) -> None:
    hw = get_hardware(hw_name)
    cm = RooflineCostModel(LLAMA8, hw)
    t = cm.step_time(BatchShape.decode(1, 1000))
    gpu = t.total - t.breakdown["cpu_overhead"]
    assert gpu == pytest.approx(LLAMA8.weight_bytes / hw.achievable_bandwidth, rel=0.15)
    assert t.breakdown["cpu_overhead"] == cm.cpu_overhead
    assert set(t.breakdown) == set(OPS) and t.total == pytest.approx(sum(t.breakdown.values()))


def test_4k_prefill_is_compute_bound() -> None:
    cm = RooflineCostModel(LLAMA8, H100)
    tokens = 4096
    t = cm.step_time(BatchShape.from_lists([tokens], [tokens]))
    layer_matmul_params = LLAMA8.attention_params_per_layer + LLAMA8.mlp_params_per_layer
    flops_time = 2 * tokens * layer_matmul_params * LLAMA8.num_layers / H100.achievable_flops()
    assert gemm_time(t) == pytest.approx(flops_time, rel=1e-9)  # every GEMM on the FLOP roof
    assert t.breakdown["attn_prefill"] > 0 and t.breakdown["attn_decode"] == 0
    # Twice the tokens: twice the GEMM time (compute bound), ~4x the causal attention.
    t2 = cm.step_time(BatchShape.from_lists([2 * tokens], [2 * tokens]))
    assert gemm_time(t2) == pytest.approx(2 * gemm_time(t), rel=1e-9)
    assert t2.breakdown["attn_prefill"] / t.breakdown["attn_prefill"] == pytest.approx(4, rel=0.01)


def test_decode_attention_reads_the_gqa_kv_cache() -> None:
    cm = RooflineCostModel(LLAMA8, H100, cpu_overhead=0.0)
    context = 256 * 4096
    t = cm.step_time(BatchShape.decode(256, context))
    kv_bytes = context * LLAMA8.kv_bytes_per_token  # 8 KV heads, not 32
    assert t.breakdown["attn_decode"] == pytest.approx(kv_bytes / H100.achievable_bandwidth, rel=0.01)


@pytest.mark.parametrize("batch", [BatchShape.decode(1, 500), BatchShape.from_lists([2048], [2048])])
def test_tp2_halves_gemm_time_and_adds_communication(batch: BatchShape) -> None:
    tp1 = RooflineCostModel(LLAMA8, H100).step_time(batch)
    tp2 = RooflineCostModel(LLAMA8, H100, ParallelConfig(tp=2)).step_time(batch)
    assert gemm_time(tp2) == pytest.approx(gemm_time(tp1) / 2, rel=0.02)
    assert tp1.breakdown["communication"] == 0.0 < tp2.breakdown["communication"]


def test_tp_beyond_kv_heads_replicates_kv() -> None:
    cm8 = RooflineCostModel(LLAMA8, H100, ParallelConfig(tp=8), cpu_overhead=0.0)
    cm16 = RooflineCostModel(get_model("Llama-3.1-70B"), H100, ParallelConfig(tp=16), cpu_overhead=0.0)
    assert cm8.parallel.kv_heads_per_gpu(LLAMA8) == 1
    assert cm16.parallel.kv_heads_per_gpu(cm16.model) == 1  # 8 KV heads over 16 GPUs: replicated
    assert kv_block_bytes(LLAMA8, 8, 1, 16) == kv_block_bytes(LLAMA8, 1, 1, 16) // 8


def test_moe_touches_fewer_experts_at_batch_1() -> None:
    mixtral = get_model("Mixtral-8x7B")
    cm = RooflineCostModel(mixtral, H100)
    mlp1 = cm.step_time(BatchShape.decode(1, 100)).breakdown["mlp"]
    mlp512 = cm.step_time(BatchShape.decode(512, 512 * 100)).breakdown["mlp"]
    # Batch 1 reads its 2 experts of 8; batch 512 reads all 8 (still memory bound; the rest
    # is the router and 512 tokens' activations).
    assert mlp1 / mlp512 == pytest.approx(2 / 8, rel=0.05)
    all_experts = mixtral.num_layers * mixtral.num_experts * mixtral.expert_params * 2
    assert mlp512 == pytest.approx(all_experts / H100.achievable_bandwidth, rel=0.05)


def test_fp8_weights_halve_memory_bound_gemms() -> None:
    fp8 = dataclasses.replace(LLAMA8, quantization="fp8")
    bf16_t = RooflineCostModel(LLAMA8, H100).step_time(BatchShape.decode(1, 100))
    fp8_t = RooflineCostModel(fp8, H100).step_time(BatchShape.decode(1, 100))
    assert gemm_time(fp8_t) == pytest.approx(gemm_time(bf16_t) / 2, rel=0.01)
    prefill = BatchShape.from_lists([4096], [4096])  # compute bound: FP8 peak is 2x
    assert gemm_time(RooflineCostModel(fp8, H100).step_time(prefill)) == pytest.approx(
        gemm_time(RooflineCostModel(LLAMA8, H100).step_time(prefill)) / 2, rel=0.01)


def test_fp8_kv_cache_halves_kv_bytes_and_doubles_blocks() -> None:
    fp8 = dataclasses.replace(LLAMA8, kv_cache_dtype="fp8")
    assert fp8.kv_bytes_per_token * 2 == LLAMA8.kv_bytes_per_token
    assert kv_block_bytes(fp8, 1, 1, 16) * 2 == kv_block_bytes(LLAMA8, 1, 1, 16)
    assert num_kv_blocks(fp8, H100) in (2 * num_kv_blocks(LLAMA8, H100), 2 * num_kv_blocks(LLAMA8, H100) + 1)
    shape = BatchShape.decode(256, 256 * 2000)  # KV-bound decode: attention reads half the bytes
    a = RooflineCostModel(LLAMA8, H100).step_time(shape).breakdown["attn_decode"]
    b = RooflineCostModel(fp8, H100).step_time(shape).breakdown["attn_decode"]
    assert b == pytest.approx(a / 2, rel=0.05)
    assert gemm_time(RooflineCostModel(fp8, H100).step_time(shape)) == gemm_time(
        RooflineCostModel(LLAMA8, H100).step_time(shape))
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        dataclasses.replace(LLAMA8, kv_cache_dtype="int4")


def test_pipeline_stages_add_sends_and_microbatches_fill_the_pipe() -> None:
    batch = BatchShape.from_lists([1024] * 4, [1024] * 4)
    pp1 = RooflineCostModel(LLAMA8, H100).step_time(batch)
    pp2 = RooflineCostModel(LLAMA8, H100, ParallelConfig(pp=2)).step_time(batch)
    # One micro-batch: the two stages run one after the other, plus one activation send.
    for op in OPS:
        if op != "communication":
            assert pp2.breakdown[op] == pytest.approx(pp1.breakdown[op], rel=1e-12)
    send = p2p_send_time(batch.num_tokens * LLAMA8.hidden_size * 2, H100)
    assert pp2.breakdown["communication"] == pytest.approx(send)
    # Four micro-batches of a compute-bound batch: (m + pp - 1) / (m * pp) of the work.
    pp2m4 = RooflineCostModel(LLAMA8, H100, ParallelConfig(pp=2, num_microbatches=4)).step_time(batch)
    assert gemm_time(pp2m4) == pytest.approx(gemm_time(pp1) * 5 / 8, rel=0.01)


@pytest.mark.parametrize("kw", [
    {"tp": 3, "match": "tensor parallel size 3 does not divide num_attention_heads 32"},
    {"pp": 3, "match": "pipeline parallel size 3 does not divide num_layers 32"},
])
def test_invalid_parallel_split(kw: dict) -> None:
    match = kw.pop("match")
    with pytest.raises(ValueError, match=match):
        RooflineCostModel(LLAMA8, H100, ParallelConfig(**kw))
    with pytest.raises(ValueError, match=match):
        make_cost_model("roofline", LLAMA8, H100, **kw)


def test_tp_rules_for_qwen25_heads() -> None:
    qwen = get_model("Qwen2.5-7B")  # 28 heads, 4 KV heads
    with pytest.raises(ValueError, match="tensor parallel size 8 does not divide num_attention_heads 28"):
        ParallelConfig(tp=8).validate(qwen)
    ParallelConfig(tp=4).validate(qwen)


ROOFLINE_CONFIGS = [
    ("Llama-3.1-8B", {}),
    ("Llama-3.1-8B", {"tp": 2}),
    ("Llama-3.1-70B", {"tp": 4, "pp": 2, "num_microbatches": 2}),
    ("Mixtral-8x7B", {"tp": 2}),
    ("Qwen3-0.6B", {"pp": 4, "num_microbatches": 3}),
]


@pytest.mark.parametrize("name, par", ROOFLINE_CONFIGS)
@pytest.mark.parametrize("batch_size, sum_context", [(1, 17), (7, 7 * 3000), (256, 256 * 100)])
def test_decode_step_times_equal_repeated_step_time(name: str, par: dict, batch_size: int,
                                                    sum_context: int) -> None:
    cm = RooflineCostModel(get_model(name), H100, ParallelConfig(**par))
    k = 300
    fast = cm.decode_step_times(batch_size, sum_context, k)
    slow = [cm.step_time(BatchShape.decode(batch_size, sum_context + j * batch_size)).total for j in range(k)]
    np.testing.assert_allclose(fast, slow, rtol=1e-12, atol=0)
    assert fast[-1] > fast[0]  # contexts grow, so do the steps


@pytest.mark.parametrize("name, par", ROOFLINE_CONFIGS)
def test_decode_step_timing_equals_step_time_exactly(name: str, par: dict) -> None:
    """The per-batch-size memo gives step_time's floats bit for bit (totals and splits, in order),
    also after the model's cpu_overhead changes."""
    cm = RooflineCostModel(get_model(name), H100, ParallelConfig(**par))
    rng = np.random.default_rng(0)
    for batch_size in [0, 1, 2, 3, 7, 64, 255, 256, 1000]:
        for ctx in {batch_size, batch_size * 100, batch_size * 8191, int(rng.integers(batch_size, 8192 * batch_size + 1))}:
            for _ in range(2):  # a cold then a warm memo
                fast = cm.decode_step_timing(batch_size, ctx, max(1, ctx // max(batch_size, 1)))
                slow = cm.step_time(BatchShape.decode(batch_size, ctx))
                assert fast.total == slow.total
                assert list(fast.breakdown.items()) == list(slow.breakdown.items())
    cm.cpu_overhead = 5e-3
    assert cm.decode_step_timing(64, 64 * 500) == cm.step_time(BatchShape.decode(64, 64 * 500))


@pytest.mark.parametrize("name, par", ROOFLINE_CONFIGS)
def test_decode_step_times_list_equals_the_array(name: str, par: dict) -> None:
    cm = RooflineCostModel(get_model(name), H100, ParallelConfig(**par))
    for batch_size, sum_context in [(0, 0), (1, 17), (7, 7 * 3000), (256, 256 * 100)]:
        for k in [0, 1, 2, 31, 32, 33, 300]:
            fast = cm.decode_step_times_list(batch_size, sum_context, k)
            assert type(fast) is list and fast == cm.decode_step_times(batch_size, sum_context, k).tolist()


@pytest.mark.parametrize("name, par", ROOFLINE_CONFIGS)
def test_decode_step_split_equals_the_scaled_timing(name: str, par: dict) -> None:
    """The roofline's memo-based split of a fast-forwarded stretch gives the base class's floats
    (decode_step_timing's split scaled to the total) bit for bit, keys in order."""
    cm = RooflineCostModel(get_model(name), H100, ParallelConfig(**par))
    for batch_size, sum_context, total in [(0, 0, 0.5), (1, 17, 0.02), (7, 7 * 3000, 1.25), (256, 256 * 100, 3e-3)]:
        for _ in range(2):  # a cold then a warm memo
            fast = cm.decode_step_split(batch_size, sum_context, None, total)
            slow = CostModel.decode_step_split(cm, batch_size, sum_context, None, total)
            assert list(fast.items()) == list(slow.items())


@pytest.mark.parametrize("name, par", ROOFLINE_CONFIGS)
def test_decode_splits_sum_equals_the_summed_splits(name: str, par: dict) -> None:
    """The roofline's vectorised sum of many stretches' splits equals the base class's loop over
    ``decode_step_split`` to rounding, with the same keys in the same order (also with a batch of 0)."""
    cm = RooflineCostModel(get_model(name), H100, ParallelConfig(**par))
    rng = np.random.default_rng(1)
    batch = rng.integers(1, 300, size=500)
    for sizes in (batch, np.append(batch, 0)):
        ctx = [int(b) * int(rng.integers(1, 8000)) for b in sizes]
        longest = [c // max(int(b), 1) + 5 for b, c in zip(sizes, ctx)]
        totals = rng.uniform(1e-3, 2.0, size=len(sizes)).tolist()
        fast = cm.decode_splits_sum(sizes.tolist(), ctx, longest, totals)
        slow = CostModel.decode_splits_sum(cm, sizes.tolist(), ctx, longest, totals)
        assert list(fast) == list(slow) == list(cm.decode_step_split(1, 10, None, 1.0))
        for op in slow:
            assert fast[op] == pytest.approx(slow[op], rel=1e-12, abs=1e-15)
        assert sum(fast.values()) == pytest.approx(sum(totals), rel=1e-12)
    assert cm.decode_splits_sum([], [], [], []) == {}


# ---- Calibrated -------------------------------------------------------------------------

def synthetic_profile(**overrides) -> dict:
    """A made-up profile whose tables follow known formulas, so the fits can be checked."""
    tokens = [1, 16, 128, 1024, 8192]
    gemm = [20e-6 + 1e-7 * t if t < 128 else 32.8e-6 + 3e-7 * (t - 128) for t in tokens]  # has a knee
    decode_pts = [(b, b * c) for b in (1, 8, 64, 256) for c in (128, 2048, 16384)]
    prefill_pts = [(n, L) for n in (16, 512, 4096) for L in (n, n + 2048, n + 30000)]

    def prefill_seconds(n: int, L: int) -> float:
        return 30e-6 + 1e-8 * n + 2e-10 * L + 3e-13 * (n * L - n * (n - 1) / 2)

    profile = {
        "format": "servelab-profile-v1", "model": "meta-llama/Llama-3.1-8B-Instruct", "hardware": "H100-measured",
        "tp": 1, "pp": 1,
        "per_token_ops": {"num_tokens": tokens, "qkv_proj": gemm, "o_proj": [g / 2 for g in gemm],
                          "mlp": [3 * g for g in gemm], "norm_rotary": [1e-6 * t for t in tokens]},
        "lm_head": {"num_rows": [1, 256], "seconds": [300e-6, 500e-6]},
        "sampling": {"num_rows": [1, 256], "seconds": [50e-6, 150e-6]},
        "attn_decode": {"batch": [b for b, _ in decode_pts], "total_context": [c for _, c in decode_pts],
                        "seconds": [10e-6 + 2e-7 * b + 4e-11 * c for b, c in decode_pts]},
        "attn_prefill": {"chunk_tokens": [n for n, _ in prefill_pts], "context_len": [L for _, L in prefill_pts],
                         "seconds": [prefill_seconds(n, L) for n, L in prefill_pts]},
        "overhead": {"eager_s": 4e-3, "graph_s": 1e-3, "graph_max_batch": 128},
    }
    profile.update(overrides)
    return profile


def test_piecewise_linear_interpolates_like_numpy_and_extrapolates() -> None:
    xs, ys = [1.0, 16.0, 128.0, 1024.0], [2.0, 3.0, 10.0, 100.0]
    f = PiecewiseLinear(xs, ys, "t")
    for x in (1, 5, 16, 77.5, 128, 600, 1024):
        assert f(x) == pytest.approx(float(np.interp(x, xs, ys)), rel=1e-14)
    assert f(2048) == pytest.approx(100 + (100 - 10) / (1024 - 128) * 1024)  # last segment's slope
    assert f(0) == pytest.approx(2 - 1 / 15)
    assert PiecewiseLinear([1.0], [5.0], "t")(1000) == 5.0
    with pytest.raises(ValueError, match="strictly increasing"):
        PiecewiseLinear([1, 1], [1, 2], "t")


def test_calibrated_profile_from_file(tmp_path) -> None:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(synthetic_profile()))
    cm = make_cost_model("Calibrated", LLAMA8, get_hardware("h100_measured"), profile=str(path))
    assert isinstance(cm, CalibratedCostModel)

    # Pure decode of 64 requests: graph overhead, GEMMs interpolated between 16 and 128 tokens.
    t = cm.step_time(BatchShape.decode(64, 64 * 1000))
    qkv = float(np.interp(64, [16, 128], [21.6e-6, 32.8e-6]))
    assert t.breakdown["qkv_proj"] == pytest.approx(qkv, rel=1e-12)
    assert t.breakdown["mlp"] == pytest.approx(3 * qkv, rel=1e-12)
    assert t.breakdown["attn_decode"] == pytest.approx(10e-6 + 2e-7 * 64 + 4e-11 * 64000, rel=1e-6)
    assert t.breakdown["attn_prefill"] == 0.0 and t.breakdown["communication"] == 0.0
    assert t.breakdown["lm_head"] == pytest.approx(300e-6 + 200e-6 * 63 / 255)
    assert t.breakdown["cpu_overhead"] == 1e-3
    assert t.total == pytest.approx(sum(t.breakdown.values()))

    # Mixed step with two prefill chunks: eager overhead, the fit recovers the formula.
    mixed = BatchShape.from_lists([1, 1, 300, 1000], [50, 70, 5300, 1000], num_sampling=3)
    t = cm.step_time(mixed)
    pairs = 300 * 5300 - 300 * 299 / 2 + 1000 * 1000 - 1000 * 999 / 2
    assert mixed.prefill_pairs == pairs
    assert t.breakdown["attn_prefill"] == pytest.approx(30e-6 + 1e-8 * 1300 + 2e-10 * 6300 + 3e-13 * pairs,
                                                        rel=1e-6)
    assert t.breakdown["cpu_overhead"] == 4e-3
    assert cm.step_time(BatchShape.decode(129, 129 * 10)).breakdown["cpu_overhead"] == 4e-3  # > graph batch


def test_calibrated_decode_step_times_equal_repeated_step_time() -> None:
    cm = CalibratedCostModel(synthetic_profile())
    fast = cm.decode_step_times(32, 32 * 700, 200)
    slow = [cm.step_time(BatchShape.decode(32, 32 * 700 + 32 * j)).total for j in range(200)]
    np.testing.assert_allclose(fast, slow, rtol=1e-12, atol=0)


def test_calibrated_profile_errors() -> None:
    hw = get_hardware("h100")
    with pytest.raises(ValueError, match="needs profile="):
        make_cost_model("calibrated", LLAMA8, hw)
    with pytest.raises(ValueError, match="measured at tp=1, pp=1, not tp=2, pp=1"):
        make_cost_model("calibrated", LLAMA8, hw, tp=2, profile=synthetic_profile())
    with pytest.raises(ValueError, match="measured for 'meta-llama/Llama-3.1-8B-Instruct', not 'Qwen3-8B'"):
        make_cost_model("calibrated", get_model("Qwen3-8B"), hw, profile=synthetic_profile())
    with pytest.raises(ValueError, match="lacks the 'attn_decode' table"):
        CalibratedCostModel({k: v for k, v in synthetic_profile().items() if k != "attn_decode"})
    with pytest.raises(ValueError, match="lacks \\['mlp'\\]"):
        CalibratedCostModel(synthetic_profile(per_token_ops={"num_tokens": [1], "qkv_proj": [1], "o_proj": [1]}))
    with pytest.raises(ValueError, match="format"):
        CalibratedCostModel(synthetic_profile(format="v0"))


def test_unknown_cost_model_kind_lists_kinds() -> None:
    with pytest.raises(ValueError, match="unknown cost model kind 'magic'; known: roofline, calibrated"):
        make_cost_model("magic", LLAMA8, H100)


# ---- Memory -----------------------------------------------------------------------------

def test_kv_blocks_for_llama8b_on_h100() -> None:
    blocks = num_kv_blocks(LLAMA8, H100, block_size=16, gpu_memory_utilization=0.9)
    block_bytes = 2 * 16 * 8 * 128 * 2 * 32  # 2 MiB
    assert kv_block_bytes(LLAMA8, 1, 1, 16) == block_bytes
    free = H100.memory_bytes * 0.9 - LLAMA8.weight_bytes - 2 * 2**30
    assert blocks == int(free // block_bytes)
    assert 25_000 < blocks < 32_000  # ~450k tokens of KV, what vLLM reports for this setup
    assert num_kv_blocks(LLAMA8, H100, tp=2) > 2 * blocks  # half the weights, half the KV per GPU


def test_70b_does_not_fit_one_h100() -> None:
    seventy = get_model("Llama-3.1-70B")
    with pytest.raises(ValueError, match=r"does not fit on H100-SXM at tp=1, pp=1: weights per GPU 131\.42 GiB"):
        num_kv_blocks(seventy, H100)
    assert num_kv_blocks(seventy, H100, tp=4) > 0


def test_zero_blocks_and_bad_arguments() -> None:
    budget = H100.memory_bytes * 0.9 - LLAMA8.weight_bytes
    with pytest.raises(ValueError, match="no KV block fits"):
        num_kv_blocks(LLAMA8, H100, activation_reserve_bytes=int(budget - 2**20))
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        num_kv_blocks(LLAMA8, H100, gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="does not divide num_attention_heads"):
        num_kv_blocks(LLAMA8, H100, tp=3)


# ---- Calibrated, format v2 -------------------------------------------------------------------

def synthetic_profile_v2(**overrides) -> dict:
    """v1's synthetic tables plus a decode grid (batch x per-request context), graph sizes,
    a per-request CPU term and an eager launch floor."""
    p = synthetic_profile()
    p["format"] = "servelab-profile-v2"
    grid = [(b, c) for b in (1, 8, 32, 64) for c in (128, 1024, 8192)]

    def dec(b: int, c: int) -> float:
        return 10e-6 + 2e-7 * b + 4e-11 * b * c

    p["attn_decode"] = {"batch": [b for b, _ in grid], "context": [c for _, c in grid],
                        "seconds": [dec(b, c) for b, c in grid], "split_max_batch": 8, "latency_batch": 32}
    p["overhead"] = {"graph_s": 1e-3, "graph_max_batch": 64, "graph_sizes": [1, 2, 4, 8, 16, 32, 48, 64],
                     "cpu_per_request_s": 5e-6, "eager_s": 2e-3, "eager_ref_reqs": 3}
    p["eager_floor"] = {"num_tokens": [16, 1024, 8192], "seconds": [10e-3, 11e-3, 11e-3]}
    p.update(overrides)
    return p


def test_v1_profiles_still_load_and_keep_their_model() -> None:
    cm = CalibratedCostModel(synthetic_profile())
    assert cm.version == 1
    # v1 ignores the longest context
    assert (cm.step_time(BatchShape.decode(32, 32 * 700, 9000)).total
            == cm.step_time(BatchShape.decode(32, 32 * 700)).total)


def test_v2_graph_decode_uses_the_padded_grid_and_the_latency_line() -> None:
    cm = CalibratedCostModel(synthetic_profile_v2())
    assert cm.version == 2

    def dec(b: float, c: float) -> float:
        return 10e-6 + 2e-7 * b + 4e-11 * b * c

    # batch 8 (a split graph): the grid at (8, mean), whatever the longest context
    t = cm.step_time(BatchShape.decode(8, 8 * 1024, 8000))
    assert t.breakdown["attn_decode"] == pytest.approx(dec(8, 1024), rel=1e-12)
    assert t.breakdown["cpu_overhead"] == pytest.approx(1e-3 + 8 * 5e-6)
    # batch 20 replays the graph of 32: grid at (32, mean) unless the latency line is longer
    t = cm.step_time(BatchShape.decode(20, 20 * 128, 128))
    assert t.breakdown["attn_decode"] == pytest.approx(dec(32, 128), rel=1e-12)
    assert t.breakdown["qkv_proj"] == pytest.approx(float(np.interp(32, [16, 128], [21.6e-6, 32.8e-6])), rel=1e-12)
    t = cm.step_time(BatchShape.decode(20, 20 * 128, 8192))
    assert t.breakdown["attn_decode"] == pytest.approx(dec(32, 8192), rel=1e-12)  # latency line at 8192
    # between batch lines (48 between 32 and 64): linear in batch
    t = cm.step_time(BatchShape.decode(48, 48 * 1024))
    assert t.breakdown["attn_decode"] == pytest.approx((dec(32, 1024) + dec(64, 1024)) / 2, rel=1e-12)
    assert t.total == pytest.approx(sum(t.breakdown.values()))


def test_v2_eager_step_is_max_of_launch_floor_and_device() -> None:
    cm = CalibratedCostModel(synthetic_profile_v2())
    small = cm.step_time(BatchShape.from_lists([1, 1, 100], [50, 70, 100]))  # 3 requests = eager_ref_reqs
    device = sum(v for k, v in small.breakdown.items() if k != "cpu_overhead")
    floor = float(np.interp(102, [16, 1024], [10e-3, 11e-3]))
    assert device < floor
    assert small.total == pytest.approx(floor + 2e-3, rel=1e-12)
    assert small.breakdown["cpu_overhead"] == pytest.approx(floor - device + 2e-3, rel=1e-12)
    big = cm.step_time(BatchShape.from_lists([8192] + [1] * 9, [8192] + [100] * 9))  # 10 requests, device bound
    device = sum(v for k, v in big.breakdown.items() if k != "cpu_overhead")
    assert device > 11e-3
    assert big.total == pytest.approx(device + 2e-3 + 7 * 5e-6, rel=1e-12)
    # decode rows beside a prefill chunk share its launch: max(prefill + decode grid, latency line)
    mixed = cm.step_time(BatchShape.from_lists([1, 16], [8192, 16]))
    p = mixed.breakdown["attn_prefill"]
    assert mixed.breakdown["attn_decode"] == pytest.approx(
        max(10e-6 + 2e-7 + 4e-11 * 8192, 10e-6 + 2e-7 * 32 + 4e-11 * 32 * 8192 - p), rel=1e-12)
    # a pure-decode batch above graph_max_batch runs eagerly
    floor65 = float(np.interp(65, [16, 1024], [10e-3, 11e-3]))
    assert cm.step_time(BatchShape.decode(65, 65 * 10)).total == pytest.approx(floor65 + 2e-3 + 62 * 5e-6, rel=1e-12)


def test_v2_mixed_graph_steps_pad_tokens_and_skip_the_launch_floor() -> None:
    p = synthetic_profile_v2()
    p["overhead"] = {**p["overhead"], "mixed_graph_sizes": [64, 128, 512], "mixed_graph_s": 0.3e-3}
    cm = CalibratedCostModel(p)
    plain = CalibratedCostModel(synthetic_profile_v2())
    shape = BatchShape.from_lists([1, 1, 100], [50, 70, 100])  # 102 tokens -> the 128-token graph
    t = cm.step_time(shape)
    assert t.breakdown["qkv_proj"] == pytest.approx(float(np.interp(128, [16, 128], [21.6e-6, 32.8e-6])), rel=1e-12)
    assert t.breakdown["attn_prefill"] == plain.step_time(shape).breakdown["attn_prefill"]  # real shape
    assert t.breakdown["cpu_overhead"] == pytest.approx(0.3e-3 + 3 * 5e-6, rel=1e-12)  # no 10 ms floor
    assert t.total < plain.step_time(shape).total - 5e-3
    # above the largest mixed graph: eager, as without mixed graphs
    big = BatchShape.from_lists([600] + [1] * 3, [600] + [100] * 3)
    assert cm.step_time(big).total == pytest.approx(plain.step_time(big).total, rel=1e-12)


@pytest.mark.parametrize("batch_size, sum_context, max_context", [
    (1, 17, None), (6, 6 * 700, 2000), (20, 20 * 300, 9000), (40, 40 * 3000, 3100), (64, 64 * 100, None),
    (100, 100 * 50, 400),  # above graph_max_batch: eager
])
def test_v2_decode_step_times_equal_repeated_step_time(batch_size: int, sum_context: int,
                                                       max_context: int | None) -> None:
    cm = CalibratedCostModel(synthetic_profile_v2())
    k = 150
    fast = cm.decode_step_times(batch_size, sum_context, k, max_context)
    m0 = BatchShape.decode(batch_size, sum_context, max_context).max_decode_context
    slow = [cm.step_time(BatchShape.decode(batch_size, sum_context + j * batch_size, m0 + j)).total for j in range(k)]
    np.testing.assert_allclose(fast, slow, rtol=1e-12, atol=0)
    base = CalibratedCostModel(synthetic_profile_v2()).decode_step_times  # the default max = equal contexts
    if max_context is None:
        np.testing.assert_allclose(base(batch_size, sum_context, k), fast, rtol=1e-12, atol=0)


def test_batch_shape_longest_decode_context() -> None:
    assert BatchShape.decode(4, 10).max_decode_context == 3  # ceil(10 / 4): equal contexts
    assert BatchShape.decode(4, 10, 7).max_decode_context == 7
    assert BatchShape.decode(0, 0).max_decode_context == 0
    assert BatchShape.from_lists([1, 1, 300], [50, 90, 400]).max_decode_context == 90
    assert BatchShape.from_lists([300], [400]).max_decode_context == 0


@pytest.mark.parametrize("pp,micro", [(1, 1), (2, 3)])
def test_roofline_short_runs_are_costed_bitwise_like_long_ones(monkeypatch, pp, micro):
    """Short fast-forward runs skip numpy (its per-call cost dominates); the durations must be
    the very same floats, or a simulation's event times would depend on the run length."""
    import simulator.cost_model.roofline as roofline
    cm = RooflineCostModel(get_model("Llama-3.1-8B"), get_hardware("H100"),
                           ParallelConfig(pp=pp, num_microbatches=micro))
    cases = [(1, 100, 1), (7, 9000, 5), (256, 300_000, roofline._SHORT_RUN)]
    short = [cm.decode_step_times(*c) for c in cases]
    monkeypatch.setattr(roofline, "_SHORT_RUN", 0)
    assert all(np.array_equal(a, cm.decode_step_times(*c)) for a, c in zip(short, cases))
