"""Images per second of teal's image tokenize path against the bare encoder, same run.

    python benchmarks/tokenize_image.py --codec vqgan            # VQGAN f16-16384 architecture
    python benchmarks/tokenize_image.py --codec dalle --images 256 --batch-size 64
    python benchmarks/tokenize_image.py --codec beit2 --checkpoint vqkd.pth --device cuda --dtype bfloat16

Arms, on the same images, batch size, device and dtype:

- ``tokenize``: JPEG files on disk -> ``teal_cli.pipeline.tokenize.tokenize_records`` (decode and
  resize in the loaders, value mapping and encode on the device) -> JSONL written to a file.
- ``bare``: ``codec.encode`` on pre-made, preprocessed tensors already on the device: the
  forward pass and codebook lookup alone.
- ``loaders``: the same loader pool (``--workers``, ``--loader``) decoding and resizing every
  image to uint8 with no encoder: the most images per second this host's CPUs can feed.
- ``device resize alone`` (with ``--resize-on device``): decoded images resized and cropped on
  the device by :mod:`teal_cli.media.resample`, upload included, both ways it can run the passes
  (float64 matrix products, int32 gathers), and their ratio.
- ``tokenize, no device work``: the tokenize arm with the device's work replaced by
  constants (``codec.encode`` by a grid of zeros, the value mapping by nothing and, with
  ``--resize-on device``, the resize by an empty batch): the ceiling of the host side of the
  pipeline (loaders, hand-over, upload, launches, JSONL), and the parent process's CPU time
  per image it costs. On a CPU device that leaves out compute the host does in the
  tokenize arm.

Printed: tokenize / bare (the goal on a GPU is >= 0.9 at batch >= 64) and tokenize /
min(bare, loaders), how close teal gets to whichever of the two limits binds. Then where
the tokenize run's main thread spends its time per batch (one more pass with timers:
waiting for the loaders, launching the upload + value mapping + encoder, waiting for the
device's ids, writing JSONL, the rest), which says what a shortfall on a GPU is made of. Then,
single-threaded, where the time of one image goes: decode, geometry (resize, crop),
value mapping + encode (batched, per image), JSON. Without ``--checkpoint`` the codec has random weights in the official
architecture (speed does not depend on the values).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# Loader processes re-import the script that started them (as __mp_main__, multiprocessing's
# rule); keep that as cheap as the `teal` command's own script, which imports no torch.
if __name__ != "__mp_main__":
    import numpy as np
    import torch
    from PIL import Image

    from teal_cli.codecs import beit2, dalle, vqgan
    from teal_cli.runtime.device import resolve_device, resolve_dtype
    from teal_cli.pipeline.loaders import Loaders, default_workers, resolve_loader

VQGAN_F16_16384 = {
    "ddconfig": {"double_z": False, "z_channels": 256, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                 "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [16], "dropout": 0.0},
    "n_embed": 16384,
    "embed_dim": 256,
}


def _randomise(model: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) / max(1.0, p[0].numel()) ** 0.5)
            else:
                p.copy_(torch.ones(p.shape) if "norm" in name and "weight" in name else torch.zeros(p.shape))
    return model.eval().requires_grad_(False)


def build_codec(name: str, checkpoint: str | None, dtype: torch.dtype):
    if checkpoint:
        loader = {"vqgan": vqgan.load, "dalle": dalle.load, "beit2": beit2.load}[name]
        return loader(None, checkpoint=checkpoint, dtype=dtype)
    if name == "vqgan":
        model = _randomise(vqgan.VQModel(**VQGAN_F16_16384))
        return vqgan.VQGANCodec(model, "vqgan-f16-16384", dtype=dtype)
    if name == "dalle":
        return dalle.DalleCodec(_randomise(dalle.Encoder()), _randomise(dalle.Decoder()), dtype=dtype)
    encoder = beit2.ViTEncoder(patch=16, grid=14, dim=768, depth=12, heads=12, hidden=3072)
    model = _randomise(beit2.VQKD(encoder, 8192, 32))
    with torch.no_grad():
        model.quantize.embedding.weight.copy_(torch.nn.functional.normalize(model.quantize.embedding.weight, dim=-1))
    return beit2.Beit2Codec(model, dtype=dtype)


def write_images(folder: Path, count: int) -> list[Path]:
    """JPEGs of assorted sizes around ImageNet's typical 500 x 375, with some structure."""
    rng = np.random.default_rng(0)
    sizes = [(500, 375), (640, 480), (375, 500), (333, 500), (512, 512)]
    paths = []
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        coarse = rng.integers(0, 256, size=(h // 16, w // 16, 3), dtype=np.uint8)
        array = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC)).astype(np.int16)
        array = np.clip(array + rng.integers(-20, 20, size=array.shape), 0, 255).astype(np.uint8)
        path = folder / f"img{i:05d}.jpg"
        Image.fromarray(array).save(path, quality=90)
        paths.append(path)
    return paths


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_tokenize(codec, paths: list[Path], out: Path, batch_size: int, loaders, resize_on: str = "loader") -> tuple[float, int]:
    from teal_cli.media.inputs import iter_input_records
    from teal_cli.records import RecordWriter
    from teal_cli.pipeline.tokenize import TokenizeOptions, tokenize_records

    options = TokenizeOptions(batch_size=batch_size, resize_on=resize_on)
    start = time.perf_counter()
    with open(out, "w") as f:
        count = RecordWriter(f).write_all(tokenize_records(iter_input_records([str(p) for p in paths]), [codec], options,
                                                                   loaders=loaders))
    _sync(codec.device)
    return time.perf_counter() - start, count


def run_bare(codec, batches: list[torch.Tensor]) -> float:
    _sync(codec.device)
    start = time.perf_counter()
    for batch in batches:
        ids = codec.encode(batch)
    ids.cpu()
    _sync(codec.device)
    return time.perf_counter() - start


def run_loaders(codec, paths: list[Path], loaders, batch_size: int, raw_bytes: int = 0) -> float:
    """Seconds for the loader pool alone to decode and resize every image (no encoder), in
    windows of ``batch_size`` with the next window queued, as tokenize does."""
    prep = codec.pixel_prep()
    windows = [[str(p) for p in paths[i : i + batch_size]] for i in range(0, len(paths), batch_size)]
    start = time.perf_counter()
    ahead = loaders.load_images(prep, windows[0], raw_bytes)
    for window in windows[1:] + [None]:
        current, ahead = ahead, loaders.load_images(prep, window, raw_bytes) if window else None
        for i in range(len(current)):
            np.ascontiguousarray(current.result(i)[0])  # read the pixels, as tokenize copies them
        current.release()
    return time.perf_counter() - start


def run_device_resize(codec, paths: list[Path], batch_size: int, matmul: bool) -> float:
    """Images per second of :func:`teal_cli.media.resample.resize_window` alone, on decoded images,
    with its passes as float64 matrix products or as int32 gathers."""
    from teal_cli.media.io import load_image
    from teal_cli.media.pixels import rgb_array, rgbx_array
    from teal_cli.media.resample import resize_window

    prep = codec.pixel_prep()
    # As the loaders hand them over: Pillow's 4 bytes a pixel where it can export them so.
    decoded = [load_image(p) for p in paths[: batch_size * 4]]
    images = [rgb_array(im) if (x := rgbx_array(im)) is None else x for im in decoded]
    windows = [prep.window(im.shape[1], im.shape[0]) for im in images]
    chunks = [(images[i : i + batch_size], windows[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    resize_window(*chunks[0], prep.resample, codec.device, matmul=matmul)  # warm-up
    _sync(codec.device)
    start = time.perf_counter()
    for chunk in chunks:
        resize_window(*chunk, prep.resample, codec.device, matmul=matmul)
    _sync(codec.device)
    return len(images) / (time.perf_counter() - start)


def timed_stages(fn, device) -> dict[str, float]:
    """Seconds of one ``fn()`` pass spent by the main thread in each stage of tokenize
    ("launching" includes queueing the ids' copy back, not waiting for it)."""
    from stages import StageTimer
    from teal_cli.runtime import device as device_module
    from teal_cli.pipeline import tokenize as tokenize_module
    from teal_cli.pipeline.loaders import ImageLoads
    from teal_cli.records import RecordWriter

    timer = StageTimer("waiting for loads", "launching", "waiting for the device", "writing JSONL")
    saved = ImageLoads.result, tokenize_module._encode, device_module.host_copy_later, RecordWriter.write
    ImageLoads.result = timer.timed("waiting for loads", saved[0])
    tokenize_module._encode = timer.timed("launching", saved[1])
    device_module.host_copy_later = lambda tensor: timer.timed("waiting for the device", saved[2](tensor))
    RecordWriter.write = timer.timed("writing JSONL", saved[3])
    try:
        return timer.run(fn, lambda: _sync(device))
    finally:
        ImageLoads.result, tokenize_module._encode, device_module.host_copy_later, RecordWriter.write = saved


def breakdown(codec, paths: list[Path], batch_size: int) -> dict[str, float]:
    """Seconds per image of each stage, run one after the other on one thread."""
    import json

    from teal_cli.media.io import load_image

    n = min(len(paths), batch_size)
    t0 = time.perf_counter()
    images = [load_image(p) for p in paths[:n]]
    t1 = time.perf_counter()
    arrays = [codec.pixel_prep().apply(im)[0] for im in images]
    t2 = time.perf_counter()
    ids = codec.encode(codec.normalize(torch.from_numpy(np.stack(arrays)).to(codec.device)))
    _sync(codec.device)
    t3 = time.perf_counter()
    lines = [json.dumps({"v": 1, "id": str(p), "segments": [{"modality": "image", "codec": codec.name,
                         "shape": list(g.shape), "tokens": g.flatten().tolist()}]}) for p, g in zip(paths, ids.cpu())]
    t4 = time.perf_counter()
    assert len(lines) == n
    return {"decode": (t1 - t0) / n, "geometry": (t2 - t1) / n, "map + encode": (t3 - t2) / n, "json": (t4 - t3) / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codec", choices=["vqgan", "dalle", "beit2"], default="vqgan")
    parser.add_argument("--checkpoint", help="real weights (default: random weights, official architecture)")
    parser.add_argument("--images", type=int, default=None, help="images per arm (default: 4 batches on GPU, 2 on CPU)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--loader", default="auto", choices=["auto", "threads", "processes"])
    parser.add_argument("--nice", type=int, default=None, help="loader processes' priority increment (default: teal's)")
    parser.add_argument("--resize-on", default="loader", choices=["loader", "device"],
                        help="device: loaders only decode; resize and crop on the encoder's device")
    parser.add_argument("--image-dir", help="write the test JPEGs here and reuse them on later runs (default: a temp dir)")
    args = parser.parse_args()

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(0)
    codec = build_codec(args.codec, args.checkpoint, dtype).to(device)
    count = args.images or args.batch_size * (4 if device.type == "cuda" else 2)
    print(f"codec {codec.name} ({args.codec}), device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"dtype {str(dtype).replace('torch.', '')}, batch {args.batch_size}, {count} images, {args.workers} loaders ({resolve_loader(args.loader, args.workers)}), "
          f"resize on the {args.resize_on}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.image_dir or Path(tmp) / "images")
        folder.mkdir(parents=True, exist_ok=True)
        paths = sorted(folder.glob("img*.jpg"))[:count]
        if len(paths) < count:
            paths = write_images(folder, count)
        made = torch.stack([codec.preprocess(Image.open(p).convert("RGB")) for p in paths[: args.batch_size]])
        batches = [made.to(device) for _ in range(count // args.batch_size)]
        codec.encode(batches[0])  # warm-up: kernels, allocator
        bare = run_bare(codec, batches)
        loaders = Loaders(args.workers, args.loader, **({} if args.nice is None else {"nice": args.nice}))
        t0 = time.perf_counter()
        loaders.start()
        started = time.perf_counter() - t0
        cpu = time.process_time()
        seconds, written = run_tokenize(codec, paths, Path(tmp) / "out.jsonl", args.batch_size, loaders, args.resize_on)
        tok_cpu = (time.process_time() - cpu) / count
        bare2 = run_bare(codec, batches)  # again after, to see drift (clocks, other load)
        assert written == count, (written, count)
        bare_ips = len(batches) * args.batch_size / min(bare, bare2)
        tok_ips = count / seconds
        print(f"bare encoder forward : {bare_ips:9.1f} images/s  (runs: {len(batches) * args.batch_size / bare:.1f}, {len(batches) * args.batch_size / bare2:.1f})")
        print(f"teal tokenize        : {tok_ips:9.1f} images/s  (decode + resize + map + encode + JSONL write)")
        stages = timed_stages(lambda: run_tokenize(codec, paths, Path(tmp) / "out.jsonl", args.batch_size, loaders,
                                                   args.resize_on), codec.device)
        cpu = time.process_time()
        from teal_cli.pipeline.loaders import RAW_BYTES

        load_ips = count / run_loaders(codec, paths, loaders, args.batch_size, RAW_BYTES if args.resize_on == "device" else 0)
        load_cpu = (time.process_time() - cpu) / count
        if args.resize_on == "device":
            from teal_cli.media.resample import matmul_suits

            gather, matmul = (run_device_resize(codec, paths, args.batch_size, m) for m in (False, True))
            used = "matmul" if matmul_suits(torch.device(codec.device)) else "gathers"
            print(f"device resize alone  : {matmul:9.1f} images/s as float64 matmuls, {gather:.1f} as int32 gathers "
                  f"(x{matmul / gather:.2f}; teal uses {used} here; decoded images in memory -> upload -> resize + crop)")
        grid = codec.encode(batches[0][:1]).shape[1:]
        codec.encode = lambda pixels: torch.zeros((pixels.shape[0], *grid), dtype=torch.long, device=pixels.device)
        codec.normalize = lambda pixels: pixels
        from teal_cli.media import resample

        resize_window = resample.resize_window
        if args.resize_on == "device":  # device work too: what is left is the host's
            empty: dict[tuple, torch.Tensor] = {}  # one batch per shape, made once: no host work per call

            def no_resize(images, windows, *_, **__):
                shape = (len(images), windows[0][5], windows[0][4], 3)
                if shape not in empty:
                    empty[shape] = torch.zeros(shape, dtype=torch.uint8, device=codec.device)
                return empty[shape]

            resample.resize_window = no_resize
        cpu = time.process_time()
        host_seconds, _ = run_tokenize(codec, paths, Path(tmp) / "out.jsonl", args.batch_size, loaders, args.resize_on)
        host_cpu = (time.process_time() - cpu) / count
        del codec.encode, codec.normalize
        resample.resize_window = resize_window
        loaders.close()
        print(f"loader start         : {started:9.3f} s once per run (not in the rates; {loaders.kind})")
        print(f"loaders alone        : {load_ips:9.1f} images/s  (decode{'' if args.resize_on == 'device' else ' + resize to uint8'}, no encoder)")
        print(f"tokenize, no device  : {count / host_seconds:9.1f} images/s  (the host side's ceiling: no encoder, "
              f"value mapping{' or resize' if args.resize_on == 'device' else ''})")
        print(f"parent CPU per image : {tok_cpu * 1000:9.3f} ms tokenize, {host_cpu * 1000:.3f} ms with no device work, "
              f"{load_cpu * 1000:.3f} ms loaders alone (all threads of this process)")
        print(f"ratio                : {tok_ips / bare_ips:9.3f}  (tokenize / bare)")
        print(f"ratio to the limit   : {tok_ips / min(bare_ips, load_ips):9.3f}  (tokenize / min(bare, loaders): "
              f"{'encoder' if bare_ips <= load_ips else 'loaders'}-bound)")
        n_batches = -(-count // args.batch_size)
        print("tokenize main thread, per batch: " + ", ".join(f"{k} {v / n_batches * 1000:.1f} ms" for k, v in stages.items()))
        parts = breakdown(codec, paths, args.batch_size)
        total = sum(parts.values())
        print("one thread, per image: " + ", ".join(f"{k} {v * 1000:.2f} ms ({v / total:.0%})" for k, v in parts.items()))


if __name__ == "__main__":
    main()
