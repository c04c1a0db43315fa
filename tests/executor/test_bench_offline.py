"""``experiments.bench_offline``: both workloads run end to end on a tiny CPU model, the
default workloads are what the docs say, and the floor's bookkeeping (context tokens,
attention pairs, FLOPs, weight bytes read) matches counts worked out by hand for a
schedule simple enough to know step by step."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("torch")

from experiments.bench_offline import WORKLOADS, StepWork, main

# Tiny Llama (2 layers, hidden 64, 4 q / 2 kv heads of 16, intermediate 128), untied, fp32;
# vocabulary 10,240 so nano-vllm's ids (< 10,001) exist.
VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, INTER = 10240, 64, 2, 4, 2, 16, 128


@pytest.fixture(scope="module")
def tiny_llama(make_tiny_model: Callable[..., Path]) -> Path:
    return make_tiny_model("LlamaForCausalLM", {"vocab_size": VOCAB})


def test_step_work_counts_causal_pairs_over_cached_context() -> None:
    # A 3-token chunk after 5 cached tokens sees 6, 7, 8 keys; a decode at 9 cached sees 10.
    w = StepWork.of([3, 1], [5, 9], [True, True])
    assert (w.tokens, w.context_tokens, w.attention_pairs, w.sampled_rows) == (4, 18, 21 + 10, 2)


def test_default_workloads() -> None:
    nano = WORKLOADS["nano-vllm"]
    prompts, params = nano.build(nano.num_seqs, nano.input_len, nano.output_len, 151936)
    assert sum(p.max_tokens for p in params) == nano.expected_output_tokens == 133_966
    assert len(prompts) == 256 and all(100 <= len(p) <= 1024 for p in prompts)
    llama = WORKLOADS["llama8b-1k"]
    prompts, params = llama.build(llama.num_seqs, llama.input_len, llama.output_len, 128256)
    assert len(prompts) == 1000 and {len(p) for p in prompts} == {1000}
    assert {(p.max_tokens, p.ignore_eos, p.temperature) for p in params} == {(1000, True, 0.6)}
    assert len({tuple(p[:16]) for p in prompts}) == 1000  # no shared prefix-cache block
    assert llama.max_model_len >= llama.input_len + llama.output_len


def test_llama8b_workload_floor_bookkeeping(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "llama.json"
    r = main(["--workload", "llama8b-1k", "--model-dir", str(tiny_llama), "--num-seqs", "3", "--input-len", "20",
              "--output-len", "5", "--max-model-len", "64", "--out", str(out)])
    assert json.loads(out.read_text())["output_tokens"] == r["output_tokens"] == 15
    f = r["floor"]
    # Step 1 prefills 3 x 20 tokens; steps 2-5 decode the 3 requests at 21..24 tokens.
    assert f["steps"] == r["steps"]["total"] == 5
    assert f["tokens_computed"] == 60 + 4 * 3
    assert f["context_tokens_read"] == 60 + 3 * (21 + 22 + 23 + 24)
    assert f["attention_pairs"] == 3 * (20 * 21 // 2) + 3 * (21 + 22 + 23 + 24)
    assert f["sampled_rows"] == 15
    linear = LAYERS * (HIDDEN * HEADS * HEAD_DIM * 2 + HIDDEN * KV_HEADS * HEAD_DIM * 2 + 3 * HIDDEN * INTER)
    assert f["linear_flops_per_token"] == 2 * linear
    assert f["attention_flops_per_pair"] == 4 * LAYERS * HEADS * HEAD_DIM
    assert f["kv_bytes_per_token"] == 2 * LAYERS * KV_HEADS * HEAD_DIM * 4
    # Untied: the input embedding is gathered, not read whole, each step.
    assert f["weight_read_bytes"] == r["kv_cache"]["weight_bytes"] - VOCAB * HIDDEN * 4
    assert f["flops"] == (f["tokens_computed"] * f["linear_flops_per_token"] + 15 * 2 * VOCAB * HIDDEN
                          + f["attention_pairs"] * f["attention_flops_per_pair"])
    assert f["bytes"] == f["context_tokens_read"] * f["kv_bytes_per_token"] + 5 * f["weight_read_bytes"]
    kinds = r["steps"]["by_kind"]
    assert (kinds["prefill_or_mixed"]["steps"], kinds["decode"]["steps"]) == (1, 4)
    assert f["seconds"] == pytest.approx(sum(k["floor_seconds"] for k in kinds.values()))
    assert f["seconds"] >= max(f["bandwidth_only_seconds"], f["overlapped_seconds"]) * (1 - 1e-12)  # summation order
    assert r["scheduling"] == {"max_batch": 3, "preemptions": 0, "prefill_tokens": 60,
                               "recomputed_prefill_tokens": 0}
    assert r["fraction_of_floor"] == pytest.approx(f["seconds"] / r["seconds"])


def test_nano_vllm_workload_runs(tiny_llama: Path, tmp_path: Path) -> None:
    r = main(["--model-dir", str(tiny_llama), "--num-seqs", "2", "--input-len", "110", "--output-len", "101",
              "--max-model-len", "256", "--out", str(tmp_path / "nano.json")])
    assert r["workload"] == "nano-vllm" and r["target_tok_per_s"] == 18_000
    assert 200 <= r["output_tokens"] <= 202 and r["floor"]["steps"] == r["steps"]["total"]
    assert r["config"]["temperature"] == 0.6
