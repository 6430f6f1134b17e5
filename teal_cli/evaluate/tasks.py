"""The text-answer tasks: caption, mcq, asr, classify. Each scores matched
``(reference, prediction)`` pairs (:func:`teal_cli.evaluate.pairs.match`).

A reference a scorer cannot use (no text target, an answer letter it cannot read) is a
:class:`~teal_cli.errors.DataError` naming the record and the file; with
``on_error="skip"`` it is reported through ``warn``, counted as ``bad`` and left out.
"""

from __future__ import annotations

import json
from typing import Callable

from ..errors import DataError
from ..records import Record
from . import metrics as M
from .pairs import MatchStats, predicted_segments, split_roles, text_of
from .result import EvalResult, nothing_to_score, per_category, sort_labels
from .text import asr_normalize, canonical_class, class_of, parse_choice, prompt_options

Pairs = list[tuple[Record, Record]]
NO_CLASS = "(none)"


class _Bad:
    """Collects the records a scorer skips, or raises at the first with on_error=fail."""

    def __init__(self, ref_name: str, on_error: str, warn: Callable[[str], None] | None, stats: MatchStats):
        self.ref_name, self.on_error, self.warn, self.stats = ref_name, on_error, warn or (lambda m: None), stats

    def __call__(self, record: Record, what: str) -> None:
        message = f"{self.ref_name}: record '{record.id}': {what}"
        if self.on_error == "fail":
            raise DataError(message)
        self.stats.bad.append(message)
        self.warn(f"skipped: {message}")


def _targets_text(ref: Record) -> list[str]:
    _, target = split_roles(ref)
    return [s.text for s in target if s.modality == "text" and s.text is not None and s.text.strip()]


def _category(ref: Record, pred: Record) -> str | None:
    cat = ref.extra.get("category", pred.extra.get("category"))
    return None if cat is None else str(cat)


def score_caption(pairs: Pairs, stats: MatchStats, ref_name: str, on_error: str = "fail",
                  warn: Callable[[str], None] | None = None) -> EvalResult:
    """BLEU-1..4 and CIDEr-D (COCO scorers, COCO tokenisation) and sacreBLEU (raw text).
    Every non-empty text target of a reference is one reference caption."""
    bad = _Bad(ref_name, on_error, warn, stats)
    refs: dict[str, list[str]] = {}
    hyps: dict[str, str] = {}
    for ref, pred in pairs:
        texts = _targets_text(ref)
        if not texts:
            bad(ref, "no text target to compare with (mark reference captions \"role\": \"target\")")
            continue
        refs[ref.id], hyps[ref.id] = texts, text_of(predicted_segments(pred))
    if not refs:
        nothing_to_score("caption", ref_name, stats.counts(0))
    scores = M.coco_caption_scores(refs, hyps)
    sacre, signature = M.sacrebleu_corpus([hyps[k] for k in refs], [refs[k] for k in refs])
    scores["sacrebleu"] = sacre
    n_refs = [len(v) for v in refs.values()]
    return EvalResult(
        "caption", scores, {**stats.counts(len(refs)), "reference_captions": sum(n_refs)},
        {"bleu_cider": "pycocoevalcap Bleu(4) 'closest' ref length + Cider (CIDEr-D, sigma 6, x10) on coco_tokenize text",
         "coco_tokenize": "lowercase, PTB punctuation split off and dropped, clitics split (Python stand-in for PTBTokenizer)",
         "sacrebleu_signature": signature, "sacrebleu_input": "untokenised text as given"},
        figures={"samples": [(k, hyps[k], refs[k][0]) for k in list(refs)[:8]]})


def score_mcq(pairs: Pairs, stats: MatchStats, ref_name: str, on_error: str = "fail",
              warn: Callable[[str], None] | None = None) -> EvalResult:
    """Accuracy of chosen letters (:func:`~teal_cli.evaluate.text.parse_choice`, options read
    from the prompt when it lists them), overall and per ``category`` when records carry one.
    An answer no rule can read counts as wrong (``unparsed``)."""
    bad = _Bad(ref_name, on_error, warn, stats)
    items: list[tuple[str, bool]] = []
    unparsed = 0
    has_category = False
    for ref, pred in pairs:
        prompt, _ = split_roles(ref)
        options = prompt_options(text_of(prompt))
        texts = _targets_text(ref)
        answer = parse_choice(texts[0], options) if texts else None
        if answer is None and isinstance(ref.extra.get("answer"), str):
            answer = parse_choice(ref.extra["answer"], options)
        if answer is None:
            bad(ref, f"cannot read an option letter from the target {texts[0][:40]!r}" if texts else "no text target holding the answer letter")
            continue
        chosen = parse_choice(text_of(predicted_segments(pred)), options)
        unparsed += chosen is None
        cat = _category(ref, pred)
        has_category |= cat is not None
        items.append((cat or "", chosen == answer))
    if not items:
        nothing_to_score("mcq", ref_name, stats.counts(0))
    result = EvalResult("mcq", {"accuracy": M.accuracy([ok for _, ok in items])},
                        {**stats.counts(len(items)), "unparsed": unparsed},
                        {"parser": "whole answer one letter; 'answer is X'; first '(X)'; leading 'X.'/'X)'/'X '; exact option text",
                         "scoring": "parsed letter"})
    if has_category:
        result.per_category = per_category(items)
    return result


def score_asr(pairs: Pairs, stats: MatchStats, ref_name: str, on_error: str = "fail",
              warn: Callable[[str], None] | None = None) -> EvalResult:
    """Corpus WER and CER (jiwer) after :func:`~teal_cli.evaluate.text.asr_normalize`, and the
    same on the text as given (``wer_raw``, ``cer_raw``; jiwer's default whitespace
    handling only). The first text target is the reference transcript."""
    bad = _Bad(ref_name, on_error, warn, stats)
    refs, hyps = [], []
    for ref, pred in pairs:
        texts = _targets_text(ref)
        if not texts:
            bad(ref, "no text target holding the reference transcript")
            continue
        if not asr_normalize(texts[0]):
            bad(ref, f"the reference transcript {texts[0][:40]!r} is empty after normalisation")
            continue
        refs.append(texts[0])
        hyps.append(text_of(predicted_segments(pred)))
    if not refs:
        nothing_to_score("asr", ref_name, stats.counts(0))
    wer, cer = M.wer_cer([asr_normalize(r) for r in refs], [asr_normalize(h) for h in hyps])
    wer_raw, cer_raw = M.wer_cer(refs, hyps)
    return EvalResult("asr", {"wer": wer, "cer": cer, "wer_raw": wer_raw, "cer_raw": cer_raw},
                      {**stats.counts(len(refs)), "reference_words": sum(len(asr_normalize(r).split()) for r in refs)},
                      {"normalisation": "NFKC, lowercase, apostrophes removed, other punctuation/symbols -> space, whitespace collapsed",
                       "library": "jiwer corpus wer/cer"})


def score_classify(pairs: Pairs, stats: MatchStats, ref_name: str, on_error: str = "fail",
                   warn: Callable[[str], None] | None = None) -> EvalResult:
    """Accuracy and confusion matrix of class-word answers.

    The classes are the references' ``"class"`` (or ``"label"``) keys where records carry one,
    else their distinct text targets (:func:`~teal_cli.evaluate.text.canonical_class`:
    "Seven", "seven" and "7" are one class), so with a label any wording that names the class
    ("the digit 7", "a handwritten seven") is right. A prediction's class is the class word found
    earliest in its text (:func:`~teal_cli.evaluate.text.class_of`); none found is ``(none)``,
    counted as wrong.
    """
    bad = _Bad(ref_name, on_error, warn, stats)
    truth_pairs = []
    shown: dict[str, str] = {}  # canonical -> the spelling first seen in the references
    for ref, pred in pairs:
        label = next((ref.extra[k] for k in ("class", "label") if ref.extra.get(k) is not None), None)
        if label is not None and (isinstance(label, bool) or not isinstance(label, (str, int))):
            bad(ref, f"its class/label {json.dumps(label)[:40]} is not a string or an integer")
            continue
        if label is not None:  # the record names its class: any wording of the answer that names it counts
            key = canonical_class(str(label))
            name = str(ref.extra.get("word") or label)
        else:
            texts = _targets_text(ref)
            key = canonical_class(texts[0]) if texts else ""
            name = texts[0].strip() if texts else ""
        if not key:
            bad(ref, "no text target naming its class (nor a 'class' / 'label' key)")
            continue
        shown.setdefault(key, name)
        truth_pairs.append((ref, pred, key))
    if not truth_pairs:
        nothing_to_score("classify", ref_name, stats.counts(0))
    classes = sort_labels(list(shown))
    truth, guess, items = [], [], []
    for ref, pred, key in truth_pairs:
        found = class_of(text_of(predicted_segments(pred)), classes) or NO_CLASS
        truth.append(key)
        guess.append(found)
        items.append((shown[key], found == key))
    labels = classes + ([NO_CLASS] if NO_CLASS in guess else [])
    names = [shown.get(k, k) for k in labels]
    return EvalResult("classify", {"accuracy": M.accuracy([ok for _, ok in items])},
                      {**stats.counts(len(items)), "no_class": guess.count(NO_CLASS)},
                      {"class_rule": "earliest class word in the answer; classes from the records' class/label keys, else their targets (ASR normalisation; digit words = numerals)"},
                      per_category=per_category(items),
                      confusion={"labels": names, "matrix": M.confusion(truth, guess, labels)})


TEXT_TASKS = {"caption": score_caption, "mcq": score_mcq, "asr": score_asr, "classify": score_classify}
