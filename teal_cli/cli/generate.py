"""teal generate: token-record prompts -> generated token records, with a TEAL model."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .common import (DeviceOpt, Log, LlmDtypeOpt, QuietOpt, SeedOpt, TemperatureOpt, TopKOpt, TopPOpt, VerboseOpt, handle_errors,
                     output_stream, setup_torch)

HELP = """Continue prompts with a TEAL model: text, image or audio segments (JSONL on stdout).

Prompts are token records (files, '-' or a pipe; any mix of text/image/audio segments;
segments with "role": "target" are left out: a record without roles is a prompt as a
whole, unlike in train and eval, where its last segment is the target) or --text. Each prompt gives one record, in
input order, with the generated segments and a 'generation' field (model, adapter sha256,
seed, sampling settings) that says how it was made. Decoding follows the segment grammar:
inside an image segment only that codec's ids, exactly H x W of them; audio until </aud>
or --max-audio-seconds; text until EOS or --max-new-tokens. --output-modality image|audio
makes the answer one segment of that modality; text forbids segments.
--engine hf runs a directory made by 'teal export' with transformers' own generate and the
shipped grammar processor (same greedy ids; no --cfg-scale).

\b
Examples:
  export TEAL_MODEL=runs/teal-digits
  teal tokenize seven.png --codec codecs/patch-p2-k64 | teal generate -q
  teal generate --text "Draw a handwritten seven:" --output-modality image | teal detokenize -o seven.png
  teal tokenize img.png --codec codecs/patch-p2-k64 | teal generate --output-modality image | teal detokenize -o out.png
  teal generate prompts.tok.jsonl --model runs/teal-7b --temperature 0.8 --top-p 0.95 --seed 1 -o answers.jsonl
  teal generate --text "Say seven:" --output-modality audio --cfg-scale 3 --max-audio-seconds 2 | teal detokenize -o '{id}.wav'
  teal generate --engine hf --model runs/teal-digits-hf --text "Draw a seven:" --output-modality image   # after 'teal export'
"""


@handle_errors
def generate(
    inputs: Annotated[Optional[list[str]], typer.Argument(help="Token record files (.jsonl), or - for stdin.", show_default=False)] = None,
    text: Annotated[list[str], typer.Option("--text", "-t", help="A text prompt (repeatable); its record id is 'text-N'.", show_default=False)] = [],
    model: Annotated[Optional[str], typer.Option("--model", "-m", envvar="TEAL_MODEL", show_envvar=True, help="Model directory made by 'teal init-embeddings' or 'teal train' (with --engine hf: one made by 'teal export').", show_default=False)] = None,
    engine: Annotated[str, typer.Option("--engine", help="teal: teal's decoder; hf: an exported checkpoint under transformers' generate.")] = "teal",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Text tokens per prompt (a segment the model opens counts as one and always completes).", min=0)] = 64,
    temperature: TemperatureOpt = 0.0,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    seed: SeedOpt = 0,
    cfg_scale: Annotated[float, typer.Option("--cfg-scale", help="Classifier-free guidance inside image/audio segments (1 = off; 3-5 is common).", min=0.0)] = 1.0,
    output_modality: Annotated[Optional[str], typer.Option("--output-modality", help="image | audio: answer with one segment of it; text: never open a segment. Default: the model decides.", show_default=False)] = None,
    codec: Annotated[Optional[str], typer.Option("--codec", "-c", help="Output codec, when the model writes several for a modality.", show_default=False)] = None,
    max_audio_seconds: Annotated[float, typer.Option("--max-audio-seconds", help="Longest generated audio segment.", min=0.0)] = 10.0,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Prompts decoded together.", min=1)] = 8,
    echo: Annotated[bool, typer.Option("--echo", help="Output records start with the prompt's segments, marked \"role\": \"prompt\" (eval leaves them out).")] = False,
    compile_: Annotated[str, typer.Option("--compile", help="auto | on | off: decode with a static KV cache and a torch.compile'd step (auto: once the tokens decoded so far would have paid for the compile; never for free answers that may open segments).")] = "auto",
    output: Annotated[Optional[str], typer.Option("-o", "--output", help="Write JSONL to this file (atomically) instead of stdout.", show_default=False)] = None,
    device: DeviceOpt = "auto",
    dtype: LlmDtypeOpt = "auto",
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    from ..errors import UsageError
    from ..media.inputs import iter_input_records, stdin_or_usage_error
    from ..records import RecordWriter

    log = Log(quiet, verbose)
    if not model:
        raise UsageError("no model given: pass --model DIR or export TEAL_MODEL=DIR (a directory made by 'teal init-embeddings')")
    if engine not in ("teal", "hf"):
        raise UsageError(f"--engine {engine}: expected teal or hf")
    if engine == "hf" and cfg_scale != 1.0:
        raise UsageError("--cfg-scale: classifier-free guidance is teal's own; use --engine teal for it")
    if output_modality is not None and output_modality not in ("image", "audio", "text"):
        raise UsageError(f"--output-modality {output_modality}: expected one of image, audio, text")
    from ..media.outputs import check_output_file

    check_output_file(output)  # before the model loads and the generation runs
    sources = (inputs or []) if text else stdin_or_usage_error(inputs or [], "prompts")

    from ..model.generate import GenerateOptions, generate as generate_records, text_prompt
    from ..model.teal_model import TealModel

    options = GenerateOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                              cfg_scale=cfg_scale, output_modality=output_modality, codec=codec,
                              max_audio_seconds=max_audio_seconds, batch_size=batch_size, echo=echo, compile=compile_)
    options.check()  # before loading the model: a bad option should not cost the load
    dev, dt = setup_torch(device, dtype, seed, llm=True)
    if engine == "hf":
        from ..model.hf_engine import ExportedModel, generate as hf_generate

        exported = ExportedModel(model, device=dev, dtype=dt)
        run = lambda records: hf_generate(exported, records, options)  # noqa: E731
    else:
        from pathlib import Path

        if (Path(model) / "teal.json").is_file():
            raise UsageError(f"{model} was made by 'teal export' (a plain Hugging Face checkpoint); run it with --engine hf")
        teal_model = TealModel.from_dir(model, device=dev, dtype=dt)
        log.debug(f"model {model}: base {teal_model.config.llm.get('name')}, codecs "
                  + ", ".join(f"{c.name} ({c.modality}{', writes' if c.output else ''})" for c in teal_model.config.codecs))
        run = lambda records: generate_records(teal_model, records, options)  # noqa: E731

    def prompts():
        warned = False
        for record in iter_input_records(sources):
            if not warned and len(record.segments) > 1 and all("role" not in s.extra for s in record.segments):
                # train and eval would take its last segment as the target: say so once, since a
                # reference file piped in here would otherwise show the model its answers.
                log.warn(f"record '{record.id}' has no \"role\" keys: all {len(record.segments)} of its segments are the "
                         "prompt (train and eval take the last one as the target); mark an answer \"role\": \"target\" "
                         "to leave it out")
                warned = True
            yield record
        for i, t in enumerate(text):
            yield text_prompt(t, f"text-{i}")

    with log.progress("generate") as advance, output_stream(output) as stream:
        writer = RecordWriter(stream)
        for record in run(prompts()):
            writer.write(record)
            advance()
    log.info(f"generated {writer.count} record(s)")
