"""The ``teal`` command line: one thin module per subcommand over the library."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .. import __version__
from . import cluster, codecs, completions, detokenize, eval, export, generate, init_embeddings, tokenize, train

app = typer.Typer(
    name="teal",
    help="teal: tokenize and embed all modalities for a frozen text LLM (TEAL). Run 'teal COMMAND --help' for each tool.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"teal {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None,
) -> None:
    """teal: tokenize and embed all modalities for a frozen text LLM (TEAL)."""


for module in (tokenize, detokenize, cluster, init_embeddings, train, generate, export, eval, codecs, completions):
    name = module.__name__.rsplit(".", 1)[-1]
    # Command names use dashes (init-embeddings); each module's function has the module's name.
    app.command(name.replace("_", "-"), help=module.HELP, no_args_is_help=False)(getattr(module, name))


def main() -> None:
    app(prog_name="teal")
