"""The package layering: a lower package never imports a higher one, not even lazily.

Every module's imports are read with ``ast`` (function-level imports included) and each
``teal_cli`` module imported is checked against the order below. Lowest first:

- ``errors``, ``records`` (and the package root, for ``__version__``): what everything shares;
- ``runtime``: the process: device and dtype choice, CPU threads, quiet libraries, atomic files;
- ``weights``: reading weight files, the restricted unpickler, the hub cache, file digests;
- ``media``: image and audio I/O, pixel preparation, the log-mel front end, input/output records;
- ``features``: the frozen encoders k-means codecs cluster (patches, mel, HuBERT, Whisper);
- ``codecs``: the tokenizers (registry, image codecs, k-means codecs, vocoder); the k-means
  codec's nearest-centroid assignment lives here (``codecs/assign.py``) because both the codec
  and the fitting in ``cluster`` use it;
- ``pipeline``: tokenize / detokenize over records, the decoding loaders, overlapped stages;
- ``cluster``: fitting k-means codecs (it reads media through the pipeline's loaders);
- ``model``: the base LLM and the TEAL model around it, generation;
- ``train``: the training loop and its checkpoints;
- ``evaluate``: the evaluation tasks (they run tokenize, models and generation);
- ``cli``: the command line (and ``teal_cli.__main__``).
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

LAYERS = [
    {"teal_cli", "errors", "records"},
    {"runtime"},
    {"weights"},
    {"media"},
    {"features"},
    {"codecs"},
    {"pipeline"},
    {"cluster"},
    {"model"},
    {"train"},
    {"evaluate"},
    {"cli", "__main__"},
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}
PACKAGE = REPO / "teal_cli"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _level(module: str) -> int:
    """The layer of ``teal_cli.<first part>...``; the root package itself is layer 0."""
    parts = module.split(".")
    return LEVEL[parts[1]] if len(parts) > 1 else 0


def _is_module(dotted: str) -> bool:
    path = PACKAGE.parent / dotted.replace(".", "/")
    return path.is_dir() or path.with_suffix(".py").is_file()


def _imports(source: str, package: str) -> set[tuple[int, str]]:
    """``(line, absolute module)`` of every teal_cli import in ``source`` (a module of
    ``package``), wherever it sits: at the top, in a function, under ``TYPE_CHECKING``."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {(node.lineno, a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from teal_cli.x import y` may name a module y: check the deepest one named.
            found |= {(node.lineno, f"{target}.{a.name}" if _is_module(f"{target}.{a.name}") else target)
                      for a in node.names}
    return {(line, name) for line, name in found if name == "teal_cli" or name.startswith("teal_cli.")}


def test_every_package_has_a_layer():
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert packages | modules <= set(LEVEL), sorted((packages | modules) - set(LEVEL))


def test_lower_packages_never_import_higher_ones():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for line, target in sorted(_imports(path.read_text(), package)):
            if _level(target) > _level(module):
                violations.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert not violations, "\n".join(violations)


def test_the_check_sees_lazy_and_relative_imports():
    """The reader above finds an import inside a function, relative or absolute, and the
    module a `from package import module` names."""
    source = "import os\n\ndef f():\n    from ..cluster import kmeans\n    import teal_cli.cli.common\n    from ..errors import TealError\n"
    found = _imports(source, "teal_cli.media")
    assert found == {(4, "teal_cli.cluster.kmeans"), (5, "teal_cli.cli.common"), (6, "teal_cli.errors")}
    assert _level("teal_cli.cluster.kmeans") > _level("teal_cli.media.io") > _level("teal_cli.errors")
