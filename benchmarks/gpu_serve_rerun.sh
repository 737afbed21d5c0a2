#!/usr/bin/env bash
# The second, shorter call of benchmarks/gpu_serve.sh's checks after TF32 was turned off for scoring: the device
# tests, predict on the GPU at batch 64 and batch 1, and serve --device cuda under load (32 clients).
source benchmarks/gpu_setup.sh
trap 'tar czf "$OUT/results.tgz" -C "$G" .' EXIT
timeout 60 python3 -m pytest -q -p no:cacheprovider -rs tests/test_device.py > "$G/pytest_device.txt" 2>&1
echo "pytest rc $?"; tail -2 "$G/pytest_device.txt"
for run in "cuda64 64" "cuda1 1"; do
  set -- $run
  timeout 60 python3 -m pneumonia_cnn predict builtin "$DATA/test" --format csv --no-progress --device cuda \
    --batch-size "$2" > "$G/predict_$1.csv" 2> "$G/predict_$1.err"; echo "predict $1 rc $?"
done
timeout 100 python3 benchmarks/load.py builtin --device cuda --concurrency 32 --requests 1000 --data "$DATA" \
  --out "$G/load_cuda_32.json" > "$G/load_cuda_32.log" 2>&1
echo "load rc $?"; grep -vE '^\s*"(python|processor|cpus|model|name|input|engine)"' "$G/load_cuda_32.log" | tail -22
