"""What the libraries teal loads models through print: silenced, or turned into progress.

transformers draws a "Loading weights" bar and logs warnings when it loads a model, and
huggingface_hub draws download bars; neither goes through teal's own log.

- :func:`quiet_libraries` turns them off for the process (``teal ... -q``), before or after
  those libraries are imported, so that ``-q`` means errors only for every model teal loads;
- :func:`library_output` turns them off for one block unless the output is a terminal
  (:func:`interactive`), and hands transformers' GGUF loading bar to a :data:`Progress`
  callback.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterator

# progress(done, total): units done so far (bytes downloaded, tensors converted), of how many.
Progress = Callable[[int, "int | None"], None]

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


def interactive() -> bool:
    """Bars and notes on stderr only on a terminal, and not after teal's ``-q`` (which turns
    transformers' bars off, see :mod:`teal_cli.runtime.quiet`)."""
    if not sys.stderr.isatty() or os.environ.get("TQDM_DISABLE"):
        return False
    with contextlib.suppress(ImportError):
        from transformers.utils import logging

        return logging.is_progress_bar_enabled()
    return True


@contextlib.contextmanager
def library_output(interactive: bool, progress: Progress | None = None) -> Iterator[None]:
    """transformers' and huggingface_hub's bars off unless ``interactive`` (restored after);
    their warnings always off: teal turns what matters in a load report into its own errors.
    ``progress`` gets the GGUF loader's per-tensor progress instead of its tqdm bar."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from transformers.utils import logging

    verbosity, bars, hub_bars = logging.get_verbosity(), logging.is_progress_bar_enabled(), not are_progress_bars_disabled()
    logging.set_verbosity_error()
    if not interactive:
        logging.disable_progress_bar()
        disable_progress_bars()
    try:
        with gguf_tqdm(interactive, progress):
            yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
        if hub_bars:
            enable_progress_bars()


@contextlib.contextmanager
def gguf_tqdm(interactive: bool, progress: Progress | None) -> Iterator[None]:
    # transformers' GGUF loader draws a plain tqdm bar, which no switch of transformers turns off:
    # swap that module's tqdm for a reporting (or silent) one while we convert.
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None or (interactive and progress is None):
        yield
        return

    def reporting(iterable, *args, **kwargs):
        items = list(iterable)
        for i, item in enumerate(items):
            if progress is not None:
                progress(i, len(items))
            yield item
        if progress is not None:
            progress(len(items), len(items))

    gguf_utils.tqdm = reporting
    try:
        yield
    finally:
        gguf_utils.tqdm = original
