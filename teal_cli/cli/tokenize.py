"""teal tokenize: media files, folders or manifests -> JSONL token records."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .common import (DeviceOpt, Log, OnErrorOpt, QuietOpt, SeedOpt, VerboseOpt, WorkersOpt, check_choice, check_number, handle_errors,
                     output_stream, setup_torch)

HELP = """Turn images and audio into token records (JSONL on stdout).

Inputs are media files, folders (searched recursively), JSONL manifests naming media by
path ({"id": .., "image": "a.png", "text": ".."}) or token records; '-' or a pipe is stdin.
Each media path becomes a token segment of the codec given for its modality.

\b
Examples:
  teal tokenize photo.jpg --codec codecs/patch-p4-k512 > photo.tok.jsonl
  teal tokenize photos/ --codec codecs/patch-p4-k512 --batch-size 64 -o photos.tok.jsonl
  teal tokenize pairs.jsonl --codec vqgan-f16-16384 --codec codecs/mel-80-k256
  teal tokenize speech/ --codec codecs/mel-80-k256 --dedup --on-error skip
  teal tokenize train.jsonl --codec codecs/patch-p4-k256 --sample-temperature 0.5 --seed 1 -o train.aug1.tok.jsonl
  torchrun --nproc-per-node 8 -m teal_cli tokenize data.jsonl -c beit2 --shard auto -o 'tok.{shard}.jsonl'
"""


@handle_errors
def tokenize(
    inputs: Annotated[Optional[list[str]], typer.Argument(help="Media files, folders, .jsonl manifests, or - for stdin.", show_default=False)] = None,
    codec: Annotated[list[str], typer.Option("--codec", "-c", help="Codec name or codec directory; once per modality.")] = [],
    output: Annotated[Optional[str], typer.Option("-o", "--output", help="Write JSONL to this file (atomically) instead of stdout; a folder or a pattern with {id} writes one file per record.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Media items encoded together.", min=1)] = 16,
    image_size: Annotated[Optional[int], typer.Option("--image-size", help="Tokenize images at this size instead of the codec's native one.", min=1)] = None,
    sample_temperature: Annotated[Optional[float], typer.Option("--sample-temperature", help="k-means codecs: draw each id from softmax(-squared distance / T) over the centroids instead of taking the nearest one (stochastic quantisation, a training-data augmentation; seeded by --seed).", show_default=False)] = None,
    dedup: Annotated[bool, typer.Option("--dedup", help="Collapse runs of equal audio ids; run lengths go to 'durations'.")] = False,
    checkpoint: Annotated[Optional[str], typer.Option("--checkpoint", help="Local checkpoint file for a named codec.")] = None,
    config: Annotated[Optional[str], typer.Option("--config", help="Local model config for a named codec (VQGAN's model.yaml).")] = None,
    shard: Annotated[Optional[str], typer.Option("--shard", help="Tokenize only shard I/N of the records (auto: from torchrun's RANK/WORLD_SIZE); {shard} in -o becomes I.")] = None,
    workers: WorkersOpt = None,
    loader: Annotated[str, typer.Option("--loader", help="Image loaders: threads, processes, or auto (processes from 8 workers up).")] = "auto",
    on_error: OnErrorOpt = "fail",
    device: DeviceOpt = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="auto (= float32: ids as the reference code gives them), bfloat16 or float16 (faster on GPU, some near-tie ids change).")] = "auto",
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    from ..codecs.registry import load_codec
    from ..errors import UsageError
    from ..media.inputs import iter_input_records, parse_shard, shard_records, stdin_or_usage_error
    from ..media.outputs import OutputTarget, check_output_target
    from ..records import RecordWriter
    from ..pipeline.tokenize import TokenizeOptions, TokenizeStats, check_codecs, tokenize_records

    log = Log(quiet, verbose)
    check_choice(on_error, ("fail", "skip"), "--on-error")
    check_choice(loader, ("auto", "threads", "processes"), "--loader")
    if not codec:
        raise UsageError("--codec is required (a codec name, e.g. beit2, or a directory made by 'teal cluster')")
    check_number(sample_temperature, "--sample-temperature", above=0)
    if image_size is not None:
        import os

        from ..media.io import DEFAULT_MAX_IMAGE_PIXELS

        limit = int(os.environ.get("TEAL_MAX_IMAGE_PIXELS", DEFAULT_MAX_IMAGE_PIXELS))
        if image_size * image_size > limit:  # the bound loaded images have (a resize would allocate it)
            raise UsageError(f"--image-size {image_size}: {image_size}x{image_size} pixels is over the image limit of "
                             f"{limit} pixels (TEAL_MAX_IMAGE_PIXELS)")
    if (checkpoint or config) and len(codec) > 1:
        raise UsageError("--checkpoint/--config apply to a single --codec")
    sources = stdin_or_usage_error(inputs or [])
    shard_index, shard_count = parse_shard(shard)
    if output and "{shard}" in output:
        output = output.replace("{shard}", str(shard_index))
    target = OutputTarget(output, extension=".jsonl") if output and output != "-" else None
    if target is not None:
        check_output_target(target)  # before the codecs load and the work starts
    dev, dt = setup_torch(device, dtype, seed)
    if dtype == "auto":
        # Tokenizers default to fp32 even on GPU: half precision flips near-tie ids (measured on
        # an H100: up to 25 % of VQGAN ids in bf16), and records should not depend on the card.
        import torch

        dt = torch.float32
    extra = {k: v for k, v in {"checkpoint": checkpoint, "config": config}.items() if v}
    codecs = [load_codec(name, device=dev, dtype=dt, **extra) for name in codec]
    check_codecs(codecs)
    if sample_temperature is not None:
        for i, c in enumerate(codecs):
            if not hasattr(c, "sample_codes"):
                raise UsageError(f"--sample-temperature: codec '{c.name}' is not a k-means codec (one made by 'teal cluster'); "
                                 "its ids cannot be sampled")
            c.sample_codes(sample_temperature, seed + i)
        log.info(f"sampling ids at temperature {sample_temperature:g} (seed {seed}), not the nearest centroid")
    log.debug("codecs: " + ", ".join(f"{c.name} ({c.modality}, {c.vocab_size} ids) on {dev}" for c in codecs))
    options = TokenizeOptions(batch_size=batch_size, image_size=image_size, dedup=dedup, on_error=on_error,
                              workers=workers, loader=loader)
    stats = TokenizeStats()
    records = tokenize_records(shard_records(iter_input_records(sources), shard_index, shard_count), codecs, options,
                               warn=log.warn, stats=stats)
    with log.progress("tokenize") as advance:
        if target is None or target.kind == "file":
            with output_stream(output) as stream:
                writer = RecordWriter(stream)
                for record in records:
                    writer.write(record)
                    advance()
        else:
            for record in records:  # one JSONL file per record, each written atomically
                with output_stream(str(target.path_for(record.id, 0, False, "records"))) as stream:
                    RecordWriter(stream).write(record)
                advance()
    log.info(f"tokenized {stats.records} record(s)" + (f", skipped {stats.skipped}" if stats.skipped else ""))
    if stats.skipped:
        raise typer.Exit(1)

