"""teal eval: score a model's outputs (or existing predictions) with the paper's metrics."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .common import (DeviceOpt, Log, LlmDtypeOpt, OnErrorOpt, QuietOpt, SeedOpt, TemperatureOpt, TopKOpt, TopPOpt, VerboseOpt,
                     check_choice, check_number, handle_errors, output_stream)

HELP = """Score predictions against references; JSON results on stdout.

TASK is caption (BLEU-1..4, CIDEr-D as the COCO evaluation computes them, sacreBLEU), mcq
(accuracy of the chosen letter, per category), asr (WER, CER), classify (accuracy and
confusion matrix of class-word answers), recon (a codec's PSNR, SSIM, log-mel distance and
codebook usage on media; no model), gen (text -> image accuracy judged by a classifier),
speech-gen (generated speech judged by a speech judge --judge, or WER/CER of a Whisper
transcription --asr-judge; segments closed by the model vs capped, durations) or
ppl (per-token loss and perplexity per modality; needs --model).

References (--data) are token records whose target segments ("role": "target", else the
last segment) hold the answers; predictions are records as 'teal generate' writes them,
matched to the references by id. --report DIR draws the pictures and an index.html.

\b
Examples:
  teal eval caption --predictions gen.jsonl --data coco-val.tok.jsonl
  teal eval caption --model runs/teal-7b --data coco-val.tok.jsonl --report report/
  teal eval mcq --predictions answers.jsonl --data scienceqa.tok.jsonl --on-error skip
  teal eval asr --predictions asr.jsonl --data speech-test.tok.jsonl
  teal eval classify --predictions digits.jsonl --data digits-test.tok.jsonl --report report/
  teal eval recon --codec codecs/patch-p4-k64 --data images/ --report report/
  teal eval gen --predictions images.jsonl --data prompts.jsonl --report report/
  teal eval gen --model runs/digits --data t2i.test.tok.jsonl --temperature 1 --top-k 20 --seed 1
  teal eval speech-gen --model runs/digits --data tts.test.tok.jsonl --judge speech-judge.npz --report report/
  teal eval speech-gen --predictions speech.jsonl --data tts.test.tok.jsonl --asr-judge whisper-tiny.en/
  teal eval ppl --model runs/teal-7b --data heldout.tok.jsonl
"""


@handle_errors
def eval(
    task: Annotated[str, typer.Argument(help="caption, mcq, asr, classify, recon, gen, speech-gen or ppl.", show_default=False)],
    data: Annotated[list[str], typer.Option("--data", "-d", help="Reference records (.jsonl); recon: media files, folders or manifests (repeatable).")] = [],
    predictions: Annotated[Optional[str], typer.Option("--predictions", "-p", help="Prediction records (.jsonl, or - for stdin), matched by id.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model directory: generate the predictions (defaults to $TEAL_MODEL when --predictions is not given).")] = None,
    codec: Annotated[list[str], typer.Option("--codec", "-c", help="recon: the codec to measure; once per modality.")] = [],
    judge: Annotated[Optional[str], typer.Option("--judge", help="gen: a judge file (.npz linear classifier; see the docs) [default: built-in digits judge]; speech-gen: a speech judge file (.npz).")] = None,
    asr_judge: Annotated[Optional[str], typer.Option("--asr-judge", help="speech-gen: a local Whisper checkpoint (Hugging Face folder) that transcribes the speech for WER/CER.")] = None,
    max_audio_seconds: Annotated[Optional[float], typer.Option("--max-audio-seconds", help="speech-gen: the cap on a generated segment (with --model: as 'teal generate'; default 10) [with --predictions: the cap they were made with].", min=0.001)] = None,
    report: Annotated[Optional[str], typer.Option("--report", help="Write pictures (PNG) and index.html to this folder.")] = None,
    curves: Annotated[Optional[str], typer.Option("--curves", help="Training curves for the report: a metrics.jsonl or a model directory [default: --model's].")] = None,
    output: Annotated[Optional[str], typer.Option("-o", "--output", help="Write the JSON results to this file (atomically) instead of stdout.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="recon: media items encoded together; ppl: records per forward pass.", min=1)] = 16,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="With --model: text tokens generated per answer.", min=0)] = 64,
    temperature: TemperatureOpt = 0.0,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    cfg_scale: Annotated[float, typer.Option("--cfg-scale", help="With --model, gen: classifier-free guidance inside image segments (1 = off), as 'teal generate --cfg-scale'.", min=0.0)] = 1.0,
    template: Annotated[Optional[str], typer.Option("--template", help="With --model: wrap each prompt in a stage-2 prompt template, TASK or TASK:N (the N-th of the task's templates, default 0), as 'teal train --stage 2' renders them.")] = None,
    templates: Annotated[Optional[str], typer.Option("--templates", help="JSON templates file (as for 'teal train'), for --template.")] = None,
    on_error: OnErrorOpt = "fail",
    device: DeviceOpt = "auto",
    dtype: LlmDtypeOpt = "auto",
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    import json
    import os

    from ..evaluate import TASKS, EvalOptions, run_eval

    from ..media.outputs import check_output_file, check_output_folder

    log = Log(quiet, verbose)
    check_choice(task, TASKS, "TASK")
    check_choice(on_error, ("fail", "skip"), "--on-error")
    # Every number and every output path before any work: a bad one must not cost the run.
    check_number(temperature, "--temperature", minimum=0)
    check_number(top_p, "--top-p", above=0, maximum=1)
    check_number(cfg_scale, "--cfg-scale", minimum=0)
    check_output_file(output)
    check_output_folder(report, "--report")
    if model is None and predictions is None and task not in ("recon",):
        model = os.environ.get("TEAL_MODEL") or None
    dev, dt = "cpu", None
    if model or task == "recon":
        from .common import setup_torch

        dev, dt = setup_torch(device, dtype, seed, llm=True)
    options = EvalOptions(task=task, data=list(data), predictions=predictions, model=model, codecs=list(codec),
                          judge=judge, asr_judge=asr_judge, max_audio_seconds=max_audio_seconds, on_error=on_error, seed=seed, batch_size=batch_size, device=dev, dtype=dt,
                          max_new_tokens=max_new_tokens, template=_template(template, templates), cfg_scale=cfg_scale,
                          temperature=temperature, top_k=top_k, top_p=top_p)
    result = run_eval(options, warn=log.warn, info=log.info)
    # The results first: a report that fails to draw must not lose them.
    with output_stream(output) as stream:
        stream.write(json.dumps(result.to_json(), ensure_ascii=False, indent=2, allow_nan=False) + "\n")
    if report:
        from ..evaluate.report import write_report

        files = write_report(result, report, curves or model)
        log.info(f"report: {len(files)} file(s) in {report}")
    skipped = sum(result.counts.get(k, 0) for k in ("missing", "extra", "duplicates", "bad", "skipped"))
    if skipped:
        log.info(f"skipped {skipped} item(s); see the warnings above")
        raise typer.Exit(1)


def _template(spec: "str | None", path: "str | None") -> "str | None":
    """``TASK`` or ``TASK:N`` to the template string ``teal train`` would render."""
    if spec is None:
        return None
    from ..errors import UsageError
    from ..train.templates import load_templates

    task, _, index = spec.partition(":")
    table = load_templates(path)
    if task not in table:
        raise UsageError(f"--template {spec}: unknown task '{task}'; known: {', '.join(table)}")
    if index and not index.isdigit():
        raise UsageError(f"--template {spec}: expected TASK or TASK:N with N a number")
    n = int(index or 0)
    if n >= len(table[task]):
        raise UsageError(f"--template {spec}: task '{task}' has {len(table[task])} templates (0..{len(table[task]) - 1})")
    return table[task][n]
