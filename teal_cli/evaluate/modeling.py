"""What ``teal eval`` needs from a model: predictions by generation, and per-token losses.

Both go through the model package's public interface (``teal_cli.model``): ``TealModel.from_dir``,
``model.encode_record(record) -> EncodedSequence(ids, target, modality)``,
``model(input_ids, attention_mask).logits`` and ``teal_cli.model.generate.generate``, so
``teal eval --model`` generates exactly as ``teal generate`` does.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable, Iterable, Iterator

from ..errors import DataError, UsageError
from ..records import Record
from .pairs import split_roles
from .result import EvalResult, nothing_to_score


def load_model(path: str, device: Any, dtype: Any):
    """``TealModel.from_dir(path)``, or a UsageError when the model package is missing."""
    try:
        from ..model import TealModel
    except ImportError as exc:
        raise UsageError(f"--model needs teal's model package, which this install lacks ({exc}); "
                         "score existing outputs with --predictions P.jsonl") from None
    return TealModel.from_dir(path, device=device, dtype=dtype).eval()


def prompts_of(references: Iterable[Record], template: str | None = None) -> Iterator[Record]:
    """Each reference with its target segments removed: what the model is asked; with
    ``template``, wrapped in it as ``teal train --stage 2`` renders instruction records."""
    for ref in references:
        prompt, _ = split_roles(ref)
        bare = replace(ref, segments=[replace(s, extra={k: v for k, v in s.extra.items() if k != "role"}) for s in prompt])
        if template is not None:
            from ..train.templates import render

            bare = render(bare, template, ["prompt"] * len(bare.segments))
        yield bare


def generate_predictions(model, references: list[Record], options: Any = None, template: str | None = None,
                         on_bad: Callable[[Record, Exception], None] | None = None) -> list[Record]:
    """Predictions for ``references`` by ``teal_cli.model.generate.generate`` (ids kept).
    ``on_bad(prompt, error)``: a prompt the model cannot continue (e.g. longer than its
    context) is reported there and gets no prediction; None: the error is raised."""
    from ..model.generate import GenerateOptions, generate

    return list(generate(model, prompts_of(references, template), options or GenerateOptions(), on_bad=on_bad))


def score_ppl(model, records: Iterable[Record], *, batch_size: int = 8, device: Any = "cpu",
              where: str = "references", on_error: str = "fail", warn: Callable[[str], None] | None = None) -> EvalResult:
    """Per-token loss (nats) and perplexity of the target positions of token records,
    overall and per modality.

    The loss at position ``t`` is the cross-entropy of ``ids[t]`` under the logits at
    ``t - 1`` (next-token prediction over the joint vocabulary), for every ``t`` the
    encoding marks as a target; a record's first position is never scored. Records are
    padded to the longest of their batch (right padding, masked out).

    A record the model cannot read, or longer than the base LLM's context (as ``teal train``
    refuses it), is a :class:`~teal_cli.errors.DataError` naming ``where`` and the record; with
    ``on_error="skip"`` it is reported through ``warn``, counted as ``skipped`` and left out.
    """
    import torch

    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    n_records = 0

    def run(batch: list) -> None:
        width = max(len(e.ids) for e in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, e in enumerate(batch):
            ids[i, : len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
            mask[i, : len(e.ids)] = 1
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().cpu()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
        for i, e in enumerate(batch):
            for t in range(1, len(e.ids)):
                if e.target[t]:
                    m = e.modality[t]
                    totals[m] = totals.get(m, 0.0) + float(nll[i, t - 1])
                    counts[m] = counts.get(m, 0) + 1

    batch: list = []
    skipped = 0
    for record in records:
        n_records += 1
        try:
            encoded = model.encode_record(record)
            model.check_length(len(encoded.ids), f"record '{record.id}'")
        except DataError as exc:
            if on_error == "fail":
                raise DataError(f"{where}: {exc}") from None
            skipped += 1
            if warn is not None:
                warn(f"skipped: {where}: {exc}")
            continue
        batch.append(encoded)
        if len(batch) == batch_size:
            run(batch)
            batch = []
    if batch:
        run(batch)
    total, tokens = sum(totals.values()), sum(counts.values())
    if not tokens:
        nothing_to_score("ppl", where, {"records": n_records, "skipped": skipped, "target_tokens": 0})
    metrics = {"loss": total / tokens, "perplexity": math.exp(total / tokens)}
    for m in sorted(totals):
        metrics[f"{m}_loss"] = totals[m] / counts[m]
        metrics[f"{m}_perplexity"] = math.exp(totals[m] / counts[m])
    return EvalResult("ppl", metrics, {"records": n_records, "skipped": skipped, "target_tokens": tokens,
                                       **{f"{m}_tokens": counts[m] for m in sorted(counts)}},
                      {"loss": "mean next-token cross-entropy (nats) over target positions, joint vocabulary",
                       "batch_size": batch_size})
