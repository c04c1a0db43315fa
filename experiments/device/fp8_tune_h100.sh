#!/bin/bash
# Device run (1 x H100): kernel tests, the fp8 attention benchmark, nano-vllm and llama8b-1k (256
# sequences) with the fp8 KV cache. ~4-6 min.
# Run: SERVELAB_COMMIT=<short hash> bash experiments/device/fp8_tune_h100.sh   (the copy has no .git)
. "$(dirname "$0")/common.sh"
mkdir -p $OUT
timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/executor/test_kernels.py > $OUT/pytest.log 2>&1; done_part pytest $?; tail -2 $OUT/pytest.log
timeout 100 python3 -m experiments.bench_attention --kv-cache-dtype fp8 --out $OUT/bench_attention_fp8.json > $OUT/fp8.log 2>&1; done_part attention-fp8 $?
tail -9 $OUT/fp8.log
timeout 100 python3 -m experiments.bench_offline --kv-cache-dtype fp8 --out $OUT/bench_offline_fp8.json > $OUT/nano_fp8.log 2>&1; done_part nano-fp8 $?
grep -E "Throughput|floor|decode:" $OUT/nano_fp8.log | cut -c1-250
timeout 260 python3 -m experiments.bench_offline --workload llama8b-1k --max-num-seqs 256 --kv-cache-dtype fp8 --out $OUT/bench_offline_llama8b_fp8_seqs256.json > $OUT/l8_fp8.log 2>&1; done_part llama8b-fp8-256 $?
grep -E "Throughput|floor|time split|scheduling|decode:|prefill_or" $OUT/l8_fp8.log | cut -c1-250
