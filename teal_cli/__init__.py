"""teal: Tokenize and Embed ALL for multimodal LLMs.

The library lives in this package; ``teal_cli.cli`` is a thin command-line layer over it.
Importing ``teal_cli`` is cheap: heavy modules (torch, transformers) load on first use.
"""

__version__ = "0.1.0"
