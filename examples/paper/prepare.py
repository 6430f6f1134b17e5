#!/usr/bin/env python3
"""Turn the paper's datasets into manifests that `teal tokenize` reads.

Usage:
  python examples/paper/prepare.py coco   captions_train2017.json IMAGE_DIR OUT.jsonl [--per-caption]
  python examples/paper/prepare.py sqa    problems.json pid_splits.json SPLIT IMAGE_ROOT OUT.jsonl
  python examples/paper/prepare.py covost covost_v2.xx_en.tsv CLIPS_DIR SPLIT OUT.jsonl

Each record names its media by path and keeps the text as target segments:
- COCO Caption: one record per image, the image then its (usually five) captions, each a
  "role": "target" text segment (several references for `teal eval caption`); with
  --per-caption one (image, caption) pair per caption, for `teal train`;
- ScienceQA: the question, its options as "(A) ... (B) ...", the optional image, then the
  answer letter as target; "category" (subject) is kept for per-category accuracy;
- CoVoST 2 (X -> en): the clip then its English translation (or the transcript with
  --transcript) as target.

Only the standard library is used; nothing is downloaded.
"""

from __future__ import annotations

import csv
import json
import sys
from collections import defaultdict
from pathlib import Path


def _write(records, out: str) -> int:
    tmp = Path(out + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(out)
    print(f"{out}: {n} records", file=sys.stderr)
    return n


def coco(annotations: str, image_dir: str, out: str, per_caption: bool = False) -> int:
    data = json.loads(Path(annotations).read_text())
    files = {im["id"]: im["file_name"] for im in data["images"]}
    captions = defaultdict(list)
    for ann in data["annotations"]:
        captions[ann["image_id"]].append(ann["caption"].strip())
    def image(image_id):
        return {"modality": "image", "path": str(Path(image_dir) / files[image_id]), "role": "prompt"}

    if per_caption:  # training pairs: one (image, caption) record per caption
        records = ({"v": 1, "id": f"{image_id}-{i}", "task": "caption",
                    "segments": [image(image_id), {"modality": "text", "text": c, "role": "target"}]}
                   for image_id, caps in sorted(captions.items()) for i, c in enumerate(caps))
    else:  # evaluation: one record per image, every caption a reference
        records = ({"v": 1, "id": str(image_id), "task": "caption",
                    "segments": [image(image_id), *({"modality": "text", "text": c, "role": "target"} for c in caps)]}
                   for image_id, caps in sorted(captions.items()))
    return _write(records, out)


def sqa(problems: str, splits: str, split: str, image_root: str, out: str) -> int:
    data = json.loads(Path(problems).read_text())
    ids = json.loads(Path(splits).read_text())[split]
    letters = "ABCDEFG"

    def record(pid):
        p = data[pid]
        options = " ".join(f"({letters[i]}) {c}" for i, c in enumerate(p["choices"]))
        context = f"Context: {p['hint']}\n" if p.get("hint") else ""
        segments = []
        if p.get("image"):
            segments.append({"modality": "image", "path": str(Path(image_root) / split / pid / p["image"]), "role": "prompt"})
        segments.append({"modality": "text", "text": f"{context}Question: {p['question']}\nOptions: {options}", "role": "prompt"})
        segments.append({"modality": "text", "text": letters[p["answer"]], "role": "target"})
        return {"v": 1, "id": pid, "task": "mcq", "category": p.get("subject", ""), "segments": segments}

    return _write((record(pid) for pid in ids), out)


def covost(tsv: str, clips: str, split: str, out: str, transcript: bool = False) -> int:
    def rows():
        with open(tsv, encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
                if row.get("split", split) != split:
                    continue
                text = row["sentence"] if transcript else row["translation"]
                yield {"v": 1, "id": row["path"], "task": "asr",
                       "segments": [{"modality": "audio", "path": str(Path(clips) / row["path"]), "role": "prompt"},
                                    {"modality": "text", "text": text, "role": "target"}]}

    return _write(rows(), out)


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] not in ("coco", "sqa", "covost"):
        print(__doc__, file=sys.stderr)
        return 2
    kind, args = argv[1], argv[2:]
    flags = [a for a in args if a.startswith("--")]
    args = [a for a in args if not a.startswith("--")]
    try:
        if kind == "coco":
            coco(*args, per_caption="--per-caption" in flags)
        elif kind == "sqa":
            sqa(*args)
        else:
            covost(*args, transcript="--transcript" in flags)
    except TypeError:
        print(__doc__, file=sys.stderr)
        return 2
    except (OSError, KeyError, ValueError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
