"""teal eval's metrics: hand-computed small cases, and the reference libraries on random ones."""

from __future__ import annotations

import math
import random
from collections import Counter

import numpy as np
import pytest

from teal_cli.evaluate import metrics as M
from teal_cli.evaluate.text import (asr_normalize, canonical_class, class_of, coco_tokenize, parse_choice,
                                    prompt_options)

WORDS = "a an the cat dog man woman sits runs on in of red blue big small table park street near".split()


def random_sentence(rng: random.Random, lo: int = 3, hi: int = 12) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def random_corpus(seed: int, n: int = 30, max_refs: int = 5):
    rng = random.Random(seed)
    refs = {f"id{i}": [random_sentence(rng) for _ in range(rng.randint(1, max_refs))] for i in range(n)}
    hyps = {k: random_sentence(rng, 1) for k in refs}
    return refs, hyps


# --------------------------------------------------------------------------- caption


def test_coco_tokenize_hand_cases():
    assert coco_tokenize("A man's hat, on the (red) table.") == "a man 's hat on the red table"
    assert coco_tokenize("I don't know... \"quoted\" well-known dogs'") == "i do n't know quoted well-known dogs"
    assert coco_tokenize("10:30, 1,000 and a,b") == "10:30 1,000 and a b"
    assert coco_tokenize("  Two\ncats!  ") == "two cats"
    assert coco_tokenize("- -- ... ;") == ""


def test_coco_tokenize_leaves_tokenised_text_alone():
    refs, hyps = random_corpus(0)
    for text in [*hyps.values(), *(r for v in refs.values() for r in v), "a man 's hat", "they do n't"]:
        assert coco_tokenize(text) == text


def _ngrams(words, n):
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def cider_d_by_hand(refs: dict, hyps: dict, sigma: float = 6.0) -> float:
    """CIDEr-D written from Vedantam et al. 2015 + the coco-caption code's conventions
    (idf over reference sets, clipped tf-idf, Gaussian length penalty on the bigram counts
    the scorer uses as 'length', mean over n = 1..4, /refs, x10), independently of pycocoevalcap."""
    keys = list(refs)
    df = Counter()
    for k in keys:
        seen = set()
        for r in refs[k]:
            w = r.split()
            for n in range(1, 5):
                seen.update(_ngrams(w, n))
        df.update(seen)
    log_n = math.log(len(keys))

    def vec(text):
        w = text.split()
        out = []
        for n in range(1, 5):
            out.append({g: c * (log_n - math.log(max(1.0, df[g]))) for g, c in _ngrams(w, n).items()})
        return out, sum(_ngrams(w, 2).values())

    total = 0.0
    for k in keys:
        vh, lh = vec(hyps[k])
        score = np.zeros(4)
        for r in refs[k]:
            vr, lr = vec(r)
            for n in range(4):
                num = sum(min(v, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, v in vh[n].items())
                nh = math.sqrt(sum(v * v for v in vh[n].values()))
                nr = math.sqrt(sum(v * v for v in vr[n].values()))
                val = num / (nh * nr) if nh and nr else num
                score[n] += val * math.exp(-((lh - lr) ** 2) / (2 * sigma**2))
        total += score.mean() / len(refs[k]) * 10.0
    return total / len(keys)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_bleu_cider_equal_coco_scorers_on_random_tokenised_text(seed):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    refs, hyps = random_corpus(seed)
    ours = M.coco_caption_scores(refs, hyps)
    gts, res = {k: list(v) for k, v in refs.items()}, {k: [hyps[k]] for k in refs}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    for n in range(4):
        assert ours[f"bleu_{n + 1}"] == pytest.approx(bleu[n], abs=1e-9)
    assert ours["cider_d"] == pytest.approx(cider, abs=1e-9)
    assert ours["cider_d"] == pytest.approx(cider_d_by_hand(refs, hyps), abs=1e-6)
    assert ours["cider_d"] > 0 and ours["bleu_1"] > 0


def test_bleu_hand_computed():
    # p1 = 3/4, p2 = 2/3, p3 = 1/2, p4 = 0; lengths equal, so no brevity penalty.
    s = M.coco_caption_scores({"x": ["a b c e"]}, {"x": "a b c d"})
    assert s["bleu_1"] == pytest.approx(0.75, abs=1e-6)
    assert s["bleu_2"] == pytest.approx(math.sqrt(0.75 * 2 / 3), abs=1e-6)
    assert s["bleu_3"] == pytest.approx((0.75 * 2 / 3 * 0.5) ** (1 / 3), abs=1e-6)
    assert s["bleu_4"] < 1e-3
    # brevity: hypothesis of 2 words against the closest reference of 4: BP = exp(1 - 4/2)
    s = M.coco_caption_scores({"x": ["a b c d", "a b c d e f g h"]}, {"x": "a b"})
    assert s["bleu_1"] == pytest.approx(math.exp(1 - 2), abs=1e-6)
    same = M.coco_caption_scores({"x": ["the cat sat on the mat"], "y": ["a dog ran"]},
                                 {"x": "the cat sat on the mat", "y": "a dog ran"})
    assert same["bleu_4"] == pytest.approx(1.0, abs=1e-6)


def test_cider_hand_computed_two_images():
    # Two images, one reference each, hypotheses equal to them: the cosine is 1 for every n
    # with any n-gram of weight > 0 ... here idf = log(2) - log(1) > 0 for every n-gram, so
    # each image scores 10 * mean(1, 1, 1, 1) = 10.
    s = M.coco_caption_scores({"x": ["a b c d"], "y": ["e f g h"]}, {"x": "a b c d", "y": "e f g h"})
    assert s["cider_d"] == pytest.approx(10.0, abs=1e-9)


@pytest.mark.parametrize("seed", [4, 5])
def test_sacrebleu_equals_sacrebleu(seed):
    import sacrebleu

    rng = random.Random(seed)
    hyps = [random_sentence(rng).capitalize() + "." for _ in range(25)]
    refs = [[random_sentence(rng) + "." for _ in range(2)] for _ in hyps]
    ours, signature = M.sacrebleu_corpus(hyps, refs)
    theirs = sacrebleu.corpus_bleu(hyps, [[r[0] for r in refs], [r[1] for r in refs]])
    assert ours == pytest.approx(theirs.score, abs=1e-9)
    assert "13a" in signature
    one, _ = M.sacrebleu_corpus(hyps, [[r[0]] for r in refs])
    assert one == pytest.approx(sacrebleu.corpus_bleu(hyps, [[r[0] for r in refs]]).score, abs=1e-9)


# --------------------------------------------------------------------------- WER / CER


def levenshtein(a, b) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def test_wer_cer_hand_and_random():
    import jiwer

    assert M.wer_cer(["a b c"], ["a x c"]) == pytest.approx((1 / 3, 1 / 5))
    rng = random.Random(7)
    refs = [random_sentence(rng) for _ in range(20)]
    hyps = [random_sentence(rng, 1) for _ in range(20)]
    wer, cer = M.wer_cer(refs, hyps)
    assert wer == pytest.approx(jiwer.wer(refs, hyps), abs=1e-12)
    assert cer == pytest.approx(jiwer.cer(refs, hyps), abs=1e-12)
    words = sum(levenshtein(r.split(), h.split()) for r, h in zip(refs, hyps)) / sum(len(r.split()) for r in refs)
    chars = sum(levenshtein(r, h) for r, h in zip(refs, hyps)) / sum(len(r) for r in refs)
    assert wer == pytest.approx(words, abs=1e-12) and cer == pytest.approx(chars, abs=1e-12)


def test_asr_normalize():
    assert asr_normalize("Hello, World!  It's 3.5 -- OK?") == "hello world its 3 5 ok"
    assert asr_normalize("Ｆｕｌｌ\u2019width\ttabs") == "fullwidth tabs"
    assert asr_normalize("...") == ""


# --------------------------------------------------------------------------- answers


def test_parse_choice_rules():
    options = prompt_options("Which is a mammal?\nOptions: (A) cat (B) fish (C) bird")
    assert options == {"A": "cat", "B": "fish", "C": "bird"}
    cases = {"B": "B", "(c)": "C", "The answer is B.": "B", "answer: a": "A", "B. fish": "B", "Fish": "B",
             "I think (C) is right": "C", "a cat": None, "nothing": None, "D": None, "The answer is D": None}
    for text, want in cases.items():
        assert parse_choice(text, options) == want, text
    assert prompt_options("A. red\nB. blue\n") == {"A": "red", "B": "blue"}
    assert parse_choice("E") == "E"  # no options known: any letter


def test_class_words():
    assert canonical_class("Seven") == "7" and canonical_class("a 7!") == "a 7"
    assert class_of("It is a 7, maybe a one", ["1", "7"]) == "7"
    assert class_of("seven", ["7"]) == "7"
    assert class_of("ice cream cone", ["ice", "ice cream"]) == "ice cream"
    assert class_of("seventy", ["7"]) is None


def test_confusion_and_accuracy():
    m = M.confusion(["a", "a", "b", "b"], ["a", "b", "b", "b"], ["a", "b"])
    assert m == [[1, 1], [0, 2]]
    assert M.accuracy([True, False, True, True]) == 0.75
    with pytest.raises(ValueError):
        M.accuracy([])  # an accuracy of nothing is no number


# --------------------------------------------------------------------------- media


def test_psnr_ssim_hand_computed():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    b = a.astype(int).copy()
    b[0, 0, 0] = (b[0, 0, 0] + 128) % 256
    mse = ((a.astype(float) - b) ** 2).mean()
    assert M.psnr(a, b.astype(np.uint8)) == pytest.approx(10 * math.log10(255**2 / mse), abs=1e-9)
    assert M.psnr(a, a) == M.PSNR_CAP_DB
    assert M.ssim(a, a) == pytest.approx(1.0, abs=1e-9)
    # Two flat images: SSIM is the luminance term alone, (2 mx my + C1) / (mx^2 + my^2 + C1).
    x, y = np.full((16, 16, 3), 100, np.uint8), np.full((16, 16, 3), 150, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert M.ssim(x, y) == pytest.approx((2 * 100 * 150 + c1) / (100**2 + 150**2 + c1), abs=1e-6)
    small = M.ssim(a[:8, :8], b.astype(np.uint8)[:8, :8])  # uniform window below 11 px
    assert 0 < small < 1


def test_log_mel_distance_hand_computed():
    rng = np.random.default_rng(1)
    wave = (0.1 * rng.standard_normal(16000)).astype(np.float32)
    assert M.log_mel_distance(wave, wave, 16000) == 0.0
    # Half the amplitude is a quarter of the power: -6.02 dB in every band above the floor.
    assert M.log_mel_distance(wave, wave * 0.5, 16000) == pytest.approx(10 * math.log10(4), abs=1e-3)
    # Another rate is resampled to 16 kHz first.
    assert M.log_mel_distance(wave, wave, 8000) == 0.0


def test_codebook_usage_hand_computed():
    u = M.codebook_usage(Counter({1: 5, 2: 5}), 4)
    assert u["used_pct"] == 50.0 and u["perplexity"] == pytest.approx(2.0)
    u = M.codebook_usage(Counter({0: 3}), 8)
    assert u["used_pct"] == 12.5 and u["perplexity"] == pytest.approx(1.0)
    counts = Counter({0: 1, 1: 2, 2: 1})
    entropy = -(0.25 * math.log(0.25) * 2 + 0.5 * math.log(0.5))
    assert M.codebook_usage(counts, 3)["perplexity"] == pytest.approx(math.exp(entropy))


def test_classify_takes_the_records_label_as_the_class_so_any_wording_counts():
    from teal_cli.evaluate.pairs import MatchStats
    from teal_cli.evaluate.tasks import score_classify
    from teal_cli.records import Record, Segment

    def ref(i, label, word):
        return Record(id=str(i), segments=[Segment("text", text="x"), Segment("text", text=f"a handwritten {word}")],
                      extra={"label": label, "word": word})

    def pred(i, text):
        return Record(id=str(i), segments=[Segment("text", text=text)])

    pairs = [(ref(0, 7, "seven"), pred(0, "the digit 7")), (ref(1, 1, "one"), pred(1, "a handwritten one")),
             (ref(2, 4, "four"), pred(2, "the digit 0")), (ref(3, 0, "zero"), pred(3, "nothing here"))]
    result = score_classify(pairs, MatchStats(), "ref.jsonl")
    assert result.metrics["accuracy"] == 0.5
