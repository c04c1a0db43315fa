"""nano-vllm's offline throughput benchmark on servelab's executor (core engine + RealBackend).

Usage: python -m experiments.bench_offline [--model-dir DIR] [--enforce-eager] [--out JSON]

Reproduces nano-vllm's ``bench.py``: a random-weight Qwen3-0.6B in bf16 (written to
``--model-dir`` if missing), ``random.seed(0)``, 256 prompts of ``randint(100, 1024)``
random token ids, then 256 ``SamplingParams(temperature=0.6, ignore_eos=True,
max_tokens=randint(100, 1024))`` -- 133,966 output tokens in all -- ``max_model_len=4096``,
CUDA graphs on. A tiny generate warms up, then one timed ``generate`` runs everything.

Besides output tokens/s it reports the *floor*: every step must read the weights once and
the KV of every scheduled request's whole context once, so the run cannot beat
``sum_steps(context_tokens * kv_bytes_per_token + weight_bytes) / bandwidth`` (3.0 TB/s: a
device-to-device copy measured on the H100, bytes read + written). Compute (prefill
FLOPs) is left out, so the floor is a lower bound. The schedule is the one actually run.
It also splits the wall time into device time (CUDA events inside each step), host
preparation inside the step, and engine overhead outside it (schedule + update).

Runs without simpy / hydra (only core, executor, torch).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from random import randint

EXPECTED_OUTPUT_TOKENS = 133_966  # nano-vllm's workload with random.seed(0)


def models_root() -> str:
    """Where random models are written: $SERVELAB_MODELS, else RAM-backed /dev/shm when it
    has room (writing 16 GB to a slow VM disk costs minutes), else /tmp."""
    if os.environ.get("SERVELAB_MODELS"):
        return os.environ["SERVELAB_MODELS"]
    try:
        if shutil.disk_usage("/dev/shm").free > 24e9:
            return "/dev/shm/servelab-models"
    except OSError:
        pass
    return "/tmp/servelab-models"


DEFAULT_MODEL_DIR = os.path.join(models_root(), "Qwen3-0.6B-random-bf16")
BANDWIDTH = 3.0e12  # bytes/s, device-to-device copy on the H100 (read + write)
TARGET_TOK_S = 18_000


def commit_id() -> str:
    if os.environ.get("SERVELAB_COMMIT"):
        return os.environ["SERVELAB_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_random_model_fast(out_dir: Path, shape: str, seed: int = 0, std: float = 0.02,
                            max_shard_bytes: int = 5 * 10**9) -> None:
    """``executor.make_random_model.write_random_model`` (bf16, same layout, names, shapes and
    init recipe), drawing the numbers on the GPU: the CPU generator needs minutes for 8B."""
    import torch
    from safetensors.torch import save_file

    from executor.config import ModelConfig
    from executor.make_random_model import checkpoint_shapes, hf_config_for

    hf = hf_config_for(None, shape)
    hf["torch_dtype"] = "bfloat16"
    config = ModelConfig.from_hf(hf)
    out_dir.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device="cuda").manual_seed(seed)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shp in checkpoint_shapes(config):
        nbytes = 2 * torch.Size(shp).numel()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shp))
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for file_name, shard in zip(names, shards):
        tensors = {}
        for name, shp in shard:
            t = torch.randn(shp, generator=generator, device="cuda", dtype=torch.bfloat16)
            t = t.mul_(0.1).add_(1.0) if name.endswith("norm.weight") else t.mul_(std)
            tensors[name] = t.cpu()
            weight_map[name] = file_name
            total += t.nbytes
        save_file(tensors, str(out_dir / file_name), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out_dir / "config.json").write_text(json.dumps(hf, indent=2) + "\n")  # last: marks completion
    torch.cuda.empty_cache()


def ensure_model(model_dir: str, shape: str) -> Path:
    """Write a random-weight bf16 ``shape`` model to ``model_dir`` unless one is there."""
    import torch

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        t = time.perf_counter()
        if torch.cuda.is_available():
            write_random_model_fast(path, shape)
        else:
            from executor.make_random_model import write_random_model

            write_random_model(path, shape=shape, dtype="bfloat16")
        print(f"wrote random {shape} to {path} in {time.perf_counter() - t:.1f} s", flush=True)
    return path


def environment() -> dict[str, object]:
    import torch
    import triton

    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit_id(),
    }


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=DEFAULT_MODEL_DIR)
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--max-input-len", type=int, default=1024)
    ap.add_argument("--max-output-len", type=int, default=1024)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-seqs", type=int, default=512)
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--bandwidth", type=float, default=BANDWIDTH)
    ap.add_argument("--attention-num-splits", type=int, default=None,
                    help="force the decode CUDA graphs' paged-attention split-K factor")
    ap.add_argument("--out", default="experiments/results/bench_offline.json")
    ap.add_argument("--profile", action="store_true",
                    help="afterwards, print a torch.profiler kernel table of 10 decode steps at batch 256")
    args = ap.parse_args(argv)

    import torch

    from core.sampling_params import SamplingParams
    from executor import LLM
    from executor.memory import kv_bytes_per_token

    path = ensure_model(args.model_dir, "Qwen3-0.6B")
    t = time.perf_counter()
    llm = LLM(path, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
              attention_num_splits=args.attention_num_splits)
    init_s = time.perf_counter() - t
    runner = llm.runner
    print(f"LLM ready in {init_s:.1f} s: {llm.backend.describe()}", flush=True)

    # nano-vllm bench.py, in its order.
    random.seed(0)
    num_seqs, max_input_len, max_ouput_len = args.num_seqs, args.max_input_len, args.max_output_len
    prompt_token_ids = [[randint(0, 10000) for _ in range(randint(100, max_input_len))] for _ in range(num_seqs)]
    sampling_params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=randint(100, max_ouput_len))
                       for _ in range(num_seqs)]
    total_tokens = sum(sp.max_tokens for sp in sampling_params)
    default_workload = (num_seqs, max_input_len, max_ouput_len) == (256, 1024, 1024)
    if default_workload:
        assert total_tokens == EXPECTED_OUTPUT_TOKENS, total_tokens

    llm.generate([[1, 2, 3, 4]], SamplingParams(), use_tqdm=False)  # warm-up ("Benchmark: " in nano-vllm)

    engine = llm.engine
    first_step = len(engine.steps)
    stats = runner.stats
    stats.record_steps = True
    stats.step_context_tokens.clear()
    before = dict(steps=stats.steps, graph=stats.graph_steps, eager=stats.eager_steps, ctx=stats.context_tokens,
                  prep=stats.prepare_seconds, exe=stats.execute_seconds)
    bd_before = dict(engine.breakdown)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.time()
    outputs = llm.generate(prompt_token_ids, sampling_params, use_tqdm=False)
    elapsed = time.time() - t
    produced = sum(len(o.token_ids) for o in outputs)
    assert produced == total_tokens, (produced, total_tokens)
    throughput = total_tokens / elapsed

    steps = engine.steps[first_step:]
    num_steps = stats.steps - before["steps"]
    ctx_tokens = stats.context_tokens - before["ctx"]
    kv_tok = kv_bytes_per_token(llm.model_config)
    w = runner.weight_bytes
    floor_bytes = ctx_tokens * kv_tok + num_steps * w
    floor_s = floor_bytes / args.bandwidth
    exec_s = stats.execute_seconds - before["exe"]
    prep_s = stats.prepare_seconds - before["prep"]
    device_s = engine.breakdown.get("device", 0.0) - bd_before.get("device", 0.0)
    prepare_ev_s = engine.breakdown.get("prepare", 0.0) - bd_before.get("prepare", 0.0)

    # Per step kind: pure decode vs steps with prefill tokens.
    per_ctx = stats.step_context_tokens
    kinds: dict[str, dict[str, float]] = {}
    if len(per_ctx) == len(steps):
        for s, ctx in zip(steps, per_ctx):
            kind = "decode" if s.num_prefill_tokens == 0 else "prefill_or_mixed"
            k = kinds.setdefault(kind, {"steps": 0, "seconds": 0.0, "floor_seconds": 0.0, "tokens": 0})
            k["steps"] += 1
            k["seconds"] += s.duration
            k["floor_seconds"] += (ctx * kv_tok + w) / args.bandwidth
            k["tokens"] += s.num_prefill_tokens + s.num_decode_tokens
        for k in kinds.values():
            k["fraction_of_floor"] = k["floor_seconds"] / k["seconds"] if k["seconds"] else None
    decode_durations = sorted(s.duration for s in steps if s.num_prefill_tokens == 0)

    result = {
        "benchmark": "nano-vllm bench.py: Qwen3-0.6B random bf16, 256 seqs, prompts 100-1024, outputs 100-1024",
        **environment(),
        "config": {"max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs,
                   "max_num_batched_tokens": args.max_num_batched_tokens,
                   "gpu_memory_utilization": args.gpu_memory_utilization, "enforce_eager": args.enforce_eager,
                   "attention_num_splits": args.attention_num_splits},
        "kv_cache": llm.backend.describe(),
        "init_seconds": init_s,
        "output_tokens": total_tokens,
        "prompt_tokens": sum(len(p) for p in prompt_token_ids),
        "seconds": elapsed,
        "output_tok_per_s": throughput,
        "target_tok_per_s": TARGET_TOK_S,
        "meets_target": throughput >= TARGET_TOK_S,
        "floor": {
            "bandwidth_bytes_per_s": args.bandwidth, "steps": num_steps, "context_tokens_read": ctx_tokens,
            "kv_bytes_per_token": kv_tok, "weight_bytes": w, "bytes": floor_bytes, "seconds": floor_s,
            "tok_per_s_at_floor": total_tokens / floor_s,
        },
        "fraction_of_floor": floor_s / elapsed,
        "time_split": {
            "wall_seconds": elapsed,
            "sum_step_durations": exec_s,
            "device_seconds": device_s,  # CUDA events: from the input copy to the sampled tokens
            "host_prepare_seconds_events": prepare_ev_s,
            "host_prepare_seconds": prep_s,
            "outside_execute_seconds": elapsed - exec_s,  # scheduler, update, Python loop
            "device_busy_fraction": device_s / elapsed if elapsed else None,
        },
        "steps": {"total": num_steps, "graph": stats.graph_steps - before["graph"],
                  "eager": stats.eager_steps - before["eager"], "by_kind": kinds,
                  "decode_step_ms_median": 1e3 * statistics.median(decode_durations) if decode_durations else None,
                  "prepare_ms_per_step": 1e3 * prep_s / max(num_steps, 1),
                  "first_steps_ms": [round(1e3 * s.duration, 2) for s in steps[:14]]},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    ts = result["time_split"]
    print(f"Total: {total_tokens}tok, Time: {elapsed:.2f}s, Throughput: {throughput:.2f}tok/s "
          f"({'meets' if result['meets_target'] else 'misses'} the {TARGET_TOK_S} tok/s target)")
    print(f"floor: {floor_s:.2f} s ({num_steps} steps, {ctx_tokens:,} context tokens x {kv_tok} B + "
          f"{w / 1e9:.2f} GB weights per step at {args.bandwidth / 1e12:.1f} TB/s) -> "
          f"{100 * result['fraction_of_floor']:.1f}% of floor")
    print(f"time split: wall {elapsed:.2f} s = steps {exec_s:.2f} s (device {ts['device_seconds']:.2f} s, "
          f"host prep {prep_s:.3f} s) + outside execute {ts['outside_execute_seconds']:.2f} s; "
          f"graph steps {result['steps']['graph']}/{num_steps}")
    print(f"first steps (ms): {result['steps']['first_steps_ms']}")
    for name, k in kinds.items():
        print(f"  {name}: {k['steps']} steps, {k['seconds']:.2f} s, floor {k['floor_seconds']:.2f} s "
              f"({100 * (k['fraction_of_floor'] or 0):.1f}%)")
    print(f"wrote {out}")
    if args.profile and torch.cuda.is_available():
        from torch.profiler import ProfilerActivity, profile

        from core.request import Request

        # The same prompts again (prefix-cache hits make their prefill short), then 10
        # profiled decode steps at batch 256.
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
