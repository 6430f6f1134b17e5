"""``teal generate --engine hf``: an exported checkpoint run by transformers' own ``generate``.

The directory ``teal export`` wrote is loaded with plain ``AutoModelForCausalLM`` and decoded
by ``model.generate(..., logits_processor=[TealGrammarProcessor])`` (see
:mod:`teal_cli.model.hf_grammar`); records go in and come out exactly as with teal's engine
(:func:`teal_cli.model.generate.generate`): prompts encoded the same way (the sidecar maps
records to ids), the generated ids turned back into segments with the sidecar, a
``generation`` field with the same keys plus ``engine: "hf"``.

Greedy decoding gives the ids teal's engine gives (same logits up to float rounding).
Sampling maps ``temperature`` / ``top_k`` / ``top_p`` to transformers' warpers, seeded with
``torch.manual_seed(seed)`` per batch: the same distribution as teal's, not the same draws
(teal draws per prompt with its own generators). Classifier-free guidance is teal's own
(its unconditional rows are not a transformers option): ``cfg_scale != 1`` is a UsageError.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from ..errors import DataError, UsageError
from ..records import Record, Segment
from . import hf_grammar
from .generate import GenerateOptions, echoed_prompt


class ExportedModel:
    """An exported directory loaded for generation: ``model`` (transformers causal LM, eval),
    ``tokenizer``, ``sidecar`` (``teal.json`` as a dict), ``directory``."""

    def __init__(self, directory: str | Path, *, device: "str | torch.device" = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .config import CONFIG_NAME

        directory = Path(directory)
        if not (directory / hf_grammar.SIDECAR).is_file():
            hint = ("it is a teal model directory: export it first with 'teal export "
                    f"{directory} -o DIR', or use --engine teal") if (directory / CONFIG_NAME).is_file() and \
                (directory / "adapter.safetensors").is_file() else "make one with 'teal export'"
            raise UsageError(f"--engine hf: {directory} has no {hf_grammar.SIDECAR}, so it is not an exported model; {hint}")
        try:
            self.sidecar = hf_grammar.load_sidecar(directory)
        except ValueError as exc:
            raise DataError(str(exc)) from None
        self.directory = directory
        self.tokenizer = AutoTokenizer.from_pretrained(str(directory))
        self.model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype).to(device).eval()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def provenance(exported: ExportedModel, options: GenerateOptions) -> dict[str, Any]:
    """The ``generation`` field's run-wide part, keyed as teal's engine keys it."""
    import teal_cli

    settings = asdict(options)
    settings.pop("echo")
    source = exported.sidecar.get("source", {})
    return {
        "model": str(exported.directory),
        "adapter_sha256": source.get("adapter_sha256"),
        "base_llm": source.get("base_llm"),
        "dtype": str(next(exported.model.parameters()).dtype).removeprefix("torch."),
        **settings,
        "teal_version": teal_cli.__version__,
        "engine": "hf",
    }


def _segments(exported: ExportedModel, ids: list[int]) -> list[Segment]:
    """Generated ids to teal segments, built as :meth:`TealModel.decode_ids` builds them."""
    out = []
    for seg in hf_grammar.segments_from_ids(ids, exported.sidecar, exported.tokenizer):
        if seg["modality"] == "text":
            out.append(Segment(modality="text", text=seg["text"]))
            continue
        s = Segment(modality=seg["modality"], codec=seg["codec"], tokens=seg["tokens"], shape=seg.get("shape"),
                    frame_rate=seg.get("frame_rate"))
        if seg.get("weights"):
            s.extra["weights"] = seg["weights"]
        out.append(s)
    return out


@torch.inference_mode()
def generate_batch(exported: ExportedModel, prompts: list[list[int]], options: GenerateOptions,
                   processor: hf_grammar.TealGrammarProcessor) -> list[tuple[list[int], str]]:
    """Decode prompts (exported ids) together with ``model.generate``: left-padded with EOS,
    as teal pads. Returns per prompt ``(generated ids the record keeps, finish)``."""
    from transformers import GenerationConfig

    eos = int(exported.sidecar["eos_token_id"])
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[eos] * (width - len(p)) + p for p in prompts], device=exported.device)
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=exported.device)
    context = exported.sidecar.get("context_length")
    bound = processor.grammar.max_new_tokens_bound()
    room = (context - width) if context else bound
    config = GenerationConfig(
        max_new_tokens=max(1, min(bound, room)), do_sample=options.sampling, eos_token_id=eos, pad_token_id=eos,
        num_beams=1, temperature=options.temperature if options.sampling else None,
        top_k=(options.top_k or 0) if options.sampling else None, top_p=(options.top_p or 1.0) if options.sampling else None,
    )
    if options.sampling:
        torch.manual_seed(options.seed)
    processor.reset()
    out = exported.model.generate(input_ids=ids, attention_mask=attn, generation_config=config,
                                  logits_processor=[processor])
    results = []
    for row in out[:, width:].tolist():
        walked = hf_grammar.run_grammar(processor.grammar, row)
        results.append((walked.ids, walked.finish or "context"))
    return results


def generate(exported: ExportedModel, records: Iterable[Record], options: GenerateOptions) -> Iterator[Record]:
    """Continue each prompt record with the exported model; yields records as
    :func:`teal_cli.model.generate.generate` does (same order, ids, fields; ``generation``
    also says ``engine: "hf"``). Raises UsageError for bad options (and CFG), DataError naming
    the record for a prompt that cannot be encoded or does not fit the context."""
    options.check()
    if options.cfg_scale != 1.0:
        raise UsageError("--cfg-scale: classifier-free guidance is teal's own; use --engine teal for it")
    try:
        processor = hf_grammar.TealGrammarProcessor(
            exported.sidecar, output_modality=options.output_modality, codec=options.codec,
            max_new_tokens=options.max_new_tokens, max_audio_seconds=options.max_audio_seconds)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    info = provenance(exported, options)
    context = exported.sidecar.get("context_length")
    grammar = processor.grammar
    need = 1
    if grammar.forced and options.output_modality == "image":
        need = 2 + max(grammar.states[s].limit for s in grammar.codec_state.values() if grammar.states[s].modality == "image")
    seen: Counter[str] = Counter()

    def run(batch):
        results = generate_batch(exported, [ids for _, ids, _ in batch], options, processor)
        for (rec, _, repeat), (ids, finish) in zip(batch, results):
            segments = echoed_prompt(rec) if options.echo else []
            generation = {**info, "finish": finish}
            if repeat:
                generation["repeat"] = repeat
            yield Record(id=rec.id, segments=segments + _segments(exported, ids), extra={**rec.extra, "generation": generation})

    batch = []
    for record in records:
        try:
            ids = hf_grammar.prompt_ids(record.to_json(), exported.sidecar, exported.tokenizer)
        except ValueError as exc:
            raise DataError(str(exc)) from None
        if not ids:
            raise DataError(f"record '{record.id}': the prompt is empty; give it a text or media segment")
        if context and len(ids) + need > context:
            raise DataError(f"record '{record.id}': the prompt has {len(ids)} tokens and the model's context is {context}; "
                            "shorten the prompt")
        batch.append((record, ids, seen[record.id]))
        seen[record.id] += 1
        if len(batch) == options.batch_size:
            yield from run(batch)
            batch = []
    if batch:
        yield from run(batch)
