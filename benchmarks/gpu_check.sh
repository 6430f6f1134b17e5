#!/usr/bin/env bash
# One prepared run of every CUDA check, for a lent GPU machine (torch preinstalled there):
#   the requires_cuda tests, then the GPU cases of the benchmarks, most telling first.
# Wheels missing there travel in .whl/ (soundfile, soxr, cffi, pycparser, and the test oracles
# openai-whisper, more-itertools, taming-transformers-rom1504, DALL-E; see the device README).
# Usage on the device: bash benchmarks/gpu_check.sh [OUT_DIR] [--no-kmeans]
#   TEAL_GPU_RUNS="beit2 float32;beit2 float32 --nice 0" picks the tokenize runs.
#   TEAL_GPU_BUDGET=520: seconds for the whole script; a step that would start past it is
#   skipped (and said), and each step's timeout is cut to what is left, so one device call
#   returns every result it could get.
set -uo pipefail
ARGS=" $* "
OUT="${1:-${OUT:-/tmp/teal-gpu}}"
mkdir -p "$OUT"
START=$SECONDS
BUDGET="${TEAL_GPU_BUDGET:-520}"
# step SECONDS CMD...: run CMD with a timeout of at most SECONDS, within the budget.
step() {
  local limit=$1 left=$((BUDGET - (SECONDS - START)))
  shift
  if (( left < 20 )); then echo "skipped (budget spent): $*" | tee -a "$OUT/skipped.txt"; return 0; fi
  (( limit > left )) && limit=$left
  timeout "$limit" "$@"
}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
nproc | tee -a "$OUT/gpu.txt"
step 150 python3 -m pytest -q -m requires_cuda -p no:cacheprovider tests 2>&1 | tee "$OUT/cuda_tests.log" | tail -8
audio() {  # dtype format
  step 90 python3 benchmarks/audio_features.py --device cuda --dtype "$1" --format "$2" --clips 2048 --seconds 10 --batch 32 \
    2>&1 | tee -a "$OUT/audio_features_gpu.log" | tail -8
}
tokenize() {  # codec dtype [extra benchmark options]
  local codec="$1" dtype="$2"
  shift 2
  step 90 python3 benchmarks/tokenize_image.py --codec "$codec" --device cuda --dtype "$dtype" --images 2048 --batch-size 64 \
    --image-dir /tmp/teal-bench-images "$@" 2>&1 | tee -a "$OUT/tokenize_image_gpu.log" | grep -E "^codec|images/s|ratio|CPU|thread|Error"
}
# Tokenize runs: "codec dtype [extra benchmark options]", separated by ';' (TEAL_GPU_RUNS overrides).
RUNS="${TEAL_GPU_RUNS:-beit2 bfloat16;vqgan bfloat16;dalle bfloat16;beit2 float32;vqgan float32}"
IFS=';' read -ra RUN_LIST <<< "$RUNS"
tokenize ${RUN_LIST[0]}
audio float16 wav
audio float16 flac
for run in "${RUN_LIST[@]:1}"; do
  tokenize $run
done
audio float32 wav
if [[ "$ARGS" != *" --no-kmeans "* ]]; then
  step 90 python3 benchmarks/kmeans.py --gpu-case --repeat 1 2>&1 | tee "$OUT/kmeans_gpu.log" | tail -10
fi
echo "gpu_check: $((SECONDS - START)) s" | tee -a "$OUT/gpu.txt"
