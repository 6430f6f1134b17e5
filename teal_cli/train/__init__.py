"""Training TEAL models: data and templates (:mod:`.data`, :mod:`.templates`), the loop
(:mod:`.loop`), checkpoints (:mod:`.checkpoint`) and data-parallel runs (:mod:`.distributed`).

Importing this package imports torch (through :mod:`.loop`)."""

from .data import DataOptions, SampleSet
from .loop import GROUPS, TrainOptions, TrainResult, Trainer, train
from .templates import BUILTIN as BUILTIN_TEMPLATES
from .templates import load_templates, render

__all__ = ["BUILTIN_TEMPLATES", "DataOptions", "GROUPS", "SampleSet", "TrainOptions", "TrainResult", "Trainer",
           "load_templates", "render", "train"]
