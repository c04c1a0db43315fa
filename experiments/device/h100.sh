#!/bin/bash
# Device run (1 x H100), issue 5, in ONE call: the executor's engine-vs-HF and LLM tests on the
# GPU (async and sync engines, real CUDA graphs), bench_attention, bench_offline (nano-vllm,
# async scheduling, then the sync engine), bench_decode (writes the random Llama-3.1-8B to
# /dev/shm), bench_offline --workload llama8b-1k (reuses it), then, only if time is left,
# llama8b-1k at --max-num-seqs 256.
# Each part has its own time limit; everything ends by BUDGET seconds (the tool allows 600).
# Estimated: tests ~60 s, attention ~40 s, nano-vllm 2 x ~35 s, decode ~70 s (of which ~30-50 s writing the
# 16 GB model: never measured), llama8b-1k ~170-210 s => ~7-8 min.
# Back under $OUT (<= 8 files): summary.log (all this prints), logs.tar.gz (each part's full
# log), and one JSON per part, written there directly so a failed part leaves no stale copy.
# Run: SERVELAB_COMMIT=<short hash>+wip bash experiments/device/h100.sh   (tracked: no carry needed)
. "$(dirname "$0")/common.sh"
BUDGET=570
LOGS=$(mktemp -d)

main() {
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,clocks.mem --format=csv
df -h /dev/shm /tmp
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"

timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/executor/test_engine_vs_hf.py tests/executor/test_llm.py \
  > "$LOGS/pytest_gpu.log" 2>&1
done_part pytest-gpu $?
tail -4 "$LOGS/pytest_gpu.log"

timeout 150 python3 -m experiments.bench_attention --out "$OUT/bench_attention.json" > "$LOGS/bench_attention.log" 2>&1
done_part attention $?
tail -25 "$LOGS/bench_attention.log"

timeout 150 python3 -m experiments.bench_offline --out "$OUT/bench_offline.json" > "$LOGS/bench_offline.log" 2>&1
done_part offline-nano-vllm $?
grep -E "wrote random|LLM ready|Throughput|floor|time split|scheduling|decode:|prefill_or|first|Error|error" "$LOGS/bench_offline.log" | cut -c1-400

timeout 120 python3 -m experiments.bench_offline --no-async-scheduling --out "$OUT/bench_offline_sync.json" \
  > "$LOGS/bench_offline_sync.log" 2>&1
done_part offline-nano-vllm-sync $?
grep -E "Throughput|floor|time split|decode:|Error|error" "$LOGS/bench_offline_sync.log" | cut -c1-400

timeout 200 python3 -m experiments.bench_decode --out "$OUT/bench_decode.json" > "$LOGS/bench_decode.log" 2>&1
done_part decode $?
grep -E "wrote random|LLM ready|decode step|Error|error" "$LOGS/bench_decode.log" | cut -c1-400

left=$(( BUDGET - $(elapsed) ))
timeout $left python3 -m experiments.bench_offline --workload llama8b-1k --out "$OUT/bench_offline_llama8b.json" \
  > "$LOGS/bench_offline_llama8b.log" 2>&1
done_part offline-llama8b-1k $?
grep -E "wrote random|LLM ready|Throughput|floor|time split|scheduling|decode:|prefill_or|first|Error|error" \
  "$LOGS/bench_offline_llama8b.log" | cut -c1-400

left=$(( BUDGET - $(elapsed) ))
if (( left > 200 )); then
  timeout $left python3 -m experiments.bench_offline --workload llama8b-1k --max-num-seqs 256 \
    --out "$OUT/bench_offline_llama8b_seqs256.json" > "$LOGS/bench_offline_llama8b_seqs256.log" 2>&1
  done_part offline-llama8b-1k-seqs256 $?
  grep -E "Throughput|floor|scheduling" "$LOGS/bench_offline_llama8b_seqs256.log" | cut -c1-400
else
  echo "== skipped llama8b-1k at --max-num-seqs 256: ${left} s left"
fi

tar czf "$OUT/logs.tar.gz" -C "$LOGS" .
echo "== total $(elapsed) s"
}

main 2>&1 | tee "$OUT/summary.log"
