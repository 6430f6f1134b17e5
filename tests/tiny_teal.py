"""Tiny TEAL model directories and toy token records for the training tests (no download).

``make_model_dir(tmp, arch)`` writes a tiny causal LM (:mod:`tiny_llm`), a 16-id patch codec
and a 32-id mel codec (k-means directories) and a model directory over them, exactly what
``teal init-embeddings`` would make. ``toy_pairs`` writes an image -> digit-word dataset:
image ``k`` is 16 ids that pick out class ``k`` unambiguously.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ["zero", "one", "two", "three"]


def make_model_dir(root: str | Path, arch: str = "llama", *, seed: int = 0, hidden: int = 32, layers: int = 2,
                   context: int = 256, audio: bool = True) -> Path:
    """A model directory over a tiny ``arch`` LLM (:func:`tiny_llm.make_tiny_llm`) with the patch codec
    and, with ``audio``, the mel codec."""
    import torch

    from teal_cli.codecs.kmeans_codec import load_codec_dir, save_codec_dir
    from teal_cli.features.mel import MelFeatures
    from teal_cli.features.patch import PatchFeatures
    from teal_cli.model import init_model
    from teal_cli.model.llm import load_base_llm
    from tiny_llm import make_tiny_llm

    root = Path(root)
    llm = make_tiny_llm(root / f"tiny-{arch}", arch, seed=seed, hidden=hidden, layers=layers, context=context)
    gen = torch.Generator().manual_seed(seed)
    patch = save_codec_dir(root / "codecs" / "patch-p2-k16", PatchFeatures(2, image_size=8), torch.rand(16, 12, generator=gen), {})
    mel = save_codec_dir(root / "codecs" / "mel-80-k32", MelFeatures(80), torch.randn(32, 80, generator=gen), {})
    dirs = [patch, mel] if audio else [patch]
    base = load_base_llm(str(llm))
    model = init_model(base, [load_codec_dir(p) for p in dirs], image_size=8, seed=seed, codec_paths=[str(p) for p in dirs])
    out = root / "model"
    model.save(out)
    return out


def image_tokens(label: int, rng: random.Random) -> list[int]:
    """16 patch ids for class ``label``: drawn from ids 4*label .. 4*label+3."""
    return [4 * label + rng.randrange(4) for _ in range(16)]


def toy_pairs(path: str | Path, n: int = 64, *, seed: int = 0, classes: int = 4) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            label = i % classes
            rec = {"v": 1, "id": f"{i}", "segments": [
                {"modality": "image", "codec": "patch-p2-k16", "shape": [4, 4], "tokens": image_tokens(label, rng)},
                {"modality": "text", "text": WORDS[label]}]}
            f.write(json.dumps(rec) + "\n")
    return Path(path)


def toy_captions(path: str | Path, n: int = 64, *, seed: int = 0, classes: int = 4, task: str | None = "caption") -> Path:
    """Stage-2 instruction records: image prompt, word target, with a ``task`` key."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            label = i % classes
            rec = {"v": 1, "id": f"c{i}", "segments": [
                {"modality": "image", "codec": "patch-p2-k16", "shape": [4, 4], "tokens": image_tokens(label, rng), "role": "prompt"},
                {"modality": "text", "text": WORDS[label], "role": "target"}]}
            if task:
                rec["task"] = task
            f.write(json.dumps(rec) + "\n")
    return Path(path)
