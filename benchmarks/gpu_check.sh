#!/usr/bin/env bash
# One prepared run of every CUDA check, for a lent GPU machine (torch preinstalled there):
#   the requires_cuda tests, then the GPU cases of the three benchmarks.
# Wheels missing there (soundfile, soxr, cffi, pycparser) travel in .whl/ (see the device README).
# Usage on the device: bash benchmarks/gpu_check.sh [OUT_DIR]
set -uo pipefail
OUT="${1:-${OUT:-/tmp/teal-gpu}}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pytest -q -m requires_cuda -p no:cacheprovider tests 2>&1 | tee "$OUT/cuda_tests.log" | tail -15
python3 benchmarks/kmeans.py --gpu-case 2>&1 | tee "$OUT/kmeans_gpu.log" | tail -12
for codec in beit2 vqgan dalle; do
  for dtype in float32 bfloat16; do
    python3 benchmarks/tokenize_image.py --codec "$codec" --device cuda --dtype "$dtype" --images 512 --batch-size 64 --workers 16 \
      2>&1 | tee -a "$OUT/tokenize_image_gpu.log" | grep -E "ratio|images/s" | head -4
  done
done
for dtype in float16 float32; do
  python3 benchmarks/audio_features.py --device cuda --dtype "$dtype" --clips 128 --seconds 10 --batch 32 \
    2>&1 | tee -a "$OUT/audio_features_gpu.log" | tail -5
done
