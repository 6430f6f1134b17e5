"""teal train: TEAL's two training stages on a frozen LLM, with exact resume."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .common import Log, QuietOpt, SeedOpt, VerboseOpt, handle_errors

HELP = """Train a model directory in place on token records (TEAL's recipe; the base LLM stays frozen).

--stage 1 trains only the projections on pair records (one image or audio segment and one text
segment), as [media][text] and [text][media] samples, the loss on the second segment.
--stage 2 trains E, O, projections and boundary rows plus bias-norm tuning of the LLM (added on
the first stage-2 run; --bias-norm scale adds scales too) on instruction records: segments
with "role": "prompt" / "target" (default: the last segment is the target), rendered through a
prompt template of the record's "task" key or --task (built in: caption, asr, text-to-image,
text-to-speech, mcq; --templates FILE adds or replaces tasks). --lora R uses LoRA instead.
--train / --freeze add or remove groups (proj, embed, output, boundary, bias_norm, lora).

Checkpoints go to DIR/checkpoints (every --checkpoint-every steps and at the end; Ctrl-C saves
one and exits 130); --resume continues the same loss curve after any stop, kill -9 included.
Metrics go to DIR/metrics.jsonl; when stderr is not a terminal (a cluster job's log) a plain
progress line is printed every 30 s. One run per directory at a time (DIR/.train.lock names
the running one); a NaN or infinite loss stops the run (exit 1) keeping the last finite state;
--resume refuses other data or a re-made model. The same command runs data-parallel under torchrun or
'accelerate launch -m teal_cli train ...' (each process its share of every batch).

\b
Examples:
  teal train runs/digits --data train.tok.jsonl --stage 1 --epochs 2
  teal train runs/digits --data sft.tok.jsonl --stage 2 --task caption --max-steps 300 --lr 2e-3
  teal train runs/digits --data sft.tok.jsonl --stage 2 --lora 8 --freeze embed
  teal train runs/digits --data sft.tok.jsonl --stage 2 --resume
  torchrun --nproc-per-node 4 -m teal_cli train runs/teal-7b --data sft.tok.jsonl --stage 2 --batch-size 64
"""


@handle_errors
def train(
    directory: Annotated[str, typer.Argument(metavar="DIR", help="The model directory (from 'teal init-embeddings'), trained in place.", show_default=False)],
    data: Annotated[str, typer.Option("--data", help="Token records to train on (JSONL file).", show_default=False)],
    stage: Annotated[int, typer.Option("--stage", help="1: projections on pairs; 2: every non-textual parameter + bias-norm on instructions.")] = 1,
    val: Annotated[Optional[str], typer.Option("--val", help="Validation records [default: --val-fraction of --data, held out by seed].", show_default=False)] = None,
    val_fraction: Annotated[float, typer.Option("--val-fraction", help="Share of --data records held out when no --val (0: none).")] = 0.05,
    task: Annotated[Optional[str], typer.Option("--task", help="Stage 2: template task for records without a 'task' key [default: their own wording].", show_default=False)] = None,
    templates: Annotated[Optional[str], typer.Option("--templates", help="JSON file: task -> list of prompts ({input} marks the prompt segments).", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per optimizer step, over all processes.", min=1)] = 32,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="Micro-batches per step (gradient accumulation).", min=1)] = 1,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW, cosine decay after warm-up).")] = 1e-3,
    warmup: Annotated[Optional[int], typer.Option("--warmup", help="Warm-up steps [default: 5% of the steps].", min=0, show_default=False)] = None,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay.")] = 0.0,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Optimizer steps [default: --epochs worth].", min=1, show_default=False)] = None,
    epochs: Annotated[Optional[float], typer.Option("--epochs", help="Passes over the data when no --max-steps [default: 1].", show_default=False)] = None,
    clip: Annotated[float, typer.Option("--clip", help="Clip the gradient norm to this (0: no clipping; negative is an error).")] = 1.0,
    bias_norm: Annotated[Optional[str], typer.Option("--bias-norm", help="Stage 2: bias (biases + norm weights), scale (also scales), none [default: bias].", show_default=False)] = None,
    lora: Annotated[Optional[int], typer.Option("--lora", help="Stage 2: LoRA of rank R on the LLM's linear layers (peft) instead of bias-norm.", min=1, show_default=False)] = None,
    train_groups: Annotated[list[str], typer.Option("--train", help="Also train this group (repeatable): proj, embed, output, boundary, bias_norm, lora.")] = [],
    freeze: Annotated[list[str], typer.Option("--freeze", help="Do not train this group (repeatable), e.g. --freeze bias_norm.")] = [],
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Steps between checkpoints (0: only at the end).", min=0)] = 100,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Steps between validation losses (0: only at the end).", min=0)] = 0,
    log_every: Annotated[int, typer.Option("--log-every", help="Steps between metrics lines.", min=1)] = 1,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in DIR/checkpoints (starts it when there is none).")] = False,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="Recompute the LLM's activations in backward (long sequences).")] = False,
    no_bucket: Annotated[bool, typer.Option("--no-bucket", help="Plain shuffled batches (no length bucketing).")] = False,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA when available), cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="Base LLM dtype: auto (bf16 on GPU and on CPUs with native bf16, AVX512_BF16 or AMX; else fp32), float32, bfloat16. Trained parameters stay fp32.")] = "auto",
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    from ..train.loop import TrainOptions
    from ..train.loop import train as run_training

    log = Log(quiet, verbose)
    options = TrainOptions(
        stage=stage, data=data, val=val, task=task, templates=templates, batch_size=batch_size, grad_accum=grad_accum,
        lr=lr, weight_decay=weight_decay, warmup=warmup, max_steps=max_steps, epochs=epochs, clip=clip, seed=seed,
        val_fraction=val_fraction, eval_every=eval_every, checkpoint_every=checkpoint_every, log_every=log_every,
        bias_norm=bias_norm, lora=lora, train=list(train_groups), freeze=list(freeze),
        gradient_checkpointing=gradient_checkpointing, bucket=not no_bucket, device=device, dtype=dtype,
    )
    with _progress(log) as on_step:
        result = run_training(directory, options, resume=resume, info=log.info, on_step=on_step)
    print(str(result.directory))


PLAIN_EVERY_S = 30.0  # a log file (stderr not a terminal) gets a progress line this often


class _progress:
    """Progress on stderr: a one-line rich display on a terminal; elsewhere (a cluster job's log)
    a plain line at the first step, every :data:`PLAIN_EVERY_S` seconds and at the last step
    (step/total, loss, tokens/s, learning rate, ETA). Nothing with -q."""

    def __init__(self, log: Log, every_s: float = PLAIN_EVERY_S):
        self.log = log
        self.bar = None
        self.task = None
        self.every_s = every_s
        self.last: float | None = None

    def __enter__(self):
        if self.log.quiet:
            return None
        return self.update if self.log.interactive else self.plain

    def plain(self, info: dict) -> None:
        import time

        now = time.monotonic()
        if self.last is not None and now - self.last < self.every_s and info["step"] < info["total"]:
            return
        self.last = now
        val = f"  val {info['val_loss']:.4f}" if "val_loss" in info else ""
        eta = int(round(info["eta_s"]))
        self.log.info(f"step {info['step']}/{info['total']}  loss {info['loss']:.4f}{val}  {info['tokens_per_s']:,.0f} tok/s"
                      f"  lr {info['lr']:.3g}  ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")

    def update(self, info: dict) -> None:
        if self.bar is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                                TimeRemainingColumn(), console=Console(stderr=True), transient=True)
            self.bar.start()
            self.task = self.bar.add_task("train", total=info["total"], stats="")
        stats = f"loss {info['loss']:.4f}  {info['tokens_per_s']:,.0f} tok/s"
        if "val_loss" in info:
            stats += f"  val {info['val_loss']:.4f}"
        self.bar.update(self.task, completed=info["step"], stats=stats)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False
