"""teal's segment grammar for a checkpoint made by ``teal export``, with nothing but torch.

This file is copied into every exported directory as ``teal_grammar.py``, so a user without
teal can constrain any engine that takes a logits processor; teal imports it too (one
implementation). It reads the sidecar ``teal.json`` and gives:

- :class:`TealGrammarProcessor`: a transformers ``LogitsProcessor`` (``__call__(input_ids,
  scores) -> scores``) for plain ``model.generate(..., logits_processor=[processor])``. It
  adds the exported logit bias (the output projection's bias, ``O · b_out``, a constant per
  codec id that a bias-free LM head cannot hold) and masks every token the grammar forbids:

  - text: text ids (EOS included) and the ``<open>`` token of each modality the model writes
    (none with ``output_modality="text"``); after ``max_new_tokens`` text-state tokens only
    EOS;
  - image: after ``<img>`` only that modality's output-codec ids, exactly ``H*W`` of them
    (the first id picks the codec when there are several), then ``</img>`` is forced;
  - audio: codec ids or ``</aud>``; ``</aud>`` is forced after ``max_audio_seconds *
    frame_rate`` ids;
  - ``output_modality="image"|"audio"``: ``<open>`` is forced first and EOS once the segment
    closes.

  Greedy decoding with it gives exactly the ids teal's own decoder gives (the exported
  weights compute the same logits up to float rounding). It follows each row of a batch
  from the tokens ``generate`` appends; beam search (which reorders rows) is not supported.
- :class:`TealRequestProcessor`: the same for one sequence, ``(output_ids, logits) -> logits``,
  the per-request form vLLM and llama-cpp-python call;
- :func:`prompt_ids` / :func:`segments_from_ids`: token records (plain dicts, format v1) to
  the exported vocabulary and back, so ``teal detokenize`` reads what any engine wrote.

Shapes: ``input_ids`` ``[B, L]`` int64; ``scores`` ``[B, V]`` float with ``V`` the exported
vocabulary (``teal.json`` ``vocab_size``). Errors are ``ValueError`` with one-line messages.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

try:  # the interface only; duck typing works without transformers too
    from transformers import LogitsProcessor as _Base
except Exception:  # pragma: no cover - transformers absent
    _Base = object

SIDECAR = "teal.json"
SIDECAR_FORMAT = "teal-export"
SIDECAR_VERSION = 1
OUTPUT_MODALITIES = ("image", "audio", "text")


def load_sidecar(path: str | Path) -> dict[str, Any]:
    """``teal.json`` from an exported directory (or the file itself) as a dict."""
    path = Path(path)
    if path.is_dir():
        path = path / SIDECAR
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: missing; not a directory made by 'teal export'") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the grammar sidecar ({exc})") from None
    if not isinstance(obj, dict) or obj.get("format") != SIDECAR_FORMAT:
        raise ValueError(f"{path}: not a teal export sidecar (expected \"format\": \"{SIDECAR_FORMAT}\")")
    if not isinstance(obj.get("version"), int) or obj["version"] > SIDECAR_VERSION:
        raise ValueError(f"{path}: sidecar version {obj.get('version')!r} is newer than this reader ({SIDECAR_VERSION})")
    return obj


def logit_bias(sidecar: dict[str, Any]) -> torch.Tensor:
    """``[V]`` float32: each output codec's constant logits (``O · b_out``), zeros elsewhere."""
    bias = torch.zeros(int(sidecar["vocab_size"]), dtype=torch.float32)
    for c in sidecar["codecs"]:
        if c.get("logit_bias") is not None:
            bias[c["offset"]:c["offset"] + c["vocab_size"]] = torch.tensor(c["logit_bias"], dtype=torch.float32)
    return bias


class _State:
    __slots__ = ("kind", "modality", "codec", "limit")

    def __init__(self, kind: str, modality: str | None = None, codec: dict | None = None, limit: int = 0):
        self.kind, self.modality, self.codec, self.limit = kind, modality, codec, limit


class TealGrammar:
    """The decoder states and their ``[S, V]`` boolean masks for one sidecar and one set of
    options (the same states as teal's own decoder). Raises ValueError for a bad option."""

    def __init__(self, sidecar: dict[str, Any], *, output_modality: str | None = None, codec: str | None = None,
                 max_new_tokens: int = 64, max_audio_seconds: float = 10.0):
        if output_modality is not None and output_modality not in OUTPUT_MODALITIES:
            raise ValueError(f"output_modality {output_modality!r}: expected one of {', '.join(OUTPUT_MODALITIES)}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens {max_new_tokens}: expected 0 or more")
        self.sidecar = sidecar
        self.vocab_size = int(sidecar["vocab_size"])
        self.eos = int(sidecar["eos_token_id"])
        self.max_new_tokens = int(max_new_tokens)
        self.output_modality = output_modality
        self.forced = output_modality in ("image", "audio")
        boundary = sidecar["boundary"]
        writable: dict[str, list[dict]] = {}
        for m in ("image", "audio"):
            entries = [c for c in sidecar["codecs"] if c["modality"] == m and c["output"]]
            if m in boundary and entries:
                writable[m] = entries
        if codec is not None:
            match = [c for c in sidecar["codecs"] if codec in (c["name"], c.get("path"))]
            if not match:
                raise ValueError(f"codec {codec!r} is not part of this model (it has: "
                                 f"{', '.join(c['name'] for c in sidecar['codecs']) or 'none'})")
            if not match[0]["output"]:
                raise ValueError(f"codec {codec!r}: the model reads this codec but does not write it")
            if self.forced and match[0]["modality"] != output_modality:
                raise ValueError(f"codec {codec!r} is an {match[0]['modality']} codec, but output_modality is {output_modality}")
            writable[match[0]["modality"]] = [match[0]]
        if self.forced and output_modality not in writable:
            raise ValueError(f"output_modality {output_modality}: this model writes no {output_modality} codec")
        self.states: list[_State] = []
        allowed: list[list[tuple[int, int]]] = []

        def add(state: _State, ranges: list[tuple[int, int]]) -> int:
            self.states.append(state)
            allowed.append(ranges)
            return len(self.states) - 1

        self.open_ids = {int(boundary[m]["open"]): m for m in writable}
        self.close_ids = {int(boundary[m]["close"]): m for m in writable}
        text_ranges = [(0, int(sidecar["text_vocab_size"]))]
        if output_modality != "text":
            text_ranges += [(i, i + 1) for i in self.open_ids]
        self.text = add(_State("text"), text_ranges)
        self.done = add(_State("done"), [(self.eos, self.eos + 1)])
        self.force_open, self.open, self.close, self.codec_state = {}, {}, {}, {}
        for m, entries in writable.items():
            open_id, close_id = int(boundary[m]["open"]), int(boundary[m]["close"])
            may_close = [(close_id, close_id + 1)] if m == "audio" else []
            self.force_open[m] = add(_State("force_open", m), [(open_id, open_id + 1)])
            self.open[m] = add(_State("open", m), [(c["offset"], c["offset"] + c["vocab_size"]) for c in entries] + may_close)
            self.close[m] = add(_State("close", m), [(close_id, close_id + 1)])
            for c in entries:
                if m == "image":
                    shape = c.get("shape")
                    if not shape:
                        raise ValueError(f"codec {c['name']!r} has no grid shape in teal.json: an image cannot be generated")
                    limit = math.prod(shape)
                else:
                    rate = float(c.get("frame_rate") or 0)
                    if rate <= 0:
                        raise ValueError(f"codec {c['name']!r} has no frame_rate in teal.json")
                    limit = max(1, int(max_audio_seconds * rate))
                self.codec_state[c["name"]] = add(_State("codec", m, c, limit),
                                                  [(c["offset"], c["offset"] + c["vocab_size"])] + may_close)
        masks = torch.zeros(len(self.states), self.vocab_size, dtype=torch.bool)
        for s, ranges in enumerate(allowed):
            for start, stop in ranges:
                masks[s, start:stop] = True
        self.masks = masks
        self._ranges = sorted((c["offset"], c["offset"] + c["vocab_size"], c) for es in writable.values() for c in es)
        self.writable = writable

    def codec_of(self, token: int) -> dict | None:
        for start, stop, c in self._ranges:
            if start <= token < stop:
                return c
        return None

    def max_new_tokens_bound(self) -> int:
        """The most tokens (EOS included) one row can take under this grammar: a bound for an
        engine's own length limit, so that only the grammar ends a row."""
        states = [self.states[s] for s in self.codec_state.values()]
        if self.forced:
            states = [s for s in states if s.modality == self.output_modality]
        longest = max((s.limit for s in states), default=0) + 2
        opens = 1 if self.forced else 0
        texts = self.max_new_tokens if not self.forced else 0
        per_text = longest if self.open_ids and self.output_modality != "text" else 1
        return opens * longest + texts * per_text + 1


class GrammarRow:
    """One sequence's place in the grammar; :meth:`advance` takes each generated token.

    Attributes: ``state`` (index into ``grammar.states``), ``ids`` (generated ids the record
    keeps: EOS and the tokens after the end are left out), ``finish`` (None while running;
    ``eos``, ``max_new_tokens`` or ``segment``)."""

    def __init__(self, grammar: TealGrammar):
        self.g = grammar
        self.budget = grammar.max_new_tokens
        self.count = 0
        self.ids: list[int] = []
        self.finish: str | None = None
        if grammar.forced:
            self.state = grammar.force_open[grammar.output_modality]
        elif grammar.max_new_tokens > 0:
            self.state = grammar.text
        else:
            self.state, self.finish = grammar.done, "max_new_tokens"

    def advance(self, token: int) -> None:
        g = self.g
        st = g.states[self.state]
        kind = st.kind
        if kind == "done":
            return
        if kind == "text" and token == g.eos:
            self.state, self.finish = g.done, "eos"
            return
        self.ids.append(token)
        if kind == "text":
            self.budget -= 1
            if token in g.open_ids:
                self.state, self.count = g.open[g.open_ids[token]], 0
            elif self.budget <= 0:
                self.state, self.finish = g.done, "max_new_tokens"
        elif kind == "force_open":
            self.state, self.count = g.open[st.modality], 0
        elif kind in ("open", "codec"):
            if token in g.close_ids:
                self._after_close()
            else:
                entry = st.codec if kind == "codec" else g.codec_of(token)
                if entry is None:
                    raise ValueError(f"token {token} is not an id of a codec this grammar writes")
                self.count += 1
                state = g.codec_state[entry["name"]]
                self.state = g.close[st.modality] if self.count >= g.states[state].limit else state
        elif kind == "close":
            self._after_close()

    def _after_close(self) -> None:
        g = self.g
        if g.forced:
            self.state, self.finish = g.done, "segment"
        elif self.budget <= 0:
            self.state, self.finish = g.done, "max_new_tokens"
        else:
            self.state = g.text


class TealGrammarProcessor(_Base):
    """A transformers ``LogitsProcessor`` enforcing teal's segment grammar and adding the
    exported logit bias (see the module docstring).

    Args:
        sidecar: an exported directory, its ``teal.json`` path, or the loaded dict.
        output_modality, codec, max_new_tokens, max_audio_seconds: as ``teal generate``'s
            options (``max_new_tokens`` counts text-state tokens only; give the engine's own
            length limit :meth:`TealGrammar.max_new_tokens_bound` or more).

    One instance follows one ``generate`` call at a time: a call whose ``input_ids`` do not
    extend the previous call's by one column starts over (or call :meth:`reset`).
    ``rows`` holds each sequence's :class:`GrammarRow` (generated ids so far, finish).
    """

    def __init__(self, sidecar: "str | Path | dict[str, Any]", *, output_modality: str | None = None,
                 codec: str | None = None, max_new_tokens: int = 64, max_audio_seconds: float = 10.0):
        self.sidecar = sidecar if isinstance(sidecar, dict) else load_sidecar(sidecar)
        self.grammar = TealGrammar(self.sidecar, output_modality=output_modality, codec=codec,
                                   max_new_tokens=max_new_tokens, max_audio_seconds=max_audio_seconds)
        self.bias = logit_bias(self.sidecar)
        self.rows: list[GrammarRow] | None = None
        self._last: torch.Tensor | None = None

    def reset(self) -> None:
        self.rows, self._last = None, None

    def _continues(self, input_ids: torch.Tensor) -> bool:
        last = self._last
        return (last is not None and self.rows is not None and input_ids.shape[0] == last.shape[0]
                and input_ids.shape[1] == last.shape[1] + 1 and bool((input_ids[:, :-1] == last).all()))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._continues(input_ids):
            for row, token in zip(self.rows, input_ids[:, -1].tolist()):
                row.advance(int(token))
        else:
            self.rows = [GrammarRow(self.grammar) for _ in range(input_ids.shape[0])]
        self._last = input_ids.detach().clone()
        g = self.grammar
        V = g.vocab_size
        if self.bias.device != scores.device:
            self.bias, g.masks = self.bias.to(scores.device), g.masks.to(scores.device)
        states = torch.tensor([r.state for r in self.rows], device=scores.device)
        head = scores[:, :V] + self.bias.to(scores.dtype)
        head = torch.where(g.masks[states], head, torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device))
        if scores.shape[-1] == V:
            return head
        # An engine may pad the vocabulary (e.g. to a multiple of 64): those ids are never allowed.
        return torch.cat([head, torch.full_like(scores[:, V:], float("-inf"))], dim=-1)


class TealRequestProcessor:
    """The same constraint for one sequence, as engines with per-request processors call it
    (vLLM's ``AdapterLogitsProcessor``, llama-cpp-python's ``logits_processor``):
    ``processor(output_ids, logits) -> logits`` with ``output_ids`` the tokens generated so
    far (prompt excluded) and ``logits`` ``[V]`` (or ``[..., V]``). Make one per request.

    Args: as :class:`TealGrammarProcessor`, or ``grammar`` (a :class:`TealGrammar` to share).
    """

    def __init__(self, sidecar: "str | Path | dict[str, Any] | None" = None, *, grammar: TealGrammar | None = None,
                 **options):
        if grammar is None:
            grammar = TealGrammar(sidecar if isinstance(sidecar, dict) else load_sidecar(sidecar), **options)
        self.grammar = grammar
        self.bias = logit_bias(grammar.sidecar)
        self.row = GrammarRow(grammar)
        self.seen = 0

    def __call__(self, output_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        for token in list(output_ids)[self.seen:]:
            self.row.advance(int(token))
        self.seen = len(output_ids)
        V = self.grammar.vocab_size
        mask = self.grammar.masks[self.row.state].to(logits.device)
        head = logits[..., :V] + self.bias.to(logits.device, logits.dtype)
        head = torch.where(mask, head, torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device))
        if logits.shape[-1] == V:
            return head
        return torch.cat([head, torch.full_like(logits[..., V:], float("-inf"))], dim=-1)


def run_grammar(grammar: TealGrammar, tokens: Iterable[int]) -> GrammarRow:
    """Replay generated ``tokens`` (what an engine returned after the prompt) through the
    grammar: the row's ``ids`` are what the record keeps and ``finish`` why it stopped
    (None if the tokens end before the grammar does, e.g. at a length limit)."""
    row = GrammarRow(grammar)
    for t in tokens:
        if row.finish is not None:
            break
        row.advance(int(t))
    return row


# ---------------------------------------------------------------------- records <-> ids


def codec_entry(sidecar: dict[str, Any], name: str) -> dict[str, Any]:
    for c in sidecar["codecs"]:
        if name in (c["name"], c.get("path")):
            return c
    raise ValueError(f"codec '{name}' is not part of this model (it has: "
                     f"{', '.join(c['name'] for c in sidecar['codecs']) or 'none'})")


def prompt_ids(record: dict[str, Any], sidecar: dict[str, Any], tokenizer) -> list[int]:
    """A token record (dict, format v1) to the exported vocabulary's ids, as teal encodes a
    prompt: the tokenizer's prefix (BOS where it adds one), text through the tokenizer,
    media as ``<open> offset+ids </close>``; segments with ``"role": "target"`` are left
    out. Raises ValueError naming the segment."""
    ids = list(tokenizer("", add_special_tokens=True).input_ids)
    rid = record.get("id")
    for i, seg in enumerate(record.get("segments", [])):
        if seg.get("role") == "target":
            continue
        where = f"record '{rid}' segments[{i}]"
        if seg.get("modality") == "text":
            ids += list(tokenizer(seg["text"], add_special_tokens=False).input_ids)
            continue
        if seg.get("tokens") is None:
            raise ValueError(f"{where}: {seg.get('modality')} segment has no tokens (tokenize it first)")
        try:
            c = codec_entry(sidecar, seg.get("codec"))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if not c["input"]:
            raise ValueError(f"{where}: codec '{c['name']}' is output-only in this model; it cannot be read")
        recorded, expected = seg.get("weights") or "", c.get("weights") or ""
        common = min(len(recorded), len(expected))
        if common and recorded[:common] != expected[:common]:
            raise ValueError(f"{where}: tokens were made by weights {recorded} of codec '{c['name']}', "
                             f"but the model was built for weights {expected}; tokenize again with the model's codec")
        tokens = [int(t) for t in seg["tokens"]]
        if tokens and (max(tokens) >= c["vocab_size"] or min(tokens) < 0):
            raise ValueError(f"{where}: token id {max(tokens)} is out of range for codec '{c['name']}' "
                             f"(vocab_size {c['vocab_size']})")
        b = sidecar["boundary"][c["modality"]]
        ids += [int(b["open"]), *(c["offset"] + t for t in tokens), int(b["close"])]
    return ids


def segments_from_ids(ids: Sequence[int], sidecar: dict[str, Any], tokenizer) -> list[dict[str, Any]]:
    """Generated ids (EOS excluded) back to segments (dicts, format v1): text runs decoded by
    the tokenizer, ``<img> ... </img>`` runs to a segment of their codec with ``shape``
    (a full grid) or ``frame_rate``, and the codec's ``weights``. An unclosed media run still
    makes a segment. Raises ValueError for a media id of another modality's codec."""
    segments: list[dict[str, Any]] = []
    text: list[int] = []
    media: list[int] | None = None
    media_modality = None
    boundary = {}
    for m, b in sidecar["boundary"].items():
        boundary[int(b["open"])] = (m, False)
        boundary[int(b["close"])] = (m, True)
    t_vocab = int(sidecar["text_vocab_size"])

    def flush_text():
        if text:
            segments.append({"modality": "text", "text": tokenizer.decode(text, skip_special_tokens=True)})
            text.clear()

    def flush_media():
        if media:
            segments.append(media_segment(sidecar, media_modality, media))

    for tok in ids:
        tok = int(tok)
        if tok in boundary:
            modality, closing = boundary[tok]
            if closing:
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


def media_segment(sidecar: dict[str, Any], modality: str, joint_ids: Sequence[int]) -> dict[str, Any]:
    """A media segment (dict) from exported ids of one codec (the codec of the first id)."""
    first = int(joint_ids[0])
    c = next((c for c in sidecar["codecs"] if c["offset"] <= first < c["offset"] + c["vocab_size"]), None)
    if c is None or c["modality"] != modality:
        raise ValueError(f"generated id {first} is not a {modality} codec id")
    tokens = [int(t) - c["offset"] for t in joint_ids]
    seg: dict[str, Any] = {"modality": modality, "codec": c["name"]}
    if c.get("shape") and len(tokens) == math.prod(c["shape"]):
        seg["shape"] = list(c["shape"])
    if c.get("frame_rate") is not None:
        seg["frame_rate"] = c["frame_rate"]
    seg["tokens"] = tokens
    if c.get("weights"):
        seg["weights"] = c["weights"]
    return seg
