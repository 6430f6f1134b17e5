"""teal detokenize: JSONL token records -> PNG / WAV files."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .common import DeviceOpt, Log, OnErrorOpt, QuietOpt, VerboseOpt, check_choice, handle_errors, setup_torch

HELP = """Decode the image and audio token segments of records into files.

-o is a file (exactly one decodable segment in the input), a folder (written as
<folder>/<id>.png), or a pattern with {id} (and {n}, the segment index within a record).
Codecs are found by the names the records carry.

\b
Examples:
  teal tokenize photo.jpg --codec codecs/patch-p4-k512 | teal detokenize -o out.png
  teal detokenize photos.tok.jsonl -o decoded/
  teal detokenize speech.tok.jsonl -o 'wav/{id}.wav' --on-error skip
"""


@handle_errors
def detokenize(
    inputs: Annotated[Optional[list[str]], typer.Argument(help="JSONL token record files, or - for stdin.", show_default=False)] = None,
    output: Annotated[Optional[str], typer.Option("-o", "--output", help="Output file, folder, or pattern with {id}.", show_default=False)] = None,
    checkpoint: Annotated[Optional[str], typer.Option("--checkpoint", help="Local checkpoint for the named codec the records use.")] = None,
    config: Annotated[Optional[str], typer.Option("--config", help="Local model config for that codec (VQGAN's model.yaml).")] = None,
    on_error: OnErrorOpt = "fail",
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    from ..codecs.registry import CodecCache
    from ..detokenize import DetokenizeStats, OutputTarget, detokenize_records
    from ..errors import UsageError
    from ..inputs import iter_input_records, stdin_or_usage_error

    log = Log(quiet, verbose)
    check_choice(on_error, ("fail", "skip"), "--on-error")
    if output is None:
        raise UsageError("-o/--output is required: a file, a folder, or a pattern with {id}")
    target = OutputTarget(output)
    sources = stdin_or_usage_error(inputs or [], "token records")
    dev, dt = setup_torch(device, "auto", None)
    extra = {k: v for k, v in {"checkpoint": checkpoint, "config": config}.items() if v}
    stats = DetokenizeStats()
    detokenize_records(iter_input_records(sources), CodecCache(dev, **extra), target, on_error=on_error,
                       warn=log.warn, stats=stats)
    log.info(f"wrote {len(stats.written)} file(s)" + (f", skipped {stats.skipped} record(s)" if stats.skipped else ""))
    if stats.skipped:
        raise typer.Exit(1)
