"""The offline LLM API, the sampler, the online driver and error paths (tiny fp32 models)."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from core.config import SchedulerConfig
from core.metrics import summarize
from core.request import Request
from core.results import write_results
from core.sampling_params import SamplingParams
from executor import LLM, create_engine, run_online
from executor.sampler import SamplingBatch, apply_top_k_top_p, sample

VOCAB = 512
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def model_dir(make_tiny_model: Callable[..., Path]) -> Path:
    return make_tiny_model("Qwen3ForCausalLM")


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> LLM:
    return LLM(model_dir, max_num_seqs=8, max_model_len=256, num_gpu_blocks=128, max_num_batched_tokens=256,
               cuda_graph_sizes=[1, 2, 4, 8])


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


# ------------------------------------------------------------------ sampling through the engine

def test_seeded_sampling_is_reproducible_across_batches(llm: LLM) -> None:
    prompt = tokens(20, 0)
    sp = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    (alone,) = llm.generate([prompt], sp, use_tqdm=False)
    others = [tokens(n, 50 + n) for n in (7, 33, 12)]
    mixed = llm.generate([others[0], prompt, *others[1:]],
                         [SamplingParams(temperature=0.8, max_tokens=9, ignore_eos=True), sp,
                          greedy(20), SamplingParams(temperature=1.2, top_p=0.9, seed=5, max_tokens=16)],
                         use_tqdm=False)
    assert mixed[1].token_ids == alone.token_ids
    (other_seed,) = llm.generate([prompt], SamplingParams(temperature=1.0, seed=4321, max_tokens=16,
                                                           ignore_eos=True), use_tqdm=False)
    assert other_seed.token_ids != alone.token_ids


def test_top_k_1_and_tiny_top_p_equal_greedy(llm: LLM) -> None:
    prompts = [tokens(n, n) for n in (5, 21, 40)]
    ref = llm.generate(prompts, greedy(12), use_tqdm=False)
    top_k = llm.generate(prompts, SamplingParams(temperature=1.5, top_k=1, max_tokens=12, ignore_eos=True),
                         use_tqdm=False)
    top_p = llm.generate(prompts, SamplingParams(temperature=0.7, top_p=1e-6, max_tokens=12, ignore_eos=True),
                         use_tqdm=False)
    for r, k, p in zip(ref, top_k, top_p):
        assert k.token_ids == r.token_ids
        assert p.token_ids == r.token_ids


def test_greedy_rows_stay_greedy_in_a_random_batch(llm: LLM) -> None:
    prompts = [tokens(n, 200 + n) for n in (9, 30, 17)]
    ref = llm.generate(prompts, greedy(10), use_tqdm=False)
    params = [greedy(10), SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0.0, top_k=3, max_tokens=10, ignore_eos=True)]
    mixed = llm.generate(prompts, params, use_tqdm=False)
    assert mixed[0].token_ids == ref[0].token_ids
    assert mixed[2].token_ids == ref[2].token_ids
    assert all(0 <= t < VOCAB for t in mixed[1].token_ids)


def test_eos_stops_and_stop_tokens(llm: LLM) -> None:
    prompt = tokens(12, 3)
    (ref,) = llm.generate([prompt], greedy(20), use_tqdm=False)
    stop_at = ref.token_ids[5]
    first = ref.token_ids.index(stop_at)
    (out,) = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=20, stop_token_ids=(stop_at,)),
                          use_tqdm=False)
    assert out.finish_reason == "stop"
    assert out.token_ids == ref.token_ids[:first + 1]
    assert out.metrics.num_output_tokens == first + 1
    assert out.metrics.ttft is not None and out.metrics.ttft >= 0
    assert out.metrics.e2e_latency >= out.metrics.ttft


def test_outputs_in_prompt_order_with_text(model_dir: Path) -> None:
    class CharTokenizer:  # the API only needs encode / decode
        def encode(self, text: str) -> list[int]:
            return [3 + ord(c) % 500 for c in text]

        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            return " ".join(map(str, ids))

    llm = LLM(model_dir, max_num_seqs=4, max_model_len=128, num_gpu_blocks=64, tokenizer=CharTokenizer(),
              enforce_eager=True)
    outs = llm.generate(["hello world", [5, 6, 7]], greedy(4), use_tqdm=True)
    assert [o.prompt_token_ids for o in outs] == [CharTokenizer().encode("hello world"), [5, 6, 7]]
    assert outs[0].text == " ".join(map(str, outs[0].token_ids))
    (single,) = llm.generate([5, 6, 7], greedy(4), use_tqdm=False)  # one prompt as a flat id list
    assert single.token_ids == outs[1].token_ids


# ------------------------------------------------------------------ sampler unit checks

def test_top_k_top_p_masks() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0, 4.0]])
    out = apply_top_k_top_p(logits.clone(), torch.tensor([2, 0]), None, max_top_k=2)
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False, False]
    assert torch.isfinite(out[1]).all()
    sorted_path = apply_top_k_top_p(logits.clone(), torch.tensor([2, 0]), torch.tensor([1.0, 1.0]))
    assert torch.equal(torch.isfinite(sorted_path), torch.isfinite(out))
    probs = logits.softmax(-1)  # row 0: 0.64, 0.24, 0.09, ...
    out = apply_top_k_top_p(logits.clone(), None, torch.tensor([0.7, 0.5]))
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False, False]
    assert torch.isfinite(out[1]).tolist() == [False, False, False, False, True]
    assert probs[0, 0] < 0.7 < probs[0, :2].sum()


def test_sampler_matches_distribution_and_seeds() -> None:
    logits = torch.tensor([1.0, 0.0, -1.0, 2.0]).repeat(20000, 1)
    batch = SamplingBatch(all_greedy=False, temperature=torch.full((20000,), 1.0))
    counts = torch.bincount(sample(logits.clone(), batch), minlength=4).float() / 20000
    assert torch.allclose(counts, logits[0].softmax(-1), atol=0.015)
    gens = {0: torch.Generator().manual_seed(3), 1: torch.Generator().manual_seed(3)}
    b = SamplingBatch(all_greedy=False, temperature=torch.ones(2), generators=gens)
    draws = [sample(logits[:2].clone(), b).tolist() for _ in range(8)]
    assert all(d[0] == d[1] for d in draws)  # same seed, same logits: same tokens


# ------------------------------------------------------------------ errors

def test_bad_inputs(llm: LLM, model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([tokens(250, 0)], greedy(10), use_tqdm=False)
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate(["a string"], greedy(4), use_tqdm=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[1, 2, VOCAB]], greedy(4), use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], greedy(4), use_tqdm=False)
    with pytest.raises(ValueError, match="2 sampling params for 1 prompts"):
        llm.generate([[1, 2]], [greedy(2), greedy(2)], use_tqdm=False)
    # A failed call leaves the engine clean: the next call works.
    (ok,) = llm.generate([[4, 5, 6]], greedy(3), use_tqdm=False)
    assert len(ok.token_ids) == 3 and not llm.engine.has_unfinished()
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLM(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        LLM(tmp_path / "missing")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        LLM(model_dir, max_model_len=4096)
    with pytest.raises(ValueError, match="KV cache can hold"):
        LLM(model_dir, max_model_len=256, num_gpu_blocks=8)


def test_fp8_kv_cache(model_dir: Path) -> None:
    """``kv_cache_dtype="fp8"``: a float8 pool (a quarter of fp32's bytes a block, so a
    profiled pool gets four times the blocks). Prefilling the same prompts writes
    exactly the fp32 run's layer-0 keys and values rounded to fp8 (that layer's K/V depend on
    the prompt only), deeper layers stay close, and generation runs through the fp8 path."""
    # A fixed pool: on a GPU, a second profiled LLM in this process would get what the first left.
    kw = dict(max_num_seqs=8, max_model_len=256, max_num_batched_tokens=256, async_scheduling=False,
              num_gpu_blocks=128)
    exact = LLM(model_dir, **kw)
    fp8 = LLM(model_dir, kv_cache_dtype="fp8", **kw)
    assert fp8.runner.kv_pool.dtype == torch.float8_e4m3fn
    assert fp8.runner.block_bytes * 4 == exact.runner.block_bytes
    assert fp8.backend.describe()["kv_cache_dtype"] == "float8_e4m3fn"
    prompts = [tokens(n, 40 + n) for n in (6, 30, 57)]
    for llm in (exact, fp8):  # one token each: only the prompts' K/V are written
        llm.generate(prompts, greedy(1), use_tqdm=False)
    want = exact.runner.kv_pool.to(torch.float8_e4m3fn)
    got = fp8.runner.kv_pool
    assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8))
    assert got[0].float().abs().sum() > 0
    deep = got[-1].float() - exact.runner.kv_pool[-1].float()
    assert deep.abs().mean() < 0.1 * exact.runner.kv_pool[-1].float().abs().mean()
    out = fp8.generate(prompts, greedy(12), use_tqdm=False)
    assert all(len(o.token_ids) == 12 and all(0 <= t < VOCAB for t in o.token_ids) for o in out)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM(model_dir, max_model_len=256, kv_cache_dtype="int4")


def test_request_larger_than_pool_names_the_knobs(model_dir: Path) -> None:
    small = LLM(model_dir, max_num_seqs=4, max_model_len=256, num_gpu_blocks=20, watermark=0.5,
                enforce_eager=True)
    with pytest.raises(ValueError, match="KV blocks.*num_gpu_blocks"):
        small.generate([tokens(200, 1)], greedy(20), use_tqdm=False)


# ------------------------------------------------------------------ online driver

def test_run_online_replays_arrivals(model_dir: Path, tmp_path: Path) -> None:
    sched = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128)
    engine = create_engine(model_dir, sched, num_gpu_blocks=64, cuda_graph_sizes=[1, 2, 4])
    arrivals = [0.0, 0.0, 0.05, 0.25]
    reqs = [Request(f"q{i}", tokens(10 + 7 * i, i), greedy(5 + i), arrival_time=t) for i, t in enumerate(arrivals)]
    reqs.append(Request("too-long", tokens(200, 9), greedy(5), arrival_time=0.01))
    result = run_online(engine, reqs)
    done = {r.request_id: r for r in result.finished}
    assert set(done) == {f"q{i}" for i in range(4)}
    assert [r.request_id for r in result.rejected] == ["too-long"]
    for r in reqs[:4]:
        assert r.first_scheduled_time >= r.arrival_time
        assert r.num_output_tokens == r.sampling_params.max_tokens
    assert done["q3"].first_scheduled_time >= 0.25  # the driver waited for it
    metrics = summarize(result.requests, result.steps)
    assert metrics["completed"] == 4 and metrics["output_throughput"] > 0
    out = write_results(tmp_path / "run", result.requests, result.steps, metrics, engine.breakdown)
    assert json.loads((out / "metrics.json").read_text())["completed"] == 4


# ------------------------------------------------------------------ GPU only

@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_gpu_profiled_pool_and_graphs_match_eager(model_dir: Path) -> None:
    prompts = [tokens(n, n) for n in (3, 18, 40, 65, 7)]
    sp = [greedy(n) for n in (20, 9, 14, 20, 3)]
    eager = LLM(model_dir, max_num_seqs=8, max_model_len=256, num_gpu_blocks=128, enforce_eager=True)
    ref = eager.generate(prompts, sp, use_tqdm=False)
    assert eager.runner.stats.graph_steps == 0
    del eager
    auto = LLM(model_dir, max_num_seqs=8, max_model_len=256, gpu_memory_utilization=0.3,
               cuda_graph_sizes=[1, 2, 4, 8])
    assert auto.runner.memory_profile is not None and auto.runner.num_gpu_blocks > 1000
    outs = auto.generate(prompts, sp, use_tqdm=False)
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    assert auto.runner.stats.graph_steps > 0


def test_no_dummy_or_captured_request_is_longer_than_max_model_len(model_dir: Path) -> None:
    """The memory-profiling forward and the mixed-graph captures use requests of at most
    ``max_model_len`` tokens (a 16k budget over 8 sequences once made 2,048-token dummy
    requests whose positions ran past the rotary tables: an intermittent illegal memory
    access on the GPU), and no graph is captured for more tokens than a step can hold."""
    from executor.model_runner import ModelRunner

    for num_reqs, num_tokens in [(8, 2048), (8, 2047), (3, 10), (5, 5)]:
        new, computed = ModelRunner._dummy_batch(None, num_reqs, num_tokens)  # type: ignore[arg-type]
        assert sum(new) == num_tokens and max(new) - min(new) <= 1 and computed == [0] * num_reqs
    llm = LLM(model_dir, max_num_seqs=8, max_model_len=256, num_gpu_blocks=128, max_num_batched_tokens=16384,
              emulate_cuda_graphs=True, device="cpu")
    runner = llm.runner
    assert runner.max_step_tokens == 8 * 256
    assert max(runner.mixed_capture_sizes) == 2048
    out = llm.generate([tokens(200, 1), tokens(230, 2)], [greedy(3), greedy(3)], use_tqdm=False)
    assert [len(o.token_ids) for o in out] == [3, 3]


def test_staging_layout_is_aligned() -> None:
    """Every region of the staging buffer starts 64-byte aligned (Triton specialises kernels
    on pointer alignment: unaligned views would compile new variants mid-run)."""
    from executor.model_runner import ModelRunner

    for t, r, w, n in [(1, 1, 16, 1), (37, 5, 32, 3), (8191, 255, 256, 17)]:
        offsets = ModelRunner._layout(t, r, w, n)
        assert all(o % 16 == 0 for o in offsets[:-1]), offsets


@pytest.mark.skipif(not CUDA, reason="the fused sampling kernel runs on the GPU")
def test_fused_gumbel_sampler_on_gpu() -> None:
    from executor.sampler import gumbel_sample

    torch.manual_seed(0)
    logits = (torch.randn(6, 50_000, device="cuda") * 4).to(torch.bfloat16)
    temps = torch.tensor([0.0, 1.0, 0.0, 0.7, 0.0, 2.0], device="cuda")
    tokens = gumbel_sample(logits, temps, seed=11)
    greedy = logits.float().argmax(-1)
    assert tokens[[0, 2, 4]].tolist() == greedy[[0, 2, 4]].tolist()
    assert torch.equal(gumbel_sample(logits, temps, seed=11), tokens)  # same seed, same draw
    row = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5], device="cuda")
    many = row.repeat(20000, 1)
    counts = torch.bincount(gumbel_sample(many, torch.full((20000,), 0.5, device="cuda"), seed=3),
                            minlength=5).float() / 20000
    assert torch.allclose(counts, (row / 0.5).softmax(-1), atol=0.015)


def test_kernel_warmup_runs(llm: LLM) -> None:
    """The warm-up pass (run at start-up on a GPU) leaves the engine's results unchanged."""
    prompt = tokens(23, 77)
    (before,) = llm.generate([prompt], greedy(6), use_tqdm=False)
    llm.runner._warmup_kernels()
    (after,) = llm.generate([prompt], greedy(6), use_tqdm=False)
    assert after.token_ids == before.token_ids
