#!/usr/bin/env bash
# The paper's ablations on the digits: each variant trains a fresh model on the tokens that
# examples/digits/run.sh made, then is evaluated like the demo. Prints a table and writes
# OUT/ablations/table.md, table.json and ablations.png.
#
# Usage: bash examples/digits/ablations.sh [OUT]     (OUT: the demo's folder, default ./digits-demo)
#   ABL_STEPS1, ABL_STEPS2, ABL_BATCH   training length per variant (default: the demo's, defaults.sh)
#   ABL_LR1, ABL_LR2                    learning rates (default: the demo's, defaults.sh)
#   ABL_VARIANTS="full random-init ..."  which variants to run (default: all below; empty: none)
#   ABL_KS="32 64 128"                    the audio-codec k sweep (empty: none)
# Two processes can share the work (e.g. ABL_KS= in one, ABL_VARIANTS= in the other); the
# table lists every variant finished so far.
# Each variant costs about one demo training run; a variant already trained is reused.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
OUT="$(cd "${1:-digits-demo}" && pwd)"
source "$ROOT/scripts/env.sh" dev
export TEAL_CODEC_PATH="$OUT/codecs${TEAL_CODEC_PATH:+:$TEAL_CODEC_PATH}"
[[ -s "$OUT/stage2.tok.jsonl" ]] || { echo "Error: $OUT has no tokens: run examples/digits/run.sh $OUT first" >&2; exit 1; }
source "$HERE/defaults.sh"
S1="${ABL_STEPS1:-$STEPS1}" S2="${ABL_STEPS2:-$STEPS2}" B="${ABL_BATCH:-$BATCH}" LR1="${ABL_LR1:-$LR1}" LR2="${ABL_LR2:-$LR2}"
# The demo model's codecs: the image codec it reads and writes, the audio codec, and the
# read-only caption codec where it has one (run.sh's default; otherwise captions use IMG).
codec_named() {  # ROLE: the name of the demo model's codec with that role, or nothing
  "$PY" - "$OUT/model/config.json" "$1" <<'PY'
import json, sys
codecs, role = json.load(open(sys.argv[1]))["codecs"], sys.argv[2]
pick = {"image": lambda c: c["modality"] == "image" and c["output"],
        "audio": lambda c: c["modality"] == "audio",
        "read": lambda c: c["modality"] == "image" and not c["output"]}[role]
print(next((c["name"] for c in codecs if pick(c)), ""))
PY
}
IMG=$(codec_named image) AUD=$(codec_named audio) READ=$(codec_named read)
TOK="$OUT/tok/$IMG+$AUD"
CAP="$TOK"; READ_ARGS=()
[[ -n $READ ]] && { CAP="$OUT/tok/$READ"; READ_ARGS=(--input-codec "$READ"); }
SETTINGS="stage 1: $S1 steps at lr $LR1; stage 2: $S2 steps at lr $LR2; batch $B"
A="$OUT/ablations"
mkdir -p "$A"
step() { printf '\n== %s\n' "$*" >&2; }

# variant NAME INIT_FLAGS STAGE1(yes|no) STAGE2_FLAGS [IMG AUD STAGE1_DATA STAGE2_DATA TASKS]
variant() {
  local name=$1 init=$2 stage1=$3 flags2=$4 img=${5:-$IMG} aud=${6:-$AUD}
  local d1=${7:-$OUT/stage1.tok.jsonl} d2=${8:-$OUT/stage2.tok.jsonl} tasks=${9:-"caption speech t2i"}
  local m="$A/$name/model"
  step "ablation $name: init $init; stage 1: $stage1; stage 2: $flags2"
  # A variant trained with other settings is trained again.
  if [[ "$(cat "$A/$name/done" 2>/dev/null)" != "$SETTINGS" ]]; then
    rm -rf "$A/$name" && mkdir -p "$A/$name"
    teal init-embeddings --llm smollm2-135m --codec "$img" --codec "$aud" "${READ_ARGS[@]}" --image-size 8 $init -o "$m" -q
    [[ $stage1 == yes ]] && teal train "$m" --data "$d1" --stage 1 --max-steps "$S1" --batch-size "$B" --lr "$LR1" -q
    teal train "$m" --data "$d2" --stage 2 --max-steps "$S2" --batch-size "$B" --lr "$LR2" $flags2 -q
    for t in $tasks; do
      case $t in
        caption) teal eval classify --model "$m" --data "$CAP/caption.test.tok.jsonl" --template caption --max-new-tokens 8 -q -o "$A/$name/caption.json" ;;
        speech)  teal eval classify --model "$m" --data "${ASR_TEST:-$TOK/asr.test.tok.jsonl}" --template asr --max-new-tokens 6 -q -o "$A/$name/speech.json" ;;
        t2i)     teal eval gen --model "$m" --data "$TOK/t2i.test.tok.jsonl" --template text-to-image -q -o "$A/$name/t2i.json" ;;
      esac
    done
    echo "$SETTINGS" > "$A/$name/done"
  fi
}

VARIANTS="${ABL_VARIANTS-full random-init no-stage1 no-bias-norm lora}"
for v in $VARIANTS; do
  case $v in
    full)         variant full "" yes "" ;;
    random-init)  variant random-init "--init random" yes "" ;;
    no-stage1)    variant no-stage1 "" no "" ;;
    no-bias-norm) variant no-bias-norm "" yes "--bias-norm none" ;;
    lora)         variant lora "" yes "--bias-norm none --lora 8" ;;
  esac
done

# The audio codec's k: refit on the same Whisper features (extracted once), retokenize speech,
# train speech-only models.
WHISPER=$("$PY" -c 'import json,sys; c=json.load(open(sys.argv[1])); print(c["features"].get("checkpoint",""))' "$OUT/codecs/$AUD/config.json")
LAYER=$("$PY" -c 'import json,sys; c=json.load(open(sys.argv[1])); print(c["features"].get("layer",""))' "$OUT/codecs/$AUD/config.json")
for k in ${ABL_KS-32 64 128}; do
  name="audio-k$k"
  codec="${AUD%-k*}-k$k"
  if [[ ! -s "$OUT/codecs/$codec/config.json" ]]; then
    if [[ $AUD == *whisper* ]]; then
      teal cluster "$OUT/data/asr.train.jsonl" --features whisper-tiny.en --checkpoint "$WHISPER" --layer "$LAYER" --k "$k" \
        --features-cache "$A/whisper-features" -o "$OUT/codecs/$codec" -q
    else
      teal cluster "$OUT/data/asr.train.jsonl" --features mel --k "$k" --features-cache "$A/mel-features" -o "$OUT/codecs/$codec" -q
    fi
  fi
  # The tokens live beside the variant's folder: variant() empties that folder before training.
  tok="$A/tok-k$k"
  mkdir -p "$tok"
  for split in train val test; do
    [[ -s "$tok/asr.$split.tok.jsonl" ]] || teal tokenize "$OUT/data/asr.$split.jsonl" --codec "$codec" --dedup -q -o "$tok/asr.$split.tok.jsonl"
  done
  ASR_TEST="$tok/asr.test.tok.jsonl" variant "$name" "" yes "" "$IMG" "$codec" \
    "$tok/asr.train.tok.jsonl" "$tok/asr.train.tok.jsonl" speech
done

"$PY" - "$A" "$SETTINGS" <<'PY'
import json, sys, pathlib
a, settings = pathlib.Path(sys.argv[1]), sys.argv[2]
rows = []
for d in sorted(p for p in a.iterdir() if (p / "done").is_file() and (p / "done").read_text().strip() == settings):
    row = {"variant": d.name}
    for task in ("caption", "speech", "t2i"):
        f = d / f"{task}.json"
        row[task] = json.loads(f.read_text())["metrics"]["accuracy"] if f.is_file() else None
    rows.append(row)
fmt = lambda v: "–" if v is None else f"{v:.1%}"
lines = ["| variant | caption | spoken digit | text -> image |", "|---|---|---|---|"]
lines += [f"| {r['variant']} | {fmt(r['caption'])} | {fmt(r['speech'])} | {fmt(r['t2i'])} |" for r in rows]
(a / "table.md").write_text("\n".join(lines) + f"\n\n{settings}\n")
(a / "table.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
print("\n".join(lines) + f"\n\n{settings}")
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
fig, ax = plt.subplots(figsize=(8, 3.5))
tasks = ("caption", "speech", "t2i")
w = 0.8 / len(tasks)
for i, t in enumerate(tasks):
    ax.bar([j + i * w for j in range(len(rows))], [100 * (r[t] or 0) for r in rows], w, label=t)
ax.axhline(10, color="grey", ls="--", lw=1, label="chance (10 %)")
ax.set_xticks([j + w for j in range(len(rows))], [r["variant"] for r in rows], rotation=20)
ax.set_ylabel("test accuracy (%)"); ax.set_ylim(0, 100)
ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1)); fig.tight_layout()
fig.savefig(a / "ablations.png", dpi=120)
PY
