"""Test helpers importable from any test module."""

from __future__ import annotations

import dataclasses
import importlib
import types

import pytest

HINT = "run the README's test command (bash scripts/test.sh), which installs the test oracles"


def require(module: str, reason: str = "") -> types.ModuleType:
    """Import a test dependency or FAIL (not skip): an oracle that silently does not run is a
    check that silently does not happen."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(f"test dependency {module!r} missing ({exc}); {reason or HINT}", pytrace=False)


@dataclasses.dataclass(frozen=True)
class CrashingPrep:
    """A pixel geometry whose loader process dies (as a decoder crash would): importable by
    spawned loader processes, which get the test's sys.path."""

    def apply(self, image):
        import os

        os._exit(3)


@dataclasses.dataclass(frozen=True)
class BuggyPrep:
    """A pixel geometry that fails as a bug would (not a teal error)."""

    def apply(self, image):
        raise ValueError("a bug in a loader")


@dataclasses.dataclass(frozen=True)
class NicePrep:
    """A pixel geometry whose one pixel is its loader's nice value (as a loader sees it)."""

    def apply(self, image):
        import os

        import numpy as np

        return np.full((1, 1, 3), os.nice(0), np.uint8), None


@dataclasses.dataclass(frozen=True)
class SlowPrep:
    """A pixel geometry that takes ``seconds`` per image."""

    seconds: float = 0.5

    def apply(self, image):
        import time

        import numpy as np

        time.sleep(self.seconds)
        return np.zeros((1, 1, 3), np.uint8), None


def fit_patch_codec(folder, out, k: int):
    """A patch-p4 k-means codec fitted on every image in ``folder``, written to ``out``, loaded."""
    from teal_cli.cluster.fit import ClusterOptions, fit_codec
    from teal_cli.codecs import load_codec
    from teal_cli.features import extractor_for

    items = [(p.name, str(p)) for p in sorted(folder.iterdir())]
    fit_codec(items, extractor_for("patch", patch_size=4), out, ClusterOptions(k=k, iters=5))
    return load_codec(str(out))
