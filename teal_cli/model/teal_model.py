"""TealModel: a frozen Hugging Face causal LM that reads and writes modality tokens.

TEAL (Yang et al., 2023, §3) gives each modality tokenizer (codec) its own embedding matrix
``E`` (K x d_code) and output matrix ``O`` (K x d_code), both initialised from the codec's
codebook, joined to the LLM by two projections: ``proj_in`` (d_code -> d_llm) on the input
side and ``proj_out`` (d_llm -> d_code) on the output side. The text embedding and the LM
head stay frozen, and the LLM's own weights are never modified:

- input: a text id embeds through the LLM's embedding, a boundary token (``<img>``...) through
  its own trainable row, a codec id ``j`` as ``proj_in(E[j])``;
- output: ``logits = [lm_head(h) | boundary_out · h | O · proj_out(h) per output codec]``,
  one joint vocabulary laid out as in :mod:`teal_cli.model.config`.

Shapes: ``ids`` are ``[B, T]`` int64 joint ids; hidden states ``[B, T, d_llm]``; logits
``[B, T, V]`` float32 with ``V = config.vocab_size`` (input-only codecs' columns are -inf).
"""

from __future__ import annotations

import inspect
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from ..errors import DataError, UsageError
from ..records import Record, Segment
from ..runtime.files import apply_umask, replace_dir, temp_dir_beside
from .config import ADAPTER_NAME, BOUNDARY_TOKENS, CONFIG_NAME, CodecEntry, ModelConfig, ModelDirError
from .bias_norm import add_bias_norm

if TYPE_CHECKING:
    from ..codecs.base import Codec
    from .llm import BaseLLM

INITS = ("codebook", "random")
DEFAULT_RANDOM_CODE_DIM = 256


class CodecHead(nn.Module):
    """One codec's parameters: ``embedding`` E ``[K, d_code]`` and ``proj_in`` (reading);
    ``proj_out`` and ``output`` O ``[K, d_code]`` (writing)."""

    def __init__(self, vocab_size: int, code_dim: int, hidden_size: int, *, input: bool, output: bool):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(vocab_size, code_dim)) if input else None
        self.proj_in = nn.Linear(code_dim, hidden_size) if input else None
        self.proj_out = nn.Linear(hidden_size, code_dim) if output else None
        self.output = nn.Parameter(torch.zeros(vocab_size, code_dim)) if output else None

    def embed(self, local_ids: torch.Tensor) -> torch.Tensor:
        """``[...]`` ids in ``[0, K)`` to ``[..., d_llm]``."""
        return self.proj_in(self.embedding[local_ids])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., d_llm]`` to ``[..., K]`` float32 logits: ``O · proj_out(h)``."""
        return self.proj_out(hidden.float()) @ self.output.t()


@dataclass
class EncodedSequence:
    """A record as the model sees it.

    Attributes:
        ids: joint-vocabulary ids, the model's input sequence.
        target: per position, whether its id is a token to predict (loss on targets only).
        modality: per position, ``text``, ``image`` or ``audio`` (boundary tokens count as
            their modality).
    """

    ids: list[int]
    target: list[bool]
    modality: list[str]


@dataclass
class TealOutput:
    logits: torch.Tensor
    hidden: torch.Tensor
    past_key_values: Any = None


def segment_role(record: Record, index: int) -> str:
    """``prompt`` or ``target``: a segment's ``role``, else the last segment is the target."""
    roles = [s.extra.get("role") for s in record.segments]
    if any(r is not None for r in roles):
        role = roles[index] or "prompt"
        if role not in ("prompt", "target"):
            raise DataError(f"record '{record.id}': segments[{index}].role is {role!r}; expected 'prompt' or 'target'")
        return role
    return "target" if index == len(record.segments) - 1 else "prompt"


class TealModel(nn.Module):
    """A frozen causal LM plus TEAL's per-codec matrices (see the module docstring).

    Build one with :func:`init_model` (what ``teal init-embeddings`` runs) or load one with
    :meth:`from_dir`. Attributes: ``config`` (:class:`ModelConfig`), ``llm`` (the frozen
    transformers model), ``tokenizer``, ``heads`` (one :class:`CodecHead` per codec key),
    ``boundary_in`` / ``boundary_out`` (``[n_boundary, d_llm]``).
    """

    def __init__(self, config: ModelConfig, base: "BaseLLM"):
        super().__init__()
        self.config = config
        self.llm = base.model
        self.tokenizer = base.tokenizer
        self.base_info = base
        d = config.hidden_size
        n_boundary = len(config.boundary_list)
        self.boundary_in = nn.Parameter(torch.zeros(n_boundary, d))
        self.boundary_out = nn.Parameter(torch.zeros(n_boundary, d))
        self.heads = nn.ModuleDict({
            c.key: CodecHead(c.vocab_size, c.code_dim, d, input=c.input, output=c.output) for c in config.codecs
        })
        if config.groups.get("bias_norm"):
            add_bias_norm(self.backbone, config.groups["bias_norm"])
        if config.groups.get("lora"):
            from .lora import add_lora

            add_lora(self, config.groups["lora"])
        # transformers 5 renamed the KV cache argument and output from past_key_values to cache.
        params = inspect.signature(self.backbone.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._prefix_ids = list(self.tokenizer("", add_special_tokens=True).input_ids)
        self.directory: Path | None = None  # set by from_dir; generation records it
        self.to(next(self.llm.parameters()).device)

    # ------------------------------------------------------------------ the LLM's parts

    @property
    def backbone(self) -> nn.Module:
        """The transformer without its LM head (Llama's ``model``, GPT-2's ``transformer``)."""
        return self.llm.base_model

    @property
    def text_embedding(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    @property
    def lm_head(self) -> nn.Module:
        return self.llm.get_output_embeddings()

    @property
    def device(self) -> torch.device:
        return self.boundary_in.device

    @property
    def eos_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            eos = self.llm.config.eos_token_id
            eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        if eos is None:
            raise ModelDirError(f"base LLM '{self.config.llm.get('name')}' defines no end-of-sequence token")
        return int(eos)

    # ------------------------------------------------------------------ records <-> ids

    def text_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` as plain text: a special string in it (``<|im_end|>``,
        ``</s>``) is spelled out, never the special token, so data cannot end a target early
        or fake a turn (transformers' ``split_special_tokens``)."""
        return list(self.tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids)

    def segment_ids(self, segment: Segment, where: str) -> list[int]:
        """Joint ids of one segment: text through the tokenizer, media as
        ``<open> offset+ids </close>``. Errors name ``where``."""
        if segment.modality == "text":
            return self.text_ids(segment.text)
        if segment.tokens is None:
            raise DataError(f"{where}: {segment.modality} segment has no tokens (tokenize it first with 'teal tokenize')")
        try:
            entry = self.config.codec(segment.codec)
        except ModelDirError as exc:
            raise DataError(f"{where}: {exc}") from None
        if not entry.input:
            raise DataError(f"{where}: codec '{entry.name}' is output-only in this model; it cannot be read")
        recorded = segment.weights  # the parser keeps it here, never in extra
        common = min(len(recorded or ""), len(entry.weights or ""))
        if common and recorded[:common].lower() != entry.weights[:common].lower():  # as codecs.base.check_segment_weights
            raise DataError(f"{where}: tokens were made by weights {recorded} of codec '{entry.name}', "
                            f"but the model was built for weights {entry.weights}; tokenize again with the model's codec")
        if segment.tokens and max(segment.tokens) >= entry.vocab_size:
            raise DataError(f"{where}: token id {max(segment.tokens)} is out of range for codec '{entry.name}' "
                            f"(vocab_size {entry.vocab_size})")
        open_id = self.config.boundary_id(entry.modality)
        return [open_id, *(entry.offset + t for t in segment.tokens), open_id + 1]

    def encode_record(self, record: Record, *, prompt_only: bool = False) -> EncodedSequence:
        """A record to the model's sequence: the tokenizer's prefix (BOS where it adds one),
        each segment's ids, and EOS after a final target segment. Target positions are the
        target segments' ids (their boundary tokens included) and that EOS; which segments
        are targets follows :func:`segment_role`.

        With ``prompt_only`` (what generation continues from) segments whose ``role`` is
        ``target`` are left out and everything else is prompt: a record without roles is a
        prompt as a whole. Raises DataError naming the record.
        """
        ids, target, modality = list(self._prefix_ids), [False] * len(self._prefix_ids), ["text"] * len(self._prefix_ids)
        n = len(record.segments)
        for i, segment in enumerate(record.segments):
            if prompt_only:
                if segment.extra.get("role") == "target":
                    continue
                role = "prompt"
            else:
                role = segment_role(record, i)
            seg_ids = self.segment_ids(segment, f"record '{record.id}' segments[{i}]")
            ids += seg_ids
            target += [role == "target"] * len(seg_ids)
            modality += [segment.modality] * len(seg_ids)
            if role == "target" and i == n - 1:
                ids.append(self.eos_id)
                target.append(True)
                modality.append(segment.modality)
        return EncodedSequence(ids, target, modality)

    def check_length(self, length: int, where: str) -> None:
        limit = self.context_length
        if limit and length > limit:
            raise DataError(f"{where}: {length} tokens exceed the base LLM's context of {limit}")

    @property
    def context_length(self) -> int | None:
        cfg = self.llm.config
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(cfg, key, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def decode_ids(self, ids: Sequence[int]) -> list[Segment]:
        """Joint ids (as generation writes them, EOS excluded) back to segments: text runs
        decoded by the tokenizer, ``<img> ... </img>`` runs to image segments of their codec
        (with the segment spec: ``shape`` / ``frame_rate``). Ids of an unclosed media run
        still make a segment."""
        segments: list[Segment] = []
        text: list[int] = []
        media: list[int] | None = None
        media_modality = None
        t_vocab, b0, nb = self.config.text_vocab_size, self.config.boundary_offset, len(self.config.boundary_list)

        def flush_text():
            if text:
                segments.append(Segment(modality="text", text=self.tokenizer.decode(text, skip_special_tokens=True)))
                text.clear()

        def flush_media():
            if media:
                segments.append(self.media_segment(media_modality, media))

        for tok in ids:
            tok = int(tok)
            if b0 <= tok < b0 + nb:
                modality, token = self.config.boundary_list[tok - b0]
                if token.startswith("</"):
                    flush_media()
                    media, media_modality = None, None
                else:
                    flush_text()
                    flush_media()
                    media, media_modality = [], modality
            elif media is not None:
                media.append(tok)
            elif tok < t_vocab:
                text.append(tok)
        flush_text()
        flush_media()
        return segments

    def media_segment(self, modality: str, joint_ids: Sequence[int]) -> Segment:
        """A media segment from joint ids of one codec (the codec of the first id)."""
        entry = self.codec_of_id(joint_ids[0])
        if entry is None or entry.modality != modality:
            raise DataError(f"generated id {joint_ids[0]} is not a {modality} codec id")
        tokens = [int(t) - entry.offset for t in joint_ids]
        seg = Segment(modality=modality, codec=entry.name, tokens=tokens)
        grid = entry.grid
        if grid and len(tokens) == math.prod(grid):
            seg.shape = list(grid)
        if "frame_rate" in entry.segment:
            seg.frame_rate = entry.segment["frame_rate"]
        if entry.weights:
            seg.weights = entry.weights
        return seg

    def codec_of_id(self, joint_id: int) -> CodecEntry | None:
        for entry in self.config.codecs:
            if entry.offset <= joint_id < entry.offset + entry.vocab_size:
                return entry
        return None

    # ------------------------------------------------------------------ forward

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` joint ids to ``[B, T, d_llm]`` input embeddings in the LLM's dtype.

        Every part is computed for all positions and selected with ``torch.where``: no
        data-dependent shapes, so the step can be compiled or graph-captured."""
        cfg = self.config
        t_vocab = cfg.text_vocab_size
        emb = self.text_embedding(ids.clamp(max=t_vocab - 1))
        dtype = emb.dtype
        nb = len(cfg.boundary_list)
        if nb:
            local = (ids - cfg.boundary_offset).clamp(0, nb - 1)
            is_b = (ids >= cfg.boundary_offset) & (ids < cfg.boundary_offset + nb)
            emb = torch.where(is_b[..., None], self.boundary_in[local].to(dtype), emb)
        for entry in cfg.codecs:
            if not entry.input:
                continue
            local = (ids - entry.offset).clamp(0, entry.vocab_size - 1)
            inside = (ids >= entry.offset) & (ids < entry.offset + entry.vocab_size)
            emb = torch.where(inside[..., None], self.heads[entry.key].embed(local).to(dtype), emb)
        return emb

    def hidden_states(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                      position_ids: torch.Tensor | None = None, past_key_values: Any = None,
                      use_cache: bool = False) -> tuple[torch.Tensor, Any]:
        """The LLM's last hidden states ``[B, T, d_llm]`` for joint ``ids`` (and the KV cache).

        ``position_ids`` default to the count of attended positions before each one, so
        left-padded batches get the same positions as unpadded sequences."""
        if attention_mask is None:
            attention_mask = torch.ones_like(ids)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            if past_key_values is not None and ids.shape[1] < attention_mask.shape[1]:
                position_ids = position_ids[:, -ids.shape[1]:]
        kwargs = {self._cache_kw: past_key_values} if past_key_values is not None else {}
        out = self.backbone(inputs_embeds=self.embed(ids), attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=use_cache, return_dict=True, **kwargs)
        return out.last_hidden_state, (out.get(self._cache_kw) if use_cache else None)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., d_llm]`` hidden states to ``[..., V]`` float32 joint logits."""
        parts = [self.lm_head(hidden).float()]
        if len(self.config.boundary_list):
            parts.append(hidden.float() @ self.boundary_out.t())
        for entry in self.config.codecs:
            if entry.output:
                parts.append(self.heads[entry.key].logits(hidden))
            else:
                parts.append(hidden.new_full((*hidden.shape[:-1], entry.vocab_size), float("-inf"), dtype=torch.float32))
        return torch.cat(parts, dim=-1)

    def target_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy ``[N]`` (float32) of joint ``labels`` ``[N]`` given the hidden
        states ``[N, d_llm]`` that predict them, under the segment grammar that generation
        decodes with (:mod:`teal_cli.model.generate`):

        - a codec id is scored against that codec's ids only (inside ``<img> ... </img>``
          nothing else can be sampled), which needs only the codec's head, not the text head;
        - a closing token (``</img>``) is forced by the grammar: loss 0;
        - except inside audio, where the model itself ends the segment: an audio codec id is
          scored against that codec's ids plus ``</aud>``, and ``</aud>`` against every output
          audio codec's ids plus ``</aud>`` (its logit ``boundary_out[</aud>] · h``, as
          generation's audio states allow); without this loss a model never learns to stop
          speaking and every segment runs to ``--max-audio-seconds``;
        - anything else (text ids, EOS, opening tokens) against the text vocabulary plus the
          opening tokens, as in the text state.

        Training on the full joint softmax would spend its first steps pushing image ids
        above 49k text logits that decoding never lets compete (measured on SmolLM2 with a
        K=64 codec: 24.7 nats at step 1 against ln 64 = 4.2 here). Raises ValueError for a
        label no output segment can produce (an input-only codec's id).
        """
        import torch.nn.functional as F

        cfg = self.config
        loss = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
        done = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
        audio_close = cfg.boundary_id("audio", closing=True) if "audio" in cfg.boundary else None

        def close_logit(h: torch.Tensor) -> torch.Tensor:  # [R, 1]: the </aud> logit
            return h.float() @ self.boundary_out[audio_close - cfg.boundary_offset][:, None]

        for entry in cfg.codecs:
            inside = (labels >= entry.offset) & (labels < entry.offset + entry.vocab_size)
            if not bool(inside.any()):
                continue
            if not entry.output:
                raise ValueError(f"codec '{entry.name}' is input-only in this model: its ids cannot be targets")
            rows = inside.nonzero().squeeze(1)
            h = hidden[rows]
            logits = self.heads[entry.key].logits(h)
            if entry.modality == "audio":
                logits = torch.cat([logits, close_logit(h)], dim=-1)
            part = F.cross_entropy(logits, labels[rows] - entry.offset, reduction="none")
            loss = loss.index_put((rows,), part)
            done |= inside
        audio_out = [e for e in cfg.codecs if e.output and e.modality == "audio"]
        if audio_close is not None and audio_out:
            ends = labels == audio_close
            if bool(ends.any()):
                rows = ends.nonzero().squeeze(1)
                h = hidden[rows]
                logits = torch.cat([self.heads[e.key].logits(h) for e in audio_out] + [close_logit(h)], dim=-1)
                target = torch.full_like(labels[rows], logits.shape[-1] - 1)
                loss = loss.index_put((rows,), F.cross_entropy(logits, target, reduction="none"))
                done |= ends
        opens = [cfg.boundary_id(m) for m in cfg.boundary]
        closes = torch.tensor([o + 1 for o in opens], dtype=labels.dtype, device=labels.device)
        done |= torch.isin(labels, closes)
        rest = (~done).nonzero().squeeze(1)
        if rest.numel():
            h = hidden[rest]
            target = labels[rest]
            parts = [self.lm_head(h).float()]
            local = target.clone()
            if opens:
                open_rows = torch.tensor([o - cfg.boundary_offset for o in opens], device=labels.device)
                parts.append(h.float() @ self.boundary_out[open_rows].t())
                for j, o in enumerate(opens):
                    local = torch.where(target == o, cfg.text_vocab_size + j, local)
            if bool((local >= cfg.text_vocab_size + len(opens)).any()):
                raise ValueError("a target id is neither text, an opening token nor an output codec id")
            loss = loss.index_put((rest,), F.cross_entropy(torch.cat(parts, dim=-1), local, reduction="none"))
        return loss

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                position_ids: torch.Tensor | None = None, past_key_values: Any = None,
                use_cache: bool = False) -> TealOutput:
        """Joint logits ``[B, T, V]`` for ``input_ids`` ``[B, T]`` (see :meth:`hidden_states`)."""
        hidden, past = self.hidden_states(input_ids, attention_mask, position_ids=position_ids,
                                          past_key_values=past_key_values, use_cache=use_cache)
        return TealOutput(logits=self.logits(hidden), hidden=hidden, past_key_values=past)

    # ------------------------------------------------------------------ parameters and files

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """teal's parameters only (never the LLM's own weights), by name."""
        return {name: p for name, p in self.named_parameters() if is_adapter_param(name)}

    def base_parameters(self) -> dict[str, torch.Tensor]:
        """The base LLM's own weights (frozen; must stay bit-identical)."""
        return {name: p for name, p in self.named_parameters() if not is_adapter_param(name)}

    def save(self, directory: str | Path, *, overwrite: bool = True, replace: bool = False) -> Path:
        """Write ``config.json`` + ``adapter.safetensors`` atomically (a temp directory renamed
        into place; an existing model directory is replaced only once the new one is complete).

        Into an existing directory only those two files are replaced (each atomically) and its
        other files (metrics, checkpoints of the training that calls this) are kept; with
        ``replace`` the whole directory is (what ``init-embeddings --force`` does: a new model's
        directory must not keep an old model's checkpoints)."""
        from safetensors.torch import save_file

        import teal_cli

        directory = Path(directory)
        if replace and directory.is_symlink():
            directory = directory.resolve()  # replace what the link points at; the link stays
        if directory.exists() and not overwrite:
            raise UsageError(f"{directory} exists; pass --force to replace it")
        self.config.teal_version = teal_cli.__version__
        directory.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.adapter_state_dict().items()}
        if directory.is_dir() and not replace:
            tmp = directory / f".{ADAPTER_NAME}.tmp"
            save_file(tensors, str(tmp), metadata={"format": "teal-adapter"})
            cfg_tmp = directory / f".{CONFIG_NAME}.tmp"
            cfg_tmp.write_text(self.config.dumps())
            apply_umask(tmp)
            os.replace(tmp, directory / ADAPTER_NAME)
            os.replace(cfg_tmp, directory / CONFIG_NAME)
            return directory
        tmp = temp_dir_beside(directory)
        try:
            save_file(tensors, str(tmp / ADAPTER_NAME), metadata={"format": "teal-adapter"})
            self.config.save(tmp)
            apply_umask(tmp)
            replace_dir(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    @classmethod
    def from_dir(cls, directory: str | Path, *, device: "str | torch.device" = "cpu",
                 dtype: "torch.dtype | None" = None, check_base: bool = True) -> "TealModel":
        """Rebuild a model from its directory: the base LLM by name/path, then the adapter.

        Raises ModelDirError (one line, naming the file) for a missing or damaged file, a
        newer format, an adapter whose tensors do not fit the config (e.g. another codec
        vocab size), or base weights whose sha256 differs from the one recorded."""
        from .llm import base_llm_fingerprint, load_base_llm

        directory = Path(directory)
        config = ModelConfig.load(directory)
        adapter_path = directory / ADAPTER_NAME
        if not adapter_path.is_file():
            raise ModelDirError(f"{adapter_path}: missing; the model directory is incomplete (run 'teal init-embeddings' again)")
        name, revision = config.llm.get("name"), config.llm.get("revision")
        if check_base and config.llm.get("weights_sha256"):
            _, _, sha = base_llm_fingerprint(name, revision)
            if sha != config.llm["weights_sha256"]:
                raise ModelDirError(
                    f"{directory / 'config.json'}: base LLM '{name}' has weights sha256 {sha[:16]}…, but this model was "
                    f"built on {config.llm['weights_sha256'][:16]}…; point it at the original weights or re-run 'teal init-embeddings'"
                )
        dtype = dtype or getattr(torch, config.dtype)
        base = load_base_llm(name, revision=revision, dtype=dtype, device=device)
        model = cls(config, base)
        model.load_adapter(adapter_path)
        model.directory = directory
        return model.to(device)

    def load_adapter(self, path: str | Path) -> None:
        """Load ``adapter.safetensors`` into the adapter parameters; every name and shape must match
        and every value be finite (ModelDirError otherwise)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except (OSError, SafetensorError, Exception) as exc:
            raise ModelDirError(f"{path}: cannot read the adapter ({exc})") from None
        own = self.adapter_state_dict()
        missing = sorted(set(own) - set(tensors))
        unexpected = sorted(set(tensors) - set(own))
        if missing or unexpected:
            what = (f"missing {', '.join(missing[:3])}" if missing else "") + ("; " if missing and unexpected else "") + \
                   (f"unexpected {', '.join(unexpected[:3])}" if unexpected else "")
            raise ModelDirError(f"{path}: adapter tensors do not match config.json ({what})")
        with torch.no_grad():
            for name, param in own.items():
                value = tensors[name]
                if tuple(value.shape) != tuple(param.shape):
                    raise ModelDirError(f"{path}: tensor {name} has shape {list(value.shape)}, config.json implies "
                                        f"{list(param.shape)} (a codec vocab size or code dim changed?)")
                if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    # What an older teal saved after a diverged run: every output would be NaN.
                    raise ModelDirError(f"{path}: tensor {name} holds NaN or infinite values (a diverged training run "
                                        "saved it); make the model again or train it from a finite checkpoint")
                param.copy_(value.to(param.dtype))

    def adapter_sha256(self, directory: str | Path) -> str:
        from ..weights.digests import sha256sum

        return sha256sum(Path(directory) / ADAPTER_NAME)


def is_adapter_param(name: str) -> bool:
    """Whether a parameter name belongs to teal's adapter rather than the base LLM."""
    if not name.startswith("llm."):
        return True
    leaf = name.rsplit(".", 1)[-1]
    return leaf.startswith("teal_") or "lora_" in name


# ---------------------------------------------------------------------- building a model


def segment_spec(codec: "Codec", image_size: int | None, output: bool) -> dict[str, Any]:
    """What generation needs to make this codec's segments (fixed grid or frame rate)."""
    if codec.modality == "audio":
        rate = float(codec.frame_rate)
        return {"frame_rate": int(rate) if rate.is_integer() else rate}
    size = image_size or codec.image_size
    if not size:
        if output:
            raise UsageError(f"codec '{codec.name}' keeps the input size, so the model cannot know how many ids an image has: "
                             "give --image-size N (the size images were tokenized at)")
        return {}
    if size % codec.downsample:
        raise UsageError(f"--image-size {size} is not a multiple of codec '{codec.name}''s {codec.downsample} pixels per token")
    side = size // codec.downsample
    return {"shape": [side, side], "image_size": size}


MAX_CODE_DIM = 65536
MAX_IMAGE_SIZE = 65536


def check_init_options(init: str = "codebook", code_dim: int | None = None, image_size: int | None = None,
                       seed: int = 0) -> None:
    """UsageError for an option of :func:`init_model` out of range (checked before anything loads)."""
    if init not in INITS:
        raise UsageError(f"--init {init}: expected one of {', '.join(INITS)}")
    for option, value, high in (("--code-dim", code_dim, MAX_CODE_DIM), ("--image-size", image_size, MAX_IMAGE_SIZE),
                                ("--seed", seed, 2 ** 64 - 1)):
        low = 0 if option == "--seed" else 1
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
            raise UsageError(f"{option} {value}: expected an integer from {low} to {high:,}")


def init_model(base: "BaseLLM", codecs: Sequence["Codec"], *, roles: Sequence[str] | None = None,
               init: str = "codebook", code_dim: int | None = None, image_size: int | None = None,
               seed: int = 0, codec_paths: Sequence[str | None] | None = None) -> TealModel:
    """A new TEAL model over ``base`` for ``codecs`` (what ``teal init-embeddings`` does).

    Args:
        base: the loaded base LLM (:func:`teal_cli.model.llm.load_base_llm`).
        codecs: loaded codecs; each becomes a :class:`CodecHead`.
        roles: per codec ``both``, ``input`` or ``output``; default ``both``, or ``input``
            for codecs without a decoder (their ids could not become media). ``output``
            codecs get E and ``proj_in`` as well (generated ids are fed back in), but are
            meant to be written rather than read.
        init: ``codebook``: E and O are the codec's codebook, standardised (zero mean, unit
            variance over all entries, so projections start on the same scale for pixel
            centroids and encoder features); ``random``: N(0, 1) entries, the paper's ablation.
        code_dim: width of E/O with ``random`` init (default: the codebook's width, else 256).
            With ``codebook`` init it must equal the codebook width if given: the projections,
            not truncation, map other widths.
        image_size: the pixel size images of codecs without a fixed grid were tokenized at.
        seed: seeds the random parts (projections, boundary rows, random E/O).

    The input projection is scaled so ``proj_in(E[j])`` starts with the per-element spread
    of the LLM's text embeddings; boundary rows start as random rows of the same spread; the
    output projection starts near zero, so every codec's ids start about equally likely.
    The config gets a fresh random ``init_id``: checkpoints name the model they belong to.
    """
    import teal_cli

    check_init_options(init, code_dim, image_size, seed)
    if not codecs:
        raise UsageError("give at least one --codec")
    roles = list(roles or [("both" if c.has_decoder else "input") for c in codecs])
    names = [c.name for c in codecs]
    if len(set(names)) != len(names):
        raise UsageError(f"codec given twice: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    llm = base.model
    d = llm.get_input_embeddings().weight.shape[1]
    text_vocab = llm.get_output_embeddings().weight.shape[0]
    modalities = [m for m in ("image", "audio") if any(c.modality == m for c in codecs)]
    boundary = {m: list(BOUNDARY_TOKENS[m]) for m in modalities}
    offset = text_vocab + sum(len(v) for v in boundary.values())
    entries, books = [], []
    for i, (codec, role) in enumerate(zip(codecs, roles)):
        entry, book = _codec_entry(codec, role, f"codec{i}", offset, init, code_dim, image_size,
                                   codec_paths[i] if codec_paths else None)
        entries.append(entry)
        books.append(book)
        offset += codec.vocab_size
    config = ModelConfig(
        llm={"name": base.name, "source": base.source, "revision": base.revision, "weights_sha256": base.weights_sha256,
             "architecture": type(llm).__name__},
        text_vocab_size=int(text_vocab), hidden_size=int(d), codecs=entries, boundary=boundary,
        boundary_offset=int(text_vocab), dtype="float32", teal_version=teal_cli.__version__, init_id=uuid.uuid4().hex,
    )
    model = TealModel(config, base)
    _init_parameters(model, books, init, seed)
    return model


def _codec_entry(codec: "Codec", role: str, key: str, offset: int, init: str, code_dim: int | None,
                 image_size: int | None, path: str | None) -> tuple[CodecEntry, "torch.Tensor | None"]:
    """One codec's config entry and its codebook ``[K, d_code]`` (None when it has none)."""
    if role not in ("both", "input", "output"):
        raise UsageError(f"codec role {role!r}: expected both, input or output")
    is_out = role in ("both", "output")
    if is_out and not codec.has_decoder and role == "output":
        raise UsageError(f"codec '{codec.name}' has no decoder, so a model cannot write it; use it as an input codec")
    book = None
    try:
        book = codec.codebook.detach().float().cpu()
    except NotImplementedError:
        if init == "codebook":
            raise UsageError(f"codec '{codec.name}' exposes no codebook; use --init random") from None
    if init == "codebook":
        if code_dim is not None and code_dim != book.shape[1]:
            raise UsageError(f"--code-dim {code_dim} differs from codec '{codec.name}''s codebook width {book.shape[1]}: "
                             "with --init codebook E keeps the codebook's width (the projections map it); "
                             "drop --code-dim or use --init random")
        width = int(book.shape[1])
    else:
        width = int(code_dim or (book.shape[1] if book is not None else DEFAULT_RANDOM_CODE_DIM))
    if book is not None and book.shape[0] != codec.vocab_size:
        raise UsageError(f"codec '{codec.name}': codebook has {book.shape[0]} rows but vocab_size is {codec.vocab_size}")
    entry = CodecEntry(
        key=key, name=codec.name, modality=codec.modality, vocab_size=int(codec.vocab_size), code_dim=width,
        # A codec the model writes is also read: decoding feeds each generated id back in,
        # and training teaches it by teacher forcing, so it needs E and proj_in too.
        offset=offset, input=True, output=is_out, init=init,
        segment=segment_spec(codec, image_size, is_out), path=path, weights=getattr(codec, "weights_id", None),
    )
    return entry, book


def _init_parameters(model: TealModel, books: Sequence["torch.Tensor | None"], init: str, seed: int) -> None:
    """Fill a new model's adapter as :func:`init_model` describes, drawing from ``seed``."""
    d = model.config.hidden_size
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        text_w = model.text_embedding.weight.detach().float()
        spread = float(text_w.std())
        head_w = model.lm_head.weight.detach().float()
        rows = torch.randn(model.boundary_in.shape, generator=gen)
        model.boundary_in.copy_(rows * spread + text_w.mean(0))
        model.boundary_out.copy_(torch.randn(model.boundary_out.shape, generator=gen) * float(head_w.std()))
        for entry, book in zip(model.config.codecs, books):
            head = model.heads[entry.key]
            if init == "codebook":
                std = book.std().clamp(min=1e-12)
                matrix = (book - book.mean(0)) / std
            else:
                matrix = None
            for name in ("embedding", "output"):
                param = getattr(head, name)
                if param is None:
                    continue
                value = matrix if matrix is not None else torch.randn(param.shape, generator=gen)
                param.copy_(value)
            if head.proj_in is not None:
                head.proj_in.weight.copy_(torch.randn(head.proj_in.weight.shape, generator=gen) * spread / math.sqrt(entry.code_dim))
                head.proj_in.bias.zero_()
            if head.proj_out is not None:
                # Small: modality logits start near uniform (loss ~ln K) rather than spanning
                # many nats, as O · proj_out(h) does at a 1/sqrt(d) init on a final-normed h;
                # not zero, so that O gets a gradient from the first step.
                head.proj_out.weight.copy_(torch.randn(head.proj_out.weight.shape, generator=gen) * 1e-3 / math.sqrt(d))
                head.proj_out.bias.zero_()
