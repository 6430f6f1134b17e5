"""Evaluation: the paper's metrics on a model's outputs or on existing predictions, and the
pictures that show them (``teal eval``).

- :mod:`.pairs`: references and predictions, roles, matching by id;
- :mod:`.text`: the normalisations and answer parsers (documented once, there);
- :mod:`.metrics`: thin calls into pycocoevalcap, sacrebleu, jiwer, scikit-image, scikit-learn;
- :mod:`.tasks` (caption, mcq, asr, classify), :mod:`.gen`, :mod:`.recon`, :mod:`.modeling` (ppl, generation);
- :mod:`.judge`: the classifiers that judge generated images; :mod:`.report`: ``--report`` pictures;
- :mod:`.run`: one task end to end (:func:`~teal_cli.evaluate.run.run_eval`).
"""

from .result import EvalResult
from .run import TASKS, EvalOptions, run_eval

__all__ = ["EvalResult", "EvalOptions", "TASKS", "run_eval"]
