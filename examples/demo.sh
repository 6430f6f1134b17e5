#!/usr/bin/env bash
# The main job, offline: fit a patch codec on a photo, tokenize it, decode it, print PSNR.
# Usage: bash examples/demo.sh [IMAGE]   (default: scikit-learn's bundled photo china.jpg)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh" dev
WORK="${TEAL_DEMO_DIR:-$ROOT/demo}"
mkdir -p "$WORK"
cd "$WORK"
IMAGE="${1:-$("$PY" -c 'import sklearn.datasets, pathlib; print(pathlib.Path(sklearn.datasets.__file__).parent / "images" / "china.jpg")')}"
cp "$IMAGE" photo.jpg 2>/dev/null || cp "$ROOT/$IMAGE" photo.jpg

echo "== teal cluster: 4x4 pixel patches, k=512" >&2
CODEC=$(teal cluster photo.jpg --features patch --patch-size 4 --k 512 --iters 30 -o codecs/patch-p4-k512)
echo "== teal tokenize | teal detokenize" >&2
teal tokenize photo.jpg --codec "$CODEC" -q | tee photo.tok.jsonl | teal detokenize -o decoded.png -q
"$PY" - <<'PY'
import json, math
import numpy as np
from PIL import Image
a = np.asarray(Image.open("photo.jpg").convert("RGB"), dtype=np.float64)
b = np.asarray(Image.open("decoded.png").convert("RGB"), dtype=np.float64)
seg = json.loads(open("photo.tok.jsonl").readline())["segments"][0]
psnr = 10 * math.log10(255 ** 2 / np.mean((a - b) ** 2))
print(f"{a.shape[1]}x{a.shape[0]} photo -> {seg['shape'][0]}x{seg['shape'][1]} = {len(seg['tokens'])} tokens "
      f"of codec {seg['codec']} -> decoded.png: PSNR {psnr:.2f} dB")
PY
echo "outputs in $WORK" >&2
