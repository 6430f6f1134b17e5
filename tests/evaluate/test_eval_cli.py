"""teal eval end to end: matching, every task through the CLI, bad records, report folders."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from test_eval_metrics import random_corpus, random_sentence


def write_jsonl(path, rows) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def text(t, role=None):
    seg = {"modality": "text", "text": t}
    if role:
        seg["role"] = role
    return seg


def refs_and_preds(pairs, prompt="Describe the image."):
    """``pairs``: id -> (reference texts, prediction text)."""
    refs = [{"v": 1, "id": k, "segments": [text(prompt)] + [text(r, "target") for r in rs]} for k, (rs, _) in pairs.items()]
    preds = [{"v": 1, "id": k, "segments": [text(p)]} for k, (_, p) in pairs.items()]
    return write_jsonl("ref.jsonl", refs), write_jsonl("pred.jsonl", preds)


def run_ok(cli, *args):
    r = cli("eval", *args, "-q")
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def one_line_error(r, *needles):
    assert r.exit_code != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------- caption / asr


def test_caption_cli_equals_coco_scorers_and_sacrebleu(cli):
    import sacrebleu
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    refs, hyps = random_corpus(11, n=20, max_refs=3)
    ref_file, pred_file = refs_and_preds({k: (refs[k], hyps[k]) for k in refs})
    out = run_ok(cli, "caption", "--predictions", pred_file, "--data", ref_file)
    bleu, _ = Bleu(4).compute_score(refs, {k: [v] for k, v in hyps.items()}, verbose=0)
    cider, _ = Cider().compute_score(refs, {k: [v] for k, v in hyps.items()})
    assert abs(out["metrics"]["bleu_4"] - bleu[3]) < 1e-6 and abs(out["metrics"]["cider_d"] - cider) < 1e-6
    padded = [[r[j] if j < len(r) else None for r in refs.values()] for j in range(3)]
    assert abs(out["metrics"]["sacrebleu"] - sacrebleu.corpus_bleu(list(hyps.values()), padded).score) < 1e-6
    assert out["counts"]["scored"] == 20 and out["counts"]["reference_captions"] == sum(map(len, refs.values()))
    assert "sacrebleu_signature" in out["settings"]


def test_asr_cli_equals_jiwer(cli):
    import jiwer

    rng = random.Random(3)
    pairs = {f"u{i}": ([random_sentence(rng)], random_sentence(rng, 1)) for i in range(15)}
    ref_file, pred_file = refs_and_preds(pairs, prompt="Transcribe.")
    out = run_ok(cli, "asr", "-p", pred_file, "-d", ref_file)
    refs = [v[0][0] for v in pairs.values()]
    hyps = [v[1] for v in pairs.values()]
    assert abs(out["metrics"]["wer"] - jiwer.wer(refs, hyps)) < 1e-6  # already normalised text
    assert abs(out["metrics"]["cer"] - jiwer.cer(refs, hyps)) < 1e-6
    # Normalisation: case and punctuation do not count as errors; the raw scores see them.
    ref_file, pred_file = refs_and_preds({"a": (["Hello, world."], "hello world")})
    out = run_ok(cli, "asr", "-p", pred_file, "-d", ref_file)
    assert out["metrics"]["wer"] == 0.0 and out["metrics"]["wer_raw"] == 1.0


# --------------------------------------------------------------------------- matching and bad records


def test_missing_extra_duplicate_ids(cli):
    ref_file, pred_file = refs_and_preds({"a": (["a cat"], "a cat"), "b": (["a dog"], "a dog")})
    lines = pred_file.read_text().splitlines()
    write_jsonl("missing.jsonl", [json.loads(lines[0])])
    one_line_error(cli("eval", "caption", "-p", "missing.jsonl", "-d", ref_file), "'b'", "missing.jsonl", "ref.jsonl")
    write_jsonl("extra.jsonl", [json.loads(x) for x in lines] + [{"id": "zz", "segments": [text("x")]}])
    one_line_error(cli("eval", "caption", "-p", "extra.jsonl", "-d", ref_file), "'zz'", "extra.jsonl")
    write_jsonl("dup.jsonl", [json.loads(x) for x in lines] + [json.loads(lines[0])])
    one_line_error(cli("eval", "caption", "-p", "dup.jsonl", "-d", ref_file), "'a'", "more than once")
    # skip: scored on what matches, counted, warned, exit 1, results still printed
    r = cli("eval", "caption", "-p", "missing.jsonl", "-d", ref_file, "--on-error", "skip")
    assert r.exit_code == 1
    out = json.loads(r.stdout)
    assert out["counts"]["missing"] == 1 and out["counts"]["scored"] == 1
    assert out["metrics"]["bleu_1"] == pytest.approx(1.0, abs=1e-6)
    assert "no prediction for id 'b'" in r.stderr
    r = cli("eval", "caption", "-p", "extra.jsonl", "-d", ref_file, "--on-error", "skip")
    assert r.exit_code == 1 and json.loads(r.stdout)["counts"]["extra"] == 1


def test_bad_records_are_one_line_errors(cli):
    write_jsonl("ref.jsonl", [{"id": "a", "segments": [text("q"), {"modality": "text", "text": "x", "role": "answer"}]}])
    write_jsonl("pred.jsonl", [{"id": "a", "segments": [text("x")]}])
    one_line_error(cli("eval", "caption", "-p", "pred.jsonl", "-d", "ref.jsonl"), "record 'a'", "role")
    Path("broken.jsonl").write_text('{"id": "a", "segments": [\n')
    one_line_error(cli("eval", "asr", "-p", "broken.jsonl", "-d", "ref.jsonl"), "broken.jsonl:1", "invalid JSON")
    # mcq reference whose target holds no letter
    write_jsonl("mref.jsonl", [{"id": "a", "segments": [text("(A) x (B) y"), text("maybe", "target")]}])
    one_line_error(cli("eval", "mcq", "-p", "pred.jsonl", "-d", "mref.jsonl"), "mref.jsonl", "record 'a'", "letter")
    # classify reference with an image target only
    write_jsonl("cref.jsonl", [{"id": "a", "segments": [text("what?"), {"modality": "image", "codec": "c", "tokens": [1]}]}])
    one_line_error(cli("eval", "classify", "-p", "pred.jsonl", "-d", "cref.jsonl"), "record 'a'", "class")
    r = cli("eval", "classify", "-p", "pred.jsonl", "-d", "cref.jsonl", "--on-error", "skip", "-q")
    # the only reference skipped: nothing is left to score, which is an error, not an accuracy
    assert r.exit_code == 1 and r.stdout == "" and "nothing to score" in r.stderr.splitlines()[-1]


def test_usage_errors(cli):
    ref_file, pred_file = refs_and_preds({"a": (["x"], "x")})
    r = cli("eval", "caption", "-d", ref_file)
    assert r.exit_code == 2 and "--model" in r.stderr
    r = cli("eval", "nope", "-p", pred_file, "-d", ref_file)
    assert r.exit_code == 2
    r = cli("eval", "recon", "-d", ref_file)
    assert r.exit_code == 2 and "--codec" in r.stderr
    one_line_error(cli("eval", "ppl", "-d", ref_file), "--model")
    # --model before the model package exists is a clear usage error, never a traceback
    import importlib.util

    if importlib.util.find_spec("teal_cli.model") is None:
        r = cli("eval", "caption", "--model", "runs/x", "-d", ref_file)
        assert r.exit_code == 2 and "model package" in one_line_error(r)


# --------------------------------------------------------------------------- mcq / classify


def test_mcq_accuracy_per_category(cli):
    prompt = "Question? (A) red (B) blue (C) green"
    rows = [("1", "B", "The answer is B.", "color"), ("2", "A", "A", "color"), ("3", "C", "blue", "color"),
            ("4", "(B)", "(B)", "shape"), ("5", "A", "no idea", "shape")]
    write_jsonl("ref.jsonl", [{"id": i, "category": c, "segments": [text(prompt), text(a, "target")]} for i, a, _, c in rows])
    write_jsonl("pred.jsonl", [{"id": i, "segments": [text(p)]} for i, _, p, _ in rows])
    out = run_ok(cli, "mcq", "-p", "pred.jsonl", "-d", "ref.jsonl")
    assert out["metrics"]["accuracy"] == pytest.approx(3 / 5)
    assert out["per_category"] == {"color": {"accuracy": pytest.approx(2 / 3), "count": 3},
                                   "shape": {"accuracy": 0.5, "count": 2}}
    assert out["counts"]["unparsed"] == 1


def test_classify_words_and_numerals_report(cli, tmp_path):
    rows = [("a", "seven", "It is a 7."), ("b", "7", "seven"), ("c", "one", "a one"), ("d", "One", "seven I think"),
            ("e", "three", "no clue")]
    write_jsonl("ref.jsonl", [{"id": i, "segments": [text("Which digit?"), text(t)]} for i, t, _ in rows])
    write_jsonl("pred.jsonl", [{"id": i, "segments": [text(p)]} for i, _, p in rows])
    out = run_ok(cli, "classify", "-p", "pred.jsonl", "-d", "ref.jsonl", "--report", "rep")
    assert out["metrics"]["accuracy"] == pytest.approx(3 / 5)
    conf = out["confusion"]
    assert conf["labels"] == ["one", "three", "seven", "(none)"]
    assert conf["matrix"] == [[1, 0, 1, 0], [0, 0, 0, 1], [0, 0, 2, 0], [0, 0, 0, 0]]
    assert out["counts"]["no_class"] == 1
    _check_png(tmp_path / "rep" / "confusion.png")
    assert "confusion.png" in (tmp_path / "rep" / "index.html").read_text()


def _check_png(path: Path, min_side: int = 100):
    from PIL import Image

    assert path.is_file(), path
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG" and min(im.size) >= min_side
        arr = np.asarray(im.convert("L"))
        assert arr.std() > 5  # not a blank canvas


# --------------------------------------------------------------------------- recon / gen (real codecs)


@pytest.fixture
def digit_images(tmp_path):
    """Twenty of scikit-learn's digits (two per class) as 32x32 PNGs, black ink on white."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder = tmp_path / "digits"
    folder.mkdir()
    picked = [int(np.flatnonzero(digits.target == c)[k]) for c in range(10) for k in range(2)]
    for i in picked:
        grey = (255 - np.round(digits.images[i] * 255 / 16)).astype(np.uint8)
        Image.fromarray(grey).resize((32, 32), Image.Resampling.BILINEAR).convert("RGB").save(folder / f"d{i:04d}-{digits.target[i]}.png")
    return folder


def test_recon_images_report(cli, digit_images, tmp_path):
    r = cli("cluster", digit_images, "--features", "patch", "--patch-size", "4", "--k", "32", "--iters", "10", "-q")
    assert r.exit_code == 0, r.stderr
    codec_dir = r.stdout.strip()
    out = run_ok(cli, "recon", "--codec", codec_dir, "--data", digit_images, "--report", "rep")
    m = out["metrics"]
    assert out["counts"]["images"] == 20
    assert 12 < m["psnr_db"] < 100 and 0.3 < m["ssim"] <= 1.0
    assert 0 < m["image_codebook_used_pct"] <= 100 and 1 < m["image_codebook_perplexity"] <= 32
    _check_png(tmp_path / "rep" / "recon.png")
    # Against the metrics of the files teal detokenize writes (the same 8-bit pixels).
    from teal_cli.evaluate import metrics as M
    from PIL import Image

    tok = cli("tokenize", digit_images, "--codec", codec_dir, "-q")
    back = cli("detokenize", "-o", "back/", "-q", input=tok.stdout)
    assert back.exit_code == 0, back.stderr
    psnrs = []
    for rec in map(json.loads, tok.stdout.splitlines()):
        original = np.asarray(Image.open(rec["id"]).convert("RGB"))
        from teal_cli.media.outputs import safe_id

        decoded = np.asarray(Image.open(Path("back") / (safe_id(rec["id"]) + ".png")).convert("RGB"))
        psnrs.append(M.psnr(original, decoded))
    assert m["psnr_db"] == pytest.approx(float(np.mean(psnrs)), abs=1e-6)


def test_recon_audio(cli, wav_file):
    r = cli("cluster", wav_file, "--features", "mel", "--k", "16", "--iters", "10", "-q")
    assert r.exit_code == 0, r.stderr
    out = run_ok(cli, "recon", "--codec", r.stdout.strip(), "--data", wav_file)
    m = out["metrics"]
    assert out["counts"]["audio"] == 1 and 0 < m["log_mel_distance_db"] < 40
    assert m["audio_codebook_used_pct"] > 0


def test_gen_digits_judge_report_and_curves(cli, digit_images, tmp_path):
    r = cli("cluster", digit_images, "--features", "patch", "--patch-size", "2", "--k", "64", "--iters", "10", "-q")
    assert r.exit_code == 0, r.stderr
    tok = cli("tokenize", digit_images, "--codec", r.stdout.strip(), "-q")
    assert tok.exit_code == 0, tok.stderr
    from teal_cli.evaluate.text import DIGIT_WORDS

    refs, preds = [], []
    for i, rec in enumerate(map(json.loads, tok.stdout.splitlines())):
        digit = int(Path(rec["id"]).stem.split("-")[1])
        refs.append({"id": f"g{i}", "segments": [text(f"a handwritten {DIGIT_WORDS[digit]}"), rec["segments"][0]]})
        preds.append({"id": f"g{i}", "segments": rec["segments"]})
    preds[0]["segments"] = [text("no image here")]
    write_jsonl("ref.jsonl", refs)
    write_jsonl("pred.jsonl", preds)
    write_jsonl("metrics.jsonl", [{"step": s, "loss": 3 / (s + 1), "lr": 1e-3 * min(1, s / 3), **({"val_loss": 3.5 / (s + 1)} if s % 4 == 0 else {})}
                                  for s in range(20)])
    out = run_ok(cli, "gen", "-p", "pred.jsonl", "-d", "ref.jsonl", "--report", "rep", "--curves", "metrics.jsonl")
    assert out["metrics"]["judge_test_accuracy"] > 0.9
    assert out["counts"]["no_image"] == 1 and out["counts"]["scored"] == 20
    assert out["metrics"]["accuracy"] >= 0.8  # the originals' own tokens: the judge should know them
    assert set(out["per_category"]) == {str(d) for d in range(10)}
    assert sum(map(sum, out["confusion"]["matrix"])) == 20
    for name in ("gen.png", "confusion.png", "curves.png"):
        _check_png(tmp_path / "rep" / name)


def test_judge_file_round_trip_and_refuses_pickles(tmp_path):
    from teal_cli.errors import DataError
    from teal_cli.evaluate.judge import digits_judge, image_features, load_judge, save_judge
    from PIL import Image
    from sklearn.datasets import load_digits

    judge = digits_judge(0)
    assert 0.9 < judge.test_accuracy <= 1.0
    save_judge(judge, tmp_path / "j.npz")
    back = load_judge(tmp_path / "j.npz")
    assert back.test_accuracy == judge.test_accuracy and back.classes == judge.classes
    x = load_digits().data[:50]
    assert back.predict(x) == judge.predict(x)
    # image_features inverts dark ink on white and box-filters back to the digits' values
    img = load_digits().images[3]
    im = Image.fromarray((255 - img * 255 / 16).round().astype(np.uint8)).resize((32, 32), Image.Resampling.NEAREST)
    assert np.abs(image_features(im) - img.reshape(-1)).max() < 0.1
    np.savez(tmp_path / "evil.npz", coef=np.array([object()], dtype=object))
    with pytest.raises(DataError, match="evil.npz"):
        load_judge(tmp_path / "evil.npz")
    np.savez(tmp_path / "short.npz", coef=np.zeros((2, 64)))
    with pytest.raises(DataError, match="lacks"):
        load_judge(tmp_path / "short.npz")


# --------------------------------------------------------------------------- ppl (model interface, with a stand-in model)


class _Encoded:
    def __init__(self, ids, target, modality):
        self.ids, self.target, self.modality = ids, target, modality


class FakeModel:
    """The TealModel interface ppl uses: encode_record, check_length and logits; logits favour id 1 by ``bias``."""

    def __init__(self, vocab: int, bias: float = 0.0):
        self.vocab, self.bias = vocab, bias

    def check_length(self, length, where):
        pass  # no context limit

    def encode_record(self, record):
        ids, target, modality = [0], [False], ["text"]
        for seg in record.segments:
            toks = seg.tokens if seg.tokens is not None else [2] * len(seg.text.split())
            ids += toks
            target += [seg.extra.get("role") == "target"] * len(toks)
            modality += [seg.modality] * len(toks)
        return _Encoded(ids, target, modality)

    def __call__(self, input_ids, attention_mask):
        import torch

        logits = torch.zeros((*input_ids.shape, self.vocab))
        logits[..., 1] = self.bias

        class Out:
            pass

        out = Out()
        out.logits = logits
        return out


def test_ppl_per_modality_hand_computed():
    from teal_cli.evaluate.modeling import score_ppl
    from teal_cli.records import Record, Segment

    records = [Record("a", [Segment("text", text="w w", extra={"role": "prompt"}),
                            Segment("image", codec="c", tokens=[1, 1, 3], extra={"role": "target"})]),
               Record("b", [Segment("text", text="w w w", extra={"role": "target"})])]
    uniform = score_ppl(FakeModel(5), records, batch_size=2)
    assert uniform.metrics["perplexity"] == pytest.approx(5.0) and uniform.counts["target_tokens"] == 6
    assert uniform.counts["image_tokens"] == 3 and uniform.counts["text_tokens"] == 3
    biased = score_ppl(FakeModel(5, bias=math.log(4)), records, batch_size=1)  # p(1) = 4/8, others 1/8
    assert biased.metrics["image_loss"] == pytest.approx((2 * math.log(2) + math.log(8)) / 3)
    assert biased.metrics["text_perplexity"] == pytest.approx(8.0)
