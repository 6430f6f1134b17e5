"""Training samples from token records, streamed: the file is indexed once, then read by offset.

One pass over the JSONL file checks every record (known codec, ids in range, roles, task,
length within the LLM's context) and keeps only a small index per sample (byte offset,
line, length, target count: ~30 bytes), so memory stays flat in the file's size and bad
data fails before the first step with ``file:line``. Each batch then re-reads its records
by offset and encodes them.

- stage 1 takes pair records (one image or audio segment, one text segment) and makes two
  samples from each: ``[media][text]`` (loss on the text) and ``[text][media]`` (loss on the
  media ids), as far as the codec is read / written by the model;
- stage 2 takes instruction records: roles per :func:`~teal_cli.model.teal_model.segment_role`
  (default: the last segment is the target), rendered through a prompt template of the
  record's ``task`` (or ``--task``) picked per example and epoch by seed.

The order of an epoch is a pure function of ``(seed, epoch)`` (numpy's PCG64), length-
bucketed: so a resumed run replays exactly the batches an uninterrupted run would see.

Because batches are read back by byte offset, the file must not change under a run: the
scan hashes every byte it reads (sha256, which a checkpoint records so ``--resume`` refuses
other data) and keeps the file's identity (device, inode, size, mtime), which every read
compares first.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from ..errors import DataError, UsageError
from ..records import MEDIA_MODALITIES, Record, Segment, parse_record
from .templates import load_templates, render, template_pieces

if TYPE_CHECKING:
    import torch

    from ..model.teal_model import EncodedSequence, TealModel

MODALITY_CODES = {"text": 0, "image": 1, "audio": 2}
MODALITY_NAMES = tuple(MODALITY_CODES)
BUCKET_BATCHES = 64  # a bucket sorts this many batches' worth of samples by length
VAL_SEED_SALT = 0x7EA1  # keeps the validation draw apart from the epoch orders


@dataclass
class DataOptions:
    """What turns records into samples.

    Attributes:
        stage: 1 (pairs, both directions) or 2 (instruction records through templates).
        task: stage 2's template task for records without a ``task`` key; None keeps
            such records' own wording.
        templates: a JSON templates file (task -> prompts) over the built-ins.
        seed: picks templates, the validation split and every epoch's order.
    """

    stage: int = 1
    task: str | None = None
    templates: str | None = None
    seed: int = 0


@dataclass
class Batch:
    """One micro-batch, right-padded.

    Attributes:
        ids: ``[B, T]`` int64 joint ids. mask: ``[B, T]`` attention mask (1 = token).
        rows: ``[N]`` flat indices ``b * T + t`` of positions whose next id is a target.
        labels: ``[N]`` the target ids. label_modality: ``[N]`` codes of :data:`MODALITY_CODES`.
        tokens: real (unpadded) tokens in the batch.
    """

    ids: "torch.Tensor"
    mask: "torch.Tensor"
    rows: "torch.Tensor"
    labels: "torch.Tensor"
    label_modality: "torch.Tensor"
    tokens: int

    def to(self, device) -> "Batch":
        return Batch(self.ids.to(device, non_blocking=True), self.mask.to(device, non_blocking=True),
                     self.rows.to(device, non_blocking=True), self.labels.to(device, non_blocking=True),
                     self.label_modality.to(device, non_blocking=True), self.tokens)


class SampleSet:
    """The indexed samples of one records file (see the module docstring).

    Build with :meth:`scan`; :meth:`subset` splits off validation; :meth:`epoch_batches`
    gives an epoch's batches; :meth:`encode` makes the samples of a batch.
    """

    def __init__(self, path: Path, model: "TealModel", options: DataOptions, templates: dict[str, list[str]],
                 offsets: np.ndarray, lines: np.ndarray, record: np.ndarray, variant: np.ndarray,
                 task: np.ndarray, length: np.ndarray, n_target: np.ndarray, tasks: list[str | None],
                 sha256: str = "", identity: tuple[int, ...] = ()):
        self.path, self.model, self.options, self.templates = path, model, options, templates
        self.offsets, self.lines = offsets, lines
        self.record, self.variant, self.task, self.length, self.n_target = record, variant, task, length, n_target
        self.tasks = tasks
        self.sha256 = sha256  # of the file's bytes as scanned
        self.identity = identity  # (device, inode, size, mtime_ns) as scanned

    def __len__(self) -> int:
        return len(self.record)

    @property
    def n_records(self) -> int:
        return len(self.offsets)

    # ------------------------------------------------------------------ building

    @classmethod
    def scan(cls, path: str | Path, model: "TealModel", options: DataOptions,
             templates: dict[str, list[str]] | None = None, progress: Callable[[int], None] | None = None) -> "SampleSet":
        """Index and check every record of ``path``. Raises DataError naming ``file:line``
        (bad JSON or record, unknown codec, id out of range, no target, unknown task, a
        sample longer than the context) or UsageError for a missing file / unknown --task."""
        path = Path(path)
        if str(path) == "-":
            raise UsageError("--data -: training reads its data more than once; give a file, not stdin")
        if not path.is_file():
            raise UsageError(f"--data {path}: no such file")
        templates = templates if templates is not None else load_templates(options.templates)
        if options.task is not None and options.task not in templates:
            raise UsageError(f"--task {options.task}: unknown task (known: {', '.join(sorted(templates))}; "
                             "add it with --templates FILE)")
        builder = _Builder(model, options, templates)
        offsets, lines = [], []
        s_record, s_variant, s_task, s_length, s_target = [], [], [], [], []
        position = 0
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            identity = _identity(os.fstat(f.fileno()))
            for lineno, raw in enumerate(f, 1):
                digest.update(raw)
                start, position = position, position + len(raw)
                if not raw.strip():
                    continue
                where = f"{path}:{lineno}"
                record = parse_line(raw, where, first=lineno == 1)
                samples = builder.check(record, where)
                index = len(offsets)
                offsets.append(start)
                lines.append(lineno)
                for variant, task, length, n_target in samples:
                    s_record.append(index)
                    s_variant.append(variant)
                    s_task.append(task)
                    s_length.append(length)
                    s_target.append(n_target)
                if progress is not None:
                    progress(1)
            if _identity(os.fstat(f.fileno())) != identity or position != identity[2]:
                raise DataError(f"{path}: the file changed while it was being checked; start again once it is complete")
        if not offsets:
            raise DataError(f"{path}: no records (the file is empty); give a file of token records made by 'teal tokenize'")
        return cls(path, model, options, templates, np.asarray(offsets, np.int64), np.asarray(lines, np.int64),
                   np.asarray(s_record, np.int64), np.asarray(s_variant, np.int8), np.asarray(s_task, np.int16),
                   np.asarray(s_length, np.int32), np.asarray(s_target, np.int32), builder.tasks,
                   digest.hexdigest(), identity)

    def subset(self, records: np.ndarray) -> "SampleSet":
        """The samples of the given record indices (both directions of a pair stay together)."""
        keep = np.isin(self.record, records)
        return SampleSet(self.path, self.model, self.options, self.templates, self.offsets, self.lines,
                         self.record[keep], self.variant[keep], self.task[keep], self.length[keep],
                         self.n_target[keep], self.tasks, self.sha256, self.identity)

    def check_unchanged(self, stat: os.stat_result | None = None) -> None:
        """Raise DataError when the file is no longer the one :meth:`scan` checked (edited,
        replaced or removed): batches are read back by byte offset and would be other records."""
        if not self.identity:
            return
        try:
            now = _identity(stat if stat is not None else os.stat(self.path))
        except OSError:
            now = ()
        if now != self.identity:
            when = datetime.datetime.fromtimestamp(self.identity[3] / 1e9).isoformat(sep=" ", timespec="seconds")
            raise DataError(f"{self.path}: the file changed during training (it was {self.identity[2]} bytes, modified "
                            f"{when}, when the run checked it); training reads it again at every epoch: restore it and "
                            "continue with --resume, or start over")

    def split(self, fraction: float, seed: int) -> tuple["SampleSet", "SampleSet | None"]:
        """``(train, val)``: ``fraction`` of the records (at least one, when there are two or
        more) held out, drawn by ``seed``; ``val`` is None with ``fraction`` 0."""
        n = self.n_records
        n_val = min(n - 1, max(1, round(fraction * n))) if fraction > 0 and n >= 2 else 0
        if n_val == 0:
            return self, None
        order = np.random.Generator(np.random.PCG64([seed, VAL_SEED_SALT])).permutation(n)
        return self.subset(np.sort(order[n_val:])), self.subset(np.sort(order[:n_val]))

    # ------------------------------------------------------------------ epochs

    def steps_per_epoch(self, batch_size: int) -> int:
        return len(self) // batch_size

    def epoch_batches(self, epoch: int, batch_size: int, *, bucket: bool = True) -> list[np.ndarray]:
        """The batches of ``epoch`` (sample positions in this set), a pure function of
        ``(seed, epoch)``: shuffled, then sorted by length within buckets of
        :data:`BUCKET_BATCHES` batches so a batch pads little, then the batches shuffled.
        The last incomplete batch is dropped (every step sees ``batch_size`` samples)."""
        gen = np.random.Generator(np.random.PCG64([self.options.seed, epoch]))
        order = gen.permutation(len(self))
        if bucket:
            span = batch_size * BUCKET_BATCHES
            order = np.concatenate([chunk[np.argsort(self.length[chunk], kind="stable")]
                                    for chunk in np.array_split(order, range(span, len(order), span))])
        n = len(order) // batch_size
        batches = [order[i * batch_size:(i + 1) * batch_size] for i in range(n)]
        return [batches[i] for i in gen.permutation(n)] if bucket else batches

    def fixed_batches(self, batch_size: int) -> list[np.ndarray]:
        """Every sample once, sorted by length (for validation)."""
        order = np.argsort(self.length, kind="stable")
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]

    # ------------------------------------------------------------------ samples

    def encode(self, positions: Sequence[int], epoch: int) -> list["EncodedSequence"]:
        """The encoded samples at ``positions`` for ``epoch`` (templates are picked per epoch)."""
        out = []
        try:
            f = open(self.path, "rb")
        except OSError:
            self.check_unchanged()
            raise
        with f:
            self.check_unchanged(os.fstat(f.fileno()))
            for pos in positions:
                rec_index = int(self.record[pos])
                f.seek(int(self.offsets[rec_index]))
                line = int(self.lines[rec_index])
                record = parse_line(f.readline(), f"{self.path}:{line}", first=line == 1)
                out.append(self._sample(record, int(self.variant[pos]), int(self.task[pos]), epoch, rec_index, pos))
        return out

    def _sample(self, record: Record, variant: int, task: int, epoch: int, rec_index: int, pos: int) -> "EncodedSequence":
        if self.options.stage == 1:
            return self.model.encode_record(pair_sample(record, variant))
        name = self.tasks[task]
        template = None
        if name is not None:
            prompts = self.templates[name]
            pick = np.random.Generator(np.random.PCG64([self.options.seed, epoch, rec_index])).integers(len(prompts))
            template = prompts[int(pick)]
        return self.model.encode_record(render(record, template, record_roles(record)))

    def target_tokens(self, positions: Sequence[int]) -> int:
        return int(self.n_target[np.asarray(positions, dtype=np.int64)].sum())


def _identity(stat: os.stat_result) -> tuple[int, ...]:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


# ---------------------------------------------------------------------- records -> samples


def parse_line(raw: bytes, where: str, *, first: bool = False) -> Record:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start} of the line)") from None
    if first:
        line = line.lstrip("\ufeff")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    return parse_record(obj, where)


def pair_parts(record: Record, where: str) -> tuple[Segment, Segment]:
    """``(media, text)`` of a stage-1 pair record, or DataError."""
    media = [s for s in record.segments if s.modality in MEDIA_MODALITIES]
    text = [s for s in record.segments if s.modality == "text"]
    if len(media) != 1 or len(text) != 1 or len(record.segments) != 2:
        kinds = ", ".join(s.modality for s in record.segments) or "none"
        raise DataError(f"{where}: stage 1 takes pair records (one image or audio segment and one text segment), "
                        f"this one has: {kinds}; use --stage 2 for instruction records")
    if media[0].tokens is None:
        raise DataError(f"{where}: the {media[0].modality} segment has no tokens (tokenize it first with 'teal tokenize')")
    return media[0], text[0]


def pair_sample(record: Record, variant: int) -> Record:
    """Variant 0: ``[media][text]`` (text is the target); 1: ``[text][media]``."""
    media, text = pair_parts(record, f"record '{record.id}'")
    first, second = (media, text) if variant == 0 else (text, media)
    return Record(id=record.id, segments=[_role(first, "prompt"), _role(second, "target")])


def record_roles(record: Record) -> list[str]:
    from ..model.teal_model import segment_role

    return [segment_role(record, i) for i in range(len(record.segments))]


def _role(segment: Segment, role: str) -> Segment:
    return segment.with_role(role)


class _Builder:
    """Checks one record and says which samples it gives (variant, task, length, targets)."""

    def __init__(self, model: "TealModel", options: DataOptions, templates: dict[str, list[str]]):
        self.model, self.options, self.templates = model, options, templates
        self.tasks: list[str | None] = [None]
        self.task_extra: dict[str | None, int] = {None: 0}
        self.context = model.context_length

    def task_index(self, name: str | None) -> int:
        if name not in self.task_extra:
            extra = 0
            for prompt in self.templates[name]:
                # Each text piece becomes its own segment, tokenized alone (as encode_record does).
                pieces = [p for p in template_pieces(prompt) if p]
                extra = max(extra, sum(len(self.model.text_ids(p)) for p in pieces))
            self.task_extra[name] = extra
            self.tasks.append(name)
        return self.tasks.index(name)

    def check(self, record: Record, where: str) -> list[tuple[int, int, int, int]]:
        from ..model.config import ModelDirError

        out = []
        if self.options.stage == 1:
            media, _ = pair_parts(record, where)
            try:
                entry = self.model.config.codec(media.codec)
            except ModelDirError as exc:
                raise DataError(f"{where}: {exc}") from None
            variants = ([0] if entry.input else []) + ([1] if entry.output and entry.input else [])
            for variant in variants:
                enc = self._encode(pair_sample(record, variant), where)
                out.append(self._sized(enc, 0, 0, variant, where))
            return out
        roles = self._roles(record, where)
        if "target" not in roles:
            raise DataError(f"{where}: no segment has \"role\": \"target\"; mark what the model should learn to produce")
        for segment, role in zip(record.segments, roles):
            if role == "target" and segment.modality in MEDIA_MODALITIES and segment.codec:
                try:
                    entry = self.model.config.codec(segment.codec)
                except ModelDirError as exc:
                    raise DataError(f"{where}: {exc}") from None
                if not entry.output:
                    raise DataError(f"{where}: target segment of codec '{entry.name}', which this model only reads; "
                                    "it cannot learn to write it (make the model with --codec, not --input-codec)")
        task = record.extra.get("task", self.options.task)
        if task is not None and (not isinstance(task, str) or task not in self.templates):
            raise DataError(f"{where}: unknown task {json.dumps(task)} (known: {', '.join(sorted(self.templates))}; "
                            "add it with --templates FILE)")
        t_index = self.task_index(task)
        enc = self._encode(render(record, None, roles), where)
        return [self._sized(enc, self.task_extra[task], t_index, 0, where)]

    def _roles(self, record: Record, where: str) -> list[str]:
        try:
            return record_roles(record)
        except DataError as exc:
            raise DataError(f"{where}: {str(exc).split(': ', 1)[-1]}") from None

    def _encode(self, record: Record, where: str) -> "EncodedSequence":
        try:
            return self.model.encode_record(record)
        except DataError as exc:
            # encode_record names the record id; the file and line are what a user opens.
            message = str(exc)
            if message.startswith("record '"):
                message = message.split(": ", 1)[-1]
            raise DataError(f"{where}: {message}") from None

    def _sized(self, enc: "EncodedSequence", extra: int, task: int, variant: int, where: str) -> tuple[int, int, int, int]:
        length = len(enc.ids)
        if self.context and length + extra > self.context:
            more = f" with the longest template of its task ({extra} tokens)" if extra else ""
            raise DataError(f"{where}: the sample has {length + extra} tokens{more}, more than the base LLM's context "
                            f"of {self.context}; shorten the record or drop it")
        n_target = sum(enc.target[1:])
        if n_target == 0:
            raise DataError(f"{where}: the sample has no target token to learn")
        return variant, task, length, n_target


def collate(samples: Sequence["EncodedSequence"], pad_id: int) -> Batch:
    """Right-pad encoded samples into a :class:`Batch` (see its attributes)."""
    import torch

    width = max(len(s.ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    rows, labels, mods = [], [], []
    tokens = 0
    for b, s in enumerate(samples):
        n = len(s.ids)
        ids[b, :n] = torch.tensor(s.ids, dtype=torch.long)
        mask[b, :n] = 1
        tokens += n
        for t in range(1, n):
            if s.target[t]:
                rows.append(b * width + t - 1)
                labels.append(s.ids[t])
                mods.append(MODALITY_CODES.get(s.modality[t], 0))
    return Batch(ids, mask, torch.tensor(rows, dtype=torch.long), torch.tensor(labels, dtype=torch.long),
                 torch.tensor(mods, dtype=torch.long), tokens)
