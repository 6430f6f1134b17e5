"""``teal export``: a TEAL model directory to a plain Hugging Face causal-LM checkpoint.

The exported directory is what ``AutoModelForCausalLM.from_pretrained`` loads without teal,
so any engine that reads Hugging Face checkpoints (transformers, vLLM, llama.cpp's
converter) can run a trained TEAL model:

- **vocabulary**: teal's joint vocabulary unchanged, ``[text | boundary | codec 0 | ...]``, so
  an exported id *is* teal's joint id. The tokenizer gets the boundary tokens (``<img>``,
  ``</img>``, ``<aud>``, ``</aud>``) and one token per codec id, ``<|CODEC:ID|>`` (e.g.
  ``<|patch-p4-k256:123|>``), as added special tokens at those ids;
- **input embedding**: row ``i`` is what teal feeds for id ``i`` (:meth:`TealModel.embed`):
  the text embedding, the boundary rows, ``proj_in(E[j])`` with its bias, precomputed;
- **LM head** (untied from the input embedding): the text head, the boundary output rows,
  and ``O · W_out`` per output codec. ``proj_out``'s bias gives each codec id a constant
  logit ``O · b_out``; Llama's and GPT-2's LM heads have no bias, so it is stored exactly in
  the sidecar (``teal.json``, ``codecs[i].logit_bias``) and added by the shipped logits
  processor (:mod:`teal_cli.model.hf_grammar`). Input-only codecs get zero output rows
  (the grammar never allows them);
- **bias-norm** merged exactly: a linear layer's ``y = s * (W x + b0 + b)`` becomes
  ``W' = diag(s) W``, ``b' = s * (b0 + b)``, through the architecture's own bias slots (GPT-2's
  Conv1D and LayerNorm have them; Llama's through ``attention_bias`` (q/k/v/o) and ``mlp_bias``
  (gate/up/down), zero biases where only some layers of a group were tuned); a norm's
  ``norm(x) * g + beta`` becomes weight ``w * g`` and bias ``b * g + beta``. Architectures
  without a bias slot for a tuned layer (e.g. Qwen2's ``o_proj``), or an RMSNorm with a
  tuned bias, are refused with one line;
- **LoRA** merged by peft (each layer's ``merge``), after bias-norm, which is the order teal
  computes them in (``s * (W x + b) + B A x``).

``export_model`` checks its work: the written directory is loaded back with plain
``AutoModelForCausalLM`` (no missing or unexpected tensors) and its logits, plus the logit
bias, must equal the TEAL model's on a probe sequence of text, boundary and codec ids
(fp32 tolerance); otherwise nothing is written. The grammar processor is copied into the
directory as ``teal_grammar.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import TealError, UsageError
from ..runtime.files import apply_umask, replace_dir, temp_dir_beside
from . import hf_grammar

if TYPE_CHECKING:
    from .teal_model import TealModel

GRAMMAR_FILE = "teal_grammar.py"
# Architectures whose config can give every tuned linear layer a bias: option -> module names.
BIAS_OPTIONS = {
    "llama": {"attention_bias": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp_bias": ("gate_proj", "up_proj", "down_proj")},
}
PROBE_RTOL, PROBE_ATOL = 1e-4, 1e-4  # relative to the largest |logit|; fp32 reassociation is ~1e-6


class ExportError(TealError):
    """The model cannot be exported exactly (architecture, adapter) or the check failed."""


def codec_token(name: str, local_id: int) -> str:
    """The exported token of codec ``name``'s id ``local_id``: ``<|name:id|>``."""
    return f"<|{name}:{local_id}|>"


def check_output(out: str | Path, overwrite: bool) -> Path:
    """Raise UsageError if ``out`` exists (and ``overwrite`` is off) or is a file."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UsageError(f"{out} exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file; give a directory path")
    return out


# ---------------------------------------------------------------------- folding the adapter


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def _remove_hooks(module: nn.Module, hooks: tuple) -> None:
    for key, fn in list(module._forward_hooks.items()):
        if fn in hooks:
            del module._forward_hooks[key]


def check_exportable(model: "TealModel") -> None:
    """Raise ExportError (one line) where the adapter cannot be folded exactly into ``model``'s
    architecture; see the module docstring."""
    backbone = model.backbone
    arch = type(model.llm).__name__
    model_type = getattr(model.llm.config, "model_type", "")
    options = BIAS_OPTIONS.get(model_type, {})
    slots = {n for names in options.values() for n in names}
    if getattr(model.lm_head, "bias", None) is not None:
        raise ExportError(f"{arch}'s LM head has a bias; teal export handles bias-free heads only")
    for name, module in backbone.named_modules():
        name = name.replace(".base_layer", "")
        if hasattr(module, "teal_bias"):
            leaf = name.rsplit(".", 1)[-1]
            if getattr(module, "bias", None) is None and leaf not in slots:
                raise ExportError(f"cannot merge bias-norm exactly into {arch}: layer '{name}' has no bias and the "
                                  "architecture's config has no option to give it one (supported: Llama, GPT-2, "
                                  "and models whose tuned layers all have biases)")
        if hasattr(module, "teal_norm_bias") and getattr(module, "bias", None) is None:
            raise ExportError(f"cannot merge bias-norm exactly into {arch}: norm '{name}' ({type(module).__name__}) "
                              "has a tuned bias but no bias of its own")
        if hasattr(module, "teal_norm_weight") and getattr(module, "weight", None) is None:
            raise ExportError(f"cannot merge bias-norm exactly into {arch}: norm '{name}' has no weight")


@torch.no_grad()
def fold_bias_norm(model: "TealModel") -> int:
    """Merge every bias-norm parameter into the LLM's own weights (in place) and remove the
    hooks; returns the number of layers folded. Call :func:`check_exportable` first."""
    from .bias_norm import _linear_hook, _norm_hook

    backbone = model.backbone
    count = 0
    for module in list(backbone.modules()):
        if hasattr(module, "teal_bias"):
            w = module.weight
            s = getattr(module, "teal_scale", None)
            s = s.detach().float() if s is not None else torch.ones_like(module.teal_bias, dtype=torch.float32)
            b0 = module.bias.detach().float() if module.bias is not None else 0.0
            bias = s * (b0 + module.teal_bias.detach().float())
            w.copy_((w.float() * (s[None, :] if _is_conv1d(module) else s[:, None])).to(w.dtype))
            if module.bias is not None:
                module.bias.copy_(bias.to(module.bias.dtype))
            else:
                module.bias = nn.Parameter(bias.to(w.dtype), requires_grad=False)
            del module.teal_bias
            if hasattr(module, "teal_scale"):
                del module.teal_scale
            _remove_hooks(module, (_linear_hook,))
            count += 1
        elif hasattr(module, "teal_norm_weight"):
            g = module.teal_norm_weight.detach().float()
            beta = getattr(module, "teal_norm_bias", None)
            if getattr(module, "bias", None) is not None:
                new_bias = module.bias.float() * g + (beta.detach().float() if beta is not None else 0.0)
                module.bias.copy_(new_bias.to(module.bias.dtype))
            module.weight.copy_((module.weight.float() * g).to(module.weight.dtype))
            del module.teal_norm_weight
            if beta is not None:
                del module.teal_norm_bias
            _remove_hooks(module, (_norm_hook,))
            count += 1
    return count


def _fill_bias_options(model: "TealModel") -> dict[str, bool]:
    """Turn on the config's bias options a folded layer needs; zero biases for the group's
    other layers (exact: a zero bias adds nothing)."""
    options = BIAS_OPTIONS.get(getattr(model.llm.config, "model_type", ""), {})
    flags = {}
    for option, names in options.items():
        group = [m for n, m in model.backbone.named_modules() if n.rsplit(".", 1)[-1] in names and isinstance(m, nn.Linear)]
        on = bool(getattr(model.llm.config, option, False)) or any(m.bias is not None for m in group)
        for m in group:
            if on and m.bias is None:
                m.bias = nn.Parameter(torch.zeros(m.out_features, dtype=m.weight.dtype, device=m.weight.device),
                                      requires_grad=False)
        setattr(model.llm.config, option, on)
        flags[option] = on
    return flags


@torch.no_grad()
def merge_lora(model: "TealModel") -> int:
    """Merge peft's LoRA layers into their base layers (peft's own ``merge``) and put the base
    layers back in their place; returns the number merged."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    count = 0
    for name, module in list(model.backbone.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            parent = model.backbone.get_submodule(parent_name) if parent_name else model.backbone
            setattr(parent, child, module.get_base_layer())
            count += 1
    if hasattr(model.backbone, "peft_config"):
        del model.backbone.peft_config
    return count


# ---------------------------------------------------------------------- vocabulary


@torch.no_grad()
def exported_rows(model: "TealModel") -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``(input_rows [V, d], output_rows [V, d], logit_bias {codec key: [K]})`` in float32.

    Input rows are :meth:`TealModel.embed` of every joint id; output rows the text LM head,
    the boundary output rows and ``O · W_out`` per output codec (zeros for input-only codecs);
    the bias ``O · b_out`` per output codec."""
    cfg = model.config
    V = cfg.vocab_size
    ids = torch.arange(V, device=model.device)[None]
    inputs = model.embed(ids)[0].float()
    parts = [model.lm_head.weight.float(), model.boundary_out.float()]
    bias = {}
    for entry in cfg.codecs:
        head = model.heads[entry.key]
        if entry.output:
            parts.append(head.output.float() @ head.proj_out.weight.float())
            bias[entry.key] = head.output.float() @ head.proj_out.bias.float()
        else:
            parts.append(torch.zeros(entry.vocab_size, cfg.hidden_size, device=model.device))
    outputs = torch.cat(parts)
    assert outputs.shape[0] == V, (outputs.shape, V)
    return inputs, outputs, bias


def extend_tokenizer(tokenizer, cfg) -> list[str]:
    """Add the boundary and codec tokens so that token ``i`` is joint id ``i``; returns the
    added tokens (filler ``<|teal-unused-N|>`` tokens pad a tokenizer shorter than the LM head).
    Raises ExportError if the tokenizer has ids beyond the text vocabulary."""
    from tokenizers import AddedToken

    n = len(tokenizer)
    if n > cfg.text_vocab_size:
        raise ExportError(f"the tokenizer has {n} tokens but the LM head only {cfg.text_vocab_size}: "
                          "exported ids could not equal teal's joint ids")
    names = [f"<|teal-unused-{i}|>" for i in range(n, cfg.text_vocab_size)]
    names += [tok for _, tok in cfg.boundary_list]
    for entry in cfg.codecs:
        names += [codec_token(entry.name, j) for j in range(entry.vocab_size)]
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in names], special_tokens=True)
    vocab = tokenizer.get_vocab()
    for i, t in enumerate(names, start=n):
        if vocab.get(t) != i:
            raise ExportError(f"the tokenizer gave token {t} id {vocab.get(t)}, expected {i} "
                              "(a token of that name already existed?)")
    return names


def sidecar(model: "TealModel", bias: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The ``teal.json`` grammar sidecar (format ``teal-export`` v1)."""
    import teal_cli

    cfg = model.config
    boundary = {}
    for m, (open_tok, close_tok) in cfg.boundary.items():
        boundary[m] = {"open": cfg.boundary_id(m), "close": cfg.boundary_id(m, closing=True),
                       "open_token": open_tok, "close_token": close_tok}
    codecs = []
    for entry in cfg.codecs:
        c = {"name": entry.name, "modality": entry.modality, "offset": entry.offset, "vocab_size": entry.vocab_size,
             "input": entry.input, "output": entry.output, "shape": entry.grid,
             "frame_rate": entry.segment.get("frame_rate"), "image_size": entry.segment.get("image_size"),
             "weights": entry.weights, "path": entry.path, "token": codec_token(entry.name, 0).replace(":0|", ":{id}|"),
             # float32 values written as Python floats: the JSON round trip is exact.
             "logit_bias": [float(x) for x in bias[entry.key].cpu().tolist()] if entry.key in bias else None}
        codecs.append(c)
    directory = getattr(model, "directory", None)
    return {
        "format": hf_grammar.SIDECAR_FORMAT, "version": hf_grammar.SIDECAR_VERSION, "teal_version": teal_cli.__version__,
        "source": {"model": str(directory) if directory else None,
                   "adapter_sha256": model.adapter_sha256(directory) if directory else None,
                   "base_llm": cfg.llm.get("name"), "base_weights_sha256": cfg.llm.get("weights_sha256"),
                   "architecture": type(model.llm).__name__},
        "vocab_size": cfg.vocab_size, "text_vocab_size": cfg.text_vocab_size, "eos_token_id": model.eos_id,
        "context_length": model.context_length,
        "boundary": boundary, "codecs": codecs,
        "logit_bias": "codecs[i].logit_bias: a constant logit per codec id (the output projection's bias, O . b_out); "
                      "add it to the LM head's logits before masking and sampling (TealGrammarProcessor does)",
    }


# ---------------------------------------------------------------------- the whole export


def probe_ids(model: "TealModel") -> list[int]:
    """A sequence covering text, every boundary token and ids of every input codec."""
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    ids = list(model._prefix_ids) + torch.randint(0, cfg.text_vocab_size, (6,), generator=gen).tolist()
    for entry in cfg.codecs:
        if not entry.input:
            continue
        k = min(entry.tokens_per_item or 8, 16)
        ids += [cfg.boundary_id(entry.modality)]
        ids += (entry.offset + torch.randint(0, entry.vocab_size, (k,), generator=gen)).tolist()
        ids += [cfg.boundary_id(entry.modality, closing=True)]
    ids += torch.randint(0, cfg.text_vocab_size, (4,), generator=gen).tolist()
    limit = model.context_length or len(ids)
    return ids[:limit]


def compare_logits(reference: torch.Tensor, exported: torch.Tensor) -> float:
    """Largest ``|exported - reference|`` over the reference's finite entries, relative to its
    largest magnitude."""
    finite = torch.isfinite(reference)
    scale = float(reference[finite].abs().max().clamp(min=1.0))
    return float((exported[finite] - reference[finite]).abs().max()) / scale


def export_model(model: "TealModel", out: str | Path, *, overwrite: bool = False, verify: bool = True,
                 log=None) -> Path:
    """Write ``model`` (a loaded :class:`TealModel`, fp32; it is modified in place and must
    not be used afterwards) to ``out`` as a Hugging Face checkpoint + tokenizer + ``teal.json``
    + ``teal_grammar.py`` (see the module docstring). The directory appears only when
    complete (written beside it, then renamed).

    Raises UsageError if ``out`` exists without ``overwrite``; ExportError if the adapter
    cannot be folded exactly into the architecture, or (``verify``) if the reloaded checkpoint
    misses tensors or its logits differ from the TEAL model's beyond fp32 tolerance."""
    from transformers import AutoModelForCausalLM

    out = check_output(out, overwrite)
    say = log or (lambda message: None)
    model.eval()
    if next(model.llm.parameters()).dtype != torch.float32:
        raise ExportError("export needs the model in float32 (load it with dtype=torch.float32)")
    check_exportable(model)
    cfg = model.config
    probe = torch.tensor([probe_ids(model)], device=model.device)
    with torch.no_grad():
        reference = model(probe).logits[0].float().cpu()
    inputs, outputs, bias = exported_rows(model)
    folded = fold_bias_norm(model)
    merged = merge_lora(model)
    flags = _fill_bias_options(model) if folded else {}
    say(f"folded bias-norm into {folded} layer(s), merged {merged} LoRA layer(s)"
        + (f"; config: {', '.join(f'{k}={v}' for k, v in flags.items())}" if flags else ""))
    llm = model.llm
    d, V = cfg.hidden_size, cfg.vocab_size
    emb = nn.Embedding(V, d)
    emb.weight = nn.Parameter(inputs.to(llm.dtype).contiguous(), requires_grad=False)
    head = nn.Linear(d, V, bias=False)
    head.weight = nn.Parameter(outputs.to(llm.dtype).contiguous(), requires_grad=False)
    llm.set_input_embeddings(emb)
    llm.set_output_embeddings(head)
    for config in {id(c): c for c in (llm.config, llm.config.get_text_config())}.values():
        config.vocab_size = V
        config.tie_word_embeddings = False
    if hasattr(llm, "all_tied_weights_keys"):
        llm.all_tied_weights_keys = {}
    eos = model.eos_id
    llm.generation_config.eos_token_id = eos
    llm.generation_config.pad_token_id = eos
    tokenizer = model.tokenizer
    extend_tokenizer(tokenizer, cfg)
    meta = sidecar(model, bias)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(out)
    try:
        llm.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / hf_grammar.SIDECAR).write_text(json.dumps(meta, indent=1) + "\n")
        shutil.copyfile(Path(hf_grammar.__file__), tmp / GRAMMAR_FILE)
        apply_umask(tmp)  # save_pretrained writes 0600 files
        if verify:
            loaded, info = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32, output_loading_info=True)
            bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
            if bad:
                raise ExportError(f"the exported {type(llm).__name__} does not load cleanly ({bad}); refusing an inexact export")
            with torch.no_grad():
                got = loaded(probe.cpu()).logits[0].float() + hf_grammar.logit_bias(meta)
            err = compare_logits(reference, got)
            say(f"verified: plain transformers logits match teal's (max relative difference {err:.1e})")
            if not err <= PROBE_RTOL + PROBE_ATOL:
                raise ExportError(f"the exported checkpoint's logits differ from the TEAL model's by {err:.2e} "
                                  f"(relative; tolerance {PROBE_RTOL + PROBE_ATOL:.0e}): refusing an inexact export")
            del loaded
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_dir(model_dir: str | Path, out: str | Path, *, overwrite: bool = False, verify: bool = True,
               device: str = "cpu", log=None) -> Path:
    """Load the model directory ``model_dir`` in float32 and :func:`export_model` it to ``out``."""
    from .teal_model import TealModel

    check_output(out, overwrite)
    model = TealModel.from_dir(model_dir, device=device, dtype=torch.float32)
    return export_model(model, out, overwrite=overwrite, verify=verify, log=log)
