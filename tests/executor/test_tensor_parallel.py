"""Tensor parallelism on the CPU (gloo, fp32, tiny random models): greedy outputs of TP=2
(and TP=4) equal TP=1 token for token, and TP=1 equals transformers.

All TP cases run in one spawn per world size (``run_tensor_parallel``: rank 0 builds one
``LLM`` after the other, the other ranks serve them), so process start-up is paid once.
Cases: Llama GQA (KV heads split), Qwen3 q/k norm + tied embeddings, one KV head with tp=2
(replicated), an untied LM head with a vocabulary not divisible by tp (padded last shard),
and chunked prefill + swap preemption + the CUDA-graph padded layout (emulated) with tp=2.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from executor.parallel.launch import run_tensor_parallel
from executor.parallel.selfcheck import compare_greedy, greedy_cases, greedy_tokens

BASE = {"max_num_seqs": 8, "max_model_len": 256, "num_gpu_blocks": 96, "max_num_batched_tokens": 512,
        "device": "cpu"}


def _tokens(n: int, seed: int, hi: int = 500) -> list[int]:
    return torch.randint(3, hi, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


PROMPTS = [_tokens(n, n) for n in (3, 17, 40)]
LENGTHS = [12, 9, 10]
PREEMPT_PROMPTS = [_tokens(30, 100 + i) for i in range(4)]
PREEMPT_LENGTHS = [40, 40, 40, 40]

# name -> (architecture, config overrides, prompts, lengths, LLM kwargs)
CASES: dict[str, tuple[str, dict[str, Any], list[list[int]], list[int], dict[str, Any]]] = {
    "llama-gqa": ("LlamaForCausalLM", {}, PROMPTS, LENGTHS, {}),
    "qwen3-qknorm-tied": ("Qwen3ForCausalLM", {}, PROMPTS, LENGTHS, {}),
    "llama-kv1-replicated": ("LlamaForCausalLM", {"num_key_value_heads": 1}, PROMPTS, LENGTHS, {}),
    "qwen3-untied-vocab509": ("Qwen3ForCausalLM", {"tie_word_embeddings": False, "vocab_size": 509},
                              PROMPTS, LENGTHS, {}),
    "llama-chunked-swap-graphs": ("LlamaForCausalLM", {}, PREEMPT_PROMPTS, PREEMPT_LENGTHS, {
        "max_num_batched_tokens": 32, "num_gpu_blocks": 14, "max_model_len": 128, "watermark": 0.0,
        "preemption_mode": "swap", "num_cpu_blocks": 32, "emulate_cuda_graphs": True,
        "cuda_graph_sizes": [1, 2, 4]}),
}
TP4_CASES = ("llama-gqa", "qwen3-qknorm-tied")  # tp=4 > 2 KV heads: replicated


@pytest.fixture(scope="module")
def model_dirs(make_tiny_model: Callable[..., Path]) -> dict[str, Path]:
    return {name: make_tiny_model(arch, overrides) for name, (arch, overrides, *_) in CASES.items()}


def _case_args(model_dirs: dict[str, Path], names: Any) -> dict[str, tuple[str, list, list, dict]]:
    return {n: (str(model_dirs[n]), CASES[n][2], CASES[n][3], BASE | CASES[n][4]) for n in names}


@pytest.fixture(scope="module")
def tp1(model_dirs: dict[str, Path]) -> dict[str, list[list[int]]]:
    return greedy_cases(_case_args(model_dirs, CASES))


@pytest.fixture(scope="module")
def tp2(model_dirs: dict[str, Path]) -> dict[str, list[list[int]]]:
    return run_tensor_parallel(greedy_cases, 2, _case_args(model_dirs, CASES), backend="gloo", threads=1)


@pytest.fixture(scope="module")
def tp4(model_dirs: dict[str, Path]) -> dict[str, list[list[int]]]:
    return run_tensor_parallel(greedy_cases, 4, _case_args(model_dirs, TP4_CASES), backend="gloo", threads=1)


def _hf_greedy(hf: Any, prompt: list[int], n: int) -> list[int]:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), generation_config=config)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", list(CASES))
def test_tp2_equals_tp1(tp1: dict[str, list[list[int]]], tp2: dict[str, list[list[int]]], name: str) -> None:
    assert tp2[name] == tp1[name]


@pytest.mark.parametrize("name", TP4_CASES)
def test_tp4_equals_tp1(tp1: dict[str, list[list[int]]], tp4: dict[str, list[list[int]]], name: str) -> None:
    assert tp4[name] == tp1[name]


@pytest.mark.parametrize("name", ["llama-gqa", "qwen3-qknorm-tied", "llama-kv1-replicated",
                                  "qwen3-untied-vocab509"])
def test_tp1_equals_hf(tp1: dict[str, list[list[int]]], model_dirs: dict[str, Path],
                       load_hf: Callable[[Path], Any], name: str) -> None:
    hf = load_hf(model_dirs[name])
    _, _, prompts, lengths, _ = CASES[name]
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        assert tp1[name][i] == _hf_greedy(hf, p, n), f"prompt {i}"


def test_shard_plan_partitions() -> None:
    from executor.config import ModelConfig
    from executor.make_random_model import hf_config_for
    from executor.parallel.layers import shard_plan
    from executor.parallel.state import TPGroup

    cfg = ModelConfig.from_hf(hf_config_for("LlamaForCausalLM", "tiny", {"vocab_size": 509}))  # 4 q, 2 kv heads
    plans = [shard_plan(cfg, TPGroup(rank=r, world_size=4)) for r in range(4)]
    assert [p.kv_head_start for p in plans] == [0, 0, 1, 1]  # replicated: q heads 0,1 -> kv 0; 2,3 -> kv 1
    assert all(p.num_heads == 1 and p.num_kv_heads == 1 for p in plans)
    assert [p.vocab_rows(509) for p in plans] == [128, 128, 128, 125]
    two = [shard_plan(cfg, TPGroup(rank=r, world_size=2)) for r in range(2)]
    assert [(p.num_kv_heads, p.kv_head_start) for p in two] == [(1, 0), (1, 1)]
    with pytest.raises(ValueError, match="divide num_attention_heads"):
        shard_plan(cfg, TPGroup(rank=0, world_size=3))


def test_tp_size_mismatch_is_explained() -> None:
    from executor.parallel.state import resolve_tp_group

    assert resolve_tp_group(None) is None and resolve_tp_group(1) is None
    with pytest.raises(ValueError, match="executor.parallel.launch --tp 2"):
        resolve_tp_group(2)


def test_bf16_policy_accepts_only_near_ties() -> None:
    class FakeRunner:  # compare_greedy asks top2_gap only at a divergence
        pass

    import executor.parallel.selfcheck as sc

    gaps = iter([0.05, 1.5])
    original = sc.top2_gap
    sc.top2_gap = lambda runner, ids: next(gaps)
    try:
        near = compare_greedy([[1, 2, 3]], [[1, 2, 4]], [[9]], FakeRunner())
        far = compare_greedy([[1, 2, 3]], [[1, 5, 3]], [[9]], FakeRunner())
    finally:
        sc.top2_gap = original
    assert near["ok"] and near["sequences"][0]["first_divergence"] == 2
    assert not far["ok"] and far["sequences"][0]["first_divergence"] == 1
    assert compare_greedy([[1]], [[1]], [[9]], None)["ok"]


def test_single_process_greedy_tokens_helper(model_dirs: dict[str, Path], tp1: dict[str, list[list[int]]]) -> None:
    out = greedy_tokens(str(model_dirs["llama-gqa"]), PROMPTS[:1], LENGTHS[:1], tensor_parallel_size=1, **BASE)
    assert out == tp1["llama-gqa"][:1]
