#!/usr/bin/env bash
# One call on a lent GPU machine (at most 9 minutes), for what the development machine cannot measure:
#   1. its CPU: when it has AMX (issue 22's CPU), the CPU targets on 2 of its cores pinned with taskset, the GPU
#      hidden: the bf16/float32 matrix-product peaks on 2 physical cores and on one core's 2 hyperthreads, the
#      seed model's training speed and utilisation (benchmarks/run.py --only training), and `--preset best` from
#      raw images to a calibrated, OOD-fitted checkpoint (benchmarks/time_to_accuracy.py);
#   2. `serve` under load (benchmarks/load.py, 1,000 requests, latency by kind: plain and Grad-CAM): on the GPU
#      with 32 clients, 32 without Grad-CAM and 64; on all of the machine's CPU cores with 32.
# `bash benchmarks/gpu_host.sh serve` runs the second call of 2026-11-28 instead: step 2 only, after the Grad-CAM
# and idle-thread changes, the CPU server with ONNX Runtime's threads spinning and sleeping, alternating twice.
# What it needs carried (.gpu_data/, .whl/): benchmarks/gpu_setup.sh.
# Everything comes back as $OUT/results.tgz.
source benchmarks/gpu_setup.sh
snap() { tar czf "$OUT/results.tgz" -C "$G" .; }  # after each step: a call cut short still returns what ran
trap snap EXIT
{ nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__)"; nproc; lscpu; } > "$G/machine.txt"
grep -E "^Model name|^Thread|^Core" "$G/machine.txt"
lscpu -p=CPU,CORE > "$G/cpu_core.txt"
# two physical cores (the first CPU of each) and the two hyperthreads of one core
TWO_CORES=$(grep -v '^#' "$G/cpu_core.txt" | sort -t, -k2,2n -u | head -2 | cut -d, -f1 | paste -sd,)
SIBLINGS=$(grep -v '^#' "$G/cpu_core.txt" | awk -F, '$2 == 0 {print $1}' | head -2 | paste -sd,)
echo "two cores: $TWO_CORES, one core's threads: $SIBLINGS"
RUNS=("cuda 32 0.1 sleep" "cuda 32 0 sleep" "cuda 64 0.1 sleep" "cpu 32 0.1 spin")
if [ "${1:-}" = serve ]; then
  RUNS=("cpu 32 0.1 spin" "cpu 32 0.1 sleep" "cpu 32 0.1 spin" "cpu 32 0.1 sleep" "cuda 32 0.1 sleep" "cuda 64 0.1 sleep")
elif grep -q amx_bf16 /proc/cpuinfo; then
  echo "== 1. AMX CPU, 2 cores"
  for cpus in "$TWO_CORES" "$SIBLINGS"; do
    CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=2 taskset -c "$cpus" timeout 60 python3 -c "
import sys, torch; sys.path.insert(0, 'benchmarks'); import training_speed as t; d = torch.device('cpu')
print('cpus $cpus threads', torch.get_num_threads(), 'bf16', round(t.matmul_peak(torch.bfloat16, d)),
      'fp32', round(t.matmul_peak(torch.float32, d)), 'GFLOP/s')" 2>&1 | tee -a "$G/peaks.txt"
  done
  CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=2 taskset -c "$TWO_CORES" timeout 150 python3 benchmarks/run.py \
    --device cpu --only training --data "$DATA" --out "$G/training_amx.json" > "$G/training_amx.log" 2>&1
  echo "training rc $?"; tail -12 "$G/training_amx.log"; snap
  start=$(date +%s)
  CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=2 taskset -c "$TWO_CORES" timeout 290 python3 benchmarks/time_to_accuracy.py \
    --preset best --data "$DATA" --out "$G/tta_best_amx.json" > "$G/tta_best_amx.log" 2>&1
  echo "best rc $? $(( $(date +%s) - start )) s"; tail -4 "$G/tta_best_amx.log"; snap
else
  echo "== 1. no AMX on this CPU: skipped"
fi
echo "== 2. serve under load"
for index in "${!RUNS[@]}"; do
  set -- ${RUNS[$index]}
  name="load_${index}_$1_$2_$3_$4"
  PNEUMONIA_CNN_IDLE_THREADS=$4 timeout 100 python3 benchmarks/load.py builtin --device "$1" --concurrency "$2" \
    --gradcam-share "$3" --requests 1000 --data "$DATA" --out "$G/$name.json" > "$G/$name.log" 2>&1
  echo "load ${RUNS[$index]} rc $?"
  python3 -c "import json; r = json.load(open('$G/$name.json')); print({k: r.get(k) for k in (
    'failures', 'wrong_answers', 'labels_changed', 'p50_ms', 'p95_ms', 'throughput_per_s', 'latency_by_kind')})"
  snap
done
