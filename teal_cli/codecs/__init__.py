"""Codecs: modality <-> token ids. See :mod:`teal_cli.codecs.registry` for name resolution."""

from .base import AudioCodec, Codec, ImageCodec
from .registry import CodecCache, CodecSpec, available_codecs, load_codec

__all__ = ["AudioCodec", "Codec", "CodecCache", "CodecSpec", "ImageCodec", "available_codecs", "load_codec"]
