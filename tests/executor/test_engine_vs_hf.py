"""Greedy generation through the core engine + real backend equals transformers' generate.

Each scenario drives the real scheduling paths (mixed batches, chunked prefill, prefix-cache
hits, preemption by recompute and by swap) on tiny fp32 random models and compares every
generated token with HF ``generate`` run on one prompt at a time. Runs on the CPU (torch
references of the kernels) and, where a GPU is present, on it (Triton kernels, CUDA graphs).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from core.config import SchedulerConfig
from core.request import Request
from core.sampling_params import SamplingParams
from executor import LLM, create_engine

VOCAB = 512
CUDA = torch.cuda.is_available()

MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaForCausalLM", {}),
    "qwen3": ("Qwen3ForCausalLM", {}),
    # Sliding-window layers take the torch attention (and disable CUDA graphs).
    "qwen2-sliding": ("Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 8,
                                           "max_window_layers": 1}),
}


@pytest.fixture(scope="module")
def models(make_tiny_model: Callable[..., Path], load_hf: Callable[[Path], Any]) -> dict[str, tuple[Path, Any]]:
    class Lazy(dict):  # written and loaded on first use, once per module
        def __missing__(self, key: str) -> tuple[Path, Any]:
            arch, overrides = MODELS[key]
            path = make_tiny_model(arch, overrides)
            hf = load_hf(path)
            hf.generation_config.eos_token_id = None  # compare full lengths (our requests ignore EOS)
            self[key] = (path, hf)
            return self[key]

    return Lazy()


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_greedy(hf: Any, prompt: list[int], n: int) -> list[int]:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), generation_config=config)
    return out[0, len(prompt):].tolist()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


def make_llm(path: Path, **kwargs: Any) -> LLM:
    kwargs = {"max_num_seqs": 8, "max_model_len": 256, "num_gpu_blocks": 128, "max_num_batched_tokens": 512,
              "cuda_graph_sizes": [1, 2, 4, 8]} | kwargs
    return LLM(path, **kwargs)


def check_against_hf(hf: Any, prompts: list[list[int]], lengths: list[int], outputs: list[Any]) -> None:
    for i, (prompt, n, out) in enumerate(zip(prompts, lengths, outputs)):
        assert out.prompt_token_ids == prompt
        assert out.finish_reason == "length"
        assert out.token_ids == hf_greedy(hf, prompt, n), f"prompt {i} (length {len(prompt)}) diverged from HF"


@pytest.mark.parametrize("name", list(MODELS))
def test_mixed_batch_matches_hf(models: dict[str, tuple[Path, Any]], name: str) -> None:
    """Prompts of different lengths (one under a block, one exactly a block, several blocks)
    and different output lengths share every step: prefill and decode rows mix."""
    path, hf = models[name]
    llm = make_llm(path)
    prompts = [tokens(n, seed) for seed, n in enumerate((3, 16, 17, 45, 90))]
    lengths = [24, 10, 30, 16, 20]
    outputs = llm.generate(prompts, [greedy(n) for n in lengths], use_tqdm=False)
    check_against_hf(hf, prompts, lengths, outputs)
    stats = llm.runner.stats
    assert stats.max_batch == len(prompts)
    if CUDA and name != "qwen2-sliding":
        assert stats.graph_steps > 0, "pure-decode steps should replay CUDA graphs"


@pytest.mark.skipif(not CUDA, reason="captures real CUDA graphs of more than 2,048 tokens")
def test_mixed_graphs_above_2048_tokens_match_hf(make_tiny_model: Callable[..., Path],
                                                  load_hf: Callable[[Path], Any]) -> None:
    """A first step of 3,740 tokens (a 3,000-token prompt beside two short ones) replays the
    4,096-token mixed graph, with padding tokens and empty padding requests, and decodes like HF."""
    path = make_tiny_model("Qwen3ForCausalLM", {"max_position_embeddings": 4096})
    hf = load_hf(path)
    hf.generation_config.eos_token_id = None
    llm = make_llm(path, max_model_len=4096, num_gpu_blocks=512, max_num_batched_tokens=4096)
    prompts = [tokens(n, 900 + n) for n in (3000, 40, 700)]
    lengths = [6, 12, 8]
    outputs = llm.generate(prompts, [greedy(n) for n in lengths], use_tqdm=False)
    check_against_hf(hf, prompts, lengths, outputs)
    stats = llm.runner.stats
    assert 4096 in stats.mixed_graph_sizes and stats.eager_steps == 0


def test_chunked_prefill_matches_hf(models: dict[str, tuple[Path, Any]]) -> None:
    path, hf = models["llama"]
    llm = make_llm(path, max_num_batched_tokens=32)
    prompts = [tokens(n, 10 + n) for n in (70, 45, 20)]
    lengths = [12, 20, 16]
    outputs = llm.generate(prompts, [greedy(n) for n in lengths], use_tqdm=False)
    check_against_hf(hf, prompts, lengths, outputs)
    steps = llm.engine.steps
    assert max(s.num_prefill_tokens + s.num_decode_tokens for s in steps) <= 32
    assert any(s.num_prefill_tokens and s.num_decode_tokens for s in steps), "expected steps mixing chunks and decodes"


def test_prefix_cache_hit_matches_hf(models: dict[str, tuple[Path, Any]]) -> None:
    path, hf = models["qwen3"]
    llm = make_llm(path)
    first = tokens(50, 1)
    (out,) = llm.generate([first], greedy(8), use_tqdm=False)
    assert out.metrics.num_cached_tokens == 0
    second = first[:40] + tokens(20, 2)  # shares two full blocks (32 tokens) with the first
    (out2,) = llm.generate([second], greedy(12), use_tqdm=False)
    assert out2.metrics.num_cached_tokens == 32
    assert out2.token_ids == hf_greedy(hf, second, 12)
    # The same prompt again: everything but the last (partial) block is a hit.
    (out3,) = llm.generate([second], greedy(12), use_tqdm=False)
    assert out3.metrics.num_cached_tokens == 48
    assert out3.token_ids == out2.token_ids


def _preempting_run(path: Path, **kwargs: Any) -> tuple[LLM, list[list[int]], list[int], list[Any]]:
    # 4 requests of 30 + 40 tokens need 5 blocks each at the end; the pool has 14.
    llm = make_llm(path, num_gpu_blocks=14, max_model_len=128, watermark=0.0, **kwargs)
    prompts = [tokens(30, 100 + i) for i in range(4)]
    lengths = [40, 40, 40, 40]
    outputs = llm.generate(prompts, [greedy(n) for n in lengths], use_tqdm=False)
    return llm, prompts, lengths, outputs


def test_preemption_recompute_matches_hf(models: dict[str, tuple[Path, Any]]) -> None:
    path, hf = models["llama"]
    llm, prompts, lengths, outputs = _preempting_run(path)
    assert sum(o.metrics.num_preemptions for o in outputs) > 0
    check_against_hf(hf, prompts, lengths, outputs)


def test_preemption_swap_matches_hf(models: dict[str, tuple[Path, Any]]) -> None:
    path, hf = models["llama"]
    llm, prompts, lengths, outputs = _preempting_run(path, preemption_mode="swap", num_cpu_blocks=32)
    assert sum(o.metrics.num_preemptions for o in outputs) > 0
    assert llm.runner.stats.swap_blocks > 0
    check_against_hf(hf, prompts, lengths, outputs)


def test_engine_core_with_real_backend(models: dict[str, tuple[Path, Any]]) -> None:
    """The core's EngineCore driven directly (as the online driver and validation do)."""
    path, hf = models["llama"]
    sched = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128)
    engine = create_engine(path, sched, num_gpu_blocks=64, cuda_graph_sizes=[1, 2, 4])
    prompts = [tokens(n, 7 + n) for n in (9, 33)]
    for i, p in enumerate(prompts):
        engine.add_request(Request(f"r{i}", p, greedy(6)))
    now = 0.0
    while engine.has_unfinished():
        now += engine.step(now).duration
    done = {r.request_id: r for r in engine.finished}
    for i, p in enumerate(prompts):
        assert done[f"r{i}"].output_token_ids == hf_greedy(hf, p, 6)
    assert all(s.duration > 0 for s in engine.steps)
    assert engine.steps[-1].time + engine.steps[-1].duration == pytest.approx(now)


def test_async_scheduling_equals_sync_with_stops_and_seeds(models: dict[str, tuple[Path, Any]]) -> None:
    """Stop tokens (found one step late by the async engine) and per-request seeded
    sampling with top-k (each request's generator draws once per token it samples): the
    async LLM returns exactly the sync LLM's tokens and finish reasons."""
    path, _ = models["qwen3"]
    prompts = [tokens(n, 700 + n) for n in (5, 18, 40, 23)]
    sync = make_llm(path, async_scheduling=False)
    probe = sync.generate(prompts, greedy(12), use_tqdm=False)
    # Stop each greedy request on its 5th token (stop ids act at their first occurrence).
    stops = [SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=(o.token_ids[4],)) for o in probe]
    seeded = [SamplingParams(temperature=0.8, top_k=20, seed=11 + i, max_tokens=10 + i, ignore_eos=True)
              for i in range(len(prompts))]
    params = stops + seeded
    both = prompts + prompts
    expected = make_llm(path, async_scheduling=False).generate(both, params, use_tqdm=False)
    llm = make_llm(path, async_scheduling=True)
    assert llm.async_scheduling
    got = llm.generate(both, params, use_tqdm=False)
    assert [(o.token_ids, o.finish_reason) for o in got] == [(o.token_ids, o.finish_reason) for o in expected]
    assert all(o.finish_reason == "stop" for o in got[:4])


@pytest.mark.parametrize("name,async_scheduling", [("llama", False), ("qwen3", False), ("llama", True)])
def test_cuda_graph_layout_matches_hf(models: dict[str, tuple[Path, Any]], name: str, async_scheduling: bool) -> None:
    """The graph path's fixed layout (batch padded to a capture size, padding rows with slot
    -1 and a dummy block table, full-width block tables) run eagerly: on a CPU this checks the
    bookkeeping that CUDA-graph replays rely on; on a GPU it captures real graphs. With async
    scheduling the decode ids are placeholders that the runner fills from the previous step's
    samples inside the graph's input buffer."""
    path, hf = models[name]
    sched = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=128, max_model_len=256)
    engine = create_engine(path, sched, num_gpu_blocks=96, cuda_graph_sizes=[2, 4, 8], emulate_cuda_graphs=True,
                           async_scheduling=async_scheduling)
    prompts = [tokens(n, 300 + n) for n in (5, 19, 40)]
    lengths = [18, 7, 12]  # the batch shrinks 3 -> 2 -> 1: padded to 4, then 2, then 2
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        engine.add_request(Request(f"g{i}", p, greedy(n)))
    now = 0.0
    while engine.has_unfinished():
        now += engine.step(now).duration
    done = {r.request_id: r for r in engine.finished}
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        assert done[f"g{i}"].output_token_ids == hf_greedy(hf, p, n)
    stats = engine.backend.runner.stats
    assert stats.graph_steps > 0 and set(stats.graph_sizes) == {2, 4}
    assert stats.mixed_graph_steps > 0 and stats.eager_steps == 0  # every prefill step fits a mixed graph
