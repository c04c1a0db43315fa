"""Offline throughput benchmarks on servelab's executor (core engine + RealBackend).

Usage: python -m experiments.bench_offline [--workload nano-vllm|llama8b-1k] [--model-dir DIR]
       [--enforce-eager] [--no-async-scheduling] [--kv-cache-dtype auto|fp8] [--profile] [--out JSON]

Workloads (random-weight bf16 models, written to ``--model-dir`` if missing; everything is
submitted at once to one timed ``generate`` after a tiny warm-up generate; CUDA graphs on):

* ``nano-vllm`` (default) reproduces nano-vllm's ``bench.py``: Qwen3-0.6B,
  ``random.seed(0)``, 256 prompts of ``randint(100, 1024)`` random ids, then 256
  ``SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=randint(100, 1024))`` --
  133,966 output tokens in all -- ``max_model_len=4096``. Target 18,000 output tok/s.
* ``llama8b-1k``: Llama-3.1-8B, 1,000 prompts of exactly 1,000 ids drawn uniformly from
  the vocabulary (seed 0, so no two share a prefix-cache block), each generating exactly
  1,000 tokens (``ignore_eos``, temperature 0.6 as nano-vllm: the fused Gumbel-max
  sampler), ``max_model_len=2048``. The KV pool (~430k tokens on an H100 at 0.9
  utilisation) bounds the concurrency to ~300 requests, so the scheduler admits waves and
  preempts by recompute when running requests outgrow the pool; both are in the steps
  actually run, which the floor is computed from. Target 8,000 output tok/s.

Besides output tokens/s every run reports its *floor*, a lower bound on the time of the
schedule actually run: each step takes at least the roofline of what it must do,

    floor = sum over steps of max(bytes / BANDWIDTH, flops / PEAK_FLOPS)
    bytes = context_tokens * kv_bytes_per_token + weight_read_bytes
    flops = 2 * linear_params * tokens + 2 * vocab * hidden * sampled_rows
            + 4 * layers * q_heads * head_dim * attention_pairs

where ``context_tokens`` sums every scheduled request's context (cached + new tokens: the KV
its attention reads), ``weight_read_bytes`` is every weight except an untied input
embedding (a step gathers only its rows), ``linear_params`` are the decoder layers' matrix
weights, and ``attention_pairs`` counts (new token, visible key) pairs (QK^T and PV cost
2 * head_dim FLOPs each per head). BANDWIDTH is 3.0 TB/s (a device-to-device copy measured
on the H100, bytes read + written) and PEAK_FLOPS ~790 TFLOP/s (bf16 GEMMs on Hopper).
Decode steps are bandwidth-bound, big prefill steps compute-bound. Writes to the KV cache,
activations and the sampler are left out, so the floor stays a lower bound. The JSON also
keeps ``floor.bandwidth_only_seconds`` (the sum of the bytes terms alone: the floor of
results before the ``llama8b-1k`` workload) and ``floor.overlapped_seconds`` = max(all
bytes / BANDWIDTH, all FLOPs / PEAK_FLOPS), the bound if every prefill's compute could hide
under other steps' memory traffic (a schedule that mixes them perfectly, not the one run).

It also splits the wall time into device time (CUDA events inside each step), host
preparation inside the step, and engine overhead outside it (schedule + update). The LLM's
default async scheduling overlaps the host's share with the previous step's device time;
``--no-async-scheduling`` runs the synchronous engine for comparison.
Runs without simpy / hydra (only core, executor, torch).
"""
from __future__ import annotations

import argparse
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from random import randint
from typing import Any

from core.sampling_params import SamplingParams
from core.scheduler_output import SchedulerOutput, StepResult
from experiments.bench_common import (
    BANDWIDTH,
    PEAK_FLOPS,
    default_model_dir,
    ensure_model,
    environment,
    write_result,
)

Requests = tuple[list[list[int]], list[SamplingParams]]


def nano_vllm_requests(num_seqs: int, max_input_len: int, max_output_len: int, vocab_size: int) -> Requests:
    """nano-vllm's ``bench.py``, call for call (the output-token count depends on the order
    of the ``randint`` draws); its ids are < 10,001 whatever the model's vocabulary."""
    random.seed(0)
    prompts = [[randint(0, 10000) for _ in range(randint(100, max_input_len))] for _ in range(num_seqs)]
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=randint(100, max_output_len))
              for _ in range(num_seqs)]
    return prompts, params


def fixed_length_requests(num_seqs: int, input_len: int, output_len: int, vocab_size: int) -> Requests:
    """``num_seqs`` prompts of exactly ``input_len`` uniform random ids (seed 0), each
    generating exactly ``output_len`` tokens at temperature 0.6 with ``ignore_eos``."""
    rng = random.Random(0)
    prompts = [[rng.randrange(vocab_size) for _ in range(input_len)] for _ in range(num_seqs)]
    return prompts, [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=output_len)] * num_seqs


@dataclass(frozen=True)
class Workload:
    """An offline workload: its model shape, request generator and default sizes."""

    description: str
    shape: str
    build: Callable[[int, int, int, int], Requests]  # (num_seqs, input_len, output_len, vocab) -> requests
    num_seqs: int
    input_len: int
    output_len: int
    max_model_len: int
    target_tok_s: float
    out: str
    expected_output_tokens: int | None = None  # asserted at the default sizes


WORKLOADS: dict[str, Workload] = {
    "nano-vllm": Workload(
        "nano-vllm bench.py: Qwen3-0.6B random bf16, 256 seqs, prompts 100-1024, outputs 100-1024",
        "Qwen3-0.6B", nano_vllm_requests, 256, 1024, 1024, 4096, 18_000,
        "experiments/results/bench_offline.json", expected_output_tokens=133_966),
    "llama8b-1k": Workload(
        "Llama-3.1-8B random bf16, 1000 seqs x 1000 random prompt ids x 1000 output tokens, all at once",
        "Llama-3.1-8B", fixed_length_requests, 1000, 1000, 1000, 2048, 8_000,
        "experiments/results/bench_offline_llama8b.json", expected_output_tokens=1_000_000),
}


@dataclass(frozen=True, slots=True)
class StepWork:
    """What one executed step had to do, from its ``SchedulerOutput``."""

    tokens: int  # tokens computed (prefill chunks + decodes)
    context_tokens: int  # sum over requests of cached + new tokens: the KV attention reads
    attention_pairs: int  # (new token, visible key) pairs under the causal mask
    sampled_rows: int

    @classmethod
    def of(cls, num_new: list[int], num_computed: list[int], samples: list[bool]) -> StepWork:
        tokens = sum(num_new)
        # Request with c cached and n new tokens: new token j (0-based) sees c + j + 1 keys.
        pairs = sum(n * c + n * (n + 1) // 2 for n, c in zip(num_new, num_computed))
        return cls(tokens, sum(num_computed) + tokens, pairs, sum(samples))


class StepRecorder:
    """Stands in for the engine's backend during the timed run: keeps each step's
    ``SchedulerOutput`` counts (O(1) a step, so the measured host time does not grow) and
    calls the real backend. Engines use nothing of a backend but ``execute`` (sync) or
    ``launch`` (async scheduling)."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self._raw: dict[int, tuple[list[int], list[int], list[bool]]] = {}

    def execute(self, out: SchedulerOutput) -> StepResult:
        self._raw[out.step_id] = (out.num_new_tokens, out.num_computed_tokens, out.samples)
        return self.backend.execute(out)

    def launch(self, out: SchedulerOutput) -> Any:
        self._raw[out.step_id] = (out.num_new_tokens, out.num_computed_tokens, out.samples)
        return self.backend.launch(out)

    def work(self) -> dict[int, StepWork]:
        """Per step id, what the step had to do."""
        return {sid: StepWork.of(*raw) for sid, raw in self._raw.items()}


@dataclass(frozen=True)
class FloorModel:
    """The per-step roofline of the module docstring for one model and device."""

    kv_bytes_per_token: int
    weight_read_bytes: int
    linear_flops_per_token: int
    lm_head_flops_per_row: int
    attention_flops_per_pair: int
    bandwidth: float
    peak_flops: float

    @classmethod
    def for_model(cls, config: Any, weight_bytes: int, bandwidth: float, peak_flops: float,
                  kv_dtype: Any = None) -> FloorModel:
        """From the model config and the runner's weight bytes (tied embeddings counted once);
        the matrix shapes are read off the checkpoint layout, as the loader sees them.
        ``kv_dtype``: the KV pool's dtype (None: the model's)."""
        from executor.make_random_model import checkpoint_shapes
        from executor.memory import kv_bytes_per_token

        linear = sum(math.prod(shape) for name, shape in checkpoint_shapes(config)
                     if ".layers." in name and len(shape) == 2)
        embedding_bytes = config.vocab_size * config.hidden_size * config.dtype.itemsize
        return cls(
            kv_bytes_per_token=kv_bytes_per_token(config, kv_dtype),
            weight_read_bytes=weight_bytes - (0 if config.tie_word_embeddings else embedding_bytes),
            linear_flops_per_token=2 * linear,
            lm_head_flops_per_row=2 * config.vocab_size * config.hidden_size,
            attention_flops_per_pair=4 * config.num_hidden_layers * config.num_attention_heads * config.head_dim,
            bandwidth=bandwidth, peak_flops=peak_flops)

    def bytes(self, w: StepWork) -> int:
        return w.context_tokens * self.kv_bytes_per_token + self.weight_read_bytes

    def flops(self, w: StepWork) -> int:
        return (w.tokens * self.linear_flops_per_token + w.sampled_rows * self.lm_head_flops_per_row
                + w.attention_pairs * self.attention_flops_per_pair)

    def seconds(self, w: StepWork) -> float:
        return max(self.bytes(w) / self.bandwidth, self.flops(w) / self.peak_flops)

    def compute_bound(self, w: StepWork) -> bool:
        return self.flops(w) / self.peak_flops > self.bytes(w) / self.bandwidth


def floor_summary(model: FloorModel, work: list[StepWork], output_tokens: int) -> dict[str, object]:
    """The floor of a run's steps, with its inputs, for the result JSON."""
    seconds = sum(model.seconds(w) for w in work)
    total_bytes = sum(model.bytes(w) for w in work)
    total_flops = sum(model.flops(w) for w in work)
    return {
        "formula": "sum_steps max((context_tokens*kv_bytes_per_token + weight_read_bytes)/bandwidth, "
                   "(tokens*linear_flops_per_token + sampled_rows*lm_head_flops_per_row "
                   "+ attention_pairs*attention_flops_per_pair)/peak_flops)",
        "bandwidth_bytes_per_s": model.bandwidth, "peak_flops": model.peak_flops,
        "steps": len(work), "compute_bound_steps": sum(model.compute_bound(w) for w in work),
        "tokens_computed": sum(w.tokens for w in work),
        "context_tokens_read": sum(w.context_tokens for w in work),
        "attention_pairs": sum(w.attention_pairs for w in work),
        "sampled_rows": sum(w.sampled_rows for w in work),
        "kv_bytes_per_token": model.kv_bytes_per_token, "weight_read_bytes": model.weight_read_bytes,
        "linear_flops_per_token": model.linear_flops_per_token,
        "lm_head_flops_per_row": model.lm_head_flops_per_row,
        "attention_flops_per_pair": model.attention_flops_per_pair,
        "bytes": total_bytes, "flops": total_flops,
        "seconds": seconds, "bandwidth_only_seconds": total_bytes / model.bandwidth,
        "overlapped_seconds": max(total_bytes / model.bandwidth, total_flops / model.peak_flops),
        "tok_per_s_at_floor": output_tokens / seconds if seconds else None,
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="nano-vllm")
    ap.add_argument("--model-dir", default=None, help="default: the workload's shape under the models root")
    ap.add_argument("--num-seqs", type=int, default=None)
    ap.add_argument("--input-len", "--max-input-len", dest="input_len", type=int, default=None,
                    help="nano-vllm: the largest drawn prompt length; llama8b-1k: every prompt's")
    ap.add_argument("--output-len", "--max-output-len", dest="output_len", type=int, default=None,
                    help="nano-vllm: the largest drawn output length; llama8b-1k: every request's")
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=512)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"],
                    help="fp8: float8 e4m3 KV cache (half the KV bytes; the floor counts them too)")
    ap.add_argument("--no-async-scheduling", action="store_true",
                    help="schedule each step only after the previous one's tokens are back (sync engine)")
    ap.add_argument("--bandwidth", type=float, default=BANDWIDTH)
    ap.add_argument("--peak-flops", type=float, default=PEAK_FLOPS)
    ap.add_argument("--attention-num-splits", type=int, default=None,
                    help="force the decode CUDA graphs' paged-attention split-K factor")
    ap.add_argument("--out", default=None, help="default: the workload's JSON under experiments/results")
    ap.add_argument("--profile", action="store_true",
                    help="afterwards, print a torch.profiler kernel table of 10 decode steps of the same prompts")
    args = ap.parse_args(argv)
    wl = WORKLOADS[args.workload]
    num_seqs = args.num_seqs or wl.num_seqs
    input_len = args.input_len or wl.input_len
    output_len = args.output_len or wl.output_len
    max_model_len = args.max_model_len or wl.max_model_len

    import torch

    from executor import LLM

    path = ensure_model(args.model_dir or default_model_dir(wl.shape), wl.shape)
    t = time.perf_counter()
    llm = LLM(path, max_model_len=max_model_len, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
              attention_num_splits=args.attention_num_splits, async_scheduling=not args.no_async_scheduling,
              kv_cache_dtype=args.kv_cache_dtype)
    init_s = time.perf_counter() - t
    runner = llm.runner
    print(f"LLM ready in {init_s:.1f} s: {llm.backend.describe()}", flush=True)

    prompt_token_ids, sampling_params = wl.build(num_seqs, input_len, output_len, llm.model_config.vocab_size)
    total_tokens = sum(sp.max_tokens for sp in sampling_params)
    if (num_seqs, input_len, output_len) == (wl.num_seqs, wl.input_len, wl.output_len):
        assert total_tokens == wl.expected_output_tokens, total_tokens

    llm.generate([[1, 2, 3, 4]], SamplingParams(), use_tqdm=False)  # warm-up ("Benchmark: " in nano-vllm)

    engine = llm.engine
    first_step = len(engine.steps)
    stats = runner.stats
    before = {"steps": stats.steps, "graph": stats.graph_steps, "eager": stats.eager_steps,
              "prep": stats.prepare_seconds, "exe": stats.execute_seconds}
    bd_before = dict(engine.breakdown)
    recorder = StepRecorder(engine.backend)
    engine.backend = recorder
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.time()
    try:
        outputs = llm.generate(prompt_token_ids, sampling_params, use_tqdm=False)
    finally:
        engine.backend = recorder.backend
    elapsed = time.time() - t
    produced = sum(len(o.token_ids) for o in outputs)
    assert produced == total_tokens, (produced, total_tokens)
    throughput = total_tokens / elapsed

    steps = engine.steps[first_step:]
    work = recorder.work()
    assert len(work) == len(steps) == stats.steps - before["steps"], (len(work), len(steps))
    model = FloorModel.for_model(llm.model_config, runner.weight_bytes, args.bandwidth, args.peak_flops,
                                 kv_dtype=runner.kv_dtype)
    floor = floor_summary(model, [work[s.step_id] for s in steps], total_tokens)
    floor_s = floor["seconds"]
    exec_s = stats.execute_seconds - before["exe"]
    prep_s = stats.prepare_seconds - before["prep"]
    device_s = engine.breakdown.get("device", 0.0) - bd_before.get("device", 0.0)
    prepare_ev_s = engine.breakdown.get("prepare", 0.0) - bd_before.get("prepare", 0.0)

    # Per step kind: pure decode vs steps with prefill tokens.
    kinds: dict[str, dict[str, float]] = {}
    for s in steps:
        kind = "decode" if s.num_prefill_tokens == 0 else "prefill_or_mixed"
        k = kinds.setdefault(kind, {"steps": 0, "seconds": 0.0, "floor_seconds": 0.0, "tokens": 0})
        k["steps"] += 1
        k["seconds"] += s.duration
        k["floor_seconds"] += model.seconds(work[s.step_id])
        k["tokens"] += s.num_prefill_tokens + s.num_decode_tokens
    for k in kinds.values():
        k["fraction_of_floor"] = k["floor_seconds"] / k["seconds"] if k["seconds"] else None
    decode_durations = sorted(s.duration for s in steps if s.num_prefill_tokens == 0)
    prompt_tokens = sum(len(p) for p in prompt_token_ids)
    prefill_tokens = sum(s.num_prefill_tokens for s in steps)

    result = {
        "benchmark": wl.description,
        "workload": args.workload,
        **environment(),
        "config": {"num_seqs": num_seqs, "input_len": input_len, "output_len": output_len,
                   "max_model_len": max_model_len, "max_num_seqs": args.max_num_seqs,
                   "max_num_batched_tokens": args.max_num_batched_tokens,
                   "gpu_memory_utilization": args.gpu_memory_utilization, "enforce_eager": args.enforce_eager,
                   "attention_num_splits": args.attention_num_splits, "temperature": sampling_params[0].temperature,
                   "async_scheduling": llm.async_scheduling, "kv_cache_dtype": args.kv_cache_dtype},
        "kv_cache": llm.backend.describe(),
        "init_seconds": init_s,
        "output_tokens": total_tokens,
        "prompt_tokens": prompt_tokens,
        "seconds": elapsed,
        "output_tok_per_s": throughput,
        "target_tok_per_s": wl.target_tok_s,
        "meets_target": throughput >= wl.target_tok_s,
        "floor": floor,
        "fraction_of_floor": floor_s / elapsed,
        "scheduling": {
            "max_batch": max(s.batch_size for s in steps),
            "preemptions": sum(s.num_preempted for s in steps),
            "prefill_tokens": prefill_tokens,
            "recomputed_prefill_tokens": prefill_tokens - prompt_tokens,  # re-prefills after recompute preemption
        },
        "time_split": {
            "wall_seconds": elapsed,
            "sum_step_durations": exec_s,
            "device_seconds": device_s,  # CUDA events: from the input copy to the sampled tokens
            "host_prepare_seconds_events": prepare_ev_s,
            "host_prepare_seconds": prep_s,
            # Scheduler, update, Python loop; only meaningful for the sync engine, whose steps
            # do not overlap (async: host work hides under device time).
            "outside_execute_seconds": None if llm.async_scheduling else elapsed - exec_s,
            "device_idle_seconds": elapsed - device_s,
            "device_busy_fraction": device_s / elapsed if elapsed else None,
        },
        "steps": {"total": len(steps), "graph": stats.graph_steps - before["graph"],
                  "eager": stats.eager_steps - before["eager"], "by_kind": kinds,
                  "decode_step_ms_median": 1e3 * statistics.median(decode_durations) if decode_durations else None,
                  "prepare_ms_per_step": 1e3 * prep_s / max(len(steps), 1),
                  "first_steps_ms": [round(1e3 * s.duration, 2) for s in steps[:14]]},
    }
    out = write_result(args.out or wl.out, result)
    ts, sc = result["time_split"], result["scheduling"]
    print(f"Total: {total_tokens}tok, Time: {elapsed:.2f}s, Throughput: {throughput:.2f}tok/s "
          f"({'meets' if result['meets_target'] else 'misses'} the {wl.target_tok_s} tok/s target)")
    print(f"floor: {floor_s:.2f} s ({len(steps)} steps, {floor['compute_bound_steps']} compute-bound; "
          f"{floor['context_tokens_read']:,} context tokens x {model.kv_bytes_per_token} B + "
          f"{model.weight_read_bytes / 1e9:.2f} GB weights per step at {args.bandwidth / 1e12:.1f} TB/s, "
          f"{floor['flops'] / 1e15:.2f} PFLOP at {args.peak_flops / 1e12:.0f} TFLOP/s) -> "
          f"{100 * result['fraction_of_floor']:.1f}% of floor ({floor['tok_per_s_at_floor']:,.0f} tok/s at 100%)")
    if llm.async_scheduling:
        print(f"time split (async scheduling): wall {elapsed:.2f} s = device busy {ts['device_seconds']:.2f} s + "
              f"idle {ts['device_idle_seconds']:.2f} s; host prep {prep_s:.3f} s (overlapped); "
              f"graph steps {result['steps']['graph']}/{len(steps)}")
    else:
        print(f"time split: wall {elapsed:.2f} s = steps {exec_s:.2f} s (device {ts['device_seconds']:.2f} s, "
              f"host prep {prep_s:.3f} s) + outside execute {ts['outside_execute_seconds']:.2f} s; "
              f"graph steps {result['steps']['graph']}/{len(steps)}")
    print(f"scheduling: max batch {sc['max_batch']}, {sc['preemptions']} preemptions, "
          f"{sc['recomputed_prefill_tokens']:,} recomputed prefill tokens")
    print(f"first steps (ms): {result['steps']['first_steps_ms']}")
    for name, k in kinds.items():
        print(f"  {name}: {k['steps']} steps, {k['seconds']:.2f} s, floor {k['floor_seconds']:.2f} s "
              f"({100 * (k['fraction_of_floor'] or 0):.1f}%)")
    print(f"wrote {out}")
    if args.profile and torch.cuda.is_available():
        from torch.profiler import ProfilerActivity, profile

        from core.request import Request

        # The same prompts again (prefix-cache hits make their prefill short), then 10
        # profiled decode steps of as many of them as fit.
        for i, p in enumerate(prompt_token_ids):
            engine.add_request(Request(f"profile-{i}", p, SamplingParams(temperature=0.6, ignore_eos=True,
                                                                          max_tokens=64)))
        sched = engine.scheduler
        while sched.waiting or any(r.is_prefill for r in sched.running):
            engine.step(llm.clock())
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                engine.step(llm.clock())
            torch.cuda.synchronize()
        while engine.has_unfinished():
            engine.step(llm.clock())
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=50))
    return result


if __name__ == "__main__":
    main()
