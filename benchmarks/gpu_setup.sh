# Sourced by the benchmarks/gpu_*.sh scripts on a lent GPU machine: the shared chest_xray_224 folder carried in
# .gpu_data/ and linked where the tests look for ../shared, the wheels the machine's image lacks (.whl/: fastapi,
# starlette, pydantic, pydantic-core, annotated-types, typing-inspection, python-multipart, uvicorn, pydicom,
# opentelemetry-api) installed beside it, and $G, whose files come back as $OUT/results.tgz.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
DATA=${DATA:-$PWD/.gpu_data/chest_xray_224}
G=/tmp/gpu-results
mkdir -p "$OUT" "$G" /tmp/shared/data
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 PNEUMONIA_CNN_SHARED=/tmp/shared PNEUMONIA_CNN_TEST_CUDA=1
ln -sfn "$DATA" /tmp/shared/data/chest_xray_224
