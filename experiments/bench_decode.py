"""Batch-1 decode step of a Llama-3.1-8B-shaped model vs. the weight-read floor.

Usage: python -m experiments.bench_decode [--model-dir DIR] [--steps 256] [--out JSON]

Writes random bf16 weights of the Llama-3.1-8B shape to ``--model-dir`` if missing
(executor.make_random_model), then generates greedily for one 128-token prompt through
the offline LLM (core engine + RealBackend, CUDA graph for batch 1). A decode step must
read every weight once (plus a little KV), so its floor is ``(weight_bytes + context *
kv_bytes_per_token) / 3.0 TB/s`` (the H100's measured copy bandwidth). Reported: the
median measured step (CUDA events around the whole execute: input copy, graph replay,
LM head, sampling), the graph replay alone, and the wall time per decode step including
the scheduler. Target: step / floor <= 1.25.
"""
from __future__ import annotations

import argparse
import statistics
import time

from experiments.bench_common import (
    BANDWIDTH,
    default_model_dir,
    ensure_model,
    environment,
    write_result,
)

DEFAULT_MODEL_DIR = default_model_dir("Llama-3.1-8B")
TARGET_RATIO = 1.25


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=DEFAULT_MODEL_DIR)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--bandwidth", type=float, default=BANDWIDTH)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--out", default="experiments/results/bench_decode.json")
    args = ap.parse_args(argv)

    import torch

    from core.sampling_params import SamplingParams
    from executor import LLM
    from executor.memory import kv_bytes_per_token

    path = ensure_model(args.model_dir, "Llama-3.1-8B")
    t = time.perf_counter()
    llm = LLM(path, max_model_len=args.max_model_len, max_num_seqs=1, max_num_batched_tokens=args.max_model_len,
              cuda_graph_sizes=[1], enforce_eager=args.enforce_eager)
    init_s = time.perf_counter() - t
    runner = llm.runner
    print(f"LLM ready in {init_s:.1f} s: {llm.backend.describe()}", flush=True)

    prompt = list(range(1000, 1000 + args.prompt_len))
    sp = SamplingParams(temperature=0.0, max_tokens=args.steps + 1, ignore_eos=True)
    llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    engine = llm.engine
    first = len(engine.steps)
    t = time.perf_counter()
    llm.generate([prompt[::-1]], sp, use_tqdm=False)  # reversed: no prefix-cache hit on the warm-up prompt
    wall = time.perf_counter() - t
    decode = [s for s in engine.steps[first:] if s.num_prefill_tokens == 0]
    durations = sorted(s.duration for s in decode)
    median = statistics.median(durations)

    # The graph replay alone (no input copy, LM head or sampling), for the split.
    replay_ms = None
    if runner.graphs.sizes:
        g = runner.graphs.graphs[runner.graphs.sizes[0]]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(50):
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        replay_ms = statistics.median(times)

    w = runner.weight_bytes
    kv_tok = kv_bytes_per_token(llm.model_config)
    mean_ctx = args.prompt_len + args.steps / 2
    floor_s = (w + mean_ctx * kv_tok) / args.bandwidth
    ratio = median / floor_s
    result = {
        "benchmark": "decode step, batch 1, Llama-3.1-8B shape, random bf16 weights",
        **environment(),
        "init_seconds": init_s,
        "decode_steps": len(decode),
        "step_ms_median": 1e3 * median,
        "step_ms_p10": 1e3 * durations[len(durations) // 10],
        "step_ms_p90": 1e3 * durations[(9 * len(durations)) // 10],
        "graph_replay_ms_median": replay_ms,
        "wall_ms_per_decode_step": 1e3 * wall / max(len(decode), 1),
        "weight_bytes": w,
        "kv_bytes_per_token": kv_tok,
        "floor_ms": 1e3 * floor_s,
        "ratio_to_floor": ratio,
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio <= TARGET_RATIO,
        "graph_steps": runner.stats.graph_steps,
        "kv_cache": llm.backend.describe(),
    }
    out = write_result(args.out, result)
    print(f"decode step (batch 1): median {1e3 * median:.3f} ms, graph replay {replay_ms or float('nan'):.3f} ms, "
          f"wall/step {result['wall_ms_per_decode_step']:.3f} ms; floor {1e3 * floor_s:.3f} ms "
          f"({w / 1e9:.2f} GB weights at {args.bandwidth / 1e12:.1f} TB/s) -> {ratio:.3f}x floor "
          f"({'meets' if result['meets_target'] else 'misses'} the {TARGET_RATIO}x target)")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
