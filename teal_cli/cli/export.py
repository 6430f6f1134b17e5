"""teal export: a TEAL model directory to a plain Hugging Face checkpoint that serving engines load."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import Log, QuietOpt, VerboseOpt, handle_errors

HELP = """Export a TEAL model as a plain Hugging Face causal LM (safetensors + config.json +
tokenizer) that AutoModelForCausalLM, vLLM or llama.cpp's converter load without teal.

Exported token ids are teal's joint ids: the tokenizer gains <img> </img> <aud> </aud> and one
special token per codec id, <|CODEC:ID|>. The input embedding holds proj_in(E) rows, the LM
head O . W_out rows; bias-norm and LoRA are merged into the weights exactly (an architecture
where that is impossible is refused). OUT/teal.json holds the segment grammar (id ranges, grid,
boundary ids, codec weights, the per-id logit bias of the output projection) and
OUT/teal_grammar.py a logits processor for model.generate that enforces it. The export is
checked: OUT is reloaded by plain transformers and must give the TEAL model's logits.

\b
Examples:
  teal export runs/teal-digits -o runs/teal-digits-hf
  teal generate --engine hf --model runs/teal-digits-hf --text "Draw a seven:" --output-modality image | teal detokenize -o 7.png
"""


@handle_errors
def export(
    model_dir: Annotated[str, typer.Argument(help="Model directory made by 'teal init-embeddings' / 'teal train'.", show_default=False)],
    output: Annotated[str, typer.Option("-o", "--output", help="The directory to write.", show_default=False)],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing OUT.")] = False,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Reload OUT with plain transformers and compare logits with the TEAL model's.")] = True,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    log = Log(quiet, verbose)
    from ..model.export import check_output, export_dir

    check_output(output, force)
    out = export_dir(model_dir, output, overwrite=force, verify=verify, log=log.info)
    log.info(f"wrote {out}: load it with AutoModelForCausalLM.from_pretrained; decode with {out}/teal_grammar.py")
    print(str(out))
