"""teal_cli.media.resample reproduces Pillow's resize (and the codecs' resize + crop) byte for byte,
and tokenize --resize-on device gives the records of --resize-on loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from teal_cli.media import resample
from teal_cli.media.pixels import PixelPrep
from teal_cli.media.resample import BICUBIC, BILINEAR, BOX, HAMMING, LANCZOS, resize_window

pytestmark = pytest.mark.skipif(resample.exact_here() is not None, reason=str(resample.exact_here()))


def _image(rng, w, h, smooth):
    """Noise (every weight and both clip ends matter), or a gradient with noise."""
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if smooth:
        ramp = np.linspace(0, 190, w, dtype=np.float64)[None, :, None]
        pixels = (pixels // 4 + ramp).astype(np.uint8)
    return pixels


@pytest.mark.parametrize("matmul", [True, False], ids=["matmul", "gather"])
@pytest.mark.parametrize("resample_filter", [BICUBIC, LANCZOS, BILINEAR, BOX, HAMMING])
def test_resize_and_crop_equal_pillow(resample_filter, matmul):
    rng = np.random.default_rng(resample_filter)
    for trial in range(14):
        w, h, rw, rh = (int(v) for v in rng.integers(1, 400, 4))
        if trial == 0:
            rw, rh = w, h  # no resize: a crop alone
        elif trial == 1:
            h, rh = max(h, 200), 20  # the height shrinks most: vertical pass first from Pillow 13
        ow, oh = int(rng.integers(1, rw + 1)), int(rng.integers(1, rh + 1))
        left, top = int(rng.integers(0, rw - ow + 1)), int(rng.integers(0, rh - oh + 1))
        pixels = _image(rng, w, h, trial % 2)
        expected = np.asarray(Image.fromarray(pixels).resize((rw, rh), resample_filter).crop((left, top, left + ow, top + oh)))
        out = resize_window([torch.from_numpy(pixels)], [(rw, rh, left, top, ow, oh)], resample_filter, matmul=matmul)
        assert out.dtype == torch.uint8 and out.shape == (1, oh, ow, 3)
        assert np.array_equal(out[0].numpy(), expected), (w, h, rw, rh, left, top, ow, oh)


@pytest.mark.parametrize("prep", [PixelPrep("shorter", 64, BICUBIC, crop=56), PixelPrep("shorter_rounded", 64, LANCZOS, crop=64),
                                  PixelPrep("square", 48, BICUBIC)], ids=["beit2-like", "vqgan-dalle-like", "square"])
@pytest.mark.parametrize("matmul", [True, False], ids=["matmul", "gather"])
def test_a_batch_of_sizes_equals_each_image_done_by_pillow(prep, matmul):
    rng = np.random.default_rng(7)
    sizes = [(120, 90), (90, 120), (64, 300), (300, 64), (64, 64), (40, 50), (333, 200), (200, 700)]
    images = [_image(rng, w, h, i % 2) for i, (w, h) in enumerate(sizes)]
    windows = [prep.window(w, h) for w, h in sizes]
    assert all(windows) and len({w[4:] for w in windows}) == 1
    orders = {resample.horizontal_first(w, h, win[0], win[1]) for (w, h), win in zip(sizes, windows)}
    out = resize_window([torch.from_numpy(p) for p in images], windows, prep.resample, matmul=matmul)
    for got, pixels in zip(out, images):
        assert np.array_equal(got.numpy(), prep.apply(Image.fromarray(pixels))[0])
    if int(Image.__version__.split(".")[0]) >= 13:
        assert orders == {True, False}  # both pass orders in one batch
    # RGB plus a padding byte (how loaders hand Pillow's pixels over), mixed with plain RGB,
    # as numpy arrays and as tensors: the padding is dropped, the bytes are the same.
    padded = [np.concatenate([p, rng.integers(0, 256, (*p.shape[:2], 1), dtype=np.uint8)], axis=2) if i % 3 else p
              for i, p in enumerate(images)]
    assert torch.equal(resize_window(padded, windows, prep.resample, matmul=matmul), out)
    assert torch.equal(resize_window([torch.from_numpy(p) for p in padded], windows, prep.resample, matmul=matmul), out)


def test_pass_order_follows_the_installed_pillow():
    major = int(Image.__version__.split(".")[0])
    assert resample.horizontal_first(100, 100, 50, 50)
    assert resample.horizontal_first(300, 1000, 224, 746) == (major < 13)


def test_windows_are_refused_where_the_device_cannot_follow():
    assert PixelPrep("shorter", 64, Image.Resampling.NEAREST, crop=64).window(100, 80) is None
    assert PixelPrep(pad_multiple=4).window(30, 30) is None  # padding: the loaders keep it
    assert PixelPrep("shorter", 64, BICUBIC, crop=64).window(100, 80) == (80, 64, 8, 0, 64, 64)


def _records(folder, codec, **options):
    from teal_cli.media.inputs import iter_input_records
    from teal_cli.pipeline.tokenize import TokenizeOptions, tokenize_records

    return [r.to_json() for r in tokenize_records(iter_input_records([str(folder)]), [codec], TokenizeOptions(**options))]


@pytest.fixture
def sized_images(tmp_path, photo_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    photo = Image.open(photo_path).convert("RGB")
    for i, size in enumerate([(96, 64), (64, 96), (50, 200), (33, 41), (128, 128)]):
        photo.resize(size, Image.BICUBIC).rotate(10 * i).save(folder / f"p{i}.png")
    return folder


@pytest.fixture
def square_codec(tmp_path, sized_images):
    from helpers import fit_patch_codec

    return fit_patch_codec(sized_images, tmp_path / "patch-p4-k16", k=16)


@pytest.mark.parametrize("loader", ["threads", "processes"])
def test_tokenize_resize_on_device_gives_the_loader_records(sized_images, square_codec, loader, monkeypatch):
    import teal_cli.pipeline.loaders as loaders_module
    import teal_cli.media.resample as resample_module

    expected = _records(sized_images, square_codec, image_size=24, workers=2, loader=loader)
    resized = []
    real = resample_module.resize_window
    monkeypatch.setattr(resample_module, "resize_window", lambda images, *a, **k: resized.extend(images) or real(images, *a, **k))
    monkeypatch.setattr(loaders_module, "RAW_BYTES", 96 * 64 * 4)  # the 128 x 128 and 50 x 200 images stay on the loaders
    monkeypatch.setattr(loaders_module, "PROCESS_AFTER", 1)
    got = _records(sized_images, square_codec, image_size=24, workers=2, loader=loader, resize_on="device", batch_size=3)
    assert got == expected
    # Pillow's own 4 bytes a pixel, the padding byte dropped on the device
    assert sorted(tuple(i.shape) for i in resized) == [(41, 33, 4), (64, 96, 4), (96, 64, 4)]


def test_resize_on_is_checked(sized_images, square_codec, monkeypatch):
    from teal_cli.errors import UsageError

    with pytest.raises(UsageError, match="--resize-on gpu"):
        _records(sized_images, square_codec, resize_on="gpu")
    monkeypatch.setattr(resample.platform, "machine", lambda: "aarch64")
    with pytest.raises(UsageError, match="only reproduced on x86-64"):
        _records(sized_images, square_codec, resize_on="device")


def test_matmul_is_the_default_where_float64_products_are_fast():
    assert resample.matmul_suits(torch.device("cpu"))
    if torch.cuda.is_available():
        capability = torch.cuda.get_device_capability(0)
        assert resample.matmul_suits(torch.device("cuda", 0)) == (capability in resample.FAST_FLOAT64)


@pytest.mark.requires_cuda
@pytest.mark.parametrize("matmul", [True, False], ids=["matmul", "gather"])
@pytest.mark.parametrize("resample_filter", [BICUBIC, LANCZOS])
def test_resize_on_cuda_equals_pillow(resample_filter, matmul):
    rng = np.random.default_rng(3)
    prep = PixelPrep("shorter", 224, resample_filter, crop=224)
    sizes = [(500, 375), (375, 500), (640, 480), (300, 1000), (224, 300), (1000, 240), (4000, 3000)]
    images = [_image(rng, w, h, i % 2) for i, (w, h) in enumerate(sizes)]
    out = resize_window(images, [prep.window(w, h) for w, h in sizes], resample_filter, "cuda", matmul=matmul)
    assert out.device.type == "cuda"
    for got, pixels in zip(out.cpu(), images):
        assert np.array_equal(got.numpy(), prep.apply(Image.fromarray(pixels))[0])
    padded = [np.concatenate([p, np.full((*p.shape[:2], 1), 255, np.uint8)], axis=2) for p in images]
    assert torch.equal(resize_window(padded, [prep.window(w, h) for w, h in sizes], resample_filter, "cuda", matmul=matmul), out)


def test_cli_resize_on_device(photo, patch_codec, cli):
    """``teal tokenize --resize-on device`` writes what the default writes."""
    loader = cli("tokenize", photo, "--codec", patch_codec, "--image-size", "32", "--workers", "2")
    device = cli("tokenize", photo, "--codec", patch_codec, "--image-size", "32", "--workers", "2", "--resize-on", "device")
    assert loader.exit_code == 0 and device.exit_code == 0, device.stderr
    assert device.stdout == loader.stdout and '"shape": [8, 8]' in loader.stdout
    assert "slower than Pillow" in device.stderr and "slower" not in loader.stderr
    bad = cli("tokenize", photo, "--codec", patch_codec, "--resize-on", "gpu")
    assert bad.exit_code == 2 and "--resize-on" in bad.stderr


@pytest.mark.requires_cuda
def test_tokenize_resize_on_device_on_cuda_gives_the_cpu_records(sized_images, square_codec):
    expected = _records(sized_images, square_codec, image_size=24, workers=2)
    got = _records(sized_images, square_codec.to("cuda"), image_size=24, workers=2, loader="processes", resize_on="device")
    assert got == expected
