"""Seconds of audio per second: Whisper feature extraction as ``teal cluster`` runs it, against
the bare encoder forward on ready-made mel windows, in one run on one device.

    python benchmarks/audio_features.py                         # whisper-small shapes, random weights
    python benchmarks/audio_features.py --checkpoint small.pt   # real weights (any format teal loads)
    python benchmarks/audio_features.py --device cuda --clips 2048 --seconds 10 --batch 32
    python benchmarks/audio_features.py --device cuda --format flac          # files as 16-bit FLAC

Rows:
- ``bare encoder``: ``encoder(mel)`` up to ``--layer`` on ``[batch, n_mels, 3000]`` windows already
  on the device (no front end, no copies): the floor teal can reach.
- ``extract (batched)``: ``WhisperFeatures.extract`` on ``--batch`` waveforms at a time
  (log-mel, windowing, trimming, dtype handling): the goal is >= 90 % of the bare rate on GPU.
- ``teal cluster path``: ``teal_cli.cluster.fit.iter_features`` over files on disk (decode,
  resample check, extract), as ``teal cluster`` runs it: float WAV (``--format wav``, reads
  cost next to nothing) or 16-bit FLAC (``--format flac``, as LibriSpeech ships: ~1.9 ms of
  a core per 10 s clip, so the loaders' count matters; ``--workers``).
- ``cluster, in memory``: the same with the file reads replaced by the decoded clips: what
  the loaders cost the main thread.
Then one more pass of the cluster path with timers: where the main thread's time goes per
batch (waiting for the loaders, launching the extractor, waiting for the GPU, the rest), and
the tensor operations (about the kernels) one batch dispatches, bare and in the cluster path.
Each row gets a warm-up pass, then the fastest of three timed passes counts. Every clip is shorter than 30 s, so each costs one window.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from teal_cli.media import logmel as audio  # noqa: E402
from teal_cli.features.whisper import EncoderDims, WhisperFeatures, resolve_checkpoint  # noqa: E402

SMALL = EncoderDims(n_mels=80, n_audio_ctx=1500, n_audio_state=768, n_audio_head=12, n_audio_layer=12)


def random_small() -> dict:
    from teal_cli.features.whisper import build_encoder

    torch.manual_seed(0)
    encoder = build_encoder(SMALL)
    with torch.no_grad():
        for p in encoder.parameters():
            p.normal_(0, 0.02)
    return {"model": "whisper-small(random)", "dims": SMALL, "state": encoder.state_dict(), "sha256": "", "path": "", "format": ""}


DISTINCT = 64  # clips made; more are repeats of these (and hard links on disk)


def clips(n: int, seconds: float) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t = torch.arange(int(seconds * audio.SAMPLE_RATE)) / audio.SAMPLE_RATE
    out = []
    for i in range(min(n, DISTINCT)):
        f0 = 100 + 10 * (i % 7)
        wave = sum(torch.sin(2 * math.pi * f0 * k * t) / k for k in range(1, 8)) * (0.5 + 0.5 * torch.sin(2 * math.pi * 3 * t))
        out.append((0.2 * wave + 0.01 * torch.randn(t.shape, generator=g)).float())
    return [out[i % len(out)] for i in range(n)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(fn, audio_seconds: float, device: torch.device, repeat: int = 3) -> float:
    """Audio seconds per second of ``fn``: a warm-up, then the fastest of ``repeat`` passes
    (other load on the host only ever makes a pass slower)."""
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return audio_seconds / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--layer", default="11")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--clips", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--format", choices=("wav", "flac"), default="wav", help="files for the cluster path")
    parser.add_argument("--workers", type=int, default=None, help="cluster loader threads (default: one per core, at most 16)")
    args = parser.parse_args()
    device = torch.device(args.device)
    n_clips = args.clips or (2048 if device.type == "cuda" else 8)  # a GPU pass of 2,048 clips: ~1 s
    batch = args.batch or (16 if device.type == "cuda" else 4)

    found = resolve_checkpoint("whisper", args.checkpoint) if args.checkpoint else random_small()
    extractor = WhisperFeatures(found["model"], found["dims"], found["state"], args.layer, sha256=found["sha256"],
                                dtype=args.dtype, device=str(device), batch_size=batch)
    waves = clips(n_clips, args.seconds)
    total = n_clips * args.seconds
    layer = None if extractor.layer == "final" else extractor.layer
    print(f"{found['model']} layer {extractor.layer}, {device} {extractor.dtype}, {n_clips} clips x {args.seconds:g} s, "
          f"batch {batch}, {args.format} files", file=sys.stderr)

    mel = torch.stack([extractor.windows(w)[0][0] for w in waves[:batch]]).to(device, extractor.dtype)
    n_batches = math.ceil(n_clips / batch)

    def bare():
        with torch.inference_mode():
            for _ in range(n_batches):
                extractor.encoder(mel, layer=layer)

    def batched():
        for i in range(0, n_clips, batch):
            extractor.extract(waves[i : i + batch])

    rows = [("bare encoder", rate(bare, total, device)), ("extract (batched)", rate(batched, total, device))]
    import soundfile as sf

    from teal_cli.cluster import fit as cluster

    with tempfile.TemporaryDirectory() as tmp:
        items = []
        for i, w in enumerate(waves):
            path = os.path.join(tmp, f"clip{i}.{args.format}")
            if i < DISTINCT:
                sf.write(path, w.numpy(), audio.SAMPLE_RATE, subtype="FLOAT" if args.format == "wav" else "PCM_16")
            else:
                os.link(items[i % DISTINCT][0], path)
            items.append((path, path))
        options = cluster.ClusterOptions(batch_size=batch, workers=args.workers)

        def cluster_path():
            for _ in cluster.iter_features(items, extractor, options, cluster.ClusterReport()):
                pass

        rows.append(("teal cluster path", rate(cluster_path, total, device)))
        in_memory = {path: cluster._load(extractor, path, options) for path, _ in items}
        load = cluster._load
        cluster._load = lambda extractor, path, options: in_memory[path]
        try:
            rows.append(("cluster, in memory", rate(cluster_path, total, device)))
        finally:
            cluster._load = load
        stages = timed_stages(cluster_path, device)

    floor = rows[0][1]
    print(f"{'method':<20} {'audio s / s':>12} {'vs bare':>8}")
    for name, value in rows:
        print(f"{name:<20} {value:>12.1f} {value / floor:>8.0%}")
    n_batches = math.ceil(n_clips / batch)
    print("cluster path, main thread per batch: " + ", ".join(f"{k} {v / n_batches * 1000:.1f} ms" for k, v in stages.items()))
    from stages import count_ops

    with torch.inference_mode():
        bare_ops = count_ops(lambda: extractor.encoder(mel, layer=layer))
    path_ops = count_ops(lambda: cluster._finite_flags(cluster._extract_batch(extractor, waves[:batch]))())
    print(f"tensor operations per batch (about the kernels launched): bare encoder {bare_ops}, cluster path {path_ops}")


def timed_stages(fn, device: torch.device) -> dict[str, float]:
    """Seconds of one ``fn()`` pass spent by the main thread in each stage of iter_features."""
    from concurrent.futures import Future

    from stages import StageTimer
    from teal_cli.cluster import fit as cluster

    timer = StageTimer("waiting for loads", "launching the extractor", "waiting for the GPU")
    saved = Future.result, cluster._extract_batch, cluster._finite_flags
    Future.result = timer.timed("waiting for loads", saved[0])
    cluster._extract_batch = timer.timed("launching the extractor", saved[1])
    cluster._finite_flags = lambda feats: timer.timed("waiting for the GPU", saved[2](feats))
    try:
        return timer.run(fn, lambda: sync(device))
    finally:
        Future.result, cluster._extract_batch, cluster._finite_flags = saved


if __name__ == "__main__":
    main()
