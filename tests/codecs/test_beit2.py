"""BEiT-v2 VQ-KD: a tiny checkpoint in the official key layout, checked against an
independent, functional spelling of the original's math (no reference package installs
without timm/torchvision)."""

from __future__ import annotations

import argparse
import hashlib
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest_image import smooth_image, to_tensor_reference, torchvision_center_crop
from teal_cli.codecs import beit2
from teal_cli.codecs.registry import find_spec, load_codec
from teal_cli.errors import CodecError, DownloadError, UsageError

DIM, DEPTH, HIDDEN, PATCH, GRID, CODE_DIM, N_EMBED = 64, 2, 128, 16, 14, 8, 64


def _official_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the key names of modeling_vqkd.VQKD (decoder and extras included)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.02):
        return torch.randn(*shape, generator=g) * std

    sd: dict[str, torch.Tensor] = {}

    def vit(prefix: str, in_chans: int, patch: int, depth: int):
        sd[f"{prefix}.cls_token"] = rnd(1, 1, DIM)
        sd[f"{prefix}.pos_embed"] = rnd(1, GRID * GRID + 1, DIM, std=0.5)
        sd[f"{prefix}.patch_embed.proj.weight"] = rnd(DIM, in_chans, patch, patch, std=0.05)
        sd[f"{prefix}.patch_embed.proj.bias"] = rnd(DIM)
        for i in range(depth):
            b = f"{prefix}.blocks.{i}"
            sd[f"{b}.norm1.weight"], sd[f"{b}.norm1.bias"] = 1 + rnd(DIM, std=0.1), rnd(DIM)
            sd[f"{b}.attn.q_bias"], sd[f"{b}.attn.v_bias"] = rnd(DIM), rnd(DIM)
            sd[f"{b}.attn.qkv.weight"] = rnd(3 * DIM, DIM, std=0.2)
            sd[f"{b}.attn.proj.weight"], sd[f"{b}.attn.proj.bias"] = rnd(DIM, DIM, std=0.1), rnd(DIM)
            sd[f"{b}.norm2.weight"], sd[f"{b}.norm2.bias"] = 1 + rnd(DIM, std=0.1), rnd(DIM)
            sd[f"{b}.mlp.fc1.weight"], sd[f"{b}.mlp.fc1.bias"] = rnd(HIDDEN, DIM, std=0.1), rnd(HIDDEN)
            sd[f"{b}.mlp.fc2.weight"], sd[f"{b}.mlp.fc2.bias"] = rnd(DIM, HIDDEN, std=0.1), rnd(DIM)
        sd[f"{prefix}.fc_norm.weight"], sd[f"{prefix}.fc_norm.bias"] = 1 + rnd(DIM, std=0.1), rnd(DIM)

    vit("encoder", 3, PATCH, DEPTH)
    vit("decoder", CODE_DIM, 1, 1)
    sd["encode_task_layer.0.weight"], sd["encode_task_layer.0.bias"] = rnd(DIM, DIM, std=0.2), rnd(DIM)
    sd["encode_task_layer.2.weight"], sd["encode_task_layer.2.bias"] = rnd(CODE_DIM, DIM, std=0.2), rnd(CODE_DIM)
    sd["decode_task_layer.0.weight"], sd["decode_task_layer.0.bias"] = rnd(DIM, DIM), rnd(DIM)
    sd["decode_task_layer.2.weight"], sd["decode_task_layer.2.bias"] = rnd(512, DIM), rnd(512)
    sd["quantize.embedding.weight"] = F.normalize(rnd(N_EMBED, CODE_DIM, std=1.0), dim=-1)
    sd["quantize.embedding.cluster_size"] = torch.rand(N_EMBED, generator=g)
    sd["quantize.embedding.embed_avg"] = rnd(N_EMBED, CODE_DIM)
    sd["quantize.embedding.initted"] = torch.tensor([1.0])
    sd["quantize.cluster_size"] = torch.rand(N_EMBED, generator=g)
    # Present in training checkpoints; the original loader drops them.
    sd["teacher_model.visual.proj"] = rnd(4, 4)
    sd["scaling_layer.shift"] = torch.zeros(1, 3, 1, 1)
    sd["loss_weight"] = torch.ones(1)
    return sd


def _reference_codes(sd: dict[str, torch.Tensor], pixels: torch.Tensor, heads: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """modeling_vqkd's get_codebook_indices, written out functionally: (ids [B, N], normalised z)."""
    b = pixels.shape[0]
    x = F.conv2d(pixels, sd["encoder.patch_embed.proj.weight"], sd["encoder.patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["encoder.cls_token"].expand(b, -1, -1), x], dim=1) + sd["encoder.pos_embed"]
    for i in range(DEPTH):
        p = f"encoder.blocks.{i}."
        h = F.layer_norm(x, (DIM,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        bias = torch.cat([sd[p + "attn.q_bias"], torch.zeros(DIM), sd[p + "attn.v_bias"]])
        q, k, v = (h @ sd[p + "attn.qkv.weight"].t() + bias).chunk(3, dim=-1)
        split = lambda t: t.view(b, -1, heads, DIM // heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(DIM // heads), dim=-1)
        o = (att @ v).transpose(1, 2).reshape(b, -1, DIM)
        x = x + o @ sd[p + "attn.proj.weight"].t() + sd[p + "attn.proj.bias"]
        h = F.layer_norm(x, (DIM,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        h = F.gelu(h @ sd[p + "mlp.fc1.weight"].t() + sd[p + "mlp.fc1.bias"])
        x = x + h @ sd[p + "mlp.fc2.weight"].t() + sd[p + "mlp.fc2.bias"]
    x = F.layer_norm(x[:, 1:], (DIM,), sd["encoder.fc_norm.weight"], sd["encoder.fc_norm.bias"], eps=1e-6)
    z = torch.tanh(x @ sd["encode_task_layer.0.weight"].t() + sd["encode_task_layer.0.bias"])
    z = z @ sd["encode_task_layer.2.weight"].t() + sd["encode_task_layer.2.bias"]
    z = z / z.norm(dim=-1, keepdim=True)
    codebook = sd["quantize.embedding.weight"]
    ids = ((z[:, :, None, :] - codebook[None, None]) ** 2).sum(-1).argmin(-1)
    return ids, z


def _pixels(seed: int, batch: int = 3) -> torch.Tensor:
    return torch.rand(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    sd = _official_state_dict()
    # A random codebook maps everything to a few codes: take it from real encoder outputs.
    _, z = _reference_codes(sd, _pixels(100, batch=2))
    pick = torch.randperm(z.shape[0] * z.shape[1], generator=torch.Generator().manual_seed(1))[:N_EMBED]
    sd["quantize.embedding.weight"] = z.reshape(-1, CODE_DIM)[pick].clone()
    path = tmp_path_factory.mktemp("beit2") / "vqkd_encoder_base_decoder_1x768x12_clip-00000000.pth"
    torch.save({"model": sd, "epoch": 99, "args": argparse.Namespace(model="vqkd")}, path)
    return sd, path


def test_ids_match_the_original_math(official):
    sd, path = official
    codec = beit2.load(find_spec("beit2"), checkpoint=path)
    assert (codec.name, codec.vocab_size, codec.image_size, codec.downsample, codec.has_decoder) == ("beit2", N_EMBED, 224, 16, False)
    x = _pixels(7)
    ids = codec.encode(x)
    expected, _ = _reference_codes(sd, x)
    assert ids.dtype == torch.int64 and ids.shape == (3, GRID, GRID)
    assert torch.equal(ids.view(3, -1), expected)
    assert ids.unique().numel() >= 16, "the tiny checkpoint should use many codes"


def test_architecture_comes_from_shapes(official, tmp_path):
    sd, path = official
    model = beit2.load(None, checkpoint=path).model
    encoder = model.encoder
    assert (len(encoder.blocks), encoder.patch, encoder.grid, encoder.blocks[0].attn.heads) == (DEPTH, PATCH, GRID, 1)
    assert encoder.blocks[0].mlp.fc1.out_features == HIDDEN and hasattr(encoder, "fc_norm")
    # Two heads by option (heads are not visible in the weights).
    two = beit2.load(None, checkpoint=path, num_heads=2)
    x = _pixels(8, batch=1)
    assert torch.equal(two.encode(x).view(1, -1), _reference_codes(sd, x, heads=2)[0])


def test_whole_pipeline_from_images(official):
    sd, path = official
    codec = load_codec("beit2-3x768x12-clip", checkpoint=path)
    images = [smooth_image(s, w, h) for s, (w, h) in enumerate([(300, 257), (224, 224), (500, 333)])]
    batch = torch.stack([codec.preprocess(im) for im in images])
    assert batch.shape == (3, 3, 224, 224)
    assert torch.equal(codec.encode(batch).view(3, -1), _reference_codes(sd, batch)[0])


def test_preprocess_is_test_get_code(official):
    _, path = official
    codec = beit2.load(None, checkpoint=path)
    for seed, (w, h) in enumerate([(300, 257), (640, 480), (257, 1000), (256, 256)]):
        image = smooth_image(seed, w, h)
        # Resize(256, interpolation=3): shorter side 256, longer int(256 * long / short), bicubic.
        short, long = min(w, h), max(w, h)
        size = (256, int(256 * long / short)) if w <= h else (int(256 * long / short), 256)
        resized = image if short == 256 else image.resize(size, Image.BICUBIC)
        x = to_tensor_reference(torchvision_center_crop(resized, 224))
        expected = x * 255.0 / 127.5 - 1.0  # VQKD.pre_process, process_type 'default'
        assert torch.equal(codec.preprocess(image), expected), (w, h)
    with pytest.raises(UsageError, match="224 px only"):
        codec.preprocess(image, image_size=256)
    with pytest.raises(UsageError, match=r"\[B, 3, 224, 224\]"):
        codec.encode(torch.zeros(1, 3, 256, 256))


def test_pixel_mapping_is_bit_identical_to_the_torch_original():
    """teal maps pixels in numpy (thread-friendly); every uint8 value must land where
    ToTensor + VQKD.pre_process put it."""
    import numpy as np

    from teal_cli.media.image_prep import unit_range

    values = np.arange(256, dtype=np.uint8)
    expected = torch.from_numpy(values.copy()).to(torch.float32).div(255) * 255.0 / 127.5 - 1.0
    assert np.array_equal(unit_range(values) * 255.0 / 127.5 - 1.0, expected.numpy())


def test_no_pixel_decoder(official):
    _, path = official
    codec = beit2.load(None, checkpoint=path)
    with pytest.raises(CodecError, match="no pixel decoder.*vqgan.*dalle"):
        codec.decode(torch.zeros(1, GRID, GRID, dtype=torch.long))


def test_codebook_is_the_normalised_32d_table(official):
    sd, path = official
    codebook = beit2.load(None, checkpoint=path).codebook
    assert torch.equal(codebook, sd["quantize.embedding.weight"])
    torch.testing.assert_close(codebook.norm(dim=1), torch.ones(N_EMBED))


def test_strict_keys(official, tmp_path):
    sd, _ = official
    broken = dict(sd)
    del broken["encoder.blocks.1.mlp.fc2.bias"]
    broken["encoder.head.weight"] = torch.zeros(2, DIM)
    torch.save({"model": broken}, tmp_path / "broken.pth")
    with pytest.raises(CodecError, match=r"broken\.pth.*missing 1 key\(s\): encoder\.blocks\.1\.mlp\.fc2\.bias.*unexpected 1 key\(s\): encoder\.head\.weight"):
        beit2.load(None, checkpoint=tmp_path / "broken.pth")
    torch.save({"model": {"x": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(CodecError, match="not a BEiT-v2 VQ-KD checkpoint"):
        beit2.load(None, checkpoint=tmp_path / "other.pth")


def test_named_variants_and_hash_prefix(tmp_path, monkeypatch):
    expected = {
        "beit2": "vqkd_encoder_base_decoder_1x768x12_clip-d93179da.pth",
        "beit2-1x768x12-clip": "vqkd_encoder_base_decoder_1x768x12_clip-d93179da.pth",
        "beit2-3x768x12-clip": "vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth",
        "beit2-1x768x12-dino": "vqkd_encoder_base_decoder_1x768x12_dino-663c55d7.pth",
    }
    for name, filename in expected.items():
        spec = find_spec(name)
        hub = spec.options["checkpoint_file"]
        assert hub.url == f"https://github.com/addf400/files/releases/download/BEiT-v2/{filename}"
        assert filename.endswith(f"-{hub.sha256}.pth") and len(hub.sha256) == 8 and hub.subdir == "beit2"
    monkeypatch.setenv("TEAL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TEAL_OFFLINE", "1")
    with pytest.raises(DownloadError, match=rf"place it at {tmp_path}/beit2/vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7\.pth"):
        load_codec("beit2-3x768x12-clip")
    # The prefix is what fetch() verifies for a cached file.
    from teal_cli.weights import hub as teal_hub

    digest = hashlib.sha256(b"teal").hexdigest()
    for prefix, ok in ((digest[:8], True), ("00000000" if not digest.startswith("00000000") else "11111111", False)):
        f = teal_hub.HubFile(f"https://example.invalid/{prefix}/w.pth", prefix, f"prefix-{prefix}")
        path = teal_hub.cached_path(f)
        path.parent.mkdir(parents=True)
        path.write_bytes(b"teal")
        if ok:
            assert teal_hub.fetch(f) == path
        else:
            with pytest.raises(DownloadError, match="expected one starting with"):
                teal_hub.fetch(f)


@pytest.mark.requires_cuda
def test_cuda_gives_the_cpu_ids(official):
    _, path = official
    codec = beit2.load(None, checkpoint=path)
    x = _pixels(9, batch=8)
    cpu = codec.encode(x)
    assert torch.equal(codec.to("cuda").encode(x).cpu(), cpu)
    for dtype in (torch.bfloat16, torch.float16):
        half = beit2.load(None, checkpoint=path, dtype=dtype).to("cuda")
        assert (half.encode(x).cpu() == cpu).float().mean() > 0.8


def test_detokenize_explains_there_is_no_pixel_decoder(official, cli, photo):
    from pathlib import Path

    ckpt = official[1]
    tok = cli("tokenize", photo, "--codec", "beit2", "--checkpoint", ckpt, "-q")
    assert tok.exit_code == 0, tok.stderr
    out = cli("detokenize", "-o", "b.png", "--checkpoint", ckpt, input=tok.stdout)
    assert out.exit_code == 1
    assert "no pixel decoder" in out.stderr or "no decoder" in out.stderr
    assert "vqgan" in out.stderr and "dalle" in out.stderr
    assert not Path("b.png").exists()
