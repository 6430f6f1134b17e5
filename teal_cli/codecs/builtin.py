"""The table of built-in codec names. Importing it registers them; it imports no torch.

Official download addresses. Digests: OpenAI and the taming authors publish none for
these files, so their ``sha256`` is empty and a download is verified against nothing
(see :class:`~teal_cli.weights.hub.HubFile`). BEiT-v2's file names carry the first 8 hex digits of
their sha256 (torch.hub's convention, checked by the original loader with
``check_hash=True``); their HubFile pins that prefix, which :func:`~teal_cli.weights.hub.fetch` checks.
"""

from __future__ import annotations

from ..weights.hub import HubFile
from .registry import CodecSpec, register

_DALLE = "https://cdn.openai.com/dall-e"
_HEIBOX = "https://heibox.uni-heidelberg.de/d/{share}/files/?p=%2F{path}&dl=1"
_BEIT2 = "https://github.com/addf400/files/releases/download/BEiT-v2"


def _vqgan(name: str, share: str, codes: int) -> CodecSpec:
    return CodecSpec(
        name=name,
        family="vqgan",
        loader="teal_cli.codecs.vqgan:load",
        modality="image",
        description=f"taming-transformers VQGAN, ImageNet, f16, {codes} codes: 256px -> 16x16 (decoder)",
        options={
            "checkpoint_file": HubFile(_HEIBOX.format(share=share, path="ckpts%2Flast.ckpt"), "", name, "last.ckpt"),
            "config_file": HubFile(_HEIBOX.format(share=share, path="configs%2Fmodel.yaml"), "", name, "model.yaml"),
        },
    )


def _beit2(name: str, official: str, prefix: str, note: str) -> CodecSpec:
    return CodecSpec(
        name=name,
        family="beit2",
        loader="teal_cli.codecs.beit2:load",
        modality="image",
        description=f"BEiT-v2 VQ-KD tokenizer {official} ({note}): 224px -> 14x14, 8192 codes (no decoder)",
        options={"checkpoint_file": HubFile(f"{_BEIT2}/{official}-{prefix}.pth", prefix, "beit2")},
    )


register(
    CodecSpec(
        name="dalle",
        family="dalle",
        loader="teal_cli.codecs.dalle:load",
        modality="image",
        description="OpenAI DALL-E dVAE: 256px -> 32x32, 8192 codes (decoder)",
        options={
            "encoder_file": HubFile(f"{_DALLE}/encoder.pkl", "", "dalle"),
            "decoder_file": HubFile(f"{_DALLE}/decoder.pkl", "", "dalle"),
        },
    )
)
register(_vqgan("vqgan-f16-1024", "8088892a516d4e3baf92", 1024))
register(_vqgan("vqgan-f16-16384", "a7530b09fed84f80a887", 16384))
register(_beit2("beit2", "vqkd_encoder_base_decoder_1x768x12_clip", "d93179da", "CLIP teacher; test_get_code.py's default"))
register(_beit2("beit2-1x768x12-clip", "vqkd_encoder_base_decoder_1x768x12_clip", "d93179da", "CLIP teacher"))
register(_beit2("beit2-3x768x12-clip", "vqkd_encoder_base_decoder_3x768x12_clip", "d5036aa7", "CLIP teacher"))
register(_beit2("beit2-1x768x12-dino", "vqkd_encoder_base_decoder_1x768x12_dino", "663c55d7", "DINO teacher"))
