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

What a run refuses rather than corrupt: a second run on the same directory (:mod:`.lock`);
resuming a checkpoint of another model (checkpoints carry the directory's ``init_id``) or of
other data (they carry the data's sha256); a data file that changes under the run (a
checkpoint of the steps done is saved first). A NaN or infinite gradient norm (checked before
the update) or loss stops the run with :class:`Diverged`, and no checkpoint or model is ever
written with non-finite parameters: the directory keeps its last finite state.
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

import numpy as np
import torch
from torch import nn

from ..errors import DataError, TealError, UsageError
from . import checkpoint as ckpt
from .data import MODALITY_NAMES, DataOptions, SampleSet, collate
from .distributed import Distributed
from .lock import TrainLock
from .templates import load_templates

if TYPE_CHECKING:
    from ..model.teal_model import TealModel

GROUPS = ("proj", "embed", "output", "boundary", "bias_norm", "lora")
STAGE_GROUPS = {1: ("proj",), 2: ("proj", "embed", "output", "boundary")}
METRICS_NAME = "metrics.jsonl"
MAX_EPOCHS = 1_000_000
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


class Diverged(TealError):
    """The loss or the gradients became NaN or infinite: the run stops and saves nothing of it."""


@dataclass
class _Run:
    """What one run trains on and where it stands: the loop's mutable state."""

    model: Any
    groups: list[str]
    params: list[torch.nn.Parameter]
    train_set: SampleSet
    val_set: SampleSet | None
    total: int
    optimizer: Any
    scheduler: Any
    run_id: str
    step: int = 0
    epoch: int = 0
    position: int = 0
    losses: list[float] = field(default_factory=list)
    val_loss: float | None = None
    saved_step: int | None = None  # the newest checkpoint of this run (written or resumed from)
    plain: Any = None  # TrainStep
    stepper: Any = None  # TrainStep, inside DDP when there are several ranks

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.params)


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
        self.init_id = ""  # the model directory's identity (config.json), which its checkpoints carry

    # ------------------------------------------------------------------ setup

    def _check_options(self) -> None:
        """Every option checked before anything loads: UsageError (exit 2) naming the option."""
        o = self.options
        if o.stage not in (1, 2):
            raise UsageError(f"--stage {o.stage}: expected 1 or 2")
        for name in (*o.train, *o.freeze):
            if name not in GROUPS:
                raise UsageError(f"group '{name}': expected one of {', '.join(GROUPS)}")
        if o.bias_norm not in (None, "bias", "scale", "none"):
            raise UsageError(f"--bias-norm {o.bias_norm}: expected bias, scale or none")
        for option, value, low in (("--batch-size", o.batch_size, 1), ("--grad-accum", o.grad_accum, 1),
                                   ("--max-steps", o.max_steps, 1), ("--warmup", o.warmup, 0), ("--lora", o.lora, 1),
                                   ("--checkpoint-every", o.checkpoint_every, 0), ("--eval-every", o.eval_every, 0),
                                   ("--log-every", o.log_every, 1), ("--seed", o.seed, 0)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise UsageError(f"{option} {value}: expected an integer of at least {low}")
        if o.seed >= 2 ** 64:
            raise UsageError(f"--seed {o.seed}: expected an integer below 2**64")
        for option, value, expected, ok in (
                ("--lr", o.lr, "a positive number", lambda v: v > 0),
                ("--weight-decay", o.weight_decay, "a number of at least 0", lambda v: v >= 0),
                ("--clip", o.clip, "a gradient norm above 0, or 0 for no clipping", lambda v: v >= 0),
                ("--epochs", o.epochs, f"a positive number up to {MAX_EPOCHS:,}", lambda v: 0 < v <= MAX_EPOCHS),
                ("--val-fraction", o.val_fraction, "a number in [0, 1)", lambda v: 0 <= v < 1)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
                raise UsageError(f"{option} {value}: expected {expected}")

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

    def _start_point(self) -> tuple[Path, dict[str, Any] | None]:
        """Where the run starts: DIR itself (no state) or the checkpoint it continues, with its state."""
        found, state = self._latest()
        if found is None:
            if self.resume:
                self.info("no checkpoint of this run to resume: starting it")
            return self.directory, None
        if state.get("model_id", "") != self.init_id and (self.resume or not state["finished"]):
            raise UsageError(f"{found} is a checkpoint of another model than {self.directory / 'config.json'} (the "
                             f"directory was made again since that run); delete {found.parent} to train this model")
        if not state["finished"]:
            if not self.resume:
                raise UsageError(f"{found} holds an unfinished run (step {state['step']} of {state['total_steps']}); "
                                 f"pass --resume to continue it, or delete {found.parent} to start over")
            diffs = self._compare(state)
            if diffs:
                raise UsageError(f"--resume: {diffs[0]}; resume with the options of that run (or delete {found.parent} to start over)")
            return found, state
        if self.resume and not self._compare(state):
            return found, state  # finished already: only make sure DIR holds its result
        if self.resume:
            self.info("no checkpoint of this run to resume: starting it")
        return self.directory, None

    def _data(self, model: "TealModel", state: dict[str, Any] | None) -> tuple[SampleSet, SampleSet | None, int, int]:
        """Scan (check) every record, split off validation; ``(train, val, total steps, warm-up steps)``.
        A resumed run must see the very data its checkpoint saw."""
        o = self.options
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
        if state is None:
            return train_set, val_set, total, warmup
        if state["total_steps"] != total or state.get("samples") != len(train_set):
            raise UsageError(f"--resume: the data file gives {len(train_set)} samples and {total} steps, the checkpoint's "
                             f"run had {state.get('samples')} and {state['total_steps']}: the data changed; start over")
        for key, option, scanned in (("data_sha256", "--data", data), ("val_sha256", "--val", val_set if o.val else None)):
            saved = state.get(key)
            if saved and scanned is not None and saved != scanned.sha256:
                fix = "drop --resume to train again" if state["finished"] else \
                    f"resume with that file, or delete {ckpt.checkpoints_dir(self.directory)} to start over"
                raise UsageError(f"--resume: {option} {scanned.path} is not the file the checkpoint's run read (sha256 "
                                 f"{scanned.sha256[:12]}…, that run's {saved[:12]}…): it was edited or replaced; {fix}")
        return train_set, val_set, total, warmup

    def _prepare(self, model: "TealModel", state: dict[str, Any] | None) -> _Run:
        """What trains, the data (every record checked before anything is written), the optimizer."""
        o = self.options
        groups = self._groups(model) if state is None else list(state["trainable"])
        for name, param in model.named_parameters():
            param.requires_grad_(param_group(name) in groups)
        params = [p for _, p in model.named_parameters() if p.requires_grad]
        if not params:
            raise UsageError("nothing to train: every group is frozen (check --train / --freeze)")
        train_set, val_set, total, warmup = self._data(model, state)
        if o.gradient_checkpointing:
            model.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.llm.train()  # transformers checkpoints only in training mode; keep dropout off
            for module in model.llm.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.eval()
        optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, betas=(0.9, 0.95))
        from transformers import get_cosine_schedule_with_warmup

        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total)
        return _Run(model=model, groups=groups, params=params, train_set=train_set, val_set=val_set, total=total,
                    optimizer=optimizer, scheduler=scheduler, run_id=f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid() % 100000}")

    def _restore(self, r: _Run, checkpoint: Path, state: dict[str, Any]) -> None:
        """Optimizer, schedule, RNG states and data position from ``checkpoint``."""
        ckpt.load_optimizer(r.optimizer, checkpoint, state["optimizer_groups"])
        if not isinstance(state["scheduler"].get("last_epoch"), int):
            raise ckpt.damaged(checkpoint / ckpt.STATE_NAME, "training state", "the schedule has no 'last_epoch'")
        r.scheduler.load_state_dict(state["scheduler"])
        ckpt.restore_rng(checkpoint, state, self.dist.rank)
        r.step, r.epoch, r.position, r.run_id = state["step"], state["epoch"], state["position"], state["run"]
        r.losses, r.val_loss, r.saved_step = list(state.get("losses", [])), state.get("val_loss"), state["step"]
        self.info(f"resuming {checkpoint.name}: step {r.step} of {r.total} (epoch {r.epoch}, batch {r.position})")

    # ------------------------------------------------------------------ the run

    def run(self) -> TrainResult:
        from ..runtime.device import autocast, fit_threads_to_cpus, resolve_device, resolve_dtype
        from ..model.config import ModelConfig

        o = self.options
        self._check_options()
        if not self.directory.is_dir():
            raise UsageError(f"{self.directory}: {'not a directory' if self.directory.exists() else 'no such directory'}; "
                             "give a model directory made by 'teal init-embeddings'")
        # A clear error for a missing or wrong DIR before anything loads.
        self.init_id = ModelConfig.load(self.directory).init_id
        device = resolve_device(o.device)
        dist = Distributed.from_env(device.type)
        if not dist.is_main:
            self.info = lambda _: None  # one voice on stderr: rank 0's
        try:
            # One run per directory; rank 0 holds the lock for the job (only it writes).
            with TrainLock(self.directory) if dist.is_main else contextlib.nullcontext():
                if device.type == "cuda" and dist.world > 1:
                    device = torch.device("cuda", dist.local_rank)
                fit_threads_to_cpus()
                if o.batch_size % (dist.world * o.grad_accum):
                    raise UsageError(f"--batch-size {o.batch_size} must be a multiple of processes x --grad-accum "
                                     f"({dist.world} x {o.grad_accum})")
                dtype = resolve_dtype(o.dtype, device, llm=True)
                self.dist, self.device = dist, device
                self.amp = lambda: autocast(device, dtype)
                return self._run(dtype)
        finally:
            dist.close()

    def _run(self, dtype) -> TrainResult:
        o, dist = self.options, self.dist
        start_from, state = self._start_point()
        torch.manual_seed(o.seed)
        r = self._prepare(self.load(start_from, self.device, dtype), state)
        if state is not None:
            self._restore(r, start_from, state)
            if dist.is_main:
                _truncate_metrics(self.directory / METRICS_NAME, r.run_id, r.step)
        self.info(f"stage {o.stage}: training {', '.join(r.groups)} ({r.n_params:,} parameters) on {len(r.train_set)} "
                  f"samples{f', validating on {len(r.val_set)}' if r.val_set is not None else ''}; "
                  f"{r.total} steps of {o.batch_size}")
        r.plain = TrainStep(r.model)
        r.stepper = dist.wrap(r.plain, self.device)
        if state is None or not state["finished"]:
            if self._loop(r):
                self._save(r)
                self.info(f"stopped at step {r.step} of {r.total}; checkpoint saved: continue with --resume")
                raise KeyboardInterrupt
            self._finish(r)
        if dist.is_main:
            r.model.save(self.directory)
            self.info(f"saved {self.directory} (step {r.step}, loss {r.losses[-1]:.4f}"
                      f"{f', val loss {r.val_loss:.4f}' if r.val_loss is not None else ''})")
        dist.barrier()
        return TrainResult(steps=r.step, losses=r.losses, val_loss=r.val_loss, directory=self.directory,
                           trainable=r.groups, trainable_params=r.n_params, model=r.model)

    def _loop(self, r: _Run) -> bool:
        """Train up to the last step; True when asked to stop first (Ctrl-C, SIGTERM, ``stop_after``)."""
        o = self.options
        t_last, tokens_since, t_start, steps_at_start = time.perf_counter(), 0, time.perf_counter(), r.step
        batches, batches_epoch = None, -1
        with _StopFlag() as stop:
            while r.step < r.total:
                if batches_epoch != r.epoch:
                    batches, batches_epoch = r.train_set.epoch_batches(r.epoch, o.batch_size, bucket=o.bucket), r.epoch
                if r.position >= len(batches):
                    r.epoch, r.position = r.epoch + 1, 0
                    continue
                sums, lr = self._step_or_save(r, batches[r.position])
                stopping = stop.requested or (self.stop_after is not None and r.step - steps_at_start >= self.stop_after)
                sums[-1] = float(stopping)
                self.dist.all_reduce_sum(sums)
                entry = _loss_entry(sums, "")
                if not math.isfinite(entry["loss"]):
                    raise self._diverged(r, "loss", entry["loss"])
                r.losses.append(entry["loss"])
                tokens_since += int(sums[-2])
                if r.step % o.log_every == 0 or r.step == r.total:
                    now = time.perf_counter()
                    line = {"run": r.run_id, "stage": o.stage, "step": r.step, "epoch": r.epoch, **entry, "lr": lr,
                            "tokens_per_s": round(tokens_since / max(now - t_last, 1e-9), 1)}
                    t_last, tokens_since = now, 0
                    if o.eval_every and r.step % o.eval_every == 0 and r.step != r.total:
                        line.update(self._evaluate(r))
                    self._write_metrics(line)
                    if self.on_step is not None and self.dist.is_main:
                        eta = (now - t_start) / max(r.step - steps_at_start, 1) * (r.total - r.step)
                        self.on_step({**line, "total": r.total, "eta_s": eta})
                if sums[-1] > 0:
                    return True
                if o.checkpoint_every and r.step % o.checkpoint_every == 0 and r.step != r.total:
                    self._save(r)
        return False

    def _step_or_save(self, r: _Run, positions) -> tuple[torch.Tensor, float]:
        """One step; when the data file changed under the run, first a checkpoint of the steps done
        (a single process only: ranks could disagree on when they noticed)."""
        try:
            r.train_set.check_unchanged()
            return self._step(r, positions)
        except DataError as exc:
            if self.dist.world > 1 or r.step == (r.saved_step or 0):
                raise
            r.optimizer.zero_grad(set_to_none=True)
            self._save(r)
            raise DataError(f"{exc} (the {r.step} steps done are saved in {ckpt.checkpoints_dir(self.directory)})") from None

    def _step(self, r: _Run, positions) -> tuple[torch.Tensor, float]:
        """Forward and backward of each micro-batch, then one update. Returns the loss sums
        (:func:`_accumulate`, before the reduction over ranks) and the step's learning rate."""
        o, dist = self.options, self.dist
        n_target = r.train_set.target_tokens(positions)
        sums = torch.zeros(2 * len(MODALITY_NAMES) + 2, dtype=torch.float64)
        for k, micro in enumerate(np.array_split(positions[dist.rank::dist.world], o.grad_accum)):
            batch = collate(r.train_set.encode(micro, r.epoch), r.model.eos_id).to(self.device)
            sync = k == o.grad_accum - 1 or dist.world == 1
            with (contextlib.nullcontext() if sync else r.stepper.no_sync()), self.amp():
                token_losses = r.stepper(batch.ids, batch.mask, batch.rows, batch.labels)
                loss = token_losses.sum() * (dist.world / n_target)
            loss.backward()
            _accumulate(sums, token_losses.detach(), batch)
        if o.clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(r.params, o.clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in r.params if p.grad is not None])
        if not torch.isfinite(norm):  # before the update, so the parameters stay the last finite ones
            raise self._diverged(r, "gradient norm", float(norm), step=r.step + 1)
        r.optimizer.step()
        lr = r.scheduler.get_last_lr()[0]
        r.scheduler.step()
        r.optimizer.zero_grad(set_to_none=True)
        r.step, r.position = r.step + 1, r.position + 1
        return sums, lr

    def _diverged(self, r: _Run, what: str, value: object, step: int | None = None) -> Diverged:
        o = self.options
        kept = f"{self.directory} keeps its model from before this run"
        if r.saved_step:
            kept += f" and {ckpt.checkpoints_dir(self.directory)} the last finite checkpoint (step {r.saved_step})"
        hint = f"lower --lr (now {o.lr:g})" + (" or clip gradients with --clip" if o.clip == 0 else "")
        return Diverged(f"step {step or r.step} of {r.total}: the {what} is {value}: training diverged; {hint}. "
                        f"Nothing non-finite was saved: {kept}")

    # ------------------------------------------------------------------ outputs

    def _state(self, r: _Run, finished: bool) -> dict[str, Any]:
        o = self.options
        return {"step": r.step, "epoch": r.epoch, "position": r.position, "total_steps": r.total, "finished": finished,
                "run": r.run_id, "stage": o.stage, "trainable": r.groups, "samples": len(r.train_set),
                "options": o.curve(), "scheduler": r.scheduler.state_dict(), "losses": r.losses, "val_loss": r.val_loss,
                "model_id": r.model.config.init_id, "data_sha256": r.train_set.sha256,
                "val_sha256": r.val_set.sha256 if o.val and r.val_set is not None else None}

    def _save(self, r: _Run, finished: bool = False) -> None:
        """A checkpoint of the run as it stands; never of non-finite parameters."""
        if not all(bool(torch.isfinite(p).all()) for p in r.params):
            raise self._diverged(r, "trained parameters", "not finite")
        rng = ckpt.gather_rng(self.dist)
        if self.dist.is_main:
            ckpt.save_checkpoint(self.directory, r.model, r.optimizer, self._state(r, finished), rng)
        self.dist.barrier()
        r.saved_step = r.step

    def _write_metrics(self, entry: dict[str, Any]) -> None:
        if self.dist.is_main:
            with open(self.directory / METRICS_NAME, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")

    def _evaluate(self, r: _Run) -> dict[str, float]:
        if r.val_set is None:
            return {}
        o, dist = self.options, self.dist
        sums = torch.zeros(2 * len(MODALITY_NAMES) + 2, dtype=torch.float64)
        with torch.no_grad(), self.amp():
            for batch_pos in r.val_set.fixed_batches(max(1, o.batch_size // dist.world // o.grad_accum))[dist.rank::dist.world]:
                batch = collate(r.val_set.encode(batch_pos, 0), r.model.eos_id).to(self.device)
                _accumulate(sums, r.plain(batch.ids, batch.mask, batch.rows, batch.labels), batch)
        dist.all_reduce_sum(sums)
        return _loss_entry(sums, "val_")

    def _finish(self, r: _Run) -> None:
        """The final validation loss, the run in the model's history, the final checkpoint."""
        o = self.options
        final = self._evaluate(r)
        r.val_loss = final.get("val_loss")
        if final:
            self._write_metrics({"run": r.run_id, "stage": o.stage, "step": r.step, "epoch": r.epoch, **final})
        r.model.config.trainable = r.groups
        r.model.config.history.append({
            "run": r.run_id, "stage": o.stage, "steps": r.step, "data": str(Path(o.data).resolve()),
            "val": str(Path(o.val).resolve()) if o.val else None, "samples": len(r.train_set), "task": o.task,
            "trainable": r.groups, "trainable_params": r.n_params, "batch_size": o.batch_size, "lr": o.lr,
            "seed": o.seed, "final_loss": r.losses[-1] if r.losses else None, "val_loss": r.val_loss,
        })
        self._save(r, finished=True)


def train(directory: str | Path, options: TrainOptions, **kwargs) -> TrainResult:
    """Train the model directory ``directory`` in place (see the module docstring).

    Reads ``options.data`` (token records; stage 1 pairs, stage 2 instruction records),
    writes ``DIR/checkpoints/``, ``DIR/metrics.jsonl`` and, at the end, ``DIR/config.json`` +
    ``DIR/adapter.safetensors`` (with the run recorded in ``config.history``). Keyword
    arguments go to :class:`Trainer` (``resume``, ``load``, ``info``, ``on_step``).

    Raises UsageError (bad options, checked before anything loads; an unfinished run without
    ``resume``; a checkpoint of another model or other data), DataError (``file:line`` of bad
    data; nothing in DIR is touched; damaged checkpoint files; the data file changing during
    the run), DirectoryBusy (another run holds DIR), Diverged (a non-finite loss or gradient;
    nothing of the run saved), KeyboardInterrupt after saving a checkpoint on Ctrl-C / SIGTERM.
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
    from ..runtime.files import atomic_output

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
