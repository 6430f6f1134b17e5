"""Training tokens/s: teal train's step against a bare frozen forward + backward of the same LLM on
the same batches, in one run (noise from other processes hits both arms alike).

    python benchmarks/train_step.py                      # SmolLM2-135M (smollm2-135m), CPU, batch 32
    python benchmarks/train_step.py --tiny               # a tiny random Llama (smoke test)
    python benchmarks/train_step.py --device cuda --batch-size 32 --stage 2

Arms (same batches, same sequence lengths, same padding):
- ``teal step``: what ``teal train`` runs per step (:class:`teal_cli.train.loop.TrainStep` under
  the loop's autocast): records read by offset and encoded, collated, joint embedding (text,
  boundary, codec ids), the LLM forward, logits only at target positions (text head + boundary
  + codec heads), cross-entropy, backward, clipping, AdamW on what trains (stage 1: projections;
  stage 2: E, O, projections, boundary rows, bias-norm).
- ``bare LM, target logits``: the frozen LLM on ready-made input embeddings that need a
  gradient (so backward runs through every layer, as it must for any input-side adapter), its
  own LM head at the target positions, cross-entropy, backward. The floor teal can reach.
- ``bare LM, all logits``: the same with the LM head on every position (what
  ``model(..., labels=...)`` does in transformers), for reference.

Printed: tokens/s of each (the fastest of ``--repeats`` interleaved passes), the ratio teal /
bare (goal >= 0.9), and peak memory during each arm: RSS on the CPU (sampled every 2 ms, and
above the level before the arm), peak allocated on CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from teal_cli.runtime.device import autocast, fit_threads_to_cpus, resolve_device, resolve_dtype  # noqa: E402

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def build(args, work: Path):
    from teal_cli.codecs.kmeans_codec import load_codec_dir, save_codec_dir
    from teal_cli.features.patch import PatchFeatures
    from teal_cli.model import init_model
    from teal_cli.model.llm import load_base_llm

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.tiny:
        from tiny_llm import make_tiny_llm

        name = str(make_tiny_llm(work / "tiny-llama", "llama", hidden=64))
    else:
        name = args.llm
    gen = torch.Generator().manual_seed(0)
    codec = save_codec_dir(work / "patch-p2-k64", PatchFeatures(2, image_size=8), torch.rand(64, 12, generator=gen), {})
    base = load_base_llm(name, dtype=dtype, device=device)
    model = init_model(base, [load_codec_dir(codec)], image_size=8)
    return model, device, dtype


def records(path: Path, n: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            k = i % 10
            f.write(json.dumps({"v": 1, "id": str(i), "segments": [
                {"modality": "text", "text": "Image:", "role": "prompt"},
                {"modality": "image", "codec": "patch-p2-k64", "shape": [4, 4],
                 "tokens": [rng.randrange(64) for _ in range(16)], "role": "prompt"},
                {"modality": "text", "text": " The handwritten digit in the image is", "role": "prompt"},
                {"modality": "text", "text": f" {WORDS[k]}", "role": "target"}]}) + "\n")


class PeakRSS:
    """Peak resident memory (MiB) of this process while the block runs, sampled every 2 ms."""

    def __init__(self):
        self.peak = self.before = 0.0

    @staticmethod
    def now() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def __enter__(self):
        self.before = self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.now())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llm", default="smollm2-135m")
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of --llm")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--stage", type=int, default=2, choices=(1, 2))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per pass")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    fit_threads_to_cpus()
    torch.manual_seed(0)

    from teal_cli.model.bias_norm import add_bias_norm
    from teal_cli.train.data import DataOptions, SampleSet, collate
    from teal_cli.train.loop import TrainStep, param_group

    work = Path(tempfile.mkdtemp(prefix="teal-train-bench-"))
    model, device, dtype = build(args, work)
    groups = ["proj"] if args.stage == 1 else ["proj", "embed", "output", "boundary", "bias_norm"]
    if args.stage == 2:
        add_bias_norm(model.backbone, "bias")
    for name, p in model.named_parameters():
        p.requires_grad_(param_group(name) in groups)
    params = [p for p in model.parameters() if p.requires_grad]
    data_path = work / "data.jsonl"
    records(data_path, args.batch_size * (args.steps + 1))
    data = SampleSet.scan(data_path, model, DataOptions(stage=2))
    batches = data.epoch_batches(0, args.batch_size)[: args.steps + 1]
    amp = lambda: autocast(device, dtype)  # noqa: E731
    step_module = TrainStep(model)
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95))
    pad = model.eos_id
    # The bare arms get the very batches teal's step will make, embedded once up front.
    ready = []
    for positions in batches:
        batch = collate(data.encode(positions, 0), pad).to(device)
        with torch.no_grad():
            emb = model.embed(batch.ids)
        t_labels = batch.labels.clamp(max=model.config.text_vocab_size - 1)  # codec ids have no text column
        ready.append((batch, emb, t_labels))
    backbone, head = model.backbone, model.lm_head

    def teal_step(positions):
        batch = collate(data.encode(positions, 0), pad).to(device)
        n_target = data.target_tokens(positions)
        with amp():
            loss = step_module(batch.ids, batch.mask, batch.rows, batch.labels).sum() / n_target
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return batch.tokens

    def bare_step(item, all_logits):
        batch, emb, labels = item
        x = emb.detach().requires_grad_(True)
        with amp():
            hidden = backbone(inputs_embeds=x, attention_mask=batch.mask, position_ids=(batch.mask.cumsum(-1) - 1).clamp(min=0),
                              return_dict=True).last_hidden_state
            if all_logits:
                logits = head(hidden).float().flatten(0, 1)[batch.rows]
            else:
                logits = head(hidden.flatten(0, 1)[batch.rows]).float()
            loss = F.cross_entropy(logits, labels)
        loss.backward()
        return batch.tokens

    arms = {
        "teal step": lambda: [teal_step(b) for b in batches[1:]],
        "bare LM, target logits": lambda: [bare_step(r, False) for r in ready[1:]],
        "bare LM, all logits": lambda: [bare_step(r, True) for r in ready[1:]],
    }
    # Warm-up: one step of each.
    teal_step(batches[0])
    bare_step(ready[0], False)
    bare_step(ready[0], True)
    best = {k: 0.0 for k in arms}
    memory = {k: (0.0, 0.0) for k in arms}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.repeats):
        for name, fn in arms.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            meter = PeakRSS() if device.type == "cpu" else contextlib.nullcontext()
            sync()
            with meter:
                t0 = time.perf_counter()
                tokens = sum(fn())
                sync()
                dt = time.perf_counter() - t0
            best[name] = max(best[name], tokens / dt)
            if device.type == "cuda":
                memory[name] = (torch.cuda.max_memory_allocated() / 2**20, 0.0)
            else:
                memory[name] = (max(memory[name][0], meter.peak), max(memory[name][1], meter.peak - meter.before))
    n_train = sum(p.numel() for p in params)
    lengths = [int(r[0].mask.sum(1).float().mean()) for r in ready]
    print(f"{'tiny llama' if args.tiny else args.llm} on {device} ({dtype}, {torch.get_num_threads()} threads), stage {args.stage}: "
          f"{n_train:,} trained parameters, batch {args.batch_size} x ~{sum(lengths) // len(lengths)} tokens, "
          f"{args.steps} steps a pass, best of {args.repeats}")
    unit = "peak allocated" if device.type == "cuda" else "peak RSS (above start)"
    for name in arms:
        mem = memory[name]
        mem_s = f"{mem[0]:,.0f} MiB" + (f" (+{mem[1]:,.0f})" if device.type == "cpu" else "")
        print(f"  {name:24s} {best[name]:10,.0f} tokens/s   {unit}: {mem_s}")
    print(f"  ratio teal / bare (target logits): {best['teal step'] / best['bare LM, target logits']:.3f}x   "
          f"teal / bare (all logits): {best['teal step'] / best['bare LM, all logits']:.3f}x   (goal >= 0.9x)")


if __name__ == "__main__":
    main()
