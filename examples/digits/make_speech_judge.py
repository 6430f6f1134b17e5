#!/usr/bin/env python3
"""Fit the digits demo's spoken-digit judge: a linear classifier over pooled log-mel statistics
of the TRAINING utterances (teal_cli.evaluate.speech), scored on the test utterances.

Usage: python examples/digits/make_speech_judge.py DATA OUT.npz
  DATA: make_data.py's folder (asr.train.jsonl, asr.test.jsonl and the WAVs they name)

Prints the judge's held-out accuracy (also stored in the file as ``test_accuracy``) on stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _clips(data: Path, split: str):
    import soundfile as sf

    waves, labels = [], []
    for line in (data / f"asr.{split}.jsonl").read_text().splitlines():
        r = json.loads(line)
        wave, rate = sf.read(data / r["segments"][0]["path"], dtype="float32")
        if rate != 16000:
            raise SystemExit(f"Error: {r['segments'][0]['path']}: {rate} Hz, expected 16000")
        waves.append(wave)
        labels.append(str(r["label"]))
    return waves, labels


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    from teal_cli.evaluate.speech import fit_speech_judge, save_speech_judge

    data, out = Path(argv[0]), Path(argv[1])
    train, train_labels = _clips(data, "train")
    test, test_labels = _clips(data, "test")
    judge = fit_speech_judge(train, train_labels, test, test_labels, name="digits-speech-logreg")
    save_speech_judge(judge, out)
    print(f"spoken-digit judge: {len(train)} training utterances, held-out accuracy {judge.test_accuracy:.1%} "
          f"on {len(test)} test utterances -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
