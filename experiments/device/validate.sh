#!/bin/bash
# Device run (1 x H200), in ONE call: the executor's engine-vs-HF and LLM tests on the GPU,
# the random Qwen3-0.6B in /dev/shm, fresh profiles in PROFILES (default 3) processes, pooled
# (experiments/profile.py: interleaved eager rounds, every step kept under "samples", clocks
# per round), then the eight single-GPU validation cases right after it on the same GPU.
# GPU clocks (nvidia-smi, 1 s) and CPU MHz / load (1 s) are logged over the whole call, so a
# slow period in the profile or in a run can be told apart from model error.
# Estimated: tests ~70 s, model ~20 s, each profile ~75 s (the step sweep ~30 s of it), real ~165 s,
# tar ~2 s => ~8 min with three profiles; each part has its own limit, all end by ~570 s.
# Back under $OUT (5 files, well under the tool's 8): summary.log (all this prints), profile.log,
# real.log, the profile JSON, and validate.tar.gz (run dirs, profile, all logs, monitors).
# Run: bash experiments/device/validate.sh   (carry .valtraces; optional NAME=<profile stem>)
# Other shapes / subsets: SHAPE (default Qwen3-0.6B), CASES (default all), TESTS=0 skips the GPU
# tests, PROFILE_TIMEOUT (default 210 s per profile), e.g. the Llama-3.1-8B QPS sweep:
#   SHAPE=Llama-3.1-8B CASES=qps_overload,qps_knee,qps_low PROFILES=1 TESTS=0 PROFILE_TIMEOUT=330 \
#   NAME=llama3_1_8b_h200_v2 bash experiments/device/validate.sh
. "$(dirname "$0")/common.sh"
export SERVELAB_TRACES=${SERVELAB_TRACES:-$PWD/.valtraces}
NAME=${NAME:-qwen3_0_6b_h200_v2_rounds}
PROFILES=${PROFILES:-3}
SHAPE=${SHAPE:-Qwen3-0.6B}
CASES=${CASES:-all}
TESTS=${TESTS:-1}
PROFILE_TIMEOUT=${PROFILE_TIMEOUT:-210}
MODEL=/dev/shm/$SHAPE
W=$(mktemp -d /tmp/val.XXXX)
PROFILE=$W/$NAME.json
BUDGET=570

cpu_monitor() {
  echo "t_s,load1,cpu_mhz_mean,cpu_mhz_min,cpu_mhz_max"
  while :; do
    awk -v t="$(elapsed)" 'FILENAME == "/proc/loadavg" && FNR == 1 {l = $1}
      /^cpu MHz/ {s += $4; n++; if (min == "" || $4 < min) min = $4; if ($4 > max) max = $4}
      END {printf "%d,%s,%.0f,%.0f,%.0f\n", t, l, n ? s / n : 0, min, max}' /proc/loadavg /proc/cpuinfo
    sleep 1
  done
}

main() {
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo none)"
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,temperature.gpu,power.draw,utilization.gpu,clocks_throttle_reasons.active \
  --format=csv -lms 1000 > "$W/gpu_monitor.csv" 2>&1 &
GPU_MON=$!
cpu_monitor > "$W/cpu_monitor.csv" 2>&1 &
CPU_MON=$!
trap 'kill $GPU_MON $CPU_MON 2>/dev/null' EXIT

timeout 240 python3 -m executor.make_random_model --shape "$SHAPE" --dtype bfloat16 --out $MODEL > "$W/model.log" 2>&1
done_part "model $SHAPE" $?

(( TESTS )) && timeout 130 python3 -m pytest -q -x -p no:cacheprovider tests/executor/test_engine_vs_hf.py tests/executor/test_llm.py \
  > "$W/pytest_gpu.log" 2>&1
rc=$?
(( TESTS )) && { done_part pytest-gpu $rc; tail -3 "$W/pytest_gpu.log"; }
if (( TESTS && rc != 0 )); then  # a crash hides which call failed: rerun the GPU-pool test with synchronous launches
  CUDA_LAUNCH_BLOCKING=1 timeout 90 python3 -m pytest -q -x -p no:cacheprovider --tb=long \
    tests/executor/test_llm.py::test_gpu_profiled_pool_and_graphs_match_eager > "$W/pytest_gpu_blocking.log" 2>&1
  done_part pytest-gpu-blocking $?
  grep -E "Error|error|assert|model_runner|kv_cache|block_pool|\.py:[0-9]+" "$W/pytest_gpu_blocking.log" | grep -v "^  File \"/usr\|site-packages" | head -30
fi

# PROFILES processes (default 3), each a whole profile; their step sweeps are then pooled into
# $PROFILE (profile --pool-sweeps: each pass levelled to the median process's run of it), while
# ~270 s are left (a profile ~75 s, the real phase ~165 s).
parts=()
for k in $(seq 1 "$PROFILES"); do
  if (( k > 1 && BUDGET - $(elapsed) < 270 )); then echo "== skipped profile $k: $(( BUDGET - $(elapsed) )) s left"; break; fi
  timeout "$PROFILE_TIMEOUT" python3 -m experiments.profile --model-dir $MODEL --model-name "$SHAPE" --out "$W/${NAME}_p$k.json" \
    --num-gpu-blocks 32768 > "$W/profile_p$k.log" 2>&1
  done_part "profile $k" $?
  [[ -f $W/${NAME}_p$k.json ]] && parts+=("$W/${NAME}_p$k.json")
  grep -E "^  round|switch penalties|mixed eager steps:|mixed graph steps|graph decode|sweep pass|step fit|FAILED|profile done" \
    "$W/profile_p$k.log" | cut -c1-400 | { (( k == 1 )) && cat || grep -E "step fit|profile done|FAILED"; }
done
if (( ${#parts[@]} > 1 )); then
  python3 -m experiments.profile --pool-sweeps "${parts[@]}" --out "$PROFILE" > "$W/profile.log" 2>&1
  done_part "pool ${#parts[@]} sweeps" $?
  grep -E "pooled|step fit" "$W/profile.log" | cut -c1-400
elif (( ${#parts[@]} == 1 )); then
  cp "${parts[0]}" "$PROFILE"; cp "$W/profile_p1.log" "$W/profile.log"
fi
cat "$W"/profile_p*.log >> "$W/profile.log"
cp "$W/profile.log" "$OUT/"
cp "$PROFILE" "$OUT/" 2>/dev/null

left=$(( BUDGET - $(elapsed) ))
if (( left > 60 )); then
  timeout $(( left < 280 ? left : 280 )) python3 -m experiments.validate real --case "$CASES" --model-dir $MODEL \
    --model-name "$SHAPE" --out "$W/runs" --num-gpu-blocks 32768 --max-duration 45 > "$W/real.log" 2>&1
  done_part real $?
else
  echo "== skipped the real phase: ${left} s left" | tee "$W/real.log"
fi
cp "$W/real.log" "$OUT/"

kill $GPU_MON $CPU_MON 2>/dev/null
tar czf "$OUT/validate.tar.gz" -C "$W" .
done_part "tar ($(du -h "$OUT/validate.tar.gz" | cut -f1), $(ls -d "$W"/runs/*/ 2>/dev/null | wc -l) run dirs)" $?

echo "== summary"
tail -10 "$W/real.log"
python3 - "$PROFILE" <<'EOF'
import json, sys
try:
    p = json.load(open(sys.argv[1]))
except (OSError, ValueError) as e:
    sys.exit(f"no profile: {e}")
o, m, r = p["overhead"], p["meta"], p["samples"]["eager_rounds"]
ms = lambda xs: [round(x * 1e3, 2) for x in xs]
fit = m["overhead_fit"]
print(f"profile {m['profile_seconds']} s: graph_s {o['graph_s'] * 1e3:.3f} ms + {o['cpu_per_request_s'] * 1e6:.2f} us/req, "
      f"mixed_graph_s {o.get('mixed_graph_s', 0) * 1e3:.3f} ms (sizes {o.get('mixed_graph_sizes')}), "
      f"eager_s {o['eager_s'] * 1e3:.2f} ms, switch after graph {o['eager_after_graph_s'] * 1e3:.2f} / "
      f"idle {o['eager_after_idle_s'] * 1e3:.2f} ms")
if "eager_floor" in p:
    print("eager floor ms", ms(p["eager_floor"]["seconds"]), "at tokens", [int(t) for t in p["eager_floor"]["num_tokens"]])
print("mixed wall ms, steady rounds", ms(fit["mixed_by_tokens"]["median_wall_s"]),
      "| all rounds", ms(fit["mixed_all_rounds_by_tokens"]["median_wall_s"]),
      "| cold pass", ms(m["mixed_cold_pass"]["median_wall_s"]))
print("steady rounds", r["steady_rounds"], "of", r["rounds"], "| drift decoders",
      [row["drift"]["decoders"] for row in r["per_round"]], "| clocks", r["clock_sources"])
EOF
echo "== total $(elapsed) s"
}

main 2>&1 | tee "$OUT/summary.log"
