"""VQGAN: teal against taming-transformers' own modules, on a tiny Lightning checkpoint."""

from __future__ import annotations

import argparse
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest_image import (
    drop_fake_lightning,
    fake_lightning_callback_class,
    malicious_torch_file,
    reference,
    smooth_image,
    torchvision_center_crop,
)
from teal_cli.codecs import vqgan
from teal_cli.codecs.registry import find_spec, load_codec
from teal_cli.errors import CodecError, DownloadError, UsageError

DDCONFIG = {
    "double_z": False, "z_channels": 8, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
    "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [16], "dropout": 0.0,
}
N_EMBED, EMBED_DIM = 64, 8


def _reference_model(seed: int = 0) -> torch.nn.Module:
    """taming's VQModel parts, built by taming's code (its VQModel class needs Lightning)."""
    model_mod = reference("taming.modules.diffusionmodules.model")
    quant_mod = reference("taming.modules.vqvae.quantize")
    torch.manual_seed(seed)
    ref = torch.nn.Module()
    ref.encoder = model_mod.Encoder(**DDCONFIG)
    ref.decoder = model_mod.Decoder(**DDCONFIG)
    ref.loss = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 1, 3))  # stands for the discriminator
    ref.quantize = quant_mod.VectorQuantizer2(N_EMBED, EMBED_DIM, beta=0.25)
    ref.quant_conv = torch.nn.Conv2d(DDCONFIG["z_channels"], EMBED_DIM, 1)
    ref.post_quant_conv = torch.nn.Conv2d(EMBED_DIM, DDCONFIG["z_channels"], 1)
    ref.eval()
    # A random codebook sends every vector to one code; take it from encoder outputs instead.
    with torch.no_grad():
        x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1)) * 2 - 1
        z = ref.quant_conv(ref.encoder(x)).permute(0, 2, 3, 1).reshape(-1, EMBED_DIM)
        pick = torch.randperm(z.shape[0], generator=torch.Generator().manual_seed(seed + 2))[:N_EMBED]
        ref.quantize.embedding.weight.copy_(z[pick])
    return ref


def _reference_encode(ref, x):
    with torch.no_grad():
        quant, _, (_, _, ids) = ref.quantize(ref.quant_conv(ref.encoder(x)))
    return ids.view(x.shape[0], x.shape[2] // 2, x.shape[3] // 2)


def _reference_decode(ref, ids):
    with torch.no_grad():
        b, h, w = ids.shape
        quant = ref.quantize.get_codebook_entry(ids.reshape(-1), (b, h, w, EMBED_DIM))
        return ((ref.decoder(ref.post_quant_conv(quant)).clamp(-1, 1) + 1) / 2)


def _save_lightning(ref, folder: Path) -> tuple[Path, Path]:
    """Save as taming's released files: ckpts/last.ckpt (Lightning) + configs/model.yaml."""
    (folder / "ckpts").mkdir(parents=True)
    (folder / "configs").mkdir()
    callback = fake_lightning_callback_class()
    try:
        state = OrderedDict(ref.state_dict())
        torch.save(
            {
                "epoch": 3,
                "global_step": 1234,
                "pytorch-lightning_version": "1.0.8",
                "callbacks": {callback: {"best_model_score": torch.tensor(0.5), "best_model_path": "x.ckpt"}},
                "optimizer_states": [{"state": {0: {"exp_avg": torch.randn(4)}}, "param_groups": [{"lr": 4.5e-6}]}],
                "lr_schedulers": [],
                "state_dict": state,
                "hparams": argparse.Namespace(embed_dim=EMBED_DIM),
            },
            folder / "ckpts" / "last.ckpt",
        )
    finally:
        drop_fake_lightning()
    config = {
        "model": {
            "base_learning_rate": 4.5e-6,
            "target": "taming.models.vqgan.VQModel",
            "params": {
                "embed_dim": EMBED_DIM, "n_embed": N_EMBED, "ddconfig": DDCONFIG,
                "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator", "params": {"disc_start": 1}},
            },
        }
    }
    (folder / "configs" / "model.yaml").write_text(yaml.safe_dump(config))
    return folder / "ckpts" / "last.ckpt", folder / "configs" / "model.yaml"


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    ref = _reference_model()
    ckpt, config = _save_lightning(ref, tmp_path_factory.mktemp("vqgan"))
    return ref, ckpt, config


def _pixels(seed: int, batch: int = 4, size: int = 32) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_ids_and_pixels_match_taming(official):
    ref, ckpt, config = official
    codec = vqgan.load(find_spec("vqgan-f16-16384"), checkpoint=ckpt, config=config)
    assert (codec.name, codec.vocab_size, codec.image_size, codec.downsample) == ("vqgan-f16-16384", N_EMBED, 32, 2)
    x = _pixels(10)
    ids = codec.encode(x)
    expected = _reference_encode(ref, x)
    assert ids.dtype == torch.int64 and ids.shape == (4, 16, 16)
    assert torch.equal(ids, expected)
    assert ids.unique().numel() >= 16, "the tiny checkpoint should use many codes"
    decoded = codec.decode(ids)
    assert decoded.shape == (4, 3, 32, 32) and decoded.min() >= 0 and decoded.max() <= 1
    torch.testing.assert_close(decoded, _reference_decode(ref, ids), rtol=1e-5, atol=1e-6)


def test_whole_pipeline_from_images(official):
    ref, ckpt, config = official
    codec = load_codec("vqgan-f16-1024", checkpoint=ckpt, config=config)
    images = [smooth_image(s, w, h) for s, (w, h) in enumerate([(50, 37), (32, 32), (41, 90)])]
    batch = torch.stack([codec.preprocess(im) for im in images])
    assert batch.shape == (3, 3, 32, 32) and batch.dtype == torch.float32
    assert torch.equal(codec.encode(batch), _reference_encode(ref, batch))
    # Fully convolutional: another size works when it is a multiple of the downsampling.
    assert codec.encode(torch.stack([codec.preprocess(images[0], image_size=48)])).shape == (1, 24, 24)
    with pytest.raises(UsageError, match="multiple of 2"):
        codec.preprocess(images[0], image_size=33)


def test_architecture_inferred_without_config(official, tmp_path):
    ref, ckpt, _ = official
    lone = tmp_path / "ckpts"
    lone.mkdir()
    (lone / "last.ckpt").write_bytes(ckpt.read_bytes())  # no model.yaml anywhere near
    codec = vqgan.load(None, checkpoint=lone / "last.ckpt")
    assert codec.image_size == vqgan.DEFAULT_RESOLUTION
    x = _pixels(11, batch=2)
    assert torch.equal(codec.encode(x), _reference_encode(ref, x))


def test_preprocess_is_taming_notebook_resize_and_127_5(official):
    _, ckpt, config = official
    codec = vqgan.load(None, checkpoint=ckpt, config=config)
    image = smooth_image(3, 61, 45)
    # Independent spelling of the reference: round(r * side), LANCZOS, CenterCrop, x/127.5 - 1.
    r = 32 / min(image.size)
    resized = image.resize((round(r * image.size[0]), round(r * image.size[1])), Image.LANCZOS)
    cropped = np.asarray(torchvision_center_crop(resized, 32), dtype=np.uint8)
    expected = torch.from_numpy((cropped / 127.5 - 1.0).astype(np.float32)).permute(2, 0, 1)
    assert torch.equal(codec.preprocess(image), expected)
    grey = image.convert("L")
    assert codec.preprocess(grey).shape == (3, 32, 32)


def test_codebook_is_quantizer_embedding(official):
    ref, ckpt, config = official
    codec = vqgan.load(None, checkpoint=ckpt, config=config)
    assert torch.equal(codec.codebook, ref.quantize.embedding.weight.detach())


def test_mismatched_checkpoint_is_a_clear_error(official, tmp_path):
    ref, ckpt, config = official
    state = OrderedDict(ref.state_dict())
    del state["post_quant_conv.bias"]
    state["encoder.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "bad.ckpt")
    with pytest.raises(CodecError, match=r"bad\.ckpt.*missing 1 key\(s\): post_quant_conv\.bias.*unexpected 1 key\(s\): encoder\.extra\.weight"):
        vqgan.load(None, checkpoint=tmp_path / "bad.ckpt", config=config)
    wrong = yaml.safe_load(config.read_text())
    wrong["model"]["params"]["n_embed"] = 32
    (tmp_path / "wrong.yaml").write_text(yaml.safe_dump(wrong))
    with pytest.raises(CodecError, match=r"quantize\.embedding\.weight has shape \[64, 8\]"):
        vqgan.load(None, checkpoint=ckpt, config=tmp_path / "wrong.yaml")
    with pytest.raises(CodecError, match="no state_dict"):
        torch.save([1, 2], tmp_path / "list.ckpt")
        vqgan.load(None, checkpoint=tmp_path / "list.ckpt", config=config)


@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_checkpoint_is_refused_without_running(tmp_path, legacy):
    marker = tmp_path / "pwned"
    malicious_torch_file(str(tmp_path / "last.ckpt"), str(marker), legacy=legacy)
    with pytest.raises(CodecError, match=r"refusing to load.*(posix|os)\.system"):
        vqgan.load(None, checkpoint=tmp_path / "last.ckpt")
    assert not marker.exists()


def test_named_codecs_point_at_official_files(tmp_path, monkeypatch):
    for name, codes in (("vqgan-f16-1024", 1024), ("vqgan-f16-16384", 16384)):
        spec = find_spec(name)
        assert spec.family == "vqgan" and str(codes) in spec.description
        ckpt, config = spec.options["checkpoint_file"], spec.options["config_file"]
        assert ckpt.url.startswith("https://heibox.uni-heidelberg.de/d/") and "ckpts%2Flast.ckpt" in ckpt.url
        assert (ckpt.name, config.name, ckpt.subdir) == ("last.ckpt", "model.yaml", name)
    monkeypatch.setenv("TEAL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TEAL_OFFLINE", "1")
    with pytest.raises(DownloadError, match=rf"last\.ckpt.*{tmp_path}/vqgan-f16-16384/last\.ckpt"):
        load_codec("vqgan-f16-16384")


@pytest.mark.requires_cuda
def test_cuda_gives_the_cpu_ids(official):
    _, ckpt, config = official
    codec = vqgan.load(None, checkpoint=ckpt, config=config)
    x = _pixels(12, batch=8)
    cpu = codec.encode(x)
    assert torch.equal(codec.to("cuda").encode(x).cpu(), cpu)
    for dtype in (torch.bfloat16, torch.float16):
        half = vqgan.load(None, checkpoint=ckpt, config=config, dtype=dtype).to("cuda")
        assert (half.encode(x).cpu() == cpu).float().mean() > 0.75
        assert half.decode(cpu).shape == (8, 3, 32, 32)


def test_cli_pipe_with_local_checkpoint(official, cli, photo):
    """tokenize | detokenize through the CLI with a local checkpoint: ids equal the reference
    encoder's on the same preprocessed photo, and the decoded file is the reference decoding."""
    import json

    import numpy as np
    from PIL import Image

    from teal_cli.media.io import load_image

    ref, ckpt, config = official
    tok = cli("tokenize", photo, "--codec", "vqgan-f16-16384", "--checkpoint", ckpt, "--config", config, "-q")
    assert tok.exit_code == 0, tok.stderr
    seg = json.loads(tok.stdout)["segments"][0]
    assert seg["codec"] == "vqgan-f16-16384" and seg["shape"] == [16, 16]
    codec = load_codec("vqgan-f16-16384", checkpoint=ckpt, config=config)
    expected = _reference_encode(ref, codec.preprocess(load_image(photo))[None])
    assert seg["tokens"] == expected.flatten().tolist()
    out = cli("detokenize", "-o", "vq.png", "--checkpoint", ckpt, "--config", config, "-q", input=tok.stdout)
    assert out.exit_code == 0, out.stderr
    pixels = _reference_decode(ref, expected)[0].permute(1, 2, 0).mul(255).round().clamp(0, 255).byte().numpy()
    assert np.abs(np.asarray(Image.open("vq.png")).astype(int) - pixels.astype(int)).max() <= 1
