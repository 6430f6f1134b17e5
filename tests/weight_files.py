"""Tiny real-format weight files for the damaged-checkpoint and provenance tests.

Every file is written in its real on-disk format by the format's own writer where one is
installed (torch.save, safetensors, transformers' save_pretrained, teal's km.bin export) and
by hand for CTranslate2's model.bin (its layout is documented in teal_cli/features/ct2.py;
tests/features/test_whisper.py checks the reader against CTranslate2's own converter).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

# A VQGAN small enough to build in milliseconds: 32 px -> 16 x 16 ids.
VQ_DDCONFIG = {"ch": 32, "out_ch": 3, "ch_mult": [1, 1], "num_res_blocks": 1, "attn_resolutions": [],
               "in_channels": 3, "resolution": 32, "z_channels": 4, "double_z": False, "dropout": 0.0}


def vqgan_files(folder: Path, n_embed: int = 16, seed: int = 0, legacy: bool = False) -> tuple[Path, Path]:
    """A Lightning-style ``last.ckpt`` (weights under ``state_dict``) and its ``model.yaml``."""
    import yaml

    from teal_cli.codecs.vqgan import VQModel

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = VQModel(VQ_DDCONFIG, n_embed, 4)
    ckpt = folder / "last.ckpt"
    torch.save({"state_dict": model.state_dict(), "global_step": 1}, ckpt, _use_new_zipfile_serialization=not legacy)
    config = folder / "model.yaml"
    config.write_text(yaml.safe_dump({"model": {"target": "taming.models.vqgan.VQModel",
                                                "params": {"ddconfig": VQ_DDCONFIG, "n_embed": n_embed, "embed_dim": 4}}}))
    return ckpt, config


def dalle_encoder(folder: Path, seed: int = 0) -> Path:
    """A DALL-E encoder state dict as ``encoder.pkl``."""
    from teal_cli.codecs.dalle import Encoder

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    path = folder / "encoder.pkl"
    torch.save(Encoder(n_hid=8, n_blk_per_group=1, vocab_size=16).state_dict(), path)
    return path


def beit2_pth(path: Path, seed: int = 0) -> Path:
    """A BEiT-v2 VQ-KD ``.pth`` (weights under ``model``), 14 x 14 patches of 16 px, width 64."""
    from teal_cli.codecs.beit2 import VQKD, ViTEncoder

    torch.manual_seed(seed)
    model = VQKD(ViTEncoder(patch=16, grid=14, dim=64, depth=1, heads=1, hidden=128), 16, 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "epoch": 1}, path)
    return path


def whisper_state(seed: int = 0, width: int = 32, layers: int = 2):
    from teal_cli.features.whisper import EncoderDims, build_encoder

    dims = EncoderDims(n_mels=80, n_audio_ctx=1500, n_audio_state=width, n_audio_head=2, n_audio_layer=layers)
    torch.manual_seed(seed)
    encoder = build_encoder(dims)
    with torch.no_grad():
        for p in encoder.parameters():
            p.normal_(0, 0.2)
        encoder.positional_embedding.normal_(0, 0.2)
    return dims, {k: v.clone() for k, v in encoder.state_dict().items()}


def whisper_pt(path: Path, seed: int = 0, width: int = 32, layers: int = 2) -> Path:
    """openai-whisper's ``.pt`` layout: ``{"dims", "model_state_dict"}``."""
    dims, state = whisper_state(seed, width, layers)
    text = {"n_vocab": 10, "n_text_ctx": 4, "n_text_state": width, "n_text_head": 2, "n_text_layer": 1}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"dims": {**dims.__dict__, **text}, "model_state_dict": {f"encoder.{k}": v for k, v in state.items()}}, path)
    return path


def _openai_to_hf(key: str) -> str:
    from teal_cli.features.whisper import _HF_LAYER_RENAMES

    if key == "positional_embedding":
        return "model.encoder.embed_positions.weight"
    if key.startswith("ln_post."):
        return "model.encoder.layer_norm." + key[len("ln_post."):]
    if key.startswith("blocks."):
        _, i, inner = key.split(".", 2)
        module, _, param = inner.rpartition(".")
        back = {v: k for k, v in _HF_LAYER_RENAMES.items()}
        return f"model.encoder.layers.{i}.{back[module]}.{param}"
    return "model.encoder." + key


def whisper_hf(folder: Path, shards: int = 1, seed: int = 0) -> Path:
    """A Hugging Face Whisper folder: ``config.json`` + one ``model.safetensors`` or
    ``shards`` shards with ``model.safetensors.index.json``."""
    from safetensors.torch import save_file

    dims, state = whisper_state(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "whisper", "num_mel_bins": dims.n_mels, "max_source_positions": dims.n_audio_ctx,
        "d_model": dims.n_audio_state, "encoder_attention_heads": dims.n_audio_head,
        "encoder_layers": dims.n_audio_layer}))
    tensors = {_openai_to_hf(k): v.contiguous() for k, v in state.items()}
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
        return folder
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, str(folder / file))
        weight_map.update({k: file for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def _ct2_string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def whisper_ct2(folder: Path, seed: int = 0, width: int = 32, layers: int = 2) -> Path:
    """A CTranslate2 Whisper folder (binary version 6, float32), written by hand."""
    dims, st = whisper_state(seed, width, layers)
    var: dict[str, torch.Tensor] = {
        "encoder/conv1/weight": st["conv1.weight"], "encoder/conv1/bias": st["conv1.bias"],
        "encoder/conv2/weight": st["conv2.weight"], "encoder/conv2/bias": st["conv2.bias"],
        "encoder/position_encodings/encodings": st["positional_embedding"],
        "encoder/layer_norm/gamma": st["ln_post.weight"], "encoder/layer_norm/beta": st["ln_post.bias"],
        "encoder/num_heads": torch.tensor(dims.n_audio_head, dtype=torch.int32),
    }
    for i in range(dims.n_audio_layer):
        b, p = f"blocks.{i}", f"encoder/layer_{i}"
        var[f"{p}/self_attention/linear_0/weight"] = torch.cat([st[f"{b}.attn.{n}.weight"] for n in ("query", "key", "value")])
        var[f"{p}/self_attention/linear_0/bias"] = torch.cat([st[f"{b}.attn.query.bias"], torch.zeros(dims.n_audio_state),
                                                              st[f"{b}.attn.value.bias"]])
        var[f"{p}/self_attention/linear_1/weight"] = st[f"{b}.attn.out.weight"]
        var[f"{p}/self_attention/linear_1/bias"] = st[f"{b}.attn.out.bias"]
        var[f"{p}/self_attention/layer_norm/gamma"] = st[f"{b}.attn_ln.weight"]
        var[f"{p}/self_attention/layer_norm/beta"] = st[f"{b}.attn_ln.bias"]
        for j, m in ((0, "mlp.0"), (1, "mlp.2")):
            var[f"{p}/ffn/linear_{j}/weight"] = st[f"{b}.{m}.weight"]
            var[f"{p}/ffn/linear_{j}/bias"] = st[f"{b}.{m}.bias"]
        var[f"{p}/ffn/layer_norm/gamma"] = st[f"{b}.mlp_ln.weight"]
        var[f"{p}/ffn/layer_norm/beta"] = st[f"{b}.mlp_ln.bias"]
    out = bytearray(struct.pack("<I", 6) + _ct2_string("WhisperSpec") + struct.pack("<I", 3) + struct.pack("<I", len(var)))
    for name, t in var.items():
        dtype_id = 3 if t.dtype == torch.int32 else 0
        data = t.contiguous().numpy().tobytes() if dtype_id == 3 else t.float().contiguous().numpy().tobytes()
        out += _ct2_string(name) + struct.pack("<B", t.dim()) + b"".join(struct.pack("<I", d) for d in t.shape)
        out += struct.pack("<BI", dtype_id, len(data)) + data
    out += struct.pack("<I", 0)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.bin").write_bytes(bytes(out))
    (folder / "config.json").write_text("{}")
    return folder


def hubert_hf(folder: Path, shards: bool = False, seed: int = 0, **overrides) -> Path:
    """A tiny random HuBERT saved by transformers' own ``save_pretrained`` (safetensors)."""
    import transformers

    cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               conv_dim=(32, 32), conv_kernel=(10, 3), conv_stride=(5, 2), conv_bias=False,
               num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, feat_extract_norm="group")
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = transformers.HubertModel(transformers.HubertConfig(**cfg))
    model.save_pretrained(folder, max_shard_size="40KB" if shards else "5GB")
    return folder
