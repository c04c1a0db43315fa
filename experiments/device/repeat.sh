#!/bin/bash
# Device run (1 x H200): several profiles and several real runs of the eight validation cases
# on ONE machine, each in its own process, to measure how much a process (not the model) moves
# the numbers: profile k vs profile j, real run k vs real run j, and every profile against every
# real run (`python -m experiments.validate compare` per pair, offline).
# PHASES is a space-separated list of profile:<tag> and real:<tag> entries, run in that order,
# e.g. PHASES="profile:p1 real:r1 real:r2". A phase starts only when the time left under
# BUDGET (default 570 s) can hold it; each one ends up under $OUT as <tag>.json (profile, plus
# its log) or <tag>.tar.gz (real run dirs and log). The random Qwen3-0.6B is built in /dev/shm
# once per machine (kept while the machine stays warm). GPU clocks are logged as in validate.sh.
# Run: PHASES="..." bash experiments/device/repeat.sh   (carry .valtraces)
. "$(dirname "$0")/common.sh"
export SERVELAB_TRACES=${SERVELAB_TRACES:-$PWD/.valtraces}
MODEL=/dev/shm/q06
BUDGET=${BUDGET:-570}
PHASES=${PHASES:?set PHASES, e.g. \"profile:p1 real:r1\"}
W=$(mktemp -d /tmp/rep.XXXX)

main() {
nvidia-smi --query-gpu=name,driver_version,memory.used,clocks.sm,clocks.mem --format=csv,noheader
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,temperature.gpu,power.draw,utilization.gpu,clocks_throttle_reasons.active \
  --format=csv -lms 1000 > "$OUT/gpu_monitor.csv" 2>&1 &
GPU_MON=$!
trap 'kill $GPU_MON 2>/dev/null' EXIT
if [[ ! -f $MODEL/config.json ]]; then
  timeout 120 python3 -m executor.make_random_model --shape Qwen3-0.6B --dtype bfloat16 --out $MODEL > "$W/model.log" 2>&1
  done_part model $?
fi
for phase in $PHASES; do
  kind=${phase%%:*} tag=${phase#*:}
  left=$(( BUDGET - $(elapsed) ))
  need=$([[ $kind == profile ]] && echo 100 || echo 200)
  if (( left < need )); then echo "== skipped $phase: ${left} s left"; continue; fi
  case $kind in
    profile)
      timeout $(( left < 210 ? left : 210 )) python3 -m experiments.profile --model-dir $MODEL --model-name Qwen3-0.6B \
        --out "$OUT/$tag.json" --num-gpu-blocks 32768 > "$OUT/$tag.log" 2>&1
      done_part "$phase" $?
      grep -E "sweep pass 6|profile done|Error" "$OUT/$tag.log" | cut -c1-200 ;;
    real)
      timeout $(( left < 280 ? left : 280 )) python3 -m experiments.validate real --case all --model-dir $MODEL \
        --model-name Qwen3-0.6B --out "$W/$tag" --num-gpu-blocks 32768 --max-duration 45 > "$W/$tag/real.log" 2>&1
      done_part "$phase" $?
      tail -9 "$W/$tag/real.log" | cut -c1-200
      tar czf "$OUT/$tag.tar.gz" -C "$W" "$tag" ;;
    *) echo "unknown phase $phase" ;;
  esac
done
echo "== total $(elapsed) s"
}

mkdir -p "$W"
for phase in $PHASES; do [[ $phase == real:* ]] && mkdir -p "$W/${phase#*:}"; done
main 2>&1 | tee "$OUT/summary.log"
