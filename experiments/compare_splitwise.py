"""Sanity check of our roofline against Splitwise's published profiles.

SplitwiseSim (Patel et al., ISCA 2024) ships measured prompt and per-token times for
Llama-2-70B and BLOOM-176B at TP=8 on DGX-A100 and DGX-H100. This script predicts the same
configurations with ``RooflineCostModel`` and writes ``docs/splitwise_comparison.md``.

* prompt_time: one prefill step of ``batch_size`` prompts of ``prompt_size`` tokens.
* token_time: the mean decode iteration while generating ``token_size`` tokens, i.e. the
  mean of ``token_size - 1`` decode steps whose contexts grow from ``prompt_size + 1``.

Run from the repository root: ``python -m experiments.compare_splitwise``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from simulator.cost_model import DEFAULT_CPU_OVERHEAD_S, BatchShape, ParallelConfig, RooflineCostModel
from simulator.hardware import get_hardware
from simulator.model_spec import get_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "experiments" / "data" / "splitwise_perf_model.csv"
DOC = ROOT / "docs" / "splitwise_comparison.md"
SOURCE = ("https://github.com/Mutinifni/splitwise-sim/blob/378088013a54df6f2052c27ff5ae6ea7619c3ecc/"
          "data/perf_model.csv")
MODEL_NAMES = {"llama2-70b": "Llama-2-70B", "bloom-176b": "BLOOM-176B"}
HARDWARE_NAMES = {"a100-80gb": "A100-80GB-SXM", "h100-80gb": "H100-SXM"}
CPU_OVERHEAD_MS = 1e3 * DEFAULT_CPU_OVERHEAD_S


def predict(cm: RooflineCostModel, prompt: int, batch: int, tokens: int) -> tuple[float, float, float, float]:
    """(prompt s, mean token s, and both without the fixed CPU overhead) for one configuration."""
    prefill = cm.step_time(BatchShape.from_lists([prompt] * batch, [prompt] * batch)).total
    decode = float(cm.decode_step_times(batch, batch * (prompt + 1), tokens - 1).mean())
    return prefill, decode, prefill - cm.cpu_overhead, decode - cm.cpu_overhead


def compare(data: pd.DataFrame) -> pd.DataFrame:
    theirs = (data.groupby(["model", "hardware", "tensor_parallel", "batch_size", "prompt_size", "token_size"])
              [["prompt_time", "token_time"]].median().reset_index())
    rows = []
    for r in theirs.itertuples(index=False):
        cm = RooflineCostModel(get_model(MODEL_NAMES[r.model]), get_hardware(HARDWARE_NAMES[r.hardware]),
                               ParallelConfig(tp=int(r.tensor_parallel)))
        prompt, token, prompt_gpu, token_gpu = predict(cm, int(r.prompt_size), int(r.batch_size), int(r.token_size))
        rows.append({"model": r.model, "hardware": r.hardware, "batch": r.batch_size, "prompt": r.prompt_size,
                     "prompt_theirs_ms": r.prompt_time, "prompt_ours_ms": 1e3 * prompt,
                     "prompt_gpu_ms": 1e3 * prompt_gpu, "token_theirs_ms": r.token_time,
                     "token_ours_ms": 1e3 * token, "token_gpu_ms": 1e3 * token_gpu})
    out = pd.DataFrame(rows)
    out["prompt_ratio"] = out.prompt_ours_ms / out.prompt_theirs_ms
    out["token_ratio"] = out.token_ours_ms / out.token_theirs_ms
    return out


def summarize(cmp: pd.DataFrame) -> pd.DataFrame:
    """Per (model, hardware): geometric-mean ratios and the numbers the interpretation quotes."""
    rows = []
    for (model, hw), g in cmp.groupby(["model", "hardware"], sort=False):
        longest = g[g.batch == 1].sort_values("prompt").iloc[-1]
        rows.append({
            "model": model, "hardware": hw,
            "prompt_ratio": float(np.exp(np.log(g.prompt_ratio).mean())),
            "token_ratio": float(np.exp(np.log(g.token_ratio).mean())),
            "token_min_theirs_ms": float(g.token_theirs_ms.min()),
            "token_max_theirs_ms": float(g.token_theirs_ms.max()),
            "token_gpu_b1_ms": float(g[g.batch == 1].token_gpu_ms.min()),
            "long_prompt": int(longest.prompt),
            "long_prompt_theirs_ms": float(longest.prompt_theirs_ms),
            "long_prompt_gpu_ms": float(longest.prompt_gpu_ms),
        })
    return pd.DataFrame(rows)


def interpretation(cmp: pd.DataFrame, summary: pd.DataFrame) -> str:
    """The doc's closing paragraph, its numbers taken from the comparison."""
    s = summary.set_index(["model", "hardware"])
    llama_h, bloom_h = s.loc[("llama2-70b", "h100-80gb")], s.loc[("bloom-176b", "h100-80gb")]
    llama_a = s.loc[("llama2-70b", "a100-80gb")]
    weights = get_model("BLOOM-176B").weight_bytes / get_model("Llama-2-70B").weight_bytes
    slow = summary.long_prompt_theirs_ms / summary.long_prompt_gpu_ms
    h_over_a = llama_a.long_prompt_theirs_ms / llama_h.long_prompt_theirs_ms
    peaks = get_hardware("h100").peak_flops_bf16 / get_hardware("a100").peak_flops_bf16
    ratios = np.concatenate([cmp.prompt_ratio, cmp.token_ratio])
    faster = int((ratios < 1).sum())
    return (
        f"Our roofline is faster than {'all' if faster == ratios.size else f'{faster} of the'} {ratios.size} "
        "Splitwise measurements "
        "(geometric-mean ratios "
        f"{summary.token_ratio.min():.2f}-{summary.token_ratio.max():.2f} for token time, "
        f"{summary.prompt_ratio.min():.2f}-{summary.prompt_ratio.max():.2f} for prompt time), and the shape "
        "of their data suggests why. Their decode iteration has a high floor that grows little with batch "
        f"size or model: Llama-2-70B on H100 takes {llama_h.token_min_theirs_ms:.0f}-"
        f"{llama_h.token_max_theirs_ms:.0f} ms from batch 1 to 64, BLOOM-176B {bloom_h.token_min_theirs_ms / llama_h.token_min_theirs_ms:.1f}x "
        f"that although it reads {weights:.1f}x the weights, while the GPU work our roofline counts for a "
        f"batch-1 step is {llama_h.token_gpu_b1_ms:.1f} ms (weights, KV and TP=8 all-reduces). So their token "
        "time must be mostly per-step software overhead (presumably eager kernel launches, Python and "
        f"their TP=8 communication), far above our {CPU_OVERHEAD_MS:g} ms default. Their prefill grows with "
        f"tokens like ours but is {slow.min():.1f}-{slow.max():.1f}x slower than GEMMs at 80% of the dense peak at the "
        f"longest prompt, and their H100 is only {h_over_a:.1f}x their A100 there where the bf16 peaks "
        f"differ {peaks:.1f}x: their kernels apparently did not use Hopper well. The roofline follows the "
        "trends (prefill time linear in tokens, decode time nearly flat in batch) but sits at the level of a "
        "well-optimised engine; to simulate a specific engine, use the calibrated cost model, or at least "
        "its measured per-step overhead."
    )


def render(cmp: pd.DataFrame) -> str:
    lines = [
        "# Roofline vs Splitwise profiles",
        "",
        f"Source: [`data/perf_model.csv`]({SOURCE}) of SplitwiseSim, Copyright (c) 2024 Pratyush Patel, "
        "MIT License; the rows used are copied verbatim into `experiments/data/splitwise_perf_model.csv`. "
        "Generated by `python -m experiments.compare_splitwise`.",
        "",
        "Their numbers are medians of 5 runs at tensor parallel 8 on one DGX (8 GPUs, NVLink). Ours are "
        "`RooflineCostModel` with catalog defaults (A100-80GB-SXM / H100-SXM, FLOP efficiency 0.8, HBM "
        f"efficiency 0.9, {CPU_OVERHEAD_MS:g} ms CPU overhead per step). *Prompt* is one prefill step of "
        "`batch` prompts of `prompt` tokens; *token* is the mean decode iteration over the 127 steps that "
        "generate tokens 2..128. Ratio = ours / theirs.",
        "",
    ]
    for model, by_model in cmp.groupby("model", sort=False):
        lines += [f"## {MODEL_NAMES[model]}", "",
                  "| hardware | batch | prompt | prompt theirs ms | prompt ours ms | ratio "
                  "| token theirs ms | token ours ms | ratio |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in by_model.sort_values(["hardware", "batch", "prompt"]).itertuples(index=False):
            lines.append(f"| {r.hardware} | {r.batch} | {r.prompt} | {r.prompt_theirs_ms:.1f} | "
                         f"{r.prompt_ours_ms:.1f} | {r.prompt_ratio:.2f} | {r.token_theirs_ms:.1f} | "
                         f"{r.token_ours_ms:.1f} | {r.token_ratio:.2f} |")
        lines.append("")
    summary = summarize(cmp)
    lines += ["## Summary", "",
              "Geometric-mean ratios (ours / theirs) per model and GPU; their token-time range over all "
              "configurations; our GPU-only time (without the CPU overhead) of a batch-1 decode step; the "
              "longest batch-1 prompt, theirs and our GPU-only.", "",
              "| model | hardware | prompt ratio | token ratio | their token ms | our batch-1 GPU token ms "
              "| longest prompt | theirs ms | our GPU ms |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary.itertuples(index=False):
        lines.append(f"| {MODEL_NAMES[r.model]} | {r.hardware} | {r.prompt_ratio:.2f} | {r.token_ratio:.2f} | "
                     f"{r.token_min_theirs_ms:.1f}-{r.token_max_theirs_ms:.1f} | {r.token_gpu_b1_ms:.1f} | "
                     f"{r.long_prompt} | {r.long_prompt_theirs_ms:.0f} | {r.long_prompt_gpu_ms:.0f} |")
    lines += ["", "## Interpretation", "", interpretation(cmp, summary), ""]
    return "\n".join(lines)


def main() -> None:
    cmp = compare(pd.read_csv(DATA, comment="#"))
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(render(cmp))
    print(f"wrote {DOC}")
    print(cmp[["model", "hardware", "batch", "prompt", "prompt_ratio", "token_ratio"]].to_string(index=False))


if __name__ == "__main__":
    main()
