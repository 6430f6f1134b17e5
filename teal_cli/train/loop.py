"""The training loop of ``teal train``: one explicit loop you can read top to bottom.

TEAL's recipe (Yang et al., 2023, §3.3) on a frozen LLM:

- stage 1 trains only the projections (``proj_in`` / ``proj_out`` of every codec) on pairs;
- stage 2 trains every non-textual parameter (E, O, projections, boundary rows) plus
  bias-norm tuning of the frozen LLM (LLaMA-Adapter V2), or LoRA through peft instead.

Per step (nanoGPT's habits): the batch's micro-batches forward under autocast (bf16 on GPU,
nothing on CPU), loss = summed cross-entropy over target positions / the global batch's
target count, backward (DDP averages gradients over ranks), clip, AdamW, cosine schedule
with warm-up. Logits are computed only at target positions: the LM head over the text
vocabulary is the costliest layer, and prompt positions need none. Trainable parameters
stay fp32 (master weights); the base LLM may be bf16 and is never updated.

Checkpoints (:mod:`.checkpoint`) every N steps and at the end; ``resume`` continues the same
curve; Ctrl-C / SIGTERM stop at the next step boundary, checkpoint, and raise
KeyboardInterrupt. Metrics go to ``DIR/metrics.jsonl``; only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from ..errors import DataError, UsageError
from . import checkpoint as ckpt
from .data import MODALITY_NAMES, DataOptions, SampleSet, collate
from .distributed import Distributed
from .templates import load_templates

if TYPE_CHECKING:
    from ..model.teal_model import TealModel

GROUPS = ("proj", "embed", "output", "boundary", "bias_norm", "lora")
STAGE_GROUPS = {1: ("proj",), 2: ("proj", "embed", "output", "boundary")}
METRICS_NAME = "metrics.jsonl"
# Options that shape the loss curve: a resumed run must use the values its checkpoint used.
CURVE_KEYS = ("stage", "data", "val", "task", "templates", "batch_size", "grad_accum", "lr", "weight_decay", "warmup",
              "max_steps", "epochs", "clip", "seed", "val_fraction", "bias_norm", "lora", "train", "freeze", "bucket")


@dataclass
class TrainOptions:
    """Everything ``teal train`` takes (see its ``--help`` for each).

    ``batch_size`` is the global batch per optimizer step, split over ranks and then over
    ``grad_accum`` micro-batches. ``warmup`` None is 5 % of the steps. ``epochs`` and
    ``max_steps`` None is one epoch. ``eval_every`` 0 evaluates at the end only.
    """

    stage: int = 1
    data: str = ""
    val: str | None = None
    task: str | None = None
    templates: str | None = None
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int | None = None
    max_steps: int | None = None
    epochs: float | None = None
    clip: float = 1.0
    seed: int = 0
    val_fraction: float = 0.05
    eval_every: int = 0
    checkpoint_every: int = 100
    log_every: int = 1
    bias_norm: str | None = None
    lora: int | None = None
    train: list[str] = field(default_factory=list)
    freeze: list[str] = field(default_factory=list)
    gradient_checkpointing: bool = False
    bucket: bool = True
    device: str = "auto"
    dtype: str = "auto"

    def curve(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in CURVE_KEYS}
        for key in ("data", "val", "templates"):
            if out[key] is not None:
                out[key] = str(Path(out[key]).resolve())
        out["train"], out["freeze"] = sorted(out["train"]), sorted(out["freeze"])
        return out


@dataclass
class TrainResult:
    steps: int
    losses: list[float]
    val_loss: float | None
    directory: Path
    trainable: list[str]
    trainable_params: int
    model: Any = None  # the trained TealModel


def param_group(name: str) -> str | None:
    """The trainable group of a TealModel parameter name, or None for the base LLM's own weights."""
    from ..model.bias_norm import PARAM_NAMES

    if name.startswith("heads."):
        part = name.split(".")[2]
        return {"proj_in": "proj", "proj_out": "proj", "embedding": "embed", "output": "output"}.get(part)
    if name.startswith("boundary_"):
        return "boundary"
    if "lora_" in name:
        return "lora"
    if name.rsplit(".", 1)[-1] in PARAM_NAMES:
        return "bias_norm"
    return None


def load_model_dir(path: str | Path, device, dtype) -> "TealModel":
    from ..model.teal_model import TealModel

    return TealModel.from_dir(path, device=device, dtype=dtype)


class TrainStep(nn.Module):
    """The differentiable part of a step, as a module DDP can wrap: per-token cross-entropy
    ``[N]`` at the target positions only (``rows`` of the flattened ``[B*T]`` hidden states)."""

    def __init__(self, model: "TealModel"):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.model.hidden_states(ids, mask)
        picked = hidden.flatten(0, 1).index_select(0, rows)
        return self.model.target_loss(picked, labels)


class _StopFlag:
    """SIGINT / SIGTERM ask for a stop at the next step boundary (a second Ctrl-C stops at once)."""

    def __init__(self):
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class Trainer:
    """One ``teal train`` run over the model directory ``directory`` (see :func:`train`)."""

    def __init__(self, directory: str | Path, options: TrainOptions, *, resume: bool = False,
                 load: Callable[..., "TealModel"] = load_model_dir, info: Callable[[str], None] = lambda _: None,
                 on_step: Callable[[dict[str, Any]], None] | None = None, stop_after: int | None = None):
        self.directory = Path(directory)
        self.options = options
        self.resume = resume
        self.load = load
        self.info = info
        self.on_step = on_step
        self.stop_after = stop_after  # tests: behave as if interrupted after this many steps

    # ------------------------------------------------------------------ setup

    def _check_options(self) -> None:
        o = self.options
        if o.stage not in (1, 2):
            raise UsageError(f"--stage {o.stage}: expected 1 or 2")
        for name in (*o.train, *o.freeze):
            if name not in GROUPS:
                raise UsageError(f"group '{name}': expected one of {', '.join(GROUPS)}")
        if o.bias_norm not in (None, "bias", "scale", "none"):
            raise UsageError(f"--bias-norm {o.bias_norm}: expected bias, scale or none")
        if o.batch_size < 1 or o.grad_accum < 1:
            raise UsageError("--batch-size and --grad-accum must be at least 1")
        if not 0 <= o.val_fraction < 1:
            raise UsageError(f"--val-fraction {o.val_fraction}: expected a number in [0, 1)")
        if o.max_steps is not None and o.max_steps < 1:
            raise UsageError("--max-steps must be at least 1")
        if o.epochs is not None and not o.epochs > 0:
            raise UsageError("--epochs must be positive")

    def _groups(self, model: "TealModel") -> list[str]:
        """Decide what trains and add bias-norm / LoRA to the model where this run needs them."""
        o = self.options
        groups = set(STAGE_GROUPS[o.stage])
        has_bn = bool(model.config.groups.get("bias_norm"))
        has_lora = bool(model.config.groups.get("lora"))
        if o.stage == 2:
            if o.lora or has_lora:
                groups.add("lora")
            if o.bias_norm != "none" and not (o.lora or has_lora) or has_bn and o.bias_norm != "none":
                groups.add("bias_norm")
        groups |= set(o.train)
        groups -= set(o.freeze)
        if o.bias_norm and o.bias_norm != "none" and has_bn and model.config.groups["bias_norm"] != o.bias_norm:
            raise UsageError(f"--bias-norm {o.bias_norm}: this model already has bias-norm in '{model.config.groups['bias_norm']}' "
                             "mode (a previous stage-2 run added it); drop --bias-norm or use that mode")
        if "bias_norm" in groups and not has_bn:
            if has_lora:
                raise UsageError("this model already has LoRA layers; bias-norm must be added before LoRA (give both in the first stage-2 run)")
            from ..model.bias_norm import add_bias_norm

            mode = o.bias_norm if o.bias_norm not in (None, "none") else "bias"
            add_bias_norm(model.backbone, mode)
            model.config.groups["bias_norm"] = mode
        if "lora" in groups and not has_lora:
            if not o.lora:
                raise UsageError("--train lora: this model has no LoRA layers; add them with --lora R")
            from ..model.lora import add_lora, lora_config

            torch.manual_seed(o.seed)
            cfg = lora_config(o.lora)
            add_lora(model, cfg)
            model.config.groups["lora"] = cfg
        elif o.lora and has_lora and int(model.config.groups["lora"].get("r", 0)) != o.lora:
            raise UsageError(f"--lora {o.lora}: this model already has rank-{model.config.groups['lora'].get('r')} LoRA layers")
        return [g for g in GROUPS if g in groups]

    def _latest(self) -> tuple[Path | None, dict[str, Any] | None]:
        found = ckpt.latest_checkpoint(self.directory)
        return (found, ckpt.read_state(found)) if found else (None, None)

    def _compare(self, state: dict[str, Any]) -> list[str]:
        saved = state.get("options", {})
        now = self.options.curve()
        return [f"{k} is {now[k]!r} here but {saved.get(k)!r} in the checkpoint" for k in CURVE_KEYS if saved.get(k) != now[k]]

    # ------------------------------------------------------------------ the run

    def run(self) -> TrainResult:
        import numpy as np

        from ..device import autocast, fit_threads_to_cpus, resolve_device, resolve_dtype
        from ..model.config import ModelConfig

        o = self.options
        self._check_options()
        ModelConfig.load(self.directory)  # a clear error for a missing or wrong DIR before anything loads
        device = resolve_device(o.device)
        dist = Distributed.from_env(device.type)
        if not dist.is_main:
            self.info = lambda _: None  # one voice on stderr: rank 0's
        try:
            if device.type == "cuda" and dist.world > 1:
                device = torch.device("cuda", dist.local_rank)
            fit_threads_to_cpus()
            if o.batch_size % (dist.world * o.grad_accum):
                raise UsageError(f"--batch-size {o.batch_size} must be a multiple of processes x --grad-accum "
                                 f"({dist.world} x {o.grad_accum})")
            dtype = resolve_dtype(o.dtype, device, llm=True)
            return self._run(dist, device, dtype, lambda: autocast(device, dtype), np)
        finally:
            dist.close()

    def _run(self, dist: Distributed, device, dtype, amp, np) -> TrainResult:
        o = self.options
        found, state = self._latest()
        start_from = self.directory
        if found is not None and not state.get("finished"):
            if not self.resume:
                raise UsageError(f"{found} holds an unfinished run (step {state['step']} of {state['total_steps']}); "
                                 f"pass --resume to continue it, or delete {found.parent} to start over")
            diffs = self._compare(state)
            if diffs:
                raise UsageError(f"--resume: {diffs[0]}; resume with the options of that run (or delete {found.parent} to start over)")
            start_from = found
        elif found is not None and self.resume and not self._compare(state):
            start_from = found  # finished already: only make sure DIR holds its result
        else:
            state = None
            if self.resume:
                self.info("no checkpoint of this run to resume: starting it")
        torch.manual_seed(o.seed)
        model = self.load(start_from, device, dtype)
        if state is None:
            groups = self._groups(model)
        else:
            groups = list(state["trainable"])
        for name, param in model.named_parameters():
            param.requires_grad_(param_group(name) in groups)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise UsageError("nothing to train: every group is frozen (check --train / --freeze)")
        n_params = sum(p.numel() for _, p in named)

        # Data: every record checked before the first step and before anything is written.
        templates = load_templates(o.templates)
        dopts = DataOptions(stage=o.stage, task=o.task, templates=o.templates, seed=o.seed)
        data = SampleSet.scan(o.data, model, dopts, templates)
        if o.val:
            train_set, val_set = data, SampleSet.scan(o.val, model, dopts, templates)
        else:
            train_set, val_set = data.split(o.val_fraction, o.seed)
        per_epoch = train_set.steps_per_epoch(o.batch_size)
        if per_epoch == 0:
            raise DataError(f"{o.data}: {len(train_set)} training samples, fewer than --batch-size {o.batch_size}")
        total = o.max_steps or max(1, math.ceil((o.epochs or 1) * per_epoch))
        warmup = o.warmup if o.warmup is not None else max(1, round(0.05 * total)) if total > 1 else 0
        if state is not None and (state["total_steps"] != total or state.get("samples") != len(train_set)):
            raise UsageError(f"--resume: the data file gives {len(train_set)} samples and {total} steps, the checkpoint's "
                             f"run had {state.get('samples')} and {state['total_steps']}: the data changed; start over")

        if o.gradient_checkpointing:
            model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.llm.train()  # transformers checkpoints only in training mode; keep dropout off
            for module in model.llm.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.eval()
        params = [p for _, p in named]
        optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, betas=(0.9, 0.95))
        from transformers import get_cosine_schedule_with_warmup

        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total)
        step, epoch, position = 0, 0, 0
        run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid() % 100000}"
        losses: list[float] = []
        if state is not None:
            ckpt.load_optimizer(optimizer, start_from, state["optimizer_groups"])
            scheduler.load_state_dict(state["scheduler"])
            ckpt.restore_rng(start_from, state, dist.rank)
            step, epoch, position, run_id = state["step"], state["epoch"], state["position"], state["run"]
            losses = list(state.get("losses", []))
            self.info(f"resuming {start_from.name}: step {step} of {total} (epoch {epoch}, batch {position})")
        metrics = self.directory / METRICS_NAME
        if dist.is_main and state is not None:
            _truncate_metrics(metrics, run_id, step)
        self.info(f"stage {o.stage}: training {', '.join(groups)} ({n_params:,} parameters) on {len(train_set)} samples"
                  f"{f', validating on {len(val_set)}' if val_set is not None else ''}; {total} steps of {o.batch_size}")

        plain = TrainStep(model)
        stepper = dist.wrap(plain, device)
        pad = model.eos_id
        micro_size = o.batch_size // dist.world // o.grad_accum

        def state_dict(finished: bool) -> dict[str, Any]:
            return {"step": step, "epoch": epoch, "position": position, "total_steps": total, "finished": finished,
                    "run": run_id, "stage": o.stage, "trainable": groups, "samples": len(train_set),
                    "options": o.curve(), "scheduler": scheduler.state_dict(), "losses": losses}

        def save(finished: bool = False) -> None:
            rng = ckpt.gather_rng(dist)
            if dist.is_main:
                ckpt.save_checkpoint(self.directory, model, optimizer, state_dict(finished), rng)
            dist.barrier()

        def write_metrics(entry: dict[str, Any]) -> None:
            if dist.is_main:
                with open(metrics, "a", encoding="utf-8") as f:
                    f.write(json.dumps(entry) + "\n")

        def evaluate() -> dict[str, float]:
            if val_set is None:
                return {}
            sums = torch.zeros(2 * len(MODALITY_NAMES) + 2, dtype=torch.float64)
            with torch.no_grad(), amp():
                for batch_pos in val_set.fixed_batches(max(1, micro_size))[dist.rank::dist.world]:
                    batch = collate(val_set.encode(batch_pos, 0), pad).to(device)
                    _accumulate(sums, plain(batch.ids, batch.mask, batch.rows, batch.labels), batch)
            dist.all_reduce_sum(sums)
            return _loss_entry(sums, "val_")

        val_loss = None
        if state is not None and state.get("finished"):
            val_loss = state.get("val_loss")
            stop_at = step
        else:
            stop_at = total
        interrupted = False
        t_last, tokens_since, t_start, steps_at_start = time.perf_counter(), 0, time.perf_counter(), step
        batches, batches_epoch = None, -1
        with _StopFlag() as stop:
            while step < stop_at:
                if batches_epoch != epoch:
                    batches, batches_epoch = train_set.epoch_batches(epoch, o.batch_size, bucket=o.bucket), epoch
                if position >= len(batches):
                    epoch, position = epoch + 1, 0
                    continue
                positions = batches[position]
                n_target = train_set.target_tokens(positions)
                mine = positions[dist.rank::dist.world]
                sums = torch.zeros(2 * len(MODALITY_NAMES) + 2, dtype=torch.float64)
                for k, micro in enumerate(np.array_split(mine, o.grad_accum)):
                    batch = collate(train_set.encode(micro, epoch), pad).to(device)
                    sync = k == o.grad_accum - 1 or dist.world == 1
                    with (contextlib.nullcontext() if sync else stepper.no_sync()), amp():
                        token_losses = stepper(batch.ids, batch.mask, batch.rows, batch.labels)
                        loss = token_losses.sum() * (dist.world / n_target)
                    loss.backward()
                    _accumulate(sums, token_losses.detach(), batch)
                if o.clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, o.clip)
                optimizer.step()
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step, position = step + 1, position + 1
                sums[-1] = float(stop.requested or (self.stop_after is not None and step - steps_at_start >= self.stop_after))
                dist.all_reduce_sum(sums)
                entry = _loss_entry(sums, "")
                losses.append(entry["loss"])
                tokens_since += int(sums[-2])
                if step % o.log_every == 0 or step == total:
                    now = time.perf_counter()
                    rate = tokens_since / max(now - t_last, 1e-9)
                    t_last, tokens_since = now, 0
                    line = {"run": run_id, "stage": o.stage, "step": step, "epoch": epoch, **entry, "lr": lr,
                            "tokens_per_s": round(rate, 1)}
                    if o.eval_every and step % o.eval_every == 0 and step != total:
                        line.update(evaluate())
                    write_metrics(line)
                    if self.on_step is not None and dist.is_main:
                        elapsed = now - t_start
                        eta = elapsed / max(step - steps_at_start, 1) * (total - step)
                        self.on_step({**line, "total": total, "eta_s": eta})
                if sums[-1] > 0:
                    interrupted = True
                    break
                if o.checkpoint_every and step % o.checkpoint_every == 0 and step != total:
                    save()
        if interrupted:
            save()
            self.info(f"stopped at step {step} of {total}; checkpoint saved: continue with --resume")
            raise KeyboardInterrupt
        if state is None or not state.get("finished"):
            final = evaluate()
            val_loss = final.get("val_loss")
            if final:
                write_metrics({"run": run_id, "stage": o.stage, "step": step, "epoch": epoch, **final})
            model.config.trainable = groups
            model.config.history.append({
                "run": run_id, "stage": o.stage, "steps": step, "data": str(Path(o.data).resolve()),
                "val": str(Path(o.val).resolve()) if o.val else None, "samples": len(train_set), "task": o.task,
                "trainable": groups, "trainable_params": n_params, "batch_size": o.batch_size, "lr": o.lr,
                "seed": o.seed, "final_loss": losses[-1] if losses else None, "val_loss": val_loss,
            })
            save(finished=True)
        if dist.is_main:
            model.save(self.directory)
            self.info(f"saved {self.directory} (step {step}, loss {losses[-1]:.4f}"
                      f"{f', val loss {val_loss:.4f}' if val_loss is not None else ''})")
        dist.barrier()
        return TrainResult(steps=step, losses=losses, val_loss=val_loss, directory=self.directory,
                           trainable=groups, trainable_params=n_params, model=model)


def train(directory: str | Path, options: TrainOptions, **kwargs) -> TrainResult:
    """Train the model directory ``directory`` in place (see the module docstring).

    Reads ``options.data`` (token records; stage 1 pairs, stage 2 instruction records),
    writes ``DIR/checkpoints/``, ``DIR/metrics.jsonl`` and, at the end, ``DIR/config.json`` +
    ``DIR/adapter.safetensors`` (with the run recorded in ``config.history``). Keyword
    arguments go to :class:`Trainer` (``resume``, ``load``, ``info``, ``on_step``).

    Raises UsageError (bad options, an unfinished run without ``resume``), DataError
    (``file:line`` of bad data; nothing in DIR is touched), KeyboardInterrupt after saving
    a checkpoint on Ctrl-C / SIGTERM.
    """
    return Trainer(directory, options, **kwargs).run()


# ---------------------------------------------------------------------- helpers


def _accumulate(sums, token_losses, batch) -> None:
    """Per-modality loss sums and counts, then tokens, into ``sums`` (float64, on the CPU)."""
    n = len(MODALITY_NAMES)
    mods = batch.label_modality.to(token_losses.device)
    per_sum = torch.zeros(n, dtype=torch.float64, device=token_losses.device).index_add_(0, mods, token_losses.double())
    per_count = torch.bincount(mods, minlength=n).double()
    sums[:n] += per_sum.cpu()
    sums[n:2 * n] += per_count.cpu()
    sums[-2] += batch.tokens


def _loss_entry(sums, prefix: str) -> dict[str, float]:
    n = len(MODALITY_NAMES)
    total, count = float(sums[:n].sum()), float(sums[n:2 * n].sum())
    out = {f"{prefix}loss": total / max(count, 1.0)}
    for i, name in enumerate(MODALITY_NAMES):
        if sums[n + i] > 0:
            out[f"{prefix}loss_{name}"] = float(sums[i] / sums[n + i])
    return out


def _truncate_metrics(path: Path, run_id: str, step: int) -> None:
    """Drop this run's metric lines after ``step`` (written after the checkpoint a resume
    starts from) and any torn last line, atomically."""
    if not path.is_file():
        return
    from ..media import atomic_output

    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("run") == run_id and entry.get("step", 0) > step:
            continue
        kept.append(line)
    with atomic_output(path) as f:
        f.write("".join(k + "\n" for k in kept))
