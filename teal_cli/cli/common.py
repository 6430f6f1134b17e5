"""What every subcommand shares: option types, error handling, logging, progress, output.

Data goes to stdout; logs and progress go to stderr (progress only on a terminal, never
with -q). A :class:`~teal_cli.errors.TealError` becomes one line ``Error: ...`` and exit 1
(2 for usage errors); ``TEAL_DEBUG=1`` shows the traceback. Torch is imported only inside
commands, so ``--help`` stays fast.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import traceback
from typing import Annotated, Callable, Iterator, Optional

import typer

from ..errors import TealError, UsageError

DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA when available), cpu, cuda or cuda:N.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto, float32, bfloat16 or float16 (auto: bf16 on GPU, fp32 on CPU).")]
LlmDtypeOpt = Annotated[str, typer.Option("--dtype", help="The frozen LLM's dtype: auto, float32, bfloat16 or float16 (auto: bf16 on GPU and on CPUs with native bf16, AVX512_BF16 or AMX; else fp32). teal's own parameters stay fp32.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.", min=0, max=2**63 - 1)]
QuietOpt = Annotated[bool, typer.Option("-q", "--quiet", help="No progress or info on stderr; errors only.")]
VerboseOpt = Annotated[bool, typer.Option("-v", "--verbose", help="More detail on stderr.")]
WorkersOpt = Annotated[Optional[int], typer.Option("--workers", help="Loaders decoding media ahead of the encoder [default: one per usable core, at most 16].", min=1, show_default=False)]
OnErrorOpt = Annotated[str, typer.Option("--on-error", help="fail: stop at the first bad item. skip: report it on stderr, go on, exit 1 at the end.")]
TemperatureOpt = Annotated[float, typer.Option("--temperature", help="0 = greedy; higher = more random.", min=0.0)]
TopKOpt = Annotated[Optional[int], typer.Option("--top-k", help="Sample among the k most likely allowed tokens.", min=1, show_default=False)]
TopPOpt = Annotated[Optional[float], typer.Option("--top-p", help="Nucleus sampling: the smallest set of tokens with this much probability.", show_default=False)]


class Log:
    """stderr logging for one command run."""

    def __init__(self, quiet: bool = False, verbose: bool = False):
        self.quiet = quiet
        self.verbose = verbose
        self.interactive = sys.stderr.isatty() and not quiet
        if quiet:  # the bars and logs of the libraries models load through, too
            from ..runtime.quiet import quiet_libraries

            quiet_libraries()
        if self.interactive:
            from ..weights import hub

            hub.default_progress = DownloadBar()

    def info(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def debug(self, message: str) -> None:
        if self.verbose and not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        print(f"Warning: {message}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def progress(self, description: str, total: int | None = None) -> Iterator[Callable[..., None]]:
        """Yields ``advance(n=1, total=None)``; a rich bar on a terminal, nothing otherwise."""
        if not self.interactive:
            yield lambda n=1, total=None: None
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(description, total=total)

            def advance(n: int = 1, total: int | None = None) -> None:
                if total is not None:
                    bar.update(task, total=total)
                bar.advance(task, n)

            yield advance


class DownloadBar:
    """A rich progress bar for checkpoint downloads, shown on a terminal only."""

    def __init__(self) -> None:
        self._bar = None
        self._task = None

    def __call__(self, done: int, total: int | None) -> None:
        if self._bar is None:
            from rich.console import Console
            from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

            self._bar = Progress(*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn(),
                                 console=Console(stderr=True), transient=True)
            self._bar.start()
            self._task = self._bar.add_task("download", total=total)
        self._bar.update(self._task, completed=done, total=total)
        if total is not None and done >= total:
            self._bar.stop()
            self._bar = None


def handle_errors(fn: Callable) -> Callable:
    """Turn TealError into ``Error: ...`` on stderr and the matching exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TealError as exc:
            if os.environ.get("TEAL_DEBUG"):
                traceback.print_exc()
            message = str(exc).replace("\n", " ")
            print(f"Error: {message}", file=sys.stderr, flush=True)
            raise typer.Exit(exc.exit_code) from None
        except BrokenPipeError:
            # Downstream closed the pipe (e.g. `| head`): not an error of ours.
            with contextlib.suppress(Exception):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            print("Error: interrupted", file=sys.stderr)
            raise typer.Exit(130) from None

    return wrapper


def check_choice(value: str, choices: tuple[str, ...], option: str) -> str:
    if value not in choices:
        raise UsageError(f"{option} {value}: expected one of {', '.join(choices)}")
    return value


def check_number(value: float | None, option: str, *, minimum: float | None = None, maximum: float | None = None,
                 above: float | None = None) -> None:
    """Raise UsageError unless ``value`` (None: not given) is a finite number in range:
    ``>= minimum``, ``<= maximum``, ``> above``. Commands call it before any model loads."""
    if value is None:
        return
    import math

    bounds = [f">= {minimum:g}" if minimum is not None else "", f"> {above:g}" if above is not None else "",
              f"<= {maximum:g}" if maximum is not None else ""]
    expected = " and ".join(b for b in bounds if b)
    ok = math.isfinite(value) and (minimum is None or value >= minimum) and (maximum is None or value <= maximum) \
        and (above is None or value > above)
    if not ok:
        raise UsageError(f"{option} {value}: expected a finite number" + (f" {expected}" if expected else ""))


@contextlib.contextmanager
def output_stream(path: Optional[str]) -> Iterator:
    """stdout, or an atomically written text file for ``-o FILE``."""
    if path is None or path == "-":
        yield sys.stdout
        return
    from ..runtime.files import atomic_output

    with atomic_output(path) as f:
        yield f


def setup_torch(device: str, dtype: str, seed: int | None, *, llm: bool = False):
    """Resolve device/dtype (``llm``: the frozen LLM's, see ``resolve_dtype``) and seed torch;
    returns ``(device, dtype)``."""
    from ..runtime.device import fit_threads_to_cpus, resolve_device, resolve_dtype, seed_everything

    dev = resolve_device(device)
    fit_threads_to_cpus()
    seed_everything(seed)
    return dev, resolve_dtype(dtype, dev, llm=llm)
