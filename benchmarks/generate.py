"""Tokens/s of teal's generation against Hugging Face ``generate`` on the bare base model,
same prompts, same lengths, same run; ratio printed; batch 1 and 8; text and image segments.

    python benchmarks/generate.py                  # SmolLM2-135M (the offline default), CPU
    python benchmarks/generate.py --tiny           # a tiny random Llama (no model files needed)
    python benchmarks/generate.py --repeats 5 --new-tokens 48 --grid 8
    python benchmarks/generate.py --device cuda    # a GPU, when there is one
    python benchmarks/generate.py --exported       # also: the 'teal export' checkpoint under HF generate

Arms, each timed end to end (prefill + decoding, what a user waits for):

- text: teal ``output_modality="text"`` greedy vs ``model.llm.generate(do_sample=False)``
  on the same left-padded ids. Both stop at EOS or ``--new-tokens``; the two outputs are
  compared (they must be the same ids), so both arms produce the same tokens.
- image: teal forced image segment (``<img>``, grid*grid ids, ``</img>``) vs HF generating the
  same number of tokens (``min_new_tokens = max_new_tokens``) from the same prompts.
- compiled: teal with ``compile="on"`` (a ``StaticCache`` and a ``torch.compile``d step), in
  the same repeats, for both arms; its ids are compared with the eager arm's. Its compile
  time (first run minus a warm run, per batch size: a new batch shape compiles again) is
  reported apart, with the tokens after which it pays off against the eager arm.

Tokens/s counts generated tokens of all rows (a row's tokens after its EOS are not counted;
both arms count the same). Arms alternate within each repeat and the paired ratios are
reported as a range, so load from other processes on the machine hits both alike.
``--exported`` adds, per arm and batch, the model written by ``teal export`` and run by
transformers' ``generate`` with the shipped grammar processor (what ``teal generate --engine
hf`` runs) against teal's decoder on the same prompts, interleaved, ids compared.
``--profile`` adds where teal's time goes: embed, backbone, logits, masks (+CFG), sampling,
the grammar's per-row bookkeeping, and the rest (Python in the loop, cache/mask growth).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from teal_cli.model import generate as gen  # noqa: E402
from teal_cli.model.generate import GenerateOptions, Grammar, generate_ids  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "Write one sentence about the sea:",
    "List three colours:",
    "Once upon a time, in a small village by the mountains, there lived an old clockmaker who",
    "Q: What is two plus two?\nA:",
    "The handwritten digit in the image is",
    "Translate to French: good morning",
    "A short poem about autumn leaves falling slowly from the trees onto the quiet road:",
]


def build(args, work: Path):
    from teal_cli.codecs.kmeans_codec import load_codec_dir, save_codec_dir
    from teal_cli.features.patch import PatchFeatures
    from teal_cli.model import init_model
    from teal_cli.model.llm import load_base_llm

    if args.tiny:
        sys.path.insert(0, str(REPO / "tests"))
        from tiny_llm import make_tiny_llm

        name = str(make_tiny_llm(work / "tiny-llama", "llama", hidden=64, layers=4, context=1024))
    else:
        name = args.model
    base = load_base_llm(name, device=args.device, dtype=getattr(torch, args.dtype))
    g = torch.Generator().manual_seed(0)
    codec_dir = save_codec_dir(work / "patch-p2-k256", PatchFeatures(2, image_size=2 * args.grid),
                               torch.rand(256, 12, generator=g), {})
    model = init_model(base, [load_codec_dir(codec_dir)], image_size=2 * args.grid).eval()
    return model


def encode(model, texts):
    from teal_cli.records import Record, Segment

    return [model.encode_record(Record(str(i), [Segment("text", text=t)]), prompt_only=True).ids for i, t in enumerate(texts)]


def left_pad(prompts, pad, device):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def count(rows, eos):
    return sum(len(r[:r.index(eos)] if eos in r else r) for r in rows)


def run_hf(model, prompts, new_tokens, exact, device):
    ids, mask = left_pad(prompts, model.eos_id, device)
    kw = dict(min_new_tokens=new_tokens) if exact else {}
    sync(device)
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.llm.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                 pad_token_id=model.eos_id, **kw)
    sync(device)
    rows = out[:, ids.shape[1]:].tolist()
    # EOS is a generated token in HF's output, excluded from teal's: count it on both sides alike.
    return time.perf_counter() - t, rows


def run_teal(model, prompts, options, grammar, device):
    sync(device)
    t = time.perf_counter()
    results = generate_ids(model, prompts, options, grammar)
    sync(device)
    return time.perf_counter() - t, results


class Profiler:
    """Wall time per part of teal's decoding, by wrapping the functions that do each part."""

    def __init__(self, model):
        self.model = model
        self.times = defaultdict(float)
        self.saved = []

    def wrap(self, owner, attr, label):
        fn = getattr(owner, attr)
        times = self.times

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                times[label] += time.perf_counter() - t

        self.saved.append((owner, attr, attr in vars(owner), fn))
        setattr(owner, attr, timed)

    def __enter__(self):
        m = self.model
        self.wrap(m, "embed", "embed")
        self.wrap(m.backbone, "forward", "backbone")
        self.wrap(gen, "block_logits", "logits")
        self.wrap(gen, "constrain", "masks + CFG")
        self.wrap(gen, "choose_tokens", "sampling (incl. .tolist sync)")
        self.wrap(gen, "_advance", "grammar bookkeeping")
        return self

    def __exit__(self, *exc):
        for owner, attr, own, original in reversed(self.saved):
            if own:
                setattr(owner, attr, original)
            else:
                delattr(owner, attr)  # an instance attribute shadowing the class's method


def floors(model, batch: int, repeats: int = 5) -> str:
    """Where a decoding step's time can go, for one batch size: the weights read per token
    (every linear layer's, the tied LM head's apart), this machine's memory read rate (a sum
    over a buffer of that size), and the time of the linear layers' kernels alone (F.linear
    on a ready ``[batch, d]`` input, no Python model code around them): the floor a compiled
    step could approach. Reported as tokens/s of the whole batch."""
    import torch.nn.functional as F

    linears = [m for m in model.llm.modules() if isinstance(m, torch.nn.Linear)]
    head = model.lm_head
    body = [m for m in linears if m is not head]
    nbytes = sum(m.weight.numel() * m.weight.element_size() for m in body)
    head_bytes = head.weight.numel() * head.weight.element_size()
    buf = torch.ones((nbytes + head_bytes) // 4, dtype=torch.float32)
    best_read = min(_timed(lambda: buf.sum()) for _ in range(repeats))
    rate = buf.numel() * 4 / best_read
    xs = {m.in_features: torch.randn(batch, m.in_features, dtype=m.weight.dtype) for m in linears}
    with torch.inference_mode():
        body_s = min(_timed(lambda: [F.linear(xs[m.in_features], m.weight, m.bias) for m in body]) for _ in range(repeats))
        head_s = min(_timed(lambda: F.linear(xs[head.in_features], head.weight)) for _ in range(repeats))
    del buf
    return (f"      floors, batch {batch}: weights {nbytes / 1e6:.0f} MB + LM head {head_bytes / 1e6:.0f} MB per step; "
            f"memory read {rate / 1e9:.1f} GB/s -> {batch * rate / (nbytes + head_bytes):.1f} tok/s with the head, "
            f"{batch * rate / nbytes:.1f} without; linear kernels alone {batch / (body_s + head_s):.1f} tok/s with the head, "
            f"{batch / body_s:.1f} without")


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="base LLM for load_base_llm (alias, directory or hub id)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama instead (no model files)")
    ap.add_argument("--new-tokens", type=int, default=32, help="text arm: max new tokens")
    ap.add_argument("--grid", type=int, default=6, help="image arm: a grid x grid image segment")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the usable CPUs)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--arms", nargs="*", default=["text", "image"])
    ap.add_argument("--profile", action="store_true", help="where teal's time goes (one extra run per case)")
    ap.add_argument("--exported", action="store_true", help="also time the 'teal export' checkpoint under HF generate")
    ap.add_argument("--floors", action="store_true", help="memory-read and linear-kernel floors per batch size")
    ap.add_argument("--compile", choices=["on", "off"], default="on", help="add the compiled arm (default on)")
    ap.add_argument("--dtype", default="float32", help="the LLM's dtype for every arm (float32, bfloat16)")
    args = ap.parse_args()

    from teal_cli.runtime.device import fit_threads_to_cpus

    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        fit_threads_to_cpus()
    with tempfile.TemporaryDirectory() as work:
        model = build(args, Path(work))
        print(f"base {model.config.llm.get('name')} ({sum(p.numel() for p in model.llm.parameters()) / 1e6:.0f}M params, "
              f"{args.dtype}), device {args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
        eos = model.eos_id
        if args.floors:
            for batch in args.batch:
                print(floors(model, batch), flush=True)
        for arm in args.arms:
            if arm == "text":
                options = GenerateOptions(max_new_tokens=args.new_tokens, output_modality="text")
            else:
                options = GenerateOptions(output_modality="image")
            options.compile = "off"
            compiled = dataclasses.replace(options, compile="on")
            grammar = Grammar(model, options)
            image_tokens = args.grid * args.grid + 2
            for batch in args.batch:
                prompts = encode(model, (PROMPTS * batch)[:batch])
                n_new = args.new_tokens if arm == "text" else image_tokens
                # warm-up every arm once; the compiled arm's first run compiles (timed)
                run_hf(model, prompts, n_new, arm == "image", args.device)
                run_teal(model, prompts, options, grammar, args.device)
                if args.compile == "on":
                    cold, _ = run_teal(model, prompts, compiled, grammar, args.device)
                    warm, _ = run_teal(model, prompts, compiled, grammar, args.device)
                hf_rates, teal_rates, ratios, same = [], [], [], True
                c_rates, c_ratios, c_same = [], [], True
                arms = ["hf", "teal"] + (["compiled"] if args.compile == "on" else [])
                for r in range(args.repeats):
                    order = arms[r % len(arms):] + arms[:r % len(arms)]
                    got = {}
                    for which in order:
                        if which == "hf":
                            got["hf"] = run_hf(model, prompts, n_new, arm == "image", args.device)
                        elif which == "teal":
                            got["teal"] = run_teal(model, prompts, options, grammar, args.device)
                        else:
                            got["compiled"] = run_teal(model, prompts, compiled, grammar, args.device)
                    if "compiled" in got:
                        t_c, c_res = got["compiled"]
                        c_same &= [x.ids for x in c_res] == [x.ids for x in got["teal"][1]]
                        c_rates.append(sum(len(x.ids) for x in c_res) / t_c)
                    (t_hf, hf_rows), (t_teal, teal_res) = got["hf"], got["teal"]
                    if arm == "text":
                        n_hf = count(hf_rows, eos)
                        n_teal = sum(len(x.ids) for x in teal_res)
                        same &= [row[:row.index(eos)] if eos in row else row for row in hf_rows] == [x.ids for x in teal_res]
                    else:
                        n_hf = sum(len(row) for row in hf_rows)
                        n_teal = sum(len(x.ids) for x in teal_res)
                        same &= n_hf == n_teal == batch * image_tokens
                    hf_rates.append(n_hf / t_hf)
                    teal_rates.append(n_teal / t_teal)
                    ratios.append(teal_rates[-1] / hf_rates[-1])
                    if c_rates:
                        c_ratios.append(c_rates[-1] / hf_rates[-1])
                check = ("same ids as HF" if same else "IDS DIFFER FROM HF") if arm == "text" else \
                        ("same token counts" if same else "TOKEN COUNTS DIFFER")
                print(f"{arm:5s} batch {batch}: HF {statistics.median(hf_rates):7.1f} tok/s "
                      f"[{min(hf_rates):.1f}-{max(hf_rates):.1f}]  teal {statistics.median(teal_rates):7.1f} tok/s "
                      f"[{min(teal_rates):.1f}-{max(teal_rates):.1f}]  ratio {statistics.median(ratios):.2f}x "
                      f"[{min(ratios):.2f}-{max(ratios):.2f}]  ({n_teal} tokens, {check})", flush=True)
                if c_rates:
                    per_token = 1 / statistics.median(teal_rates) - 1 / statistics.median(c_rates)
                    compile_s = cold - warm
                    pays = f"pays off after {compile_s / per_token:.0f} tokens" if per_token > 0 else "never pays off"
                    print(f"      compiled: {statistics.median(c_rates):7.1f} tok/s [{min(c_rates):.1f}-{max(c_rates):.1f}]  "
                          f"ratio to HF {statistics.median(c_ratios):.2f}x [{min(c_ratios):.2f}-{max(c_ratios):.2f}], "
                          f"to eager teal {statistics.median(c_rates) / statistics.median(teal_rates):.2f}x  "
                          f"({'same ids as eager' if c_same else 'IDS DIFFER FROM EAGER'}); "
                          f"compile {compile_s:.1f}s, {pays}", flush=True)
                if args.profile:
                    with Profiler(model) as prof:
                        total, _ = run_teal(model, prompts, options, grammar, args.device)
                    parts = dict(prof.times)
                    parts["rest (loop, cache/mask growth, prefill setup)"] = total - sum(parts.values())
                    print("      teal profile: " + ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(
                        parts.items(), key=lambda kv: -kv[1])) + f" (of {total:.2f}s)", flush=True)
        if args.exported:
            report_exported(args, model, Path(work))


def report_exported(args, model, work: Path) -> None:
    """Rows for the exported checkpoint: teal's decoder vs ``teal generate --engine hf``'s path
    (plain transformers ``generate`` + ``TealGrammarProcessor``), same prompts and options,
    arms interleaved, greedy ids compared."""
    from teal_cli.model import hf_grammar
    from teal_cli.model.export import export_dir
    from teal_cli.model.hf_engine import ExportedModel, generate_batch

    model.save(work / "teal-model")
    t = time.perf_counter()
    export_dir(work / "teal-model", work / "exported")
    print(f"exported in {time.perf_counter() - t:.1f}s (with its reload-and-compare check)", flush=True)
    exported = ExportedModel(work / "exported", device=args.device)
    for arm in args.arms:
        if arm == "text":
            options = GenerateOptions(max_new_tokens=args.new_tokens, output_modality="text")
        else:
            options = GenerateOptions(output_modality="image")
        grammar = Grammar(model, options)
        processor = hf_grammar.TealGrammarProcessor(exported.sidecar, output_modality=options.output_modality,
                                                    max_new_tokens=options.max_new_tokens)
        for batch in args.batch:
            prompts = encode(model, (PROMPTS * batch)[:batch])
            run_teal(model, prompts, options, grammar, args.device)
            generate_batch(exported, prompts, options, processor)
            teal_rates, hf_rates, ratios, same = [], [], [], True
            for r in range(args.repeats):
                got = {}
                for which in (("hf", "teal") if r % 2 == 0 else ("teal", "hf")):
                    if which == "teal":
                        got["teal"] = run_teal(model, prompts, options, grammar, args.device)
                    else:
                        sync(args.device)
                        t = time.perf_counter()
                        rows = generate_batch(exported, prompts, options, processor)
                        sync(args.device)
                        got["hf"] = (time.perf_counter() - t, rows)
                (t_teal, teal_res), (t_hf, hf_rows) = got["teal"], got["hf"]
                same &= [x.ids for x in teal_res] == [ids for ids, _ in hf_rows]
                n = sum(len(x.ids) for x in teal_res)
                teal_rates.append(n / t_teal)
                hf_rates.append(sum(len(ids) for ids, _ in hf_rows) / t_hf)
                ratios.append(hf_rates[-1] / teal_rates[-1])
            print(f"{arm:5s} batch {batch}: teal {statistics.median(teal_rates):7.1f} tok/s  exported-HF+processor "
                  f"{statistics.median(hf_rates):7.1f} tok/s [{min(hf_rates):.1f}-{max(hf_rates):.1f}]  "
                  f"exported/teal {statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]  "
                  f"({'same ids as teal' if same else 'IDS DIFFER FROM TEAL'})", flush=True)


if __name__ == "__main__":
    main()
