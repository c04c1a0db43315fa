#!/bin/bash
# Device run (1 x H100): the FP8 KV cache. Kernel tests (Triton path, incl. fp8) and the LLM
# tests on the GPU, then bench_offline with --kv-cache-dtype fp8: nano-vllm, and llama8b-1k at
# 256 and 512 sequences. ~8 min. Back under $OUT: summary.log, logs.tar.gz, the JSONs.
# Run: SERVELAB_COMMIT=<short hash>+wip bash experiments/device/fp8_h100.sh   (tracked: no carry needed)
. "$(dirname "$0")/common.sh"
BUDGET=570
LOGS=$(mktemp -d)
main() {
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/executor/test_kernels.py tests/executor/test_llm.py \
  > "$LOGS/pytest_gpu.log" 2>&1
echo "== pytest-gpu: rc $? at $(elapsed) s"; tail -4 "$LOGS/pytest_gpu.log"

timeout 100 python3 -m experiments.bench_offline --kv-cache-dtype fp8 --out "$OUT/bench_offline_fp8.json" \
  > "$LOGS/bench_offline_fp8.log" 2>&1
echo "== nano-vllm fp8: rc $? at $(elapsed) s"
grep -E "LLM ready|Throughput|floor|time split|decode:|prefill_or|Error|error" "$LOGS/bench_offline_fp8.log" | cut -c1-300

timeout 230 python3 -m experiments.bench_offline --workload llama8b-1k --max-num-seqs 256 --kv-cache-dtype fp8 \
  --out "$OUT/bench_offline_llama8b_fp8_seqs256.json" > "$LOGS/llama8b_fp8_256.log" 2>&1
echo "== llama8b-1k fp8 256: rc $? at $(elapsed) s"
grep -E "wrote random|LLM ready|Throughput|floor|time split|scheduling|decode:|prefill_or|Error|error" \
  "$LOGS/llama8b_fp8_256.log" | cut -c1-300

left=$(( BUDGET - $(elapsed) ))
if (( left > 130 )); then
  timeout $left python3 -m experiments.bench_offline --workload llama8b-1k --kv-cache-dtype fp8 \
    --out "$OUT/bench_offline_llama8b_fp8.json" > "$LOGS/llama8b_fp8_512.log" 2>&1
  echo "== llama8b-1k fp8 512: rc $? at $(elapsed) s"
  grep -E "LLM ready|Throughput|floor|time split|scheduling|decode:|prefill_or|Error|error" \
    "$LOGS/llama8b_fp8_512.log" | cut -c1-300
else
  echo "== skipped llama8b-1k fp8 at 512 sequences: ${left} s left"
fi
tar czf "$OUT/logs.tar.gz" -C "$LOGS" .
echo "== total $(elapsed) s"
}
main 2>&1 | tee "$OUT/summary.log"
