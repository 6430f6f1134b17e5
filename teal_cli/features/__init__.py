"""Feature extractors for k-means codecs, by kind.

``build_extractor(config)`` rebuilds an extractor from the ``features`` block a codec
directory stores; ``extractor_for(name, **options)`` builds one from what a user types
(``--features patch --patch-size 4``, ``--features whisper-small --layer 11``).
Each kind's module is imported only when that kind is used.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import UsageError
from .base import FeatureExtractor

# kind -> "module:Class". A class provides from_config(dict) and matches(name) / from_name(name, **options).
EXTRACTORS: dict[str, str] = {
    "patch": "teal_cli.features.patch:PatchFeatures",
    "mel": "teal_cli.features.mel:MelFeatures",
    "whisper": "teal_cli.features.whisper:WhisperFeatures",
    "hubert": "teal_cli.features.hubert:HubertFeatures",
}


def _cls(kind: str):
    module, _, attr = EXTRACTORS[kind].partition(":")
    return getattr(importlib.import_module(module), attr)


def build_extractor(config: dict[str, Any], **overrides: Any) -> FeatureExtractor:
    """Rebuild the extractor a codec directory describes."""
    kind = config.get("kind")
    if kind not in EXTRACTORS:
        raise UsageError(f"unknown feature kind {kind!r}; known: {', '.join(EXTRACTORS)}")
    return _cls(kind).from_config(config, **overrides)


def feature_kind(name: str) -> str:
    """``whisper-small`` -> ``whisper``; ``patch`` -> ``patch``."""
    for kind in EXTRACTORS:
        if name == kind or name.startswith(kind + "-"):
            return kind
    raise UsageError(f"--features {name}: unknown feature extractor; known kinds: {', '.join(EXTRACTORS)}")


def extractor_for(name: str, **options: Any) -> FeatureExtractor:
    """Build an extractor from a CLI name such as ``patch``, ``mel``, ``whisper-small``."""
    return _cls(feature_kind(name)).from_name(name, **options)


__all__ = ["EXTRACTORS", "FeatureExtractor", "build_extractor", "extractor_for", "feature_kind"]
