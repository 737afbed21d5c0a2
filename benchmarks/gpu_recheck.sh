#!/usr/bin/env bash
# A short GPU re-check of the current tree, one call on a lent GPU (about 5 minutes on an H100; at most 9):
#   1. the speed paths' equivalence tests with CUDA present (graphed step vs eager on the GPU, device loader);
#   2. whole epochs of train over 8 x the train folder: the issue 22 target (>= 20,000 training images/s);
#   3. `train --preset best` end to end on the GPU (raw images to a calibrated, OOD-fitted, test-evaluated
#      checkpoint), timed, checkpoint kept so it can be evaluated on a CPU against the built-in model.
# Needs the shared chest_xray_224 folder in .gpu_data/ and the pydicom wheel in .whl/ (both carried).
# Results under $OUT: pytest_gpu.txt, gpu_epochs.json, train_best.log, best_gpu.pt, test_metrics.json.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
DATA=${DATA:-$PWD/.gpu_data/chest_xray_224}
mkdir -p "$OUT" /tmp/shared/data
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 PNEUMONIA_CNN_SHARED=/tmp/shared PNEUMONIA_CNN_TEST_CUDA=1
ln -sfn "$DATA" /tmp/shared/data/chest_xray_224
nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__)"
echo "== 1. equivalence tests on the GPU"
timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_speed_paths.py tests/test_device.py \
  > "$OUT/pytest_gpu.txt" 2>&1; echo "pytest rc $?"; tail -4 "$OUT/pytest_gpu.txt"
echo "== 2. whole epochs of train, 8 x the train folder"
timeout 240 python3 benchmarks/gpu_epochs.py --data "$DATA" --out "$OUT/gpu_epochs.json" --copies 8 --epochs 3 \
  --variants '{"batch_size": 512, "cuda_graph": true, "compile": true}' '{"batch_size": 256, "compile": true}' \
  '{"batch_size": 256, "cuda_graph": true}' 2>&1 | grep "^{"
echo "== 3. train --preset best on the GPU"
start=$(date +%s)
timeout 200 python3 -m pneumonia_cnn train --preset best --seed 0 --data "$DATA" --out /tmp/best --cache-dir /tmp/cache \
  --device cuda --no-progress > "$OUT/train_best.log" 2>&1
echo "train rc $? in $(( $(date +%s) - start )) s"; tail -6 "$OUT/train_best.log"
cp /tmp/best/best.pt "$OUT/best_gpu.pt" 2>/dev/null; cp /tmp/best/test_metrics.json "$OUT/" 2>/dev/null
true
