#!/bin/bash
# Device run for docs/parallel.md's DP validation, on 2 GPUs (`nvidia-h200-x2`):
#   run(command="bash experiments/device/parallel.sh", carry=[".valtraces"], kind="nvidia-h200-x2")
# .valtraces: a copy of ../shared/traces (the ShareGPT lengths). DP=1 and DP=2 runs of
# experiments/validate_parallel.py, written to /tmp and tarred into ONE file under $OUT: the
# device tool returns only a few files, and the first run of this (2026-11-21) lost its run
# directories by writing them to $OUT directly. ~2.5 min.
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
cd "$(dirname "$0")/../.."
export SERVELAB_TRACES=$PWD/.valtraces
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee $OUT/smi.txt
t0=$(date +%s)
timeout 90 python3 -m executor.make_random_model --shape Qwen3-0.6B --dtype bfloat16 --out /dev/shm/q06 > $OUT/model.log 2>&1
echo "== model at $(( $(date +%s) - t0 )) s"
timeout 300 python3 -m experiments.validate_parallel real --out /tmp/dp_h200x2 2>&1 | tee $OUT/dp_real.log | tail -8
tar czf $OUT/dp_h200x2.tgz -C /tmp dp_h200x2
echo "== done at $(( $(date +%s) - t0 )) s; unpack with: tar xzf dp_h200x2.tgz -C experiments/results/validation"
