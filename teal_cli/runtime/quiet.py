"""Silencing the libraries teal loads models through (``teal ... -q``).

transformers draws a "Loading weights" bar and logs warnings when it loads a model, and
huggingface_hub draws download bars; neither goes through teal's own log. :func:`quiet_libraries`
turns them off for the process, before or after those libraries are imported, so that
``-q`` means errors only for every model teal loads (HuBERT features today, LLMs later).
"""

from __future__ import annotations

import os
import sys

# Read by the libraries when they are imported: huggingface_hub's progress bars (which
# transformers' own bars follow), transformers' logging level, and tqdm's default ``disable``.
ENVIRONMENT = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1"}


def quiet_libraries() -> None:
    """Progress bars and info/warning logs of transformers and huggingface_hub off, for this
    process and the processes it starts: set in the environment for libraries not imported
    yet, and through their own switches for those already imported. Errors still show."""
    os.environ.update(ENVIRONMENT)
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
