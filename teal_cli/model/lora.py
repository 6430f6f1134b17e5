"""LoRA on the frozen LLM through peft: the alternative to bias-norm tuning TEAL's ablation tried.

LoRA (Hu et al., 2021) adds ``B @ A`` (rank ``r``, scaled by ``alpha / r``) beside a frozen
linear layer; ``B`` starts at zero, so a fresh LoRA model gives the base model's outputs
exactly. peft's :func:`peft.inject_adapter_in_model` does the wrapping in place on the
transformer blocks (``model.backbone``): the LM head and the text embedding are not touched
(SmolLM2 ties them; both stay frozen). The new parameters are named ``...lora_A...`` /
``...lora_B...``, which :func:`teal_cli.model.teal_model.is_adapter_param` counts as teal's
adapter, so they are saved in ``adapter.safetensors`` and the base weights stay as they were.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .teal_model import TealModel

DEFAULTS = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}


def lora_config(r: int, alpha: float | None = None, dropout: float = 0.0,
                target_modules: str | list[str] = "all-linear") -> dict[str, Any]:
    """The ``groups["lora"]`` entry of a model config: rank ``r``, ``alpha`` (default ``2 r``),
    dropout, and the target modules (``all-linear``: every linear layer of the blocks)."""
    if r < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {r}")
    return {"r": int(r), "alpha": float(alpha if alpha is not None else 2 * r), "dropout": float(dropout),
            "target_modules": target_modules}


def add_lora(model: "TealModel", config: dict[str, Any]) -> int:
    """Inject LoRA layers into ``model.backbone`` in place; returns the number of new parameters.

    ``config`` is a :func:`lora_config` dict (stored in the model's ``config.groups["lora"]``
    so that :meth:`TealModel.from_dir` rebuilds the same layers). The new parameters start
    with ``requires_grad`` False like everything else; the trainer chooses what trains.
    Raises ValueError if the backbone already carries LoRA layers.
    """
    from peft import LoraConfig, inject_adapter_in_model

    cfg = {**DEFAULTS, **(config or {})}
    backbone = model.backbone
    if any("lora_" in name for name, _ in backbone.named_parameters()):
        raise ValueError("LoRA layers are already present")
    targets = cfg["target_modules"]
    peft_cfg = LoraConfig(r=int(cfg["r"]), lora_alpha=float(cfg["alpha"]), lora_dropout=float(cfg["dropout"]),
                          target_modules=targets if isinstance(targets, str) else list(targets), bias="none",
                          fan_in_fan_out=_uses_conv1d(backbone))
    # peft marks only its own layers trainable; remember what was trainable before and restore it.
    before = {name: p.requires_grad for name, p in model.named_parameters()}
    device = next(backbone.parameters()).device
    inject_adapter_in_model(peft_cfg, backbone)
    count = 0
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.requires_grad_(False)
            count += param.numel()
            if param.device != device:
                param.data = param.data.to(device)
        else:
            param.requires_grad_(before.get(_strip_base_layer(name), before.get(name, False)))
    return count


def _uses_conv1d(backbone) -> bool:
    # GPT-2's Conv1D stores weights as [in, out]; peft needs fan_in_fan_out for it.
    return any(type(m).__name__ == "Conv1D" for m in backbone.modules())


def _strip_base_layer(name: str) -> str:
    return name.replace(".base_layer.", ".")
