"""Tests for core.workloads: arrivals, lengths, prompt content, trace readers, the builder."""
from __future__ import annotations

import gc
import hashlib
import math
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import core
from core.request import Request
from core.workloads import (ClosedLoopSpec, EmpiricalLengths, FixedIntervalArrivals, FixedLengths, GammaArrivals,
                            HashBlockTokens, PoissonArrivals, SystemPromptGroups, TraceArrivals, UniformLengths,
                            WorkloadConfig, WorkloadRequest, build_workload, conversation_prompts,
                            locate_traces_dir, random_token_segments, read_azure_trace, read_burstgpt_trace,
                            read_mooncake_trace, read_sharegpt_lengths, resolve_trace_path, segments_to_list,
                            truncate_segments)
from core.workloads import traces
from core.workloads.traces import TRACES_ENV_VAR


def _traces() -> Path:
    try:
        return locate_traces_dir()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _synthetic(**overrides) -> WorkloadConfig:
    base = dict(lengths="fixed", input_len=16, output_len=4, num_requests=50, rate=10.0, vocab_size=1000)
    return WorkloadConfig(**{**base, **overrides})


# --- arrivals -----------------------------------------------------------------------

def test_poisson_mean_interarrival_and_cv():
    times = PoissonArrivals(rate=20.0).arrival_times(_rng(), num_requests=20_000)
    gaps = np.diff(times)
    assert times[0] == 0.0 and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(1 / 20.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("cv", [0.5, 3.0])
def test_gamma_rate_and_cv(cv):
    gaps = np.diff(GammaArrivals(rate=5.0, cv=cv).arrival_times(_rng(1), num_requests=40_000))
    assert gaps.mean() == pytest.approx(0.2, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.08)


def test_fixed_interval_is_exact():
    times = FixedIntervalArrivals(0.25).arrival_times(_rng(), num_requests=5)
    np.testing.assert_allclose(times, [0.0, 0.25, 0.5, 0.75, 1.0])


def test_cutoffs_count_duration_and_both():
    proc = PoissonArrivals(rate=100.0)
    by_count = proc.arrival_times(_rng(3), num_requests=10_000)
    by_time = proc.arrival_times(_rng(3), duration_s=30.0)
    assert len(by_count) == 10_000
    assert by_time[-1] < 30.0 and len(by_time) == pytest.approx(3000, rel=0.1)
    # A duration cut-off is a prefix of the same seed's count cut-off.
    np.testing.assert_array_equal(by_time, by_count[: len(by_time)])
    both = proc.arrival_times(_rng(3), num_requests=100, duration_s=30.0)
    np.testing.assert_array_equal(both, by_count[:100])
    with pytest.raises(ValueError, match="num_requests or duration_s"):
        proc.arrival_times(_rng(), None, None)


def test_trace_arrivals_speed_and_cutoffs():
    ts = np.array([100.0, 101.0, 103.0, 107.0])
    np.testing.assert_allclose(TraceArrivals(ts).arrival_times(), [0, 1, 3, 7])
    np.testing.assert_allclose(TraceArrivals(ts, speed=2.0).arrival_times(), [0, 0.5, 1.5, 3.5])
    np.testing.assert_allclose(TraceArrivals(ts, speed=2.0).arrival_times(duration_s=1.5), [0, 0.5])
    np.testing.assert_allclose(TraceArrivals(ts).arrival_times(num_requests=3), [0, 1, 3])
    with pytest.raises(ValueError, match="non-decreasing"):
        TraceArrivals(np.array([0.0, 2.0, 1.0]))


# --- lengths ------------------------------------------------------------------------

def test_length_distributions():
    i, o = FixedLengths(7, 3).sample(_rng(), 4)
    assert i.tolist() == [7] * 4 and o.tolist() == [3] * 4
    i, o = UniformLengths((5, 9), (1, 2)).sample(_rng(), 5000)
    assert i.min() == 5 and i.max() == 9 and set(o.tolist()) == {1, 2}
    emp = EmpiricalLengths(np.array([10, 20, 30]), np.array([1, 2, 3]))
    i, o = emp.sample(_rng(), 1000)
    assert (o * 10 == i).all()  # rows stay paired
    assert set(i.tolist()) == {10, 20, 30}


def test_synthetic_lengths_from_a_trace():
    code = read_azure_trace(resolve_trace_path("azure_code"))
    w = build_workload(dict(lengths="azure_code", num_requests=200, rate=10.0, vocab_size=1000))
    pairs = set(zip(code.input_lens.tolist(), code.output_lens.tolist()))
    assert all((r.num_prompt_tokens, r.max_tokens) in pairs for r in w)


def test_sharegpt_lengths_sampled_from_the_file():
    sharegpt = read_sharegpt_lengths(resolve_trace_path("sharegpt"))
    i, _ = EmpiricalLengths.from_trace(sharegpt).sample(_rng(), 20_000)
    assert i.mean() == pytest.approx(sharegpt.input_lens.mean(), rel=0.05)


# --- prompt content -----------------------------------------------------------------

def test_random_token_segments_are_views_in_vocab():
    segs = random_token_segments(_rng(), [3, 0, 5], vocab_size=7)
    assert [len(s) for s in segs] == [3, 0, 5]
    assert all(0 <= t < 7 for s in segs for t in s.tolist())
    assert not segs[0].flags.writeable  # shared segments must not be mutated


def test_truncate_and_conversation_prompts():
    a, b, c = np.arange(3), np.arange(3, 5), np.arange(5, 9)
    assert segments_to_list(truncate_segments((a, b, c), 4)) == [0, 1, 2, 3]
    assert segments_to_list(truncate_segments((a, b), 99)) == [0, 1, 2, 3, 4]
    prompts = conversation_prompts((a,), [b, c], [np.array([42])])
    assert segments_to_list(prompts[0]) == [0, 1, 2, 3, 4]
    assert segments_to_list(prompts[1]) == [0, 1, 2, 3, 4, 42, 5, 6, 7, 8]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 20), min_size=1, max_size=6), st.integers(0, 150))
def test_truncate_segments_is_a_head(lengths, n):
    segs = tuple(random_token_segments(_rng(), lengths, vocab_size=50))
    full = segments_to_list(segs)
    assert segments_to_list(truncate_segments(segs, n)) == full[:n]


def test_hash_blocks_same_id_same_tokens_and_exact_length():
    blocks = HashBlockTokens(vocab_size=32000, seed=5, block_size=8)
    p1 = segments_to_list(blocks.expand([1, 2, 3], 20))
    p2 = segments_to_list(blocks.expand([1, 2, 9], 17))
    assert len(p1) == 20 and len(p2) == 17
    assert p1[:16] == p2[:16] and p1[16:] != p2[16:]
    assert len(blocks) == 4  # cached once per distinct id
    # Independent of the request and of cache order: a fresh expander agrees.
    other = HashBlockTokens(vocab_size=32000, seed=5, block_size=8)
    assert segments_to_list(other.expand([2], 8)) == p1[8:16]
    assert segments_to_list(other.expand([7, 1], 9))[8:] == p1[:1]
    assert segments_to_list(HashBlockTokens(32000, seed=6, block_size=8).expand([1], 8)) != p1[:8]
    with pytest.raises(ValueError, match="expected ceil"):
        blocks.expand([1, 2], 20)


def test_shared_system_prompt_groups_share_exact_prefixes():
    w = build_workload(_synthetic(system_prompt_lens=(32, 64), num_requests=200))
    heads: dict[int, list[int]] = {}
    for r in w:
        ids = r.prompt_token_ids
        assert len(ids) in (32 + 16, 64 + 16)
        group_len = len(ids) - 16
        heads.setdefault(group_len, ids[:group_len])
        assert ids[:group_len] == heads[group_len]
    assert set(heads) == {32, 64}
    assert heads[32] != heads[64][:32]
    groups = SystemPromptGroups((4, 4, 4)).assign(_rng(), 3000)
    assert np.bincount(groups).min() > 900  # uniform assignment


def test_multi_turn_prompt_extends_previous_turn():
    cfg = _synthetic(num_turns=4, num_requests=40, lengths="uniform", input_range=(3, 9), output_range=(2, 5))
    w = build_workload(cfg)
    by_conv: dict[int, list[WorkloadRequest]] = {}
    for r in w:  # open loop: arrival order, each conversation's turns in order
        by_conv.setdefault(r.conversation_id, []).append(r)
        assert r.client_id == r.conversation_id
    assert len(by_conv) == 10
    for turns in by_conv.values():
        assert [t.turn for t in turns] == list(range(len(turns)))
        for prev, cur in zip(turns, turns[1:]):
            p, c = prev.prompt_token_ids, cur.prompt_token_ids
            assert c[: len(p)] == p
            assert len(c) > len(p) + prev.max_tokens  # history output + new user tokens
            assert cur.arrival_time >= prev.arrival_time
    # The history's "output" tokens are reproducible from the seed alone.
    again = build_workload(cfg)
    assert [r.prompt_token_ids for r in w] == [r.prompt_token_ids for r in again]


def test_closed_loop_queues_whole_conversations_per_user():
    w = build_workload(_synthetic(arrival="closed_loop", num_users=3, think_time_s=0.5, num_turns=2,
                                  num_requests=13, duration_s=60.0))
    assert w.closed_loop == ClosedLoopSpec(3, 0.5) and w.duration_s == 60.0
    assert all(r.arrival_time is None for r in w)
    queues = w.user_queues()
    assert sum(map(len, queues)) == 13
    for user, queue in enumerate(queues):
        assert all(r.client_id == user for r in queue)
        order = [(r.conversation_id, r.turn) for r in queue]
        assert order == sorted(order)  # finish a conversation's turns before the next one
    with pytest.raises(ValueError, match="closed-loop"):
        w.requests[0].to_request()
    with pytest.raises(ValueError, match="closed-loop"):
        w.to_requests()
    req = w.requests[0].to_request(arrival_time=2.5)
    assert req.arrival_time == 2.5 and req.client_id == 0


# --- builder ------------------------------------------------------------------------

def test_same_seed_same_workload_and_streams_are_independent():
    cfg = dict(lengths="uniform", num_requests=300, rate=5.0, seed=7, system_prompt_lens=[8], num_priorities=3)
    a, b = build_workload(cfg), build_workload(cfg)

    def flat(w):
        return [(r.request_id, r.arrival_time, r.prompt_token_ids, r.max_tokens, r.priority) for r in w]

    assert flat(a) == flat(b)
    c = build_workload({**cfg, "seed": 8})
    assert flat(a) != flat(c)
    # Changing the vocabulary changes tokens, not arrivals or lengths.
    d = build_workload({**cfg, "vocab_size": 100})
    assert [r.arrival_time for r in a] == [r.arrival_time for r in d]
    assert [r.num_prompt_tokens for r in a] == [r.num_prompt_tokens for r in d]
    assert {r.priority for r in a} == {0, 1, 2}


def test_default_config_is_sharegpt_poisson():
    cfg = WorkloadConfig(num_requests=500, rate=4.0)
    assert cfg.arrival_kind == "poisson" and cfg.lengths_kind == "sharegpt"
    w = build_workload(cfg)
    assert len(w) == 500 and not w.is_closed_loop
    assert np.mean([r.num_prompt_tokens for r in w]) == pytest.approx(2340, rel=0.15)


def test_to_request_builds_core_request():
    w = build_workload(_synthetic(deadline_s=2.0, num_requests=3))
    wr = w.requests[1]
    req = wr.to_request()
    assert isinstance(req, Request)
    assert req.prompt_token_ids == wr.prompt_token_ids and all(type(t) is int for t in req.prompt_token_ids)
    assert req.sampling_params.max_tokens == 4 and req.sampling_params.ignore_eos
    assert req.arrival_time == wr.arrival_time and req.deadline == pytest.approx(wr.arrival_time + 2.0)
    assert req.expected_output_len == 4
    assert [r.request_id for r in w.to_requests()] == ["0", "1", "2"]


def test_max_model_len_clips_prompt_tail():
    cfg = _synthetic(system_prompt_lens=(10,), input_len=30, output_len=8, num_requests=20)
    full, clipped = build_workload(cfg), build_workload(replace(cfg, max_model_len=24))
    for f, c in zip(full, clipped):
        assert c.num_prompt_tokens + c.max_tokens <= 24 and c.max_tokens == 8
        assert f.prompt_token_ids[: c.num_prompt_tokens] == c.prompt_token_ids
    tiny = build_workload(replace(cfg, max_model_len=5))
    assert all(r.num_prompt_tokens == 1 and r.max_tokens == 4 for r in tiny)
    assert all(r.num_prompt_tokens + r.max_tokens == 48 for r in full)  # untouched without the hook


def test_duration_cutoff_in_builder():
    w = build_workload(_synthetic(num_requests=None, duration_s=20.0, rate=10.0))
    assert len(w) == pytest.approx(200, rel=0.25) and max(r.arrival_time for r in w) < 20.0


def test_generation_is_fast():
    # 2e7 tokens: ~0.1 s with vectorised generation, tens of seconds with a per-token loop.
    start = time.perf_counter()
    w = build_workload(dict(lengths="fixed", input_len=1000, output_len=100, num_requests=20_000, rate=100.0))
    elapsed = time.perf_counter() - start
    assert len(w) == 20_000 and w.requests[-1].num_prompt_tokens == 1000
    assert elapsed < 3.0, f"20k x 1000-token workload took {elapsed:.2f}s"


# --- traces: real files -------------------------------------------------------------

def test_read_azure_code_and_conv():
    root = _traces()
    code = read_azure_trace(root / "azure-2023/AzureLLMInferenceTrace_code.csv", max_rows=100)
    assert len(code) == 100 and code.timestamps_s[0] == 0.0
    assert (code.input_lens[0], code.output_lens[0]) == (4808, 10)
    assert code.timestamps_s[1] == pytest.approx(0.052)
    conv = read_azure_trace(root / "azure-2023/AzureLLMInferenceTrace_conv.csv")
    assert len(conv) == 19_366 and (np.diff(conv.timestamps_s) >= 0).all()
    assert conv.timestamps_s[-1] / 60 == pytest.approx(58.4, abs=0.1)
    assert (conv.input_lens[0], conv.output_lens[0]) == (374, 44)


def test_read_mooncake_and_sharegpt():
    root = _traces()
    moon = read_mooncake_trace(root / "mooncake/conversation_trace.jsonl", max_rows=200)
    assert len(moon) == 200 and moon.hash_block_size == 512 and moon.timestamps_s[0] == 0.0
    assert all(len(h) == math.ceil(n / 512) for h, n in zip(moon.hash_ids, moon.input_lens.tolist()))
    share = read_sharegpt_lengths(root / "sharegpt-lengths/sharegpt_8k_filtered_stats_llama2_tokenizer.csv")
    assert len(share) == 30_731 and share.timestamps_s is None
    assert (share.input_lens[0], share.output_lens[0]) == (74, 918)


def test_mooncake_workload_exact_lengths_and_shared_prefixes():
    w = build_workload(dict(kind="mooncake", num_requests=300, vocab_size=32000))
    moon = read_mooncake_trace(resolve_trace_path("mooncake"), max_rows=300)
    prompts = [r.prompt_token_ids for r in w]
    assert [len(p) for p in prompts] == moon.input_lens.tolist()
    assert [r.max_tokens for r in w] == moon.output_lens.tolist()
    first_block: dict[int, list[int]] = {}
    for ids, p in zip(moon.hash_ids, prompts):
        if len(p) >= 512:
            assert first_block.setdefault(ids[0], p[:512]) == p[:512]
    assert len(first_block) < 300  # the trace does share first blocks
    # Timestamps (ms) become seconds.
    np.testing.assert_allclose([r.arrival_time for r in w], moon.timestamps_s - moon.timestamps_s[0])


def test_trace_replay_with_speed_and_synthetic_arrivals():
    fast = build_workload(dict(kind="azure_code", num_requests=50, speed=4.0))
    slow = build_workload(dict(kind="azure_code", num_requests=50))
    np.testing.assert_allclose([r.arrival_time * 4 for r in fast], [r.arrival_time for r in slow])
    assert fast.requests[0].num_prompt_tokens == 4808 and fast.requests[0].max_tokens == 10
    poisson = build_workload(dict(kind="azure_code", arrival="poisson", rate=100.0, num_requests=50))
    assert [r.num_prompt_tokens for r in poisson] == [r.num_prompt_tokens for r in slow]  # rows in order
    by_time = build_workload(dict(kind="azure_conv", num_requests=None, duration_s=60.0))
    assert max(r.arrival_time for r in by_time) < 60.0 and len(by_time) > 100


# --- BurstGPT and malformed files (temp files) ---------------------------------------

BURST_HEADER = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_burstgpt_skips_and_counts_failures(tmp_path):
    path = _write(tmp_path, "burst.csv", BURST_HEADER
                  + "5,ChatGPT,472,18,490,Conversation log\n"
                  + "45,ChatGPT,1087,0,1087,Conversation log\n"
                  + "118,GPT-4,417,276,693,API log\n"
                  + "120,ChatGPT,0,12,12,API log\n")
    trace = read_burstgpt_trace(path)
    assert trace.input_lens.tolist() == [472, 417] and trace.output_lens.tolist() == [18, 276]
    assert trace.timestamps_s.tolist() == [5.0, 118.0]
    assert trace.skipped == {"failed (0 response tokens)": 1, "empty prompt (0 request tokens)": 1}
    assert read_burstgpt_trace(path, model="GPT-4").input_lens.tolist() == [417]
    assert read_burstgpt_trace(path, log_type="Conversation log").skipped["failed (0 response tokens)"] == 1
    w = build_workload(dict(kind="burstgpt", trace_path=str(path), num_requests=None))
    assert [r.arrival_time for r in w] == [0.0, 113.0] and w.skipped["failed (0 response tokens)"] == 1
    with pytest.raises(ValueError, match="trace_path"):
        build_workload(dict(kind="burstgpt"))


@pytest.mark.parametrize("body, line, reason", [
    ("TIMESTAMP,ContextTokens,GeneratedTokens\r\n2023-11-16 18:17:03.97,10,5\r\nnot-a-date,3,4\r\n", 3, "TIMESTAMP"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.97,10,5\n2023-11-16 18:17:04,abc,4\n", 3,
     "ContextTokens"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.97,10,0\n", 2, "GeneratedTokens"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.97,10,5\n\n2023-11-16 18:17:05,1,1\n", 3,
     "empty line"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03.97,10,5\n2023-11-16 18:17:05,1,1,9\n", 3,
     "fields"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:05,10,5\n2023-11-16 18:17:04,1,1\n", 3,
     "back in time"),
    ("TIMESTAMP,Context,GeneratedTokens\n2023-11-16 18:17:05,10,5\n", 1, "ContextTokens"),
])
def test_malformed_azure_rows(tmp_path, body, line, reason):
    path = _write(tmp_path, "azure.csv", body)
    with pytest.raises(ValueError, match=reason) as err:
        read_azure_trace(path)
    assert str(path) in str(err.value) and f"{line}" in str(err.value)


@pytest.mark.parametrize("rows, line, reason", [
    (['{"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [1, 2]}', '{"timestamp": 1,'],
     2, "invalid JSON"),
    (['{"timestamp": 0, "input_length": 600, "output_length": 5}'], 1, "hash_ids"),
    (['{"timestamp": 0, "input_length": 600, "output_length": 5, "hash_ids": [1]}'], 1, "expected ceil"),
    (['{"timestamp": 0, "input_length": 0, "output_length": 5, "hash_ids": []}'], 1, "input_length"),
    (['{"timestamp": -3, "input_length": 5, "output_length": 5, "hash_ids": [1]}'], 1, "timestamp"),
    (['{"timestamp": 0, "input_length": 5, "output_length": 5, "hash_ids": [-1]}'], 1, "hash_ids"),
    (['{"timestamp": 9, "input_length": 5, "output_length": 5, "hash_ids": [1]}', '',
      '{"timestamp": 3, "input_length": 5, "output_length": 5, "hash_ids": [1]}'], 3, "back in time"),
])
def test_malformed_mooncake_rows(tmp_path, rows, line, reason):
    path = _write(tmp_path, "moon.jsonl", "\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=reason) as err:
        read_mooncake_trace(path)
    assert f"{path}:{line}:" in str(err.value)


def test_malformed_sharegpt_and_burstgpt(tmp_path):
    share = _write(tmp_path, "s.csv", "num_prefill_tokens,num_decode_tokens\n5,6\n7,-1\n")
    with pytest.raises(ValueError, match=rf"{share}:3: column 'num_decode_tokens'"):
        read_sharegpt_lengths(share)
    burst = _write(tmp_path, "b.csv", BURST_HEADER + "5,ChatGPT,47.5,18,490,Conversation log\n")
    with pytest.raises(ValueError, match=rf"{burst}:2: column 'Request tokens' must be an integer"):
        read_burstgpt_trace(burst)
    nan_time = _write(tmp_path, "n.csv", BURST_HEADER + "nan,ChatGPT,47,18,65,API log\n")
    with pytest.raises(ValueError, match="Timestamp"):
        read_burstgpt_trace(nan_time)
    with pytest.raises(FileNotFoundError):
        read_sharegpt_lengths(tmp_path / "missing.csv")


# --- locating traces ----------------------------------------------------------------

def test_locate_traces_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(TRACES_ENV_VAR, str(tmp_path))
    assert locate_traces_dir() == tmp_path
    assert resolve_trace_path("mooncake", "x/y.jsonl") == tmp_path / "x/y.jsonl"
    monkeypatch.setenv(TRACES_ENV_VAR, str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=TRACES_ENV_VAR):
        locate_traces_dir()
    monkeypatch.delenv(TRACES_ENV_VAR)
    beside_repo = Path(core.__file__).resolve().parents[1].parent / "shared" / "traces"
    if beside_repo.is_dir():  # the layout CI and the developers' machines use: ../shared
        assert locate_traces_dir().resolve() == beside_repo.resolve()


# --- bad parameters -----------------------------------------------------------------

@pytest.mark.parametrize("field, value, shown", [
    ("rate", -1.0, "-1.0"), ("rate", float("nan"), "nan"), ("rate", 0, "got 0"), ("cv", 0.0, "0.0"),
    ("cv", -2.0, "-2.0"), ("speed", 0.0, "0.0"), ("num_requests", 0, "got 0"), ("duration_s", -5.0, "-5.0"),
    ("duration_s", float("nan"), "nan"), ("input_len", -3, "-3"), ("output_len", 0, "got 0"),
    ("input_range", (5, 2), "(5, 2)"), ("vocab_size", 0, "got 0"), ("num_turns", 0, "got 0"),
    ("think_time_s", -1.0, "-1.0"), ("num_users", 0, "got 0"), ("max_model_len", 1, "got 1"), ("seed", -1, "-1"),
    ("system_prompt_lens", (10, 0), "[1] must be an int >= 1, got 0"), ("kind", "nope", "'nope'"),
    ("arrival", "weibull", "'weibull'"), ("deadline_s", float("inf"), "inf"), ("num_requests", 2.5, "2.5"),
])
def test_bad_config_values_name_field_and_value(field, value, shown):
    with pytest.raises(ValueError, match=f"WorkloadConfig.{field}") as err:
        WorkloadConfig(**{field: value})
    assert shown in str(err.value)


@pytest.mark.parametrize("spec, match", [
    (dict(arrival="trace"), "arrival='trace'"),
    (dict(kind="azure_conv", lengths="fixed"), "lengths"),
    (dict(num_requests=None), "num_requests or duration_s"),
    (dict(arrival="closed_loop", num_requests=None), "num_requests"),
    (dict(kind="azure_code", num_turns=2), "num_turns"),
    (dict(kind="mooncake", system_prompt_lens=[5]), "system_prompt_lens"),
    (dict(lengths="fixed", trace_path="x.csv"), "trace_path"),
    (dict(burstgpt_model="GPT-4"), "burstgpt"),
    (dict(rates=3), "unknown field"),
])
def test_contradictory_specs_rejected(spec, match):
    with pytest.raises(ValueError, match=match):
        build_workload(spec)


@pytest.mark.parametrize("make", [
    lambda: PoissonArrivals(float("nan")),
    lambda: GammaArrivals(1.0, 0.0),
    lambda: FixedIntervalArrivals(-1.0),
    lambda: TraceArrivals(np.array([0.0, 1.0]), speed=0.0),
    lambda: TraceArrivals(np.array([0.0, float("nan")])),
    lambda: PoissonArrivals(1.0).arrival_times(_rng(), num_requests=0),
    lambda: PoissonArrivals(1.0).arrival_times(_rng(), duration_s=-1.0),
    lambda: ClosedLoopSpec(0),
    lambda: ClosedLoopSpec(2, think_time_s=float("nan")),
    lambda: EmpiricalLengths(np.array([1, 0]), np.array([1, 1])),
    lambda: UniformLengths((0, 5), (1, 2)),
    lambda: random_token_segments(_rng(), [-1], 10),
    lambda: HashBlockTokens(vocab_size=0, seed=0),
])
def test_bad_component_parameters(make):
    with pytest.raises(ValueError):
        make()


# --- pinned outputs: speed-ups must not change a single token, length or arrival -------
# Digests taken from the implementation before the construction fast paths; any change
# to them means the same seed no longer gives the same workload.

def _hex(x: float | None) -> str:
    return "None" if x is None else float(x).hex()


def _workload_digest(spec: dict) -> str:
    w = build_workload(spec)
    h = hashlib.sha256()
    for r in w:
        h.update(repr((r.request_id, _hex(r.arrival_time), r.max_tokens, r.priority, _hex(r.deadline_s),
                       r.client_id, r.conversation_id, r.turn)).encode())
        h.update(np.asarray(r.prompt_token_ids, dtype=np.int64).tobytes())
    opened, sessions = w.core_requests()  # what simulator.runner.build_requests returns
    for req in opened + [q for s in sessions for q in s]:
        h.update(repr((req.request_id, _hex(req.arrival_time), req.priority, _hex(req.deadline), req.max_tokens,
                       req.sampling_params.ignore_eos, req.expected_output_len, req.client_id,
                       req.forced_output_token_ids)).encode())
        h.update(np.asarray(req.prompt_token_ids, dtype=np.int64).tobytes())
        assert req.all_token_ids == req.prompt_token_ids and req.all_token_ids is not req.prompt_token_ids
        assert all(type(t) is int for t in req.prompt_token_ids[:50])
    return h.hexdigest()[:24]


def _trace_digest(trace) -> str:
    h = hashlib.sha256()
    for a in (trace.input_lens, trace.output_lens, trace.timestamps_s):
        if a is not None:
            h.update(str(a.dtype).encode())
            h.update(a.tobytes())
    h.update(repr(trace.hash_ids).encode())
    h.update(repr(trace.skipped).encode())
    return h.hexdigest()[:24]


_PINNED_WORKLOADS = [
    ("b6402e20cea89bdaccad7395", dict(kind="synthetic", lengths="azure_conv", arrival="poisson", rate=18.9,
                                      num_requests=2000, seed=0, max_model_len=8192)),  # bench_sim's, smaller
    ("e2cf97c6fb92520452fc6d38", dict(num_requests=300, rate=4.0, seed=3)),
    ("92b9a18b61acd9b163ef9f87", dict(lengths="uniform", input_range=(1, 300), output_range=(1, 50),
                                      arrival="gamma", rate=7.0, cv=2.0, num_requests=400, seed=11,
                                      system_prompt_lens=(64, 200, 5), num_priorities=3, deadline_s=1.5,
                                      vocab_size=128256)),
    ("46755175de303a3bfa511732", dict(lengths="uniform", input_range=(5, 120), output_range=(3, 40), num_turns=4,
                                      num_requests=301, rate=3.0, seed=5, system_prompt_lens=(50, 90),
                                      max_model_len=400, arrival="fixed")),
    ("1a0003014ebf0dae3c477c0b", dict(lengths="fixed", input_len=33, output_len=7, arrival="closed_loop",
                                      num_users=4, think_time_s=0.25, num_turns=3, num_requests=50, seed=2,
                                      vocab_size=1000, duration_s=30.0)),
    ("faadaebbf6185beb50b11237", dict(kind="azure_code", num_requests=500, speed=2.0, seed=1)),
    ("de959cc861c81b64f0d57737", dict(kind="azure_conv", num_requests=None, duration_s=120.0, max_model_len=4096)),
    ("1c830fd4e7c6adb3cde27b2e", dict(kind="mooncake", num_requests=300, vocab_size=32000, seed=4)),
]


@pytest.mark.parametrize("digest, spec", _PINNED_WORKLOADS)
def test_pinned_workloads_and_requests(digest, spec):
    _traces()
    assert _workload_digest(spec) == digest


@pytest.fixture(params=["fast", "pandas"])
def csv_path(request, monkeypatch):
    """Run a test with the CSV fast path, then with every file sent to the pandas reader."""
    if request.param == "pandas":
        monkeypatch.setattr(traces, "_plain_csv", lambda *args: None)
    return request.param


@pytest.mark.parametrize("digest, kind, reader", [
    ("4c1fb793043898b07fa944af", "azure_conv", read_azure_trace),
    ("5c4640c9848a11050c0d5afd", "azure_code", read_azure_trace),
    ("82ceae2ad1661112f90ef421", "sharegpt", read_sharegpt_lengths),
    ("339ea5e7db25ce424f6cbf45", "mooncake", read_mooncake_trace),
])
def test_pinned_trace_files(csv_path, digest, kind, reader):
    _traces()
    assert _trace_digest(reader(resolve_trace_path(kind))) == digest


_AZURE_VARIANTS = ("TIMESTAMP,ContextTokens,GeneratedTokens\r\n2023-11-16 18:17:03.9799600,4808,10\r\n"
                   "2023-11-16 18:17:04,3180,8\r\n2023-11-16 18:17:04.123456789,77,3\r\n"
                   "2023-11-16 18:17:04.5,1,1\r\n2023-11-17 00:00:00.0000001,12,2\r\n")
_BURSTGPT_FLOATS = (BURST_HEADER + "0.5,ChatGPT,472,18,490,Conversation log\n1.25,GPT-4,3,0,3,API log\n"
                    "3.1415926535,ChatGPT,0,5,5,API log\n7.1e1,GPT-4,10,20,30,API log\n"
                    "1234567.000001,ChatGPT,9,9,18,Conversation log\n")
_SHAREGPT_EXTRA = "num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n74,918,992,0.08\n290,905,1195,x\n"


@pytest.mark.parametrize("digest, text, reader", [
    ("3ab3683b5cf902fe58d88d3e", _AZURE_VARIANTS, read_azure_trace),
    ("7fc7cf09348d23b9f815f1e5", _BURSTGPT_FLOATS, read_burstgpt_trace),
    ("81f3d8bd0d6811ca018363ff", _SHAREGPT_EXTRA, read_sharegpt_lengths),
])
def test_pinned_small_csv_variants(csv_path, tmp_path, digest, text, reader):
    path = tmp_path / "trace.csv"
    path.write_text(text, encoding="utf-8", newline="")
    assert _trace_digest(reader(path)) == digest
    assert _trace_digest(reader(path, max_rows=2)) == _trace_digest(reader(path, max_rows=2))


@pytest.mark.parametrize("text", [
    "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03,4808,10\n2023-11-16 18:17:04,0012,8\n",
    "TIMESTAMP,ContextTokens,GeneratedTokens,\n2023-11-16 18:17:03.5,4808,10,\n2023-11-16 18:17:04,12,8,x\n",
    "GeneratedTokens,TIMESTAMP,ContextTokens\n10,1999-12-31 23:59:59.999999999,4808\n8,2000-01-01 00:00:00,12",
    "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03,4808,10\n2023-11-16 18:17:04,12,8\n\nbad\n",
    '"TIMESTAMP",ContextTokens,GeneratedTokens\n"2023-11-16 18:17:03",4808,10\n',
    "TIMESTAMP,ContextTokens,GeneratedTokens\r2023-11-16 18:17:03,4808,10\r",
    "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:17:03,4808,10\n2024-03-01 18:17:04,12,8\n",
])
def test_csv_fast_path_agrees_with_pandas(tmp_path, monkeypatch, text):
    """Plain files take the fast path (quoted or CR-only ones do not); both give the same
    values, including row limits that stop before a malformed line."""
    path = tmp_path / "azure.csv"
    path.write_text(text, encoding="utf-8", newline="")
    fast = [_trace_digest(read_azure_trace(path, max_rows=m)) for m in (1, 2)]
    monkeypatch.setattr(traces, "_plain_csv", lambda *args: None)
    assert fast == [_trace_digest(read_azure_trace(path, max_rows=m)) for m in (1, 2)]


def test_bench_path_does_not_import_pandas():
    """pandas (with pyarrow) costs ~0.3 s CPU to import, more than building the workload:
    only writing result files should need it."""
    _traces()
    code = ("import sys\n"
            "from core.workloads import build_workload, read_sharegpt_lengths, resolve_trace_path\n"
            "from simulator.runner import build_requests, run_simulation\n"
            "from core.metrics import summarize\n"
            "w = build_workload(dict(lengths='azure_conv', num_requests=20, max_model_len=8192))\n"
            "build_requests(w)\n"
            "read_sharegpt_lengths(resolve_trace_path('sharegpt'))\n"
            "print(sorted(m for m in ('pandas', 'pyarrow', 'matplotlib') if m in sys.modules))\n")
    root = Path(core.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, check=True)
    assert out.stdout.strip() == "[]"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(-5, 300_000), max_size=8), max_size=4),
       st.sampled_from([np.int32, np.int64, np.uint16, np.uint32, np.float64]))
def test_segments_to_list_equals_tolist(parts, dtype):
    segs = tuple(np.asarray([t % 65536 if dtype == np.uint16 else abs(t) if dtype == np.uint32 else t
                             for t in p], dtype=dtype) for p in parts)
    expected = np.concatenate(segs).tolist() if segs else []
    got = segments_to_list(segs)
    assert got == expected and [type(t) for t in got] == [type(t) for t in expected]


def test_core_requests_share_sampling_params_and_keep_gc_state():
    w = build_workload(_synthetic(num_requests=6))
    was = gc.isenabled()
    try:
        for enabled in (True, False):
            (gc.enable if enabled else gc.disable)()
            reqs, _ = w.core_requests()
            assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()
    assert len({id(r.sampling_params) for r in reqs}) == 1 and reqs[0].sampling_params.max_tokens == 4
    bad = WorkloadRequest("x", 0.0, w.requests[0].prompt_segments, max_tokens=np.int64(4))
    with pytest.raises(ValueError, match="max_tokens"):
        bad.to_request()
