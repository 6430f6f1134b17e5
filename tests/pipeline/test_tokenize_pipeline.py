"""The tokenize pipeline: loader threads and processes give the same records, the value
mapping by table is exact on every device, and a dying loader process is a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from teal_cli.errors import DataError, UsageError
from teal_cli.media.inputs import iter_input_records
from teal_cli.pipeline.loaders import Loaders, resolve_loader
from teal_cli.pipeline.tokenize import TokenizeOptions, tokenize_records


@pytest.fixture
def images(tmp_path, photo_path):
    """The photo, a crop of it whose sides are not multiples of 4 (padded: a 'size' field),
    and an RGBA PNG, in a folder."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    photo = Image.open(photo_path).convert("RGB")
    photo.resize((96, 64)).save(folder / "a.jpg", quality=95)
    photo.crop((10, 10, 77, 51)).save(folder / "b.png")
    rgba = photo.resize((40, 40)).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "c.png")
    return folder


@pytest.fixture
def patch_codec(tmp_path, images):
    from helpers import fit_patch_codec

    return fit_patch_codec(images, tmp_path / "patch-p4-k32", k=32)


def _records(folder, codec, loaders=None, **options):
    out = tokenize_records(iter_input_records([str(folder)]), [codec], TokenizeOptions(**options), loaders=loaders)
    return [r.to_json() for r in out]


def test_process_loaders_give_the_thread_records(images, patch_codec):
    threads = _records(images, patch_codec, loader="threads", workers=2, batch_size=2)
    with Loaders(2, "processes").start() as loaders:
        assert loaders.using_processes
        processes = _records(images, patch_codec, loaders, batch_size=2)
    assert processes == threads
    assert len(threads) == 3
    padded = [r for r in threads if r["segments"][0].get("size")]
    assert [r["segments"][0]["size"] for r in padded] == [[41, 67]]  # b.png, cropped 67 x 41
    assert padded[0]["segments"][0]["shape"] == [11, 17]


def test_processes_take_over_from_threads_once_started(images, patch_codec, monkeypatch):
    """Small jobs stay on threads; past PROCESS_AFTER images the processes start in the
    background and later windows go to them, with the same records either way."""
    import time

    import teal_cli.pipeline.loaders as loaders_module

    expected = _records(images, patch_codec, loader="threads", workers=2)
    with Loaders(2, "processes") as loaders:
        assert _records(images, patch_codec, loaders) == expected  # 3 jobs: below the threshold
        assert loaders._starter is None and not loaders.using_processes
        monkeypatch.setattr(loaders_module, "PROCESS_AFTER", 4)
        assert _records(images, patch_codec, loaders) == expected  # job 4 starts the pool
        deadline = time.time() + 60
        while not loaders.using_processes and time.time() < deadline:
            time.sleep(0.05)
        assert loaders.using_processes
        assert _records(images, patch_codec, loaders) == expected


def test_a_dying_loader_process_is_a_clear_error(images, patch_codec, monkeypatch):
    from helpers import CrashingPrep

    monkeypatch.setattr(type(patch_codec), "pixel_prep", lambda self, size=None: CrashingPrep())
    with Loaders(2, "processes").start() as loaders:
        with pytest.raises(DataError, match="an image loader process died"):
            _records(images, patch_codec, loaders)


def test_closing_skips_the_loads_still_queued(images):
    """Closing does not run the jobs still queued: 20 jobs of 0.5 s for 2 workers would take 5 s."""
    import time

    from helpers import SlowPrep

    with Loaders(2, "processes").start() as loaders:
        loads = [loaders.load_images(SlowPrep(), [str(images / "a.jpg")]) for _ in range(20)]
        loads[0].result(0)
        start = time.perf_counter()
    assert time.perf_counter() - start < 2.5


def test_a_bug_in_a_loader_job_fails_its_images_and_later_loads_still_match(images):
    """A job that fails as a whole (not a bad file) raises for each of its images; the loads
    queued after it still get their own images."""
    from helpers import BuggyPrep

    from teal_cli.pipeline.loaders import load_image_job
    from teal_cli.media.pixels import PixelPrep

    paths = [str(images / name) for name in ("a.jpg", "b.png", "c.png")]
    with Loaders(2, "processes").start() as loaders:
        bad = loaders.load_images(BuggyPrep(), paths)
        good = loaders.load_images(PixelPrep("square", 8), paths)
        for i in range(len(bad)):
            with pytest.raises(ValueError, match="a bug in a loader"):
                bad.result(i)
        for i, path in enumerate(paths):
            assert np.array_equal(good.result(i)[0].numpy(), load_image_job(PixelPrep("square", 8), path)[0])


def test_loader_choice():
    assert resolve_loader("auto", 16) == "processes" and resolve_loader("auto", 4) == "threads"
    assert resolve_loader("threads", 16) == "threads"
    with pytest.raises(UsageError, match="--loader forks"):
        resolve_loader("forks", 4)
    with pytest.raises(UsageError, match="--workers 0"):
        Loaders(0)


def test_bad_image_size_fails_before_reading_files(images, patch_codec):
    with pytest.raises(UsageError, match="not a multiple of the patch size"):
        _records(images, patch_codec, image_size=30)


def _table_codecs():
    """Every image codec's value table, without weights (pixel_table needs none)."""
    from teal_cli.codecs.beit2 import Beit2Codec
    from teal_cli.codecs.dalle import DalleCodec
    from teal_cli.codecs.vqgan import VQGANCodec

    return [object.__new__(cls) for cls in (VQGANCodec, DalleCodec, Beit2Codec)]


@pytest.mark.parametrize("index", range(3))
def test_normalize_is_the_table_in_channel_first_layout(index):
    codec = _table_codecs()[index]
    pixels = torch.randint(0, 256, (2, 5, 7, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(index))
    out = codec.normalize(pixels)
    table = torch.from_numpy(codec.pixel_table())
    assert out.shape == (2, 3, 5, 7) and out.dtype == torch.float32
    assert torch.equal(out, table[pixels.permute(0, 3, 1, 2).long()])
    with pytest.raises(ValueError, match="uint8"):
        codec.normalize(pixels.float())


@pytest.mark.requires_cuda
def test_normalize_on_cuda_equals_cpu():
    pixels = torch.arange(256, dtype=torch.uint8).repeat(3 * 4).reshape(4, 16, 16, 3)
    for codec in _table_codecs():
        assert torch.equal(codec.normalize(pixels.cuda()).cpu(), codec.normalize(pixels)), type(codec).__name__


@pytest.mark.requires_cuda
def test_tokenize_on_cuda_gives_the_cpu_records(images, patch_codec):
    cpu = _records(images, patch_codec, loader="threads", workers=2)
    with Loaders(2, "processes").start() as loaders:
        gpu = _records(images, patch_codec.to("cuda"), loaders)
    assert gpu == cpu


@pytest.mark.parametrize("depth", [1, 2])
def test_pipeline_stage_order(depth):
    """start(N+1) precedes launch(N), emit(N-depth) follows launch(N), results keep input order."""
    from teal_cli.pipeline.prefetch import pipeline

    log = []
    out = list(pipeline(range(5), lambda c: log.append(("start", c)) or c, lambda c: log.append(("launch", c)) or c,
                        lambda c: log.append(("emit", c)) or [c * 10], depth))
    assert out == [0, 10, 20, 30, 40]
    for n in range(5):
        if n + 1 < 5:
            assert log.index(("start", n + 1)) < log.index(("launch", n))
        assert log.index(("launch", n)) < log.index(("emit", n))
        if n + depth < 5:
            assert log.index(("launch", n + depth)) < log.index(("emit", n))
        if n + depth + 1 < 5:
            assert log.index(("emit", n)) < log.index(("launch", n + depth + 1))


def test_a_bad_file_in_a_loader_process_is_reported_and_skipped(images, patch_codec):
    """Errors raised in a loader process come back as teal errors naming the file."""
    (images / "d.png").write_bytes(b"not a png at all")
    warnings = []
    with Loaders(2, "processes").start() as loaders:
        out = tokenize_records(iter_input_records([str(images)]), [patch_codec], TokenizeOptions(on_error="skip"),
                               warn=warnings.append, loaders=loaders)
        ids = [r.id for r in out]
        with pytest.raises(DataError, match=r"d\.png: cannot read image"):
            list(tokenize_records(iter_input_records([str(images)]), [patch_codec], TokenizeOptions(), loaders=loaders))
    assert len(ids) == 3 and not any("d.png" in i for i in ids)
    assert len(warnings) == 1 and "d.png" in warnings[0] and "cannot read image" in warnings[0]


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_fixed_size_images_over_many_windows_give_the_thread_records(images, patch_codec, batch_size):
    """A fixed output shape (one tensor per job) over many windows, with loads of one window
    queued while the last is read, and the loader's passes running dry between calls."""
    for i in range(6):
        Image.open(images / "a.jpg").rotate(15 * i).save(images / f"r{i}.jpg")
    threads = _records(images, patch_codec, loader="threads", workers=2, batch_size=batch_size, image_size=16)
    with Loaders(2, "processes").start() as loaders:
        for _ in range(2):
            assert _records(images, patch_codec, loaders, batch_size=batch_size, image_size=16) == threads
    assert len(threads) == 9


def test_a_bad_file_inside_a_job_leaves_the_others_in_place(images, patch_codec):
    """A skipped image leaves a gap in its job: the others are read at their own rows, and
    give the records of the threads."""
    for i in range(3):
        Image.open(images / "a.jpg").rotate(20 * i).save(images / f"r{i}.jpg")
    threads = _records(images, patch_codec, loader="threads", workers=2, batch_size=8, image_size=16)
    (images / "bb.png").write_bytes(b"not a png")  # sorts between b.png and c.png
    with Loaders(2, "processes").start() as loaders:
        shared = _records(images, patch_codec, loaders, batch_size=8, image_size=16, on_error="skip")
    assert shared == threads and len(shared) == 6


def test_loader_processes_run_below_the_parent_priority(images):
    import os

    from helpers import NicePrep

    from teal_cli.pipeline.loaders import LOADER_NICE

    def nice(loaders):
        load = loaders.load_images(NicePrep(), [str(images / "a.jpg")])
        return int(load.result(0)[0][0, 0, 0])

    with Loaders(2, "processes").start() as loaders:
        assert nice(loaders) == min(19, os.nice(0) + LOADER_NICE)
    with Loaders(2, "processes", nice=0).start() as loaders:
        assert nice(loaders) == os.nice(0)


def test_loader_processes_go_when_the_parent_is_killed(images, tmp_path):
    """SIGKILL leaves no cleanup to the parent: the workers notice and exit."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    script = tmp_path / "parent.py"
    script.write_text(f"""
import os, sys, time
from teal_cli.pipeline.loaders import Loaders
from teal_cli.media.pixels import PixelPrep
if __name__ == "__main__":
    loaders = Loaders(2, "processes").start()
    load = loaders.load_images(PixelPrep("square", 16), [{str(images / "a.jpg")!r}] * 4)
    [load.result(i) for i in range(len(load))]
    print(*(w.pid for w in loaders._iterator._workers), flush=True)
    time.sleep(120)
""")
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        workers = parent.stdout.readline().split()
        assert len(workers) == 2
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()

    def alive(pid):
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        return True

    deadline = time.time() + 30
    while any(map(alive, workers)) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(map(alive, workers)), "loader processes outlived their parent"


def test_pack_and_unpack_round_trip():
    from teal_cli.runtime.device import pack, unpack

    parts = [torch.arange(5, dtype=torch.float64), torch.ones(2, 3), torch.zeros(0), torch.full((1, 2, 2), 7.0)]
    packed = pack(parts, torch.float32)
    assert packed.shape == (15,) and packed.dtype == torch.float32
    out = unpack(packed, parts)
    assert [o.shape for o in out] == [p.shape for p in parts]
    assert all(torch.equal(o, p.float()) for o, p in zip(out, parts))
    # Read-only numpy arrays (decoded images) beside tensors.
    image = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    image.flags.writeable = False
    mixed = [image, torch.full((2, 2), 7, dtype=torch.uint8)]
    back = unpack(pack(mixed, torch.uint8), mixed)
    assert back[0].shape == (2, 3, 4) and np.array_equal(back[0].numpy(), image) and torch.equal(back[1], mixed[1])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.requires_cuda)])
def test_upload_rows_pads_each_tensor_with_zeros(device):
    from teal_cli.runtime.device import upload_rows

    parts = [torch.arange(1, 6, dtype=torch.float64), torch.full((3,), -2.0), torch.zeros(0), torch.ones(7)]
    # Pinned buffers are reused: a stale one must not leak its old values into the padding.
    for fill in (9.0, 5.0):
        upload_rows([torch.full((7,), fill)] * 4, 7, torch.device(device), torch.float32)
        rows = upload_rows(parts, 7, torch.device(device), torch.float32)
        assert rows.device.type == device and rows.dtype == torch.float32 and rows.shape == (4, 7)
        expected = torch.zeros(4, 7)
        for row, part in zip(expected, parts):
            row[: part.numel()] = part
        assert torch.equal(rows.cpu(), expected)


@pytest.mark.requires_cuda
def test_upload_flat_gives_each_tensor_on_the_device():
    from teal_cli.runtime.device import upload_flat

    parts = [torch.arange(5, dtype=torch.float64), torch.ones(2, 3), torch.zeros(0)]
    out = upload_flat(parts, torch.device("cuda"), torch.float32)
    assert [o.device.type for o in out] == ["cuda"] * 3 and all(o.dtype == torch.float32 for o in out)
    for o, p in zip(out, parts):
        assert torch.equal(o.cpu(), p.float())
