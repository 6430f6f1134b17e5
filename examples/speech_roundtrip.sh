#!/usr/bin/env bash
# Speech through a weight-free mel codec: espeak-ng speaks, teal clusters log-mel frames,
# tokenizes with run-length dedup, and decodes back to sound with Griffin-Lim.
# Usage: bash examples/speech_roundtrip.sh   (needs espeak-ng: apt-get install espeak-ng)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh" dev
command -v espeak-ng >/dev/null || { echo "Error: espeak-ng not found (apt-get install espeak-ng)" >&2; exit 1; }
WORK="${TEAL_DEMO_DIR:-$ROOT/demo}/speech"
mkdir -p "$WORK/wav" && cd "$WORK"
for word in zero one two three four five six seven eight nine; do
  espeak-ng -w "wav/$word.wav" "$word"
done
CODEC=$(teal cluster wav/ --features mel --k 128 --iters 30 -q)
teal tokenize wav/ --codec "$CODEC" --dedup -q > speech.tok.jsonl
teal detokenize speech.tok.jsonl -o decoded/ -q
"$PY" - <<'PY'
import json
for line in open("speech.tok.jsonl"):
    r = json.loads(line)
    s = r["segments"][0]
    print(f"{r['id']:<16} {sum(s['durations']):4d} frames -> {len(s['tokens']):3d} tokens after dedup")
PY
echo "decoded speech in $WORK/decoded/" >&2
