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
