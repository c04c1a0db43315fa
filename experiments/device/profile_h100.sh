#!/bin/bash
# Device run (1 x H100): torch-profiler kernel tables of 10 decode steps at batch 256 for the
# Llama-3.1-8B shape (context ~1,000) and the nano-vllm workload (Qwen3-0.6B), to see where
# decode time goes above the floor. ~3 min. Back under $OUT: summary.log, logs.tar.gz.
# Run: bash experiments/device/profile_h100.sh   (tracked: no carry needed)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
cd "$(dirname "$0")/../.."
LOGS=$(mktemp -d)
t0=$(date +%s)
main() {
timeout 240 python3 -m experiments.bench_offline --workload llama8b-1k --num-seqs 256 --output-len 200 \
  --max-num-seqs 256 --profile --out "$LOGS/llama8b_profile.json" > "$LOGS/llama8b_profile.log" 2>&1
echo "== llama8b profile: rc $? at $(( $(date +%s) - t0 )) s"
grep -E "Throughput|floor|time split|decode:" "$LOGS/llama8b_profile.log" | cut -c1-300
sed -n '/Self CUDA/,$p' "$LOGS/llama8b_profile.log" | cut -c1-200 | head -40
timeout 150 python3 -m experiments.bench_offline --profile --out "$LOGS/nano_profile.json" > "$LOGS/nano_profile.log" 2>&1
echo "== nano-vllm profile: rc $? at $(( $(date +%s) - t0 )) s"
grep -E "Throughput|time split" "$LOGS/nano_profile.log" | cut -c1-300
sed -n '/Self CUDA/,$p' "$LOGS/nano_profile.log" | cut -c1-200 | head -40
tar czf "$OUT/logs.tar.gz" -C "$LOGS" .
}
main 2>&1 | tee "$OUT/summary.log"
