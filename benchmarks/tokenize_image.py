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
- ``tokenize, no device work``: the tokenize arm with the device's work replaced by
  constants (``codec.encode`` by a grid of zeros, the value mapping by nothing): the
  ceiling of the host side of the
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

``--against REV`` compares the loaders alone with those of a git revision instead (e.g. the
last one with teal's own process pool, before the DataLoader: ``--against d2c201c``), at the
same ``--workers`` and ``--loader``: each of ``--repeats`` rounds runs both, in alternating
order, each in a fresh process on the BEiT-v2 geometry (224 px crop), and the ratio of the
medians is printed. Run it on an otherwise idle machine, or repeat more.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

# TEAL_TREE: the teal tree to import (--against runs a git revision's loaders that way).
sys.path.insert(0, os.environ.get("TEAL_TREE") or os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

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


def run_tokenize(codec, paths: list[Path], out: Path, batch_size: int, loaders) -> tuple[float, int]:
    from teal_cli.media.inputs import iter_input_records
    from teal_cli.records import RecordWriter
    from teal_cli.pipeline.tokenize import TokenizeOptions, tokenize_records

    options = TokenizeOptions(batch_size=batch_size)
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


def run_loaders(prep, paths: list[Path], loaders, batch_size: int) -> float:
    """Seconds for the loader pool alone to decode and resize every image (no encoder), in
    windows of ``batch_size`` with the next window queued, as tokenize does."""
    windows = [[str(p) for p in paths[i : i + batch_size]] for i in range(0, len(paths), batch_size)]
    start = time.perf_counter()
    ahead = loaders.load_images(prep, windows[0])
    for window in windows[1:] + [None]:
        current, ahead = ahead, loaders.load_images(prep, window) if window else None
        for i in range(len(current)):
            np.ascontiguousarray(current.result(i)[0])  # read the pixels, as tokenize copies them
        getattr(current, "release", lambda: None)()  # (teal's own pool, up to d2c201c, recycled shared memory)
    return time.perf_counter() - start


def loaders_rate(folder: str, count: int, batch_size: int, workers: int, loader: str) -> None:
    """In a fresh process (``--against``): print images/s of the loaders alone of the teal
    tree on ``sys.path`` and this process's CPU ms per image (BEiT-v2 geometry, after a
    warm-up pass over one window)."""
    from teal_cli.media.pixels import PixelPrep

    prep = PixelPrep("shorter", 256, Image.BICUBIC, crop=224)
    paths = sorted(Path(folder).glob("img*.jpg"))[:count]
    with Loaders(workers, loader) as loaders:
        loaders.start()
        run_loaders(prep, paths[:batch_size], loaders, batch_size)
        cpu = time.process_time()
        rate = count / run_loaders(prep, paths, loaders, batch_size)
        print(rate, (time.process_time() - cpu) / count * 1000)


def against(rev: str, args, count: int) -> None:
    """The loaders alone of the working tree and of git revision ``rev``, alternating."""
    import statistics
    import subprocess

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "old"
        old.mkdir()
        archive = subprocess.run(["git", "-C", root, "archive", rev, "teal_cli"], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        folder = Path(args.image_dir or Path(tmp) / "images")
        folder.mkdir(parents=True, exist_ok=True)
        if len(list(folder.glob("img*.jpg"))) < count:
            write_images(folder, count)
        rates: dict[str, list[float]] = {rev: [], "this tree": []}
        cpu: dict[str, list[float]] = {rev: [], "this tree": []}
        for r in range(args.repeats):
            for name in (rev, "this tree") if r % 2 == 0 else ("this tree", rev):
                tree = str(old) if name == rev else os.path.abspath(root)
                # PYTHONPATH too, and a neutral working directory: loader processes start from a
                # fork server, which imports from both (the working directory first).
                env = {**os.environ, "TEAL_TREE": tree, "PYTHONPATH": os.pathsep.join([tree, os.environ.get("PYTHONPATH", "")])}
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "--loaders-rate", str(folder), "--images",
                                      str(count), "--batch-size", str(args.batch_size), "--workers", str(args.workers),
                                      "--loader", args.loader], env=env, cwd=tmp, capture_output=True, text=True)
                if out.returncode != 0:
                    sys.exit(f"{name}: {out.stderr}")
                rate, ms = map(float, out.stdout.split()[-2:])
                rates[name].append(rate)
                cpu[name].append(ms)
                print(f"round {r + 1}: {name:>10}: {rate:7.1f} images/s, parent CPU {ms:.3f} ms/image", flush=True)
    medians = {name: statistics.median(v) for name, v in rates.items()}
    for name, v in rates.items():
        print(f"{name:>10}: median {medians[name]:.1f} images/s (min {min(v):.1f}, max {max(v):.1f}, {len(v)} runs), "
              f"parent CPU median {statistics.median(cpu[name]):.3f} ms/image")
    paired = statistics.median(new / old for new, old in zip(rates["this tree"], rates[rev]))
    print(f"this tree / {rev}: {medians['this tree'] / medians[rev]:.3f} (ratio of medians), "
          f"{paired:.3f} (median of the rounds' ratios)")


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
    parser.add_argument("--against", metavar="REV", help="compare the loaders alone with those of this git revision")
    parser.add_argument("--repeats", type=int, default=6, help="--against: rounds (each runs both)")
    parser.add_argument("--loaders-rate", metavar="FOLDER", help=argparse.SUPPRESS)
    parser.add_argument("--image-dir", help="write the test JPEGs here and reuse them on later runs (default: a temp dir)")
    args = parser.parse_args()
    if args.loaders_rate:
        return loaders_rate(args.loaders_rate, args.images, args.batch_size, args.workers, args.loader)
    if args.against:
        return against(args.against, args, args.images or 512)

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(0)
    codec = build_codec(args.codec, args.checkpoint, dtype).to(device)
    count = args.images or args.batch_size * (4 if device.type == "cuda" else 2)
    print(f"codec {codec.name} ({args.codec}), device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"dtype {str(dtype).replace('torch.', '')}, batch {args.batch_size}, {count} images, {args.workers} loaders ({resolve_loader(args.loader, args.workers)})", flush=True)

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
        seconds, written = run_tokenize(codec, paths, Path(tmp) / "out.jsonl", args.batch_size, loaders)
        tok_cpu = (time.process_time() - cpu) / count
        bare2 = run_bare(codec, batches)  # again after, to see drift (clocks, other load)
        assert written == count, (written, count)
        bare_ips = len(batches) * args.batch_size / min(bare, bare2)
        tok_ips = count / seconds
        print(f"bare encoder forward : {bare_ips:9.1f} images/s  (runs: {len(batches) * args.batch_size / bare:.1f}, {len(batches) * args.batch_size / bare2:.1f})")
        print(f"teal tokenize        : {tok_ips:9.1f} images/s  (decode + resize + map + encode + JSONL write)")
        stages = timed_stages(lambda: run_tokenize(codec, paths, Path(tmp) / "out.jsonl", args.batch_size, loaders),
                              codec.device)
        cpu = time.process_time()
        load_ips = count / run_loaders(codec.pixel_prep(), paths, loaders, args.batch_size)
        load_cpu = (time.process_time() - cpu) / count
        grid = codec.encode(batches[0][:1]).shape[1:]
        codec.encode = lambda pixels: torch.zeros((pixels.shape[0], *grid), dtype=torch.long, device=pixels.device)
        codec.normalize = lambda pixels: pixels
        cpu = time.process_time()
        host_seconds, _ = run_tokenize(codec, paths, Path(tmp) / "out.jsonl", args.batch_size, loaders)
        host_cpu = (time.process_time() - cpu) / count
        del codec.encode, codec.normalize
        loaders.close()
        print(f"loader start         : {started:9.3f} s once per run (not in the rates; {loaders.kind})")
        print(f"loaders alone        : {load_ips:9.1f} images/s  (decode + resize to uint8, no encoder)")
        print(f"tokenize, no device  : {count / host_seconds:9.1f} images/s  (the host side's ceiling: no encoder, "
              f"value mapping)")
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
