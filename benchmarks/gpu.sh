#!/usr/bin/env bash
# The GPU check of issue 22 item 5, one call on a lent GPU (about 6 minutes on an H100; at most 8):
#   the graphed step and the device loader against their plain paths, on the GPU;
#   training images/s of the seed model (224x224, bf16) through the library's loop for several batch sizes,
#   with and without the CUDA graph of the whole step, with GPU utilisation and model FLOP utilisation;
#   whole epochs of the train command with the fastest variant.
# Results under $OUT: gpu_training.json, gpu_epochs.json, gpu_log.txt, nvidia_smi.txt. Measured: benchmarks/results_gpu_h100.json.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
DATA=${DATA:-.gpu_data/chest_xray_224}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then  # pydicom, which the device machine lacks
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD/src
nvidia-smi > "$OUT/nvidia_smi.txt" 2>&1
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,power.limit --format=csv >> "$OUT/nvidia_smi.txt" 2>&1
timeout "${LIMIT:-460}" python3 benchmarks/gpu_train.py --data "$DATA" --out "$OUT/gpu_training.json" --budget "${BUDGET:-300}" \
  2>&1 | tee "$OUT/gpu_log.txt" | grep -v Warning
# whole epochs of train over 8 x the train folder (33,096 images), so per-epoch costs are amortised as on a
# real-size set: the figure issue 22 targets (>= 20,000 training images/s)
timeout 300 python3 benchmarks/gpu_epochs.py --data "$DATA" --out "$OUT/gpu_epochs.json" --copies 8 --epochs 3 \
  --variants '{"batch_size": 512, "cuda_graph": true, "compile": true}' '{"batch_size": 256, "compile": true}' \
  '{"batch_size": 1024, "cuda_graph": true}' 2>&1 | tee -a "$OUT/gpu_log.txt" | grep "^{"
python3 - "$OUT/gpu_training.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{r['gpu']}: bf16 matmul peak {r['peak_gflops']['bfloat16'] / 1e3:.0f} TFLOP/s; checks {r['checks']}")
for v in r["variants"]:
    if "images_per_s" in v:
        print(f"  {v['variant']:<22} {v['images_per_s']:8.0f} img/s  step {v['step_ms']:6.1f} ms  "
              f"MFU {v['mfu_of_bf16_peak']:.1%}  GPU busy {v['gpu_utilisation_percent_median']}%")
    else:
        print(f"  {v['variant']:<22} {v.get('skipped') or v.get('error', '')[-200:]}")
t = r.get("train_command", {})
print("  train command:", {k: t.get(k) for k in ("overrides", "epoch_seconds", "images_per_s_later_epochs", "error")})
PY
