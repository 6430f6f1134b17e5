"""teal codecs: list the codecs teal can resolve by name."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import handle_errors

HELP = """List built-in and plugin codecs, and codec directories on TEAL_CODEC_PATH.

\b
Examples:
  teal codecs
  TEAL_CODEC_PATH=~/codecs teal codecs --json
"""


@handle_errors
def codecs(json_out: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False) -> None:
    import json

    from ..codecs.registry import available_codecs, codec_search_path, is_codec_dir

    rows = [{"name": s.name, "modality": s.modality, "family": s.family, "description": s.description}
            for s in available_codecs()]
    for folder in codec_search_path():
        if folder.is_dir():
            for path in sorted(folder.iterdir()):
                if is_codec_dir(path):
                    try:
                        cfg = json.loads((path / "config.json").read_text())
                    except (OSError, ValueError):
                        continue
                    rows.append({"name": path.name, "modality": cfg.get("modality", "?"), "family": "kmeans",
                                 "description": f"{cfg.get('name', '')} in {folder}"})
    for row in rows:
        if json_out:
            print(json.dumps(row))
        else:
            print(f"{row['name']:<28} {row['modality']:<6} {row['family']:<8} {row['description']}")
