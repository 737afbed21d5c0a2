#!/usr/bin/env bash
# GPU check of the scoring path and the service, one call on a lent GPU (about 6 minutes on an H100; at most 9):
#   1. the speed paths' equivalence tests with CUDA present;
#   2. `predict` of the built-in model over the shared test folder on the GPU (batch 64, batch 1, and batch 64
#      with TF32 off) and on the same machine's CPU (torch engine): the CSVs come back to compare;
#   3. `serve --device cuda` under load (benchmarks/load.py: 1,000 requests, 10% Grad-CAM, 32 and 64 clients),
#      beside `serve --device cpu` on the same machine (32 clients);
#   4. whole epochs of train (8 x the train folder, batch 512, --cuda-graph --compile): the >= 20,000 img/s target.
# Needs the shared chest_xray_224 folder in .gpu_data/ and, in .whl/, the wheels the image lacks (fastapi,
# starlette, pydantic, pydantic-core, annotated-types, typing-inspection, python-multipart, uvicorn, pydicom,
# opentelemetry-api).
# Everything comes back as $OUT/results.tgz (the tool returns at most 8 files).
source benchmarks/gpu_setup.sh
finish() { tar czf "$OUT/results.tgz" -C "$G" .; }
trap finish EXIT
{ nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__)"; nproc; } | tee "$G/machine.txt"
echo "== 1. equivalence tests on the GPU"
timeout 120 python3 -m pytest -q -p no:cacheprovider -rs tests/test_speed_paths.py tests/test_device.py \
  > "$G/pytest_gpu.txt" 2>&1; echo "pytest rc $?"; tail -3 "$G/pytest_gpu.txt"
echo "== 2. predict on the GPU and the CPU"
predict() {
  local name=$1; shift; local start; start=$(date +%s%N)
  timeout 120 python3 -m pneumonia_cnn predict builtin "$DATA/test" --format csv --no-progress "$@" \
    > "$G/predict_$name.csv" 2> "$G/predict_$name.err"
  echo "$name rc $? $(( ($(date +%s%N) - start) / 1000000 )) ms"
}
predict cuda64 --device cuda --batch-size 64
predict cuda1 --device cuda --batch-size 1
NVIDIA_TF32_OVERRIDE=0 predict cuda64_notf32 --device cuda --batch-size 64
predict cpu --device cpu --engine torch
echo "== 3. serve under load"
for run in "cuda 32" "cuda 64" "cpu 32"; do
  set -- $run
  timeout 150 python3 benchmarks/load.py builtin --device "$1" --concurrency "$2" --requests 1000 --data "$DATA" \
    --out "$G/load_$1_$2.json" > "$G/load_$1_$2.log" 2>&1
  echo "load $1 $2 rc $?"; grep -E '"(failures|wrong_answers|largest_probability_difference|labels_changed|p50_ms|p99_ms|throughput_per_s)"' "$G/load_$1_$2.log"
done
echo "== 4. whole epochs of train"
timeout 150 python3 benchmarks/gpu_epochs.py --data "$DATA" --out "$G/gpu_epochs.json" --copies 8 --epochs 3 \
  --variants '{"batch_size": 512, "cuda_graph": true, "compile": true}' > "$G/gpu_epochs.log" 2>&1
echo "epochs rc $?"; grep "^{" "$G/gpu_epochs.log"
