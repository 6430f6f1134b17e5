"""The ``gen`` task: text -> image generations, judged by a classifier.

The prompt class of a reference is its ``"class"`` (or ``"label"``) key when it has one,
else the judge's class word found in its prompt text (:func:`~teal_cli.evaluate.text.class_of`:
"a handwritten seven" -> 7). A prediction's first image token segment is decoded by its
codec (:func:`teal_cli.pipeline.detokenize.decode_segment`) and classified by the judge
(:mod:`teal_cli.evaluate.judge`); accuracy overall and per prompt class, and a confusion
matrix. A prediction without an image segment, or one that cannot be decoded, counts as
wrong (``no_image``).
"""

from __future__ import annotations

from typing import Callable

from ..codecs.registry import CodecCache
from ..errors import TealError
from . import metrics as M
from .judge import LinearJudge
from .pairs import MatchStats, predicted_segments, split_roles, text_of
from .result import EvalResult, nothing_to_score, per_category, sort_labels
from .tasks import NO_CLASS, Pairs, _Bad
from .text import canonical_class, class_of

GRID_PER_CLASS = 8  # generations kept per class for the report


def score_gen(pairs: Pairs, stats: MatchStats, ref_name: str, judge: LinearJudge, codecs: CodecCache,
              on_error: str = "fail", warn: Callable[[str], None] | None = None) -> EvalResult:
    from ..pipeline.detokenize import decode_segment

    bad = _Bad(ref_name, on_error, warn, stats)
    by_key = {canonical_class(c): c for c in judge.classes}
    keys = list(by_key)
    truth, guess, items = [], [], []
    images: list = []
    no_image = 0
    grid: dict[str, list] = {}
    for ref, pred in pairs:
        label = ref.extra.get("class", ref.extra.get("label"))
        prompt, _ = split_roles(ref)
        key = canonical_class(str(label)) if label is not None else class_of(text_of(prompt), keys)
        if key not in by_key:
            what = f"class {label!r} is not one of the judge's" if label is not None else "no judge class word in the prompt"
            bad(ref, f"{what} ({', '.join(judge.classes)})")
            continue
        seg = next((s for s in predicted_segments(pred) if s.modality == "image" and s.tokens is not None), None)
        image = None
        if seg is not None:
            try:
                image = decode_segment(seg, codecs.get(seg.codec), f"prediction '{pred.id}' image segment")
            except TealError as exc:
                if on_error == "fail":
                    raise
                if warn:
                    warn(f"prediction '{pred.id}': {exc} (counted as wrong)")
        no_image += image is None
        truth.append(key)
        images.append(image)
    if not truth:
        nothing_to_score("gen", ref_name, stats.counts(0))
    found = judge.classify([im for im in images if im is not None])
    it = iter(found)
    for key, image in zip(truth, images):
        g = next(it) if image is not None else NO_CLASS
        g = canonical_class(g) if g != NO_CLASS else g
        guess.append(g)
        items.append((by_key[key], g == key))
        if image is not None and len(grid.setdefault(by_key[key], [])) < GRID_PER_CLASS:
            grid[by_key[key]].append((image, by_key.get(g, g)))
    labels = sort_labels(keys) + ([NO_CLASS] if NO_CLASS in guess else [])
    metrics = {"accuracy": M.accuracy([ok for _, ok in items])}
    if judge.test_accuracy is not None:
        metrics["judge_test_accuracy"] = judge.test_accuracy
    return EvalResult("gen", metrics, {**stats.counts(len(items)), "no_image": no_image},
                      {"judge": judge.name, "judge_input": f"grey {judge.size[0]}x{judge.size[1]} box-filtered, ink bright, 0..{judge.max_value:g}",
                       "prompt_class": "record 'class'/'label' key, else the judge class word in the prompt"},
                      per_category=per_category(items),
                      confusion={"labels": [by_key.get(k, k) for k in labels], "matrix": M.confusion(truth, guess, labels)},
                      figures={"grid": {c: grid[c] for c in sort_labels(list(grid))}})
