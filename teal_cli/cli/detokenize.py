"""teal detokenize: JSONL token records -> PNG / WAV files."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .common import DeviceOpt, Log, OnErrorOpt, QuietOpt, VerboseOpt, check_choice, handle_errors, setup_torch

HELP = """Decode the image and audio token segments of records into files.

-o is a file (exactly one decodable segment in the input), a folder (written as
<folder>/<id>.png), or a pattern with {id} (and {n}, the segment index within a record).
Codecs are found by the names the records carry. HuBERT/Whisper k-means units
become sound through a unit vocoder: --vocoder takes a fairseq or speech-resynthesis
CodeHiFiGAN checkpoint (its config.json beside it, or --vocoder-config); a record's
durations are honoured, --dur-prediction predicts them for deduplicated units without.

\b
Examples:
  teal tokenize photo.jpg --codec codecs/patch-p4-k512 | teal detokenize -o out.png
  teal detokenize photos.tok.jsonl -o decoded/
  teal detokenize speech.tok.jsonl -o 'wav/{id}.wav' --on-error skip
  teal detokenize hubert.tok.jsonl --vocoder vocoder/g_00500000 -o 'wav/{id}.wav'
"""


@handle_errors
def detokenize(
    inputs: Annotated[Optional[list[str]], typer.Argument(help="JSONL token record files, or - for stdin.", show_default=False)] = None,
    output: Annotated[Optional[str], typer.Option("-o", "--output", help="Output file, folder, or pattern with {id}.", show_default=False)] = None,
    checkpoint: Annotated[Optional[str], typer.Option("--checkpoint", help="Local checkpoint for the named codec the records use.")] = None,
    config: Annotated[Optional[str], typer.Option("--config", help="Local model config for that codec (VQGAN's model.yaml).")] = None,
    vocoder: Annotated[Optional[str], typer.Option("--vocoder", help="CodeHiFiGAN unit vocoder checkpoint (fairseq / speech-resynthesis) for audio unit segments.", show_default=False)] = None,
    vocoder_config: Annotated[Optional[str], typer.Option("--vocoder-config", help="The vocoder's JSON config (default: config.json beside the checkpoint).", show_default=False)] = None,
    speaker: Annotated[Optional[int], typer.Option("--speaker", help="Speaker id for a multi-speaker vocoder.", show_default=False)] = None,
    style: Annotated[Optional[int], typer.Option("--style", help="Style id for a multi-style vocoder (Expresso).", show_default=False)] = None,
    dur_prediction: Annotated[bool, typer.Option("--dur-prediction", help="Predict frames per unit with the vocoder's duration predictor for segments without durations.")] = False,
    on_error: OnErrorOpt = "fail",
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    from ..codecs.registry import CodecCache
    from ..pipeline.detokenize import DetokenizeStats, OutputTarget, detokenize_records
    from ..media.outputs import check_output_target
    from ..errors import UsageError
    from ..media.inputs import iter_input_records, stdin_or_usage_error

    log = Log(quiet, verbose)
    check_choice(on_error, ("fail", "skip"), "--on-error")
    if output is None:
        raise UsageError("-o/--output is required: a file, a folder, or a pattern with {id}")
    target = OutputTarget(output)
    check_output_target(target)
    sources = stdin_or_usage_error(inputs or [], "token records")
    if vocoder is None and (vocoder_config or speaker is not None or style is not None or dur_prediction):
        raise UsageError("--vocoder-config, --speaker, --style and --dur-prediction need --vocoder")
    dev, dt = setup_torch(device, "auto", None)
    unit_vocoder = None
    if vocoder is not None:
        from ..codecs.vocoder import load_vocoder

        unit_vocoder = load_vocoder(vocoder, vocoder_config, speaker=speaker, style=style,
                                    dur_prediction=dur_prediction or None, device=dev)
    extra = {k: v for k, v in {"checkpoint": checkpoint, "config": config}.items() if v}
    stats = DetokenizeStats()
    detokenize_records(iter_input_records(sources), CodecCache(dev, **extra), target, on_error=on_error,
                       warn=log.warn, stats=stats, vocoder=unit_vocoder)
    log.info(f"wrote {len(stats.written)} file(s)" + (f", skipped {stats.skipped} record(s)" if stats.skipped else ""))
    if stats.skipped:
        raise typer.Exit(1)
