"""One evaluation end to end: read, match (or generate), score, draw."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import DataError, UsageError
from .result import EvalResult

TASKS = ("caption", "mcq", "asr", "classify", "recon", "gen", "speech-gen", "ppl")


@dataclass
class EvalOptions:
    """How to evaluate.

    Attributes:
        task: one of :data:`TASKS`.
        data: the reference records (one JSONL file; ``recon``: media files, folders, manifests).
        predictions: a JSONL file of prediction records (or ``-``), matched by id.
        model: a model directory: generate the predictions (``ppl``: score the references).
        codecs: ``recon``: the codecs to test, one per modality.
        judge: ``gen``: a judge file (:mod:`~teal_cli.evaluate.judge`); None: the digits judge.
            ``speech-gen``: a speech judge file (:mod:`~teal_cli.evaluate.speech`).
        asr_judge: ``speech-gen``: a Hugging Face Whisper folder that transcribes the speech (WER, CER).
        max_audio_seconds: ``speech-gen`` with --model: the generation cap on a segment
            (:class:`~teal_cli.model.generate.GenerateOptions`); with --predictions, the cap
            they were made with (segments that long count as capped, not closed).
        on_error: ``fail`` or ``skip`` (report, count, go on).
        seed: seeds sampling with --model (the built-in digits judge is always the same one).
        batch_size: recon tokenize batches; ppl and generation batches.
        max_new_tokens: generation with --model: text tokens per answer (image segments
            always complete).
        template: with --model, the stage-2 prompt template each prompt is wrapped in.
        cfg_scale, temperature, top_k, top_p: with --model, decoding as
            :class:`~teal_cli.model.generate.GenerateOptions` (temperature 0: greedy).
        device, dtype: where codecs and the model run (resolved values).
    """

    task: str
    data: list[str]
    predictions: str | None = None
    model: str | None = None
    codecs: list[str] = field(default_factory=list)
    judge: str | None = None
    asr_judge: str | None = None
    max_audio_seconds: float | None = None
    on_error: str = "fail"
    seed: int = 0
    batch_size: int = 16
    device: Any = "cpu"
    dtype: Any = None
    max_new_tokens: int = 64
    template: str | None = None
    cfg_scale: float = 1.0
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None


def _check(o: EvalOptions) -> None:
    if o.task not in TASKS:
        raise UsageError(f"task {o.task!r}: expected one of {', '.join(TASKS)}")
    if o.on_error not in ("fail", "skip"):
        raise UsageError(f"--on-error {o.on_error}: expected fail or skip")
    if not o.data:
        raise UsageError("--data is required (reference records; for recon, media files, folders or manifests)")
    if o.task == "recon":
        if not o.codecs:
            raise UsageError("recon needs --codec (the codec whose reconstructions are measured)")
        if o.predictions or o.model:
            raise UsageError("recon measures a codec on media: it takes --codec and --data, not --model/--predictions")
        return
    if len(o.data) > 1:
        raise UsageError(f"{o.task} takes one --data file of reference records, got {len(o.data)}")
    if o.task == "ppl":
        if not o.model:
            raise UsageError("ppl needs --model (the model whose per-token loss is measured)")
        return
    if o.task == "speech-gen" and bool(o.judge) == bool(o.asr_judge):
        raise UsageError("speech-gen needs one judge: --judge FILE.npz (a speech judge) or --asr-judge WHISPER_DIR")
    if o.asr_judge and o.task != "speech-gen":
        raise UsageError(f"--asr-judge judges generated speech (speech-gen), not {o.task}")
    if bool(o.predictions) == bool(o.model):
        raise UsageError(f"{o.task} needs exactly one of --model DIR (generate, then score) or --predictions P.jsonl")


def run_eval(o: EvalOptions, warn: Callable[[str], None] | None = None,
             info: Callable[[str], None] | None = None) -> EvalResult:
    """Evaluate ``o.task`` as :class:`EvalOptions` says; returns the scores.

    Errors: :class:`~teal_cli.errors.UsageError` for a bad combination of options,
    :class:`~teal_cli.errors.DataError` for a bad or unmatched record (one line naming the
    id and the file), unless ``on_error="skip"``.
    """
    from .pairs import MatchStats, match, read_file

    _check(o)
    info = info or (lambda message: None)
    if o.task == "recon":
        from ..codecs.registry import load_codec
        from ..media.inputs import iter_input_records
        from ..pipeline.tokenize import check_codecs
        from .recon import score_recon

        codecs = [load_codec(name, device=o.device) for name in o.codecs]
        check_codecs(codecs)
        return score_recon(iter_input_records(o.data), codecs, batch_size=o.batch_size, on_error=o.on_error, warn=warn)

    references = read_file(o.data[0])
    if o.task == "ppl":
        from .modeling import load_model, score_ppl

        model = load_model(o.model, o.device, o.dtype)
        return score_ppl(model, references, batch_size=o.batch_size, device=o.device, where=o.data[0],
                         on_error=o.on_error, warn=warn)

    if o.model:
        from ..model.generate import GenerateOptions
        from .modeling import generate_predictions, load_model

        modality = {"gen": "image", "speech-gen": "audio"}.get(o.task, "text")
        options = GenerateOptions(max_new_tokens=o.max_new_tokens, seed=o.seed, batch_size=o.batch_size,
                                  output_modality=modality, cfg_scale=o.cfg_scale,
                                  temperature=o.temperature, top_k=o.top_k, top_p=o.top_p)
        if o.max_audio_seconds is not None:
            options.max_audio_seconds = o.max_audio_seconds
        elif o.task == "speech-gen":
            o.max_audio_seconds = options.max_audio_seconds
        options.check()  # before loading the model: a bad option should not cost the load
        model = load_model(o.model, o.device, o.dtype)
        info(f"generating {len(references)} prediction(s) with {o.model}")
        unanswerable: list[str] = []

        def on_bad(prompt, exc) -> None:
            message = f"{o.data[0]}: {exc}"
            if o.on_error == "fail":
                raise DataError(message) from None
            stats.bad.append(message)
            unanswerable.append(prompt.id)
            if warn:
                warn(f"skipped: {message}")

        stats = MatchStats()
        predictions = generate_predictions(model, references, options, template=o.template, on_bad=on_bad)
        pred_name = f"generations of {o.model}"
        # A reference whose prompt was skipped is counted once (bad), not again as missing.
        references = [r for r in references if r.id not in set(unanswerable)]
    else:
        predictions, pred_name = read_file(o.predictions), o.predictions
        stats = MatchStats()
    pairs, stats = match(references, predictions, o.data[0], pred_name, o.on_error, warn, stats)
    if o.task == "gen":
        from ..codecs.registry import CodecCache
        from .gen import score_gen
        from .judge import digits_judge, load_judge

        judge = load_judge(o.judge) if o.judge else digits_judge()
        result = score_gen(pairs, stats, o.data[0], judge, CodecCache(device=o.device), o.on_error, warn)
    elif o.task == "speech-gen":
        from ..codecs.registry import CodecCache
        from .speech import WhisperJudge, load_speech_judge, score_speech_gen

        judge = load_speech_judge(o.judge) if o.judge else None
        asr = WhisperJudge(o.asr_judge, device=o.device) if o.asr_judge else None
        result = score_speech_gen(pairs, stats, o.data[0], CodecCache(device=o.device), judge=judge, asr=asr,
                                  max_audio_seconds=o.max_audio_seconds, on_error=o.on_error, warn=warn)
    else:
        from .tasks import TEXT_TASKS

        result = TEXT_TASKS[o.task](pairs, stats, o.data[0], o.on_error, warn)
    result.settings["source"] = f"model {o.model}" if o.model else f"predictions {o.predictions}"
    if o.model:
        result.settings["decoding"] = {"template": o.template, "temperature": o.temperature, "top_k": o.top_k,
                                       "top_p": o.top_p, "cfg_scale": o.cfg_scale, "seed": o.seed}
    return result
