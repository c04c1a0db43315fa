"""Tensor-parallel checks that run on rank 0 of a launch (tests and the GPU validation).

    python -m executor.parallel.launch --tp 2 -- -m executor.parallel.selfcheck \
        --model-dir /dev/shm/q06 --out $OUT/tp.json

On rank 0: greedy generation with a single-process engine (``tensor_parallel_size=1``, the
other ranks idle) and with the whole group, compared under the bf16 policy of
``docs/parallel.md`` (sequences equal, or the first divergence follows a near-tie of the
reference's top-2 logits), then median decode step times of both at several batch sizes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

#: A divergence between TP and single-GPU greedy outputs is accepted in bf16 when the
#: reference's top-2 logits at that position are closer than this (see docs/parallel.md).
BF16_TIE_THRESHOLD = 0.25


def greedy_tokens(model_dir: str, prompts: list[list[int]], max_tokens: list[int],
                  tensor_parallel_size: int | None = None, **llm_kwargs: Any) -> list[list[int]]:
    """Greedy (ignore_eos) outputs of an ``LLM`` on the current group (or one process)."""
    from core.sampling_params import SamplingParams
    from executor.llm import LLM

    llm = LLM(model_dir, tensor_parallel_size=tensor_parallel_size, **llm_kwargs)
    try:
        outs = llm.generate(prompts, [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
                                      for n in max_tokens], use_tqdm=False)
        return [o.token_ids for o in outs]
    finally:
        close = getattr(llm.backend, "close", None)
        if close is not None:
            close()


def greedy_cases(cases: dict[str, tuple[str, list[list[int]], list[int], dict[str, Any]]]
                 ) -> dict[str, list[list[int]]]:
    """``{name: (model_dir, prompts, max_tokens, llm_kwargs)}`` -> greedy outputs of each,
    one engine after the other (on the current group: one spawn serves every case)."""
    return {name: greedy_tokens(path, prompts, lengths, **kwargs)
            for name, (path, prompts, lengths, kwargs) in cases.items()}


def top2_gap(runner: Any, token_ids: list[int]) -> float:
    """Top-1 minus top-2 logit (fp32) of the next token after ``token_ids``, from a fresh
    forward of ``runner``'s model (a single-process runner; writes KV into blocks 0.. , so
    call it only after the runs it checks)."""
    from executor.layers import AttentionMetadata

    bs = runner.block_size
    n = len(token_ids)
    table = list(range(-(-n // bs)))
    with runner._own_ops(), torch.inference_mode():
        md = AttentionMetadata.build([0], [n], [table], bs, runner.device)
        ids = torch.tensor(token_ids, dtype=torch.int64, device=runner.device)
        pos = torch.arange(n, dtype=torch.int64, device=runner.device)
        hidden = runner.model(ids, pos, md)
        logits = runner.model.compute_logits(hidden[-1:])[0]
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1])


def compare_greedy(ref: list[list[int]], test: list[list[int]], prompts: list[list[int]],
                   ref_runner: Any | None, threshold: float = BF16_TIE_THRESHOLD) -> dict[str, Any]:
    """Per sequence: equal, or the first divergence and the reference's top-2 gap there;
    ``ok`` when every divergence follows a gap below ``threshold``."""
    rows = []
    ok = True
    for i, (a, b) in enumerate(zip(ref, test)):
        if a == b:
            rows.append({"seq": i, "equal": True})
            continue
        pos = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        gap = top2_gap(ref_runner, prompts[i] + a[:pos]) if ref_runner is not None else float("nan")
        near_tie = gap < threshold
        ok &= near_tie
        rows.append({"seq": i, "equal": False, "first_divergence": pos, "len": len(a), "top2_gap": gap,
                     "near_tie": near_tie})
    return {"ok": ok, "num_equal": sum(r["equal"] for r in rows), "num_seqs": len(rows), "threshold": threshold,
            "sequences": rows}


def decode_step_times(engine: Any, batch: int, steps: int, prompt_len: int, vocab: int,
                      seed: int = 0) -> dict[str, float]:
    """Median measured duration of pure-decode steps at ``batch`` (rank 0's CUDA events, the
    collectives included) and the wall time per step (scheduler included)."""
    from core.request import Request
    from core.sampling_params import SamplingParams

    g = torch.Generator().manual_seed(seed)
    sp = SamplingParams(temperature=0.0, max_tokens=steps + 1, ignore_eos=True)
    for i in range(batch):
        prompt = torch.randint(10, min(vocab, 10000), (prompt_len,), generator=g).tolist()
        engine.add_request(Request(f"b{batch}-{i}", prompt, sp))
    first = len(engine.steps)
    now = 0.0
    while engine.has_unfinished():  # prefill until every request decodes
        out = engine.step(now)
        now += out.duration
        if engine.steps[-1].num_prefill_tokens == 0:
            break
    t0 = time.perf_counter()
    n = 0
    while engine.has_unfinished():
        out = engine.step(now)
        now += out.duration
        n += 1
    wall = (time.perf_counter() - t0) / max(n, 1)
    decode = [s.duration for s in engine.steps[first:] if s.num_prefill_tokens == 0 and s.batch_size == batch]
    return {"batch": batch, "steps": len(decode), "median_step_ms": 1e3 * statistics.median(decode),
            "wall_per_step_ms": 1e3 * wall}


def gpu_main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description="TP vs single-GPU greedy equality (bf16 policy) and decode times")
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    # Fixed pools: two engines share rank 0's GPU, and the second one's profile would count the
    # first one's pool as its own peak.
    ap.add_argument("--num-gpu-blocks", type=int, default=2048)
    args = ap.parse_args(argv)

    from core.sampling_params import SamplingParams
    from executor.llm import LLM
    from executor.parallel.state import current_tp_group

    tp = current_tp_group()
    world = 1 if tp is None else tp.world_size
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"tp": world, "device": torch.cuda.get_device_name() if torch.cuda.is_available()
                              else "cpu", "torch": torch.__version__, "model_dir": args.model_dir,
                              "policy": {"tie_threshold": BF16_TIE_THRESHOLD}}

    def save(stage: str) -> None:  # partial results survive a timeout
        result["stage"] = stage
        out_path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"[selfcheck] {stage} {time.strftime('%H:%M:%S')}", flush=True)

    batches = [int(b) for b in args.batches.split(",")]
    common: dict[str, Any] = {
        "max_model_len": args.max_model_len, "max_num_seqs": max(batches), "max_num_batched_tokens": 8192,
        "gpu_memory_utilization": args.gpu_memory_utilization, "num_gpu_blocks": args.num_gpu_blocks,
        "enable_prefix_caching": False}
    from executor.loader import load_config

    hi = min(10000, load_config(args.model_dir).vocab_size)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, hi, (int(n),), generator=g).tolist()
               for n in torch.randint(16, 200, (args.num_prompts,), generator=g)]
    sps = [SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)] * args.num_prompts
    t0 = time.perf_counter()
    llms = {"tp1": LLM(args.model_dir, tensor_parallel_size=1, **common)}
    result["build_tp1_s"] = time.perf_counter() - t0
    save("built tp1")
    if world > 1:
        t0 = time.perf_counter()
        llms[f"tp{world}"] = LLM(args.model_dir, tensor_parallel_size=world, **common)
        result[f"build_tp{world}_s"] = time.perf_counter() - t0
        result["kv_blocks"] = {k: v.backend.cache_config.num_gpu_blocks for k, v in llms.items()}
        save(f"built tp{world}")
    outputs = {k: [o.token_ids for o in llm.generate(prompts, sps, use_tqdm=False)] for k, llm in llms.items()}
    save("generated")
    vocab = llms["tp1"].model_config.vocab_size
    result["decode"] = {}
    for label, llm in llms.items():
        result["decode"][label] = [decode_step_times(llm.engine, b, args.steps, args.prompt_len, vocab, seed=b)
                                   for b in batches]
        result["decode"][label + "_graph_steps"] = llm.runner.stats.graph_steps
        save(f"timed {label}")
    if world > 1:
        result["greedy"] = compare_greedy(outputs["tp1"], outputs[f"tp{world}"], prompts, llms["tp1"].runner)
        llms[f"tp{world}"].backend.close()
    save("done")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    gpu_main()
