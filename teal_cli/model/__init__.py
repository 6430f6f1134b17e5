"""The model half of TEAL: a frozen causal LM that reads and writes modality tokens.

- :mod:`.llm` loads the base LLM (any Hugging Face causal LM, or the offline ``smollm2-135m``);
- :mod:`.teal_model` holds :class:`TealModel` (E, O, projections, boundary tokens) and
  :func:`init_model`;
- :mod:`.bias_norm` adds LLaMA-Adapter-V2-style bias-norm tuning without touching base weights;
- :mod:`.config` is the model directory's ``config.json``;
- :mod:`.generate` decodes with the segment grammar.

Importing this package imports torch.
"""

from .config import ModelConfig, ModelDirError
from .teal_model import EncodedSequence, TealModel, init_model

__all__ = ["EncodedSequence", "ModelConfig", "ModelDirError", "TealModel", "init_model"]
