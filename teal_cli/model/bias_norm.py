"""Bias-norm tuning of a frozen LLM, as LLaMA-Adapter V2 does it, without touching its weights.

LLaMA-Adapter V2 (Gao et al., 2023, §3.1) unfreezes the normalisation layers and adds a
zero-initialised bias (and a unit-initialised scale) to every linear layer of the frozen
LLM: ``y = s * (W x + b)``. Here the base weights stay bit-identical, so the tuned
parameters live beside them, registered on the modules they act on:

- every ``nn.Linear`` (and GPT-2's ``Conv1D``) inside the transformer blocks gets
  ``teal_bias`` (zeros, ``[out_features]``) and, in ``scale`` mode, ``teal_scale`` (ones);
- every normalisation layer (RMSNorm, LayerNorm) gets ``teal_norm_weight`` (ones,
  ``[d]``): ``norm(x) * teal_norm_weight`` equals tuning the norm's own weight
  (``w * g``) while ``w`` stays frozen; LayerNorms with a bias also get ``teal_norm_bias``.

All start as the identity, so a fresh bias-norm model gives the base model's outputs
exactly. The LM head and the text embedding are left alone (they stay frozen).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import torch
    from torch import nn

MODES = ("bias", "scale")
PARAM_NAMES = ("teal_bias", "teal_scale", "teal_norm_weight", "teal_norm_bias")


def _is_linear(module: "nn.Module") -> bool:
    from torch import nn

    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _out_features(module: "nn.Module") -> int:
    # transformers' Conv1D stores its weight as [in, out] and has ``nf`` = out features.
    return module.nf if type(module).__name__ == "Conv1D" else module.out_features


def _is_norm(module: "nn.Module") -> bool:
    from torch import nn

    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return True
    name = type(module).__name__
    return name.endswith(("RMSNorm", "LayerNorm")) and getattr(module, "weight", None) is not None


def _linear_hook(module, inputs, output):
    output = output + module.teal_bias.to(output.dtype)
    scale = getattr(module, "teal_scale", None)
    return output if scale is None else output * scale.to(output.dtype)


def _norm_hook(module, inputs, output):
    output = output * module.teal_norm_weight.to(output.dtype)
    bias = getattr(module, "teal_norm_bias", None)
    return output if bias is None else output + bias.to(output.dtype)


def add_bias_norm(backbone: "nn.Module", mode: str = "bias") -> int:
    """Register bias-norm parameters and hooks on ``backbone`` (the LLM without its LM head).

    Args:
        backbone: e.g. ``llm.base_model`` (Llama's ``model``, GPT-2's ``transformer``).
        mode: ``bias`` (biases + norm weights) or ``scale`` (also a scale per linear output).

    Returns:
        The number of new trainable values. Raises ValueError on an unknown mode or if the
        backbone already has bias-norm parameters.
    """
    import torch
    from torch import nn

    if mode not in MODES:
        raise ValueError(f"bias-norm mode {mode!r}: expected one of {MODES}")
    count = 0
    for module in list(backbone.modules()):
        if hasattr(module, "teal_bias") or hasattr(module, "teal_norm_weight"):
            raise ValueError("bias-norm parameters are already present")
        weight = getattr(module, "weight", None)
        if _is_linear(module):
            out = _out_features(module)
            kw = {"dtype": torch.float32, "device": weight.device}
            module.teal_bias = nn.Parameter(torch.zeros(out, **kw))
            if mode == "scale":
                module.teal_scale = nn.Parameter(torch.ones(out, **kw))
            module.register_forward_hook(_linear_hook)
            count += out * (2 if mode == "scale" else 1)
        elif _is_norm(module):
            d = weight.shape[0]
            kw = {"dtype": torch.float32, "device": weight.device}
            module.teal_norm_weight = nn.Parameter(torch.ones(d, **kw))
            if getattr(module, "bias", None) is not None:
                module.teal_norm_bias = nn.Parameter(torch.zeros(d, **kw))
                count += d
            module.register_forward_hook(_norm_hook)
            count += d
    return count


def bias_norm_parameters(module: "nn.Module") -> Iterator[tuple[str, "torch.nn.Parameter"]]:
    """``(name, parameter)`` of every bias-norm parameter under ``module``."""
    for name, param in module.named_parameters():
        if name.rsplit(".", 1)[-1] in PARAM_NAMES:
            yield name, param
