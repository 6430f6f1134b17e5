"""DALL-E dVAE: teal against openai's dall_e package, on tiny pickled modules."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest_image import (
    malicious_pickle,
    malicious_torch_file,
    reference,
    smooth_image,
    to_tensor_reference,
    torchvision_center_crop,
)
from teal_cli.codecs import dalle
from teal_cli.weights import safe_pickle
from teal_cli.codecs.registry import find_spec, load_codec
from teal_cli.errors import CodecError, DownloadError, UsageError

VOCAB = 512  # the package's smallest allowed vocabulary


def _reference_models(seed: int = 0):
    dall_e = reference("dall_e")
    torch.manual_seed(seed)
    encoder = dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=VOCAB)
    decoder = dall_e.Decoder(n_init=16, n_hid=64, n_blk_per_group=1, vocab_size=VOCAB)
    # Random output weights send most positions to a few codes; aim each code at a real
    # feature vector instead so the ids are diverse.
    with torch.no_grad():
        x = dall_e.map_pixels(torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1)))
        features = x
        for name, module in encoder.blocks.named_children():
            if name == "output":
                break
            features = module(features)
        features = F.relu(features).permute(0, 2, 3, 1).reshape(-1, features.shape[1])
        pick = torch.randint(0, features.shape[0], (VOCAB,), generator=torch.Generator().manual_seed(seed + 2))
        centres = features[pick]
        # logits = f.c - |c|^2 / 2: the argmax is the nearest centre.
        encoder.blocks.output.conv.w.copy_(centres[:, :, None, None])
        encoder.blocks.output.conv.b.copy_(-0.5 * centres.pow(2).sum(1))
    return encoder, decoder


def _reference_ids(encoder, x):
    with torch.no_grad():
        return torch.argmax(encoder(x), axis=1)


def _reference_pixels(decoder, ids):
    dall_e = reference("dall_e")
    with torch.no_grad():
        z = F.one_hot(ids, num_classes=VOCAB).permute(0, 3, 1, 2).float()
        return dall_e.unmap_pixels(torch.sigmoid(decoder(z).float()[:, :3]))


def _save_official(folder, legacy: bool = False):
    """encoder.pkl / decoder.pkl pickled whole, as OpenAI released them."""
    encoder, decoder = _reference_models()
    torch.save(encoder, folder / "encoder.pkl", _use_new_zipfile_serialization=not legacy)
    torch.save(decoder, folder / "decoder.pkl", _use_new_zipfile_serialization=not legacy)
    return encoder, decoder, folder


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    return _save_official(tmp_path_factory.mktemp("dalle"))


def _pixels(seed: int, batch: int = 4, size: int = 32) -> torch.Tensor:
    return dalle.map_pixels(torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)))


def test_ids_and_pixels_match_openai(official):
    encoder, decoder, folder = official
    codec = dalle.load(find_spec("dalle"), checkpoint=folder)
    assert (codec.name, codec.vocab_size, codec.image_size, codec.downsample, codec.has_decoder) == ("dalle", VOCAB, 256, 8, True)
    x = _pixels(5)
    ids = codec.encode(x)
    assert ids.dtype == torch.int64 and ids.shape == (4, 4, 4)
    assert torch.equal(ids, _reference_ids(encoder, x))
    assert ids.unique().numel() >= 16, "the tiny checkpoint should use many codes"
    pixels = codec.decode(ids)
    assert pixels.shape == (4, 3, 32, 32)
    torch.testing.assert_close(pixels, _reference_pixels(decoder, ids), rtol=1e-5, atol=1e-6)


def test_legacy_torch_format(tmp_path):
    """Pre-1.6 torch wrote a different container; the released files may be either."""
    encoder, decoder, folder = _save_official(tmp_path, legacy=True)
    assert not (folder / "encoder.pkl").read_bytes().startswith(b"PK")
    codec = dalle.load(None, checkpoint=folder)
    x = _pixels(6, batch=2)
    ids = codec.encode(x)
    assert torch.equal(ids, _reference_ids(encoder, x))
    torch.testing.assert_close(codec.decode(ids), _reference_pixels(decoder, ids), rtol=1e-5, atol=1e-6)  # another kernel (a lookup for the one-hot conv)


def test_whole_pipeline_from_images(official):
    encoder, _, folder = official
    codec = load_codec("dalle", checkpoint=folder / "encoder.pkl")  # decoder.pkl beside it is found
    assert codec.has_decoder
    images = [smooth_image(s, w, h) for s, (w, h) in enumerate([(300, 260), (270, 512)])]
    batch = torch.stack([codec.preprocess(im) for im in images])
    assert batch.shape == (2, 3, 256, 256)
    assert torch.equal(codec.encode(batch), _reference_ids(encoder, batch))
    small = torch.stack([codec.preprocess(im, image_size=32) for im in images])
    assert torch.equal(codec.encode(small), _reference_ids(encoder, small))
    with pytest.raises(UsageError, match="multiple of 8"):
        codec.preprocess(images[0], image_size=100)


def test_preprocess_is_the_usage_notebook():
    dall_e = reference("dall_e")
    codec = dalle.DalleCodec(dalle.Encoder(64, 1, 3, VOCAB))
    for seed, (w, h) in enumerate([(300, 260), (1000, 667), (257, 301)]):
        image = smooth_image(seed, w, h)
        # Independent spelling of the notebook's preprocess().
        s = min(image.size)
        r = 256 / s
        resized = image.resize((round(r * image.size[0]), round(r * image.size[1])), Image.LANCZOS)
        expected = dall_e.map_pixels(to_tensor_reference(torchvision_center_crop(resized, 256))[None])[0]
        assert torch.equal(codec.preprocess(image), expected), (w, h)


def test_pixel_mapping_is_bit_identical_to_the_torch_original():
    """teal maps pixels in numpy (thread-friendly); every uint8 value must land where
    ToTensor + dall_e.map_pixels put it."""
    import numpy as np

    from teal_cli.media.image_prep import unit_range

    dall_e = reference("dall_e")
    values = np.arange(256, dtype=np.uint8).reshape(1, 256, 1)
    expected = dall_e.map_pixels(torch.from_numpy(values.copy()).permute(2, 0, 1)[None].to(torch.float32).div(255))
    assert np.array_equal(dalle.map_pixels(unit_range(values)), expected[0].permute(1, 2, 0).numpy())


def test_codebook_is_the_decoders_first_convolution(official):
    _, decoder, folder = official
    codec = dalle.load(None, checkpoint=folder)
    assert codec.codebook.shape == (VOCAB, 16)
    assert torch.equal(codec.codebook, decoder.blocks.input.w.detach()[:, :, 0, 0].t())
    assert "1x1 convolution" in codec.codebook_note and "no explicit codebook" in codec.codebook_note


def test_encoder_alone_has_no_decoder(official, tmp_path):
    _, _, folder = official
    (tmp_path / "enc.pkl").write_bytes((folder / "encoder.pkl").read_bytes())
    codec = dalle.load(None, checkpoint=tmp_path / "enc.pkl")
    assert not codec.has_decoder
    ids = codec.encode(_pixels(1, batch=1))
    with pytest.raises(CodecError, match="no decoder"):
        codec.decode(ids)
    with pytest.raises(CodecError, match="decoder's first layer"):
        codec.codebook


def test_swapped_files_are_refused(official, tmp_path):
    _, _, folder = official
    (tmp_path / "encoder.pkl").write_bytes((folder / "decoder.pkl").read_bytes())
    with pytest.raises(CodecError, match=r"encoder\.pkl: holds dall_e\.decoder\.Decoder"):
        dalle.load(None, checkpoint=tmp_path)


def test_malicious_pickles_are_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "encoder.pkl").write_bytes(malicious_pickle(str(marker)))
    for kind in ("zip", "legacy"):
        (tmp_path / kind).mkdir()
        malicious_torch_file(str(tmp_path / kind / "encoder.pkl"), str(marker), legacy=kind == "legacy")
    for kind in ("plain", "zip", "legacy"):
        with pytest.raises(CodecError, match=r"encoder\.pkl: refusing to load: the pickle asks for '(posix|os)\.system'"):
            dalle.load(None, checkpoint=tmp_path / kind)
    assert not marker.exists()
    # The refusal covers any callable, not only os.system.
    evil = pickle.dumps(type("E", (), {"__reduce__": lambda self: (eval, ("1+1",))})(), protocol=2)
    (tmp_path / "eval.pkl").write_bytes(evil)
    with pytest.raises(CodecError, match=r"builtins\.eval"):
        safe_pickle.load(tmp_path / "eval.pkl")


def test_named_codec_points_at_openai(tmp_path, monkeypatch):
    spec = find_spec("dalle")
    assert spec.options["encoder_file"].url == "https://cdn.openai.com/dall-e/encoder.pkl"
    assert spec.options["decoder_file"].url == "https://cdn.openai.com/dall-e/decoder.pkl"
    monkeypatch.setenv("TEAL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TEAL_OFFLINE", "1")
    with pytest.raises(DownloadError, match=rf"encoder\.pkl.*place it at {tmp_path}/dalle/encoder\.pkl"):
        load_codec("dalle")


@pytest.mark.requires_cuda
def test_cuda_gives_the_cpu_ids(official):
    _, _, folder = official
    codec = dalle.load(None, checkpoint=folder)
    x = _pixels(7, batch=8)
    cpu = codec.encode(x)
    assert torch.equal(codec.to("cuda").encode(x).cpu(), cpu)
    torch.testing.assert_close(codec.decode(cpu), dalle.load(None, checkpoint=folder).decode(cpu), rtol=1e-4, atol=1e-4)
    half = dalle.load(None, checkpoint=folder, dtype=torch.float16).to("cuda")  # the original's GPU path
    assert (half.encode(x).cpu() == cpu).float().mean() > 0.9
