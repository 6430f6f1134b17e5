"""Generation with the segment grammar: text, and image/audio segments a TEAL model writes.

:func:`generate` continues each prompt record (its segments without ``role: target``) and
yields one record per prompt, in input order, with the generated segments and a
``generation`` field saying how they were made. Decoding follows the grammar of segments
(text, and modality segments that open with their boundary token, hold only their codec's
ids, an image exactly as many as its grid, and close with the matching boundary token),
enforced by a vocabulary mask per decoder state, prepared once per run:

- **text**: text ids (EOS included) and the ``<open>`` token of every modality the model can
  write (none with ``output_modality="text"``); text ends at EOS or after ``max_new_tokens``
  text-state tokens (a ``<img>`` the model opens counts as one);
- **image**: after ``<img>`` only that modality's output-codec ids, exactly ``H*W`` of them (the
  codec's ``segment.shape``; the first id picks the codec when the model writes several, or
  ``codec`` names it), then ``</img>`` is forced and decoding returns to text;
- **audio**: at least one codec id, then ids or ``</aud>``; ``</aud>`` is forced after
  ``max_audio_seconds * frame_rate`` ids;
- ``output_modality="image"|"audio"`` forces ``<open>`` as the first token and stops once that
  segment closes;
- the context: a segment is opened only when it fits in the room left (an image's
  ``H*W + 2`` tokens; an audio segment's ``<aud>``, one id and ``</aud>``), and ``</aud>`` is
  forced when only its own place is left, so a segment the model opens always completes;
  generation ends with ``finish: context`` in text.

Masks are boolean ``[S, V]`` tensors (S states, V the joint vocabulary); each step selects one
row per sequence (``masks[state]``) and keeps logits where it is true. Logits are computed
only for the blocks of the joint vocabulary some sequence's state can emit (the frozen LM
head is skipped while every sequence is inside an image segment).

Sampling: greedy (``temperature=0``), temperature, top-k, top-p. Each prompt has its own
``torch.Generator`` (on the CPU, so the draws are the same on any device) seeded from
``(seed, record id, how many times that id came before)``; its k-th sampled token uses its
k-th uniform draw (inverse-CDF sampling). A record's output therefore does not depend on
the batch it shares or its position in the input; only the float logits do, in the last
bits (batched kernels, left padding), which can flip a greedy near-tie or a draw that lands
on a boundary between two tokens. Classifier-free guidance (``cfg_scale != 1``) adds one
unconditional row per prompt whose context is the tokenizer's prefix and the ``<open>``
token only (as image-token generators do, e.g. Chameleon/Lumina-mGPT); inside modality
segments ``logits = uncond + s * (cond - uncond)``; text is never guided.

Batches (``batch_size``) are left-padded and positions follow the attention mask. The KV
cache is transformers' ``DynamicCache`` with eager steps, or (``compile``) a ``StaticCache``
sized for the batch's longest possible answer with a ``torch.compile``d one-token step
(:class:`CompiledSteps`); both share this loop, so the grammar, sampling and CFG rows are
the same code. Errors: a prompt that fills the base LLM's context
is a one-line :class:`~teal_cli.errors.DataError` naming the record; unknown codecs and ids
out of range come from :meth:`TealModel.encode_record`; bad options are
:class:`~teal_cli.errors.UsageError`.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

import torch

from ..errors import DataError, UsageError
from ..records import Record, Segment
from .config import CodecEntry, ModelDirError

if TYPE_CHECKING:
    from .teal_model import TealModel

OUTPUT_MODALITIES = ("image", "audio", "text")
COMPILE_MODES = ("auto", "on", "off")
_UNIFORM_CHUNK = 64  # uniforms drawn per sequence at a time (one per sampled token)


@dataclass
class GenerateOptions:
    """How :func:`generate` decodes.

    Attributes:
        max_new_tokens: text-state tokens per prompt (EOS, text ids, and ``<open>`` tokens the
            model emits itself); a segment once opened always completes.
        temperature: 0 = greedy; otherwise logits are divided by it before sampling.
        top_k: keep the k most likely allowed tokens (None: all).
        top_p: nucleus sampling, keep the smallest set of allowed tokens with mass >= top_p.
        seed: seeds each prompt's generator (see the module docstring).
        cfg_scale: classifier-free guidance inside image/audio segments (1 = off).
        output_modality: ``image``/``audio``: the answer is one segment of that modality;
            ``text``: the model may not open segments; None: the model decides.
        codec: the output codec (name) when the model writes several for a modality.
        max_audio_seconds: longest audio segment, in seconds of the codec's frame rate.
        batch_size: prompts decoded together.
        echo: output records start with the prompt's segments, each marked ``"role": "prompt"``.
        compile: ``off``: eager steps on transformers' ``DynamicCache``; ``on``: a
            ``StaticCache`` and a ``torch.compile``d one-token step (CUDA graphs on a GPU);
            ``auto``: compiled only where it pays off (see :func:`use_compiled`).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    cfg_scale: float = 1.0
    output_modality: str | None = None
    codec: str | None = None
    max_audio_seconds: float = 10.0
    batch_size: int = 8
    echo: bool = False
    compile: str = "auto"

    def check(self) -> None:
        """Raise UsageError (naming the CLI option) for a value out of range."""
        if self.max_new_tokens < 0:
            raise UsageError(f"--max-new-tokens {self.max_new_tokens}: expected 0 or more")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise UsageError(f"--temperature {self.temperature}: expected a finite number >= 0 (0 = greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise UsageError(f"--top-k {self.top_k}: expected 1 or more")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UsageError(f"--top-p {self.top_p}: expected a number in (0, 1]")
        if not (self.cfg_scale >= 0 and math.isfinite(self.cfg_scale)):
            raise UsageError(f"--cfg-scale {self.cfg_scale}: expected a finite number >= 0 (1 = no guidance)")
        if self.output_modality is not None and self.output_modality not in OUTPUT_MODALITIES:
            raise UsageError(f"--output-modality {self.output_modality}: expected one of {', '.join(OUTPUT_MODALITIES)}")
        if not (self.max_audio_seconds > 0 and math.isfinite(self.max_audio_seconds)):
            raise UsageError(f"--max-audio-seconds {self.max_audio_seconds}: expected a finite number > 0")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size {self.batch_size}: expected 1 or more")
        if self.compile not in COMPILE_MODES:
            raise UsageError(f"--compile {self.compile}: expected one of {', '.join(COMPILE_MODES)}")

    @property
    def sampling(self) -> bool:
        return self.temperature > 0


# ---------------------------------------------------------------------- the grammar

# Blocks of the joint vocabulary: TEXT (the LM head), BOUNDARY, then one per codec index.
TEXT_BLOCK, BOUNDARY_BLOCK = -2, -1


@dataclass
class State:
    """One decoder state: what it may emit and what comes after."""

    kind: str                      # text | force_open | open | codec | close | done
    modality: str | None = None
    entry: CodecEntry | None = None
    limit: int = 0                 # codec states: ids in a segment (H*W, or the audio cap)
    blocks: frozenset = frozenset()
    guided: bool = False           # classifier-free guidance applies


class Grammar:
    """The decoder's states and their masks for one model and one set of options.

    Attributes: ``states`` (list of :class:`State`), ``masks`` (``[S, V]`` bool on the model's
    device), ``text``/``done`` (state indices), ``force_open``/``open``/``close`` (per modality),
    ``codec_state`` (per codec key), ``open_ids``/``close_ids`` (joint id -> modality).
    """

    def __init__(self, model: "TealModel", options: GenerateOptions):
        cfg = model.config
        self.eos = model.eos_id
        self.vocab_size = cfg.vocab_size
        writable = self._writable(cfg, options)
        self.forced = options.output_modality in ("image", "audio")
        self.modalities = list(writable)
        self.states: list[State] = []
        self.allowed: list[list[tuple[int, int]]] = []  # per state: [start, stop) id ranges
        t_vocab = cfg.text_vocab_size
        self.open_ids = {cfg.boundary_id(m): m for m in writable}
        self.close_ids = {cfg.boundary_id(m, closing=True): m for m in writable}
        self.codec_index = {entry.key: i for i, entry in enumerate(cfg.codecs)}

        def add(state: State, ranges: list[tuple[int, int]]) -> int:
            self.states.append(state)
            self.allowed.append(ranges)
            return len(self.states) - 1

        # One text state per set of modalities whose segments still fit in the context: an
        # ``<open>`` is masked once the room left is less than its segment needs (need), so a
        # segment the model opens always completes.
        openable = list(self.open_ids.items()) if options.output_modality != "text" else []
        self.text_for: dict[frozenset, int] = {}
        for n in range(len(openable), -1, -1):
            for subset in itertools.combinations(openable, n):
                ranges = [(0, t_vocab)] + [(i, i + 1) for i, _ in subset]
                self.text_for[frozenset(m for _, m in subset)] = add(
                    State("text", blocks=frozenset({TEXT_BLOCK, BOUNDARY_BLOCK})), ranges)
        self.openable = frozenset(m for _, m in openable)
        self.text = self.text_for[self.openable]
        # DONE emits EOS as filler; it needs no logits (uncomputed blocks are finite zeros).
        self.done = add(State("done"), [(self.eos, self.eos + 1)])
        self.force_open, self.open, self.close, self.codec_state = {}, {}, {}, {}
        guided = options.cfg_scale != 1.0
        audio_cap = {}
        for modality, entries in writable.items():
            open_id, close_id = cfg.boundary_id(modality), cfg.boundary_id(modality, closing=True)
            codec_blocks = frozenset(self.codec_index[e.key] for e in entries)
            codec_ranges = [(e.offset, e.offset + e.vocab_size) for e in entries]
            may_close = [(close_id, close_id + 1)] if modality == "audio" else []
            boundary = frozenset({BOUNDARY_BLOCK}) if may_close else frozenset()
            self.force_open[modality] = add(State("force_open", modality, blocks=frozenset({BOUNDARY_BLOCK})),
                                            [(open_id, open_id + 1)])
            # At least one id: an empty segment decodes to nothing (an audio answer with no audio).
            self.open[modality] = add(State("open", modality, blocks=codec_blocks, guided=guided), codec_ranges)
            self.close[modality] = add(State("close", modality, blocks=frozenset({BOUNDARY_BLOCK})),
                                       [(close_id, close_id + 1)])
            for e in entries:
                if modality == "image":
                    limit = e.tokens_per_item
                    if not limit:
                        raise ModelDirError(f"codec '{e.name}' has no segment shape in the model's config.json, so an image "
                                            "cannot be generated; re-run 'teal init-embeddings' with --image-size")
                else:
                    rate = float(e.segment.get("frame_rate") or 0)
                    if rate <= 0:
                        raise ModelDirError(f"codec '{e.name}' has no frame_rate in the model's config.json")
                    # The context bounds an audio segment long before 2**31 frames; the clamp
                    # keeps int() finite for any finite --max-audio-seconds (1e308 * rate is inf).
                    limit = max(1, int(min(options.max_audio_seconds * rate, 2**31)))
                    audio_cap[e.key] = limit
                self.codec_state[e.key] = add(
                    State("codec", modality, e, limit, frozenset({self.codec_index[e.key]}) | boundary, guided=guided),
                    [(e.offset, e.offset + e.vocab_size)] + may_close)
        masks = torch.zeros(len(self.states), self.vocab_size, dtype=torch.bool)
        for s, ranges in enumerate(self.allowed):
            for start, stop in ranges:
                masks[s, start:stop] = True
        self.masks = masks.to(model.device)
        self.guided = torch.tensor([s.guided for s in self.states], device=model.device)
        self.entries = {e.key: e for es in writable.values() for e in es}
        # Tokens a segment needs once opened: <open>, its ids (image: exactly H*W, the largest
        # of the modality's codecs; audio: at least one) and its closing token.
        self.need = {m: 2 + (max(self.states[self.codec_state[e.key]].limit for e in es) if m == "image" else 1)
                     for m, es in writable.items()}
        self._ranges = sorted((e.offset, e.offset + e.vocab_size, e) for e in self.entries.values())

    @staticmethod
    def _writable(cfg, options: GenerateOptions) -> dict[str, list[CodecEntry]]:
        """Output codecs per modality the model may write under ``options``."""
        writable = {m: cfg.output_codecs(m) for m in ("image", "audio") if m in cfg.boundary and cfg.output_codecs(m)}
        if options.codec is not None:
            try:
                entry = cfg.codec(options.codec)
            except ModelDirError as exc:
                raise UsageError(f"--codec {options.codec}: {exc}") from None
            if not entry.output:
                raise UsageError(f"--codec {options.codec}: the model reads this codec but does not write it")
            if options.output_modality in ("image", "audio") and entry.modality != options.output_modality:
                raise UsageError(f"--codec {options.codec} is an {entry.modality} codec, but --output-modality is {options.output_modality}")
            writable[entry.modality] = [entry]
        if options.output_modality in ("image", "audio") and options.output_modality not in writable:
            can = ", ".join(writable) or "text only"
            raise UsageError(f"--output-modality {options.output_modality}: this model writes no {options.output_modality} "
                             f"codec (it writes {can}); add one with 'teal init-embeddings --codec'")
        return writable

    def codec_of(self, token: int) -> CodecEntry | None:
        for start, stop, entry in self._ranges:
            if start <= token < stop:
                return entry
        return None

    def initial(self, options: GenerateOptions, room: int | None = None) -> int:
        """The first state of a row with ``room`` tokens left in the context (None: unbounded)."""
        if self.forced:
            return self.force_open[options.output_modality]
        return self.text_state(room) if options.max_new_tokens > 0 else self.done

    def text_state(self, room: int | None) -> int:
        """The text state whose ``<open>`` tokens are those of segments that fit in ``room``."""
        if room is None:
            return self.text
        return self.text_for[frozenset(m for m in self.openable if self.need[m] <= room)]


# ---------------------------------------------------------------------- logits and sampling


def block_logits(model: "TealModel", hidden: torch.Tensor, blocks: set, vocab_size: int) -> torch.Tensor:
    """``[R, d_llm]`` hidden states to ``[R, V]`` float32 joint logits, computed only for
    ``blocks`` (TEXT_BLOCK, BOUNDARY_BLOCK, codec indices) with the very operations of
    :meth:`TealModel.logits`; other columns are 0 (callers mask them)."""
    cfg = model.config
    out = hidden.new_empty((hidden.shape[0], vocab_size), dtype=torch.float32)
    nb = len(cfg.boundary_list)
    parts = [(TEXT_BLOCK, 0, cfg.text_vocab_size, lambda: model.lm_head(hidden).float()),
             (BOUNDARY_BLOCK, cfg.boundary_offset, cfg.boundary_offset + nb, lambda: hidden.float() @ model.boundary_out.t())]
    parts += [(i, e.offset, e.offset + e.vocab_size, (lambda key=e.key: model.heads[key].logits(hidden)) if e.output else None)
              for i, e in enumerate(cfg.codecs)]
    for block, start, stop, compute in parts:
        if stop > start:
            if block in blocks and compute is not None:
                out[:, start:stop] = compute()
            else:
                out[:, start:stop] = 0.0
    return out


def constrain(logits: torch.Tensor, state: torch.Tensor, grammar: Grammar, cfg_scale: float | None,
              neg_inf: torch.Tensor) -> torch.Tensor:
    """Guide and mask joint logits: ``[R, V]`` (R = B, or 2B with the unconditional rows after
    the conditional ones when ``cfg_scale`` is given) to ``[B, V]``, -inf where ``state``
    ``[B]`` forbids a token; guided states get ``uncond + cfg_scale * (cond - uncond)``."""
    if cfg_scale is not None:
        B = state.shape[0]
        cond, uncond = logits[:B], logits[B:]
        logits = torch.where(grammar.guided[state][:, None], uncond + cfg_scale * (cond - uncond), cond)
    return torch.where(grammar.masks[state], logits, neg_inf)


def choose_tokens(logits: torch.Tensor, options: GenerateOptions, uniforms: torch.Tensor | None) -> torch.Tensor:
    """One token per row of masked ``[B, V]`` logits (-inf = not allowed): argmax when greedy,
    else temperature / top-k / top-p and inverse-CDF sampling with ``uniforms`` ``[B]`` in [0, 1)."""
    if not options.sampling:
        return logits.argmax(-1)
    logits = logits / options.temperature
    if options.top_k is not None and options.top_k < logits.shape[-1]:
        kth = logits.topk(options.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    order = None
    if options.top_p is not None and options.top_p < 1:
        logits, order = logits.sort(dim=-1, descending=True)
        probs = logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        logits = logits.masked_fill(probs.cumsum(-1) - probs >= options.top_p, float("-inf"))
    probs = logits.softmax(-1)
    cdf = probs.cumsum(-1)
    target = uniforms.to(cdf.device, cdf.dtype)[:, None] * cdf[:, -1:]
    index = torch.searchsorted(cdf, target, right=True)
    # Rounding can put the target at the very top of the CDF: take the last token with mass.
    last = torch.where(probs > 0, torch.arange(probs.shape[-1], device=probs.device), 0).amax(-1, keepdim=True)
    index = torch.minimum(index, last)
    if order is not None:
        index = order.gather(-1, index)
    return index[:, 0]


def row_seed(seed: int, record_id: str, repeat: int) -> int:
    """The generator seed of one prompt: a hash of the run's seed, its id and how many
    prompts with that id came before (so repeated prompts get distinct samples)."""
    digest = hashlib.blake2b(f"{seed}\0{record_id}\0{repeat}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


# ---------------------------------------------------------------------- decoding a batch


@dataclass
class _Row:
    prompt_len: int
    state: int
    ids: list[int] = field(default_factory=list)
    budget: int = 0
    count: int = 0                 # ids in the open segment
    finish: str | None = None
    in_segment: bool = False       # the last fed token is inside a modality segment
    segment_fed: int = 0           # tokens of the current segment fed (for the unconditional row)


@dataclass
class Generated:
    """One prompt's generation: joint ids (EOS excluded) and why it stopped (``eos``,
    ``max_new_tokens``, ``segment`` (the forced segment closed) or ``context``)."""

    ids: list[int]
    finish: str


def _advance(row: _Row, token: int, grammar: Grammar, context: int | None) -> None:
    """Record ``token`` and move ``row`` to its next state (Python per row: a few integer
    comparisons a step; the vocabulary constraint itself is the precomputed masks)."""
    st = grammar.states[row.state]
    kind = st.kind
    if kind == "done":
        return
    if kind == "text" and token == grammar.eos:
        row.state, row.finish = grammar.done, "eos"
        return
    row.ids.append(token)
    if kind == "text":
        row.budget -= 1
        if token in grammar.open_ids:
            row.state, row.count = grammar.open[grammar.open_ids[token]], 0
        elif row.budget <= 0:
            row.state, row.finish = grammar.done, "max_new_tokens"
    elif kind == "force_open":
        row.state, row.count = grammar.open[st.modality], 0
    elif kind in ("open", "codec"):
        if token in grammar.close_ids:
            _after_close(row, grammar)
        else:
            entry = st.entry if kind == "codec" else grammar.codec_of(token)
            row.count += 1
            limit = grammar.states[grammar.codec_state[entry.key]].limit
            row.state = grammar.close[st.modality] if row.count >= limit else grammar.codec_state[entry.key]
    elif kind == "close":
        _after_close(row, grammar)
    if row.finish is None and context:
        room = context - row.prompt_len - len(row.ids)
        after = grammar.states[row.state]
        if room <= 0:
            row.state, row.finish = grammar.done, "context"
        elif after.kind == "text":
            row.state = grammar.text_state(room)
        elif after.modality == "audio" and after.kind in ("open", "codec") and room <= 1:
            row.state = grammar.close["audio"]  # the room left bounds an audio segment too


def _after_close(row: _Row, grammar: Grammar) -> None:
    if grammar.forced:
        row.state, row.finish = grammar.done, "segment"
    elif row.budget <= 0:
        row.state, row.finish = grammar.done, "max_new_tokens"
    else:
        row.state = grammar.text


@torch.inference_mode()
def generate_ids(model: "TealModel", prompts: list[list[int]], options: GenerateOptions, grammar: Grammar,
                 seeds: list[int] | None = None) -> list[Generated]:
    """Decode a batch of prompts (joint ids) together; see the module docstring.

    ``seeds`` (one per prompt) seed the per-prompt generators when sampling."""
    device = model.device
    B = len(prompts)
    cfg_on = options.cfg_scale != 1.0 and any(s.guided for s in grammar.states)
    prefix = list(model._prefix_ids)
    P = len(prefix)
    R = 2 * B if cfg_on else B
    context = model.context_length
    rows = [_Row(len(p), grammar.initial(options, context - len(p) if context else None), budget=options.max_new_tokens)
            for p in prompts]
    for r in rows:
        if r.state == grammar.done:
            r.finish = "max_new_tokens"
    width = max(len(p) for p in prompts)
    pad = grammar.eos
    seqs = list(prompts) + ([prefix] * B if cfg_on else [])
    ids = torch.tensor([[pad] * (width - len(s)) + list(s) for s in seqs], dtype=torch.long, device=device)
    attn = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long, device=device)
    generators = uniforms = None
    if options.sampling:
        generators = [torch.Generator().manual_seed(s) for s in (seeds or [options.seed] * B)]
    scale = float(options.cfg_scale)
    neg_inf = torch.tensor(float("-inf"), device=device)

    steps = decoding_steps(model, prompts, options, grammar, R, width)
    started = time.perf_counter()
    hidden = steps.prefill(ids, attn)
    step = 0
    while True:
        states = [r.state for r in rows]
        blocks = set().union(*(grammar.states[s].blocks for s in set(states)))
        logits = block_logits(model, hidden, blocks, grammar.vocab_size)
        logits = constrain(logits, torch.tensor(states, device=device), grammar, scale if cfg_on else None, neg_inf)
        if generators is not None and step % _UNIFORM_CHUNK == 0:
            uniforms = torch.stack([torch.rand(_UNIFORM_CHUNK, generator=g, dtype=torch.float64) for g in generators])
        draw = uniforms[:, step % _UNIFORM_CHUNK] if uniforms is not None else None
        tokens = choose_tokens(logits, options, draw).tolist()
        for r, t in zip(rows, tokens):
            _advance(r, t, grammar, context)
        step += 1
        if all(r.finish is not None for r in rows):
            break
        # Feed the sampled tokens (EOS as filler for finished rows).
        feed = [t if r.finish is None else pad for r, t in zip(rows, tokens)]
        positions = [min(r.prompt_len + step - 1, (context or 1 << 30) - 1) for r in rows]
        column = [1] * B
        if cfg_on:
            # The unconditional row attends to the prefix and the current segment only.
            for i, (r, t) in enumerate(zip(rows, feed)):
                if t in grammar.open_ids and r.finish is None:
                    attn[B + i, width:] = 0
                    r.in_segment, r.segment_fed = True, 0
                elif t in grammar.close_ids:
                    r.in_segment = False
            column += [int(r.in_segment) for r in rows]
            positions += [P + r.segment_fed if r.in_segment else 0 for r in rows]
            for r in rows:
                r.segment_fed += r.in_segment
            feed = feed + feed
        attn = torch.cat([attn, torch.tensor(column, dtype=attn.dtype, device=device)[:, None]], dim=1)
        ids = torch.tensor(feed, dtype=torch.long, device=device)[:, None]
        pos = torch.tensor(positions, dtype=torch.long, device=device)[:, None]
        hidden = steps.step(ids, attn, pos)
    if not steps.compiled:
        eager_seconds(model, time.perf_counter() - started)
    return [Generated(r.ids, r.finish) for r in rows]


# ---------------------------------------------------------------------- one decoding step: eager or compiled

# ``compile="auto"`` rents before it buys: batches run eagerly until the eager decoding time this
# model has spent in this process reaches what a compile is expected to cost, then it compiles
# (ski rental: never more than twice the better choice made in hindsight). torch.compile of
# SmolLM2-135M's step took 60-290 s on a 2-core AMD EPYC and saved 20-30 % a token
# (benchmarks/generate.py); on a GPU a reduce-overhead compile takes tens of seconds. The time
# actually spent is counted, not a batch's bound: a 2 s audio cap bounds 51 steps where a spoken
# digit takes 8, and counting bounds compiled a 360-prompt evaluation for 3 minutes to save seconds.
AUTO_COMPILE_SECONDS = {"cpu": 120.0, "cuda": 30.0}
_CACHE_ROUND = 64  # static cache lengths are rounded up to a multiple of this: fewer recompiles
COMPILE_BACKEND = "inductor"  # torch.compile's backend (tests use "eager": the same graph, no code generation)


class EagerSteps:
    """The model's forward as it is, on transformers' ``DynamicCache`` (grown by one slot a step)."""

    compiled = False

    def __init__(self, model: "TealModel"):
        self.model, self.cache = model, None

    def prefill(self, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """``[R, T]`` left-padded ids and mask to the last hidden states ``[R, d_llm]``."""
        hidden, self.cache = self.model.hidden_states(ids, attn, use_cache=True)
        return hidden[:, -1]

    def step(self, ids: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """One token per row (``ids``, ``pos`` ``[R, 1]``; ``attn`` ``[R, T + steps]``, its last
        column the new token's) to ``[R, d_llm]``."""
        hidden, self.cache = self.model.hidden_states(ids, attn, position_ids=pos, past_key_values=self.cache,
                                                      use_cache=True)
        return hidden[:, -1]


class CompiledSteps(EagerSteps):
    """The same steps on a transformers ``StaticCache`` of ``length`` slots per row, the
    one-token step (joint ids -> :meth:`TealModel.embed` -> backbone -> last hidden state)
    compiled once per model with ``torch.compile`` (``mode="reduce-overhead"``, i.e. CUDA
    graphs, on a GPU). The prefill is the eager one (one call, on a ``DynamicCache``), whose
    keys and values are then copied into the static cache: the prompt's states are the very
    same as :class:`EagerSteps`'s. The attention mask is a ``[R, length]`` boolean buffer
    (padding, unwritten slots and the unconditional rows' hidden text are False) given to the
    backbone as a ready 4-D mask, so every step has the same shapes.

    The grammar's logits (:func:`block_logits`) stay outside the compiled graph: which blocks
    they compute changes from step to step (the LM head is skipped inside image segments),
    and each set would be a graph of its own to compile; they are one matrix product each."""

    compiled = True

    def __init__(self, model: "TealModel", rows: int, length: int):
        super().__init__(model)
        from transformers import StaticCache

        length = -(-length // _CACHE_ROUND) * _CACHE_ROUND
        key = (rows, length, next(model.llm.parameters()).dtype)
        pool = model.__dict__.setdefault("_static_caches", {})
        if key not in pool:
            pool.clear()  # one batch shape at a time (the last batch of a run may be smaller)
            pool[key] = (StaticCache(config=model.llm.config, max_cache_len=length),
                         torch.zeros(rows, length, dtype=torch.bool, device=model.device))
        self.cache, self.keep = pool[key]
        self.length = length
        self.fn = compiled_step(model)

    def prefill(self, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        hidden, dynamic = self.model.hidden_states(ids, attn, use_cache=True)
        width = ids.shape[1]
        for src, dst in zip(dynamic.layers, self.cache.layers, strict=True):
            if not dst.is_initialized:
                dst.lazy_initialization(src.keys, src.values)
            dst.keys[:, :, :width].copy_(src.keys)
            dst.values[:, :, :width].copy_(src.values)
            dst.cumulative_length.fill_(width)
        self.keep.zero_()
        return hidden[:, -1]

    def step(self, ids: torch.Tensor, attn: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        n = attn.shape[1]
        if n > self.length:  # the bound of decoding_steps is wrong: a bug, not a user error
            raise RuntimeError(f"static KV cache of {self.length} slots overflowed (step {n})")
        self.keep[:, :n] = attn.bool()
        # Cloned: a CUDA graph's output is overwritten by its next replay.
        return self.fn(ids, pos, self.keep, self.cache).clone()


def compiled_step(model: "TealModel"):
    """The model's compiled one-token step ``(ids [R, 1], pos [R, 1], keep [R, L], cache) ->
    [R, d_llm]``, made once per model (torch.compile recompiles by itself for a new shape)."""
    key = f"_compiled_step_{COMPILE_BACKEND}"
    fn = model.__dict__.get(key)
    if fn is None:
        additive = model.llm.config._attn_implementation == "eager"
        cache_kw = model._cache_kw

        def step(ids, pos, keep, cache):
            emb = model.embed(ids)
            mask = keep[:, None, None, :]
            if additive:  # eager attention adds the mask; sdpa takes booleans (True = attend)
                mask = torch.zeros(mask.shape, dtype=emb.dtype, device=emb.device).masked_fill(
                    ~mask, torch.finfo(emb.dtype).min)
            out = model.backbone(inputs_embeds=emb, attention_mask=mask, position_ids=pos, use_cache=True,
                                 return_dict=True, **{cache_kw: cache})
            return out.last_hidden_state[:, -1]

        mode = "reduce-overhead" if model.device.type == "cuda" and COMPILE_BACKEND == "inductor" else None
        fn = torch.compile(step, backend=COMPILE_BACKEND, mode=mode)
        model.__dict__[key] = fn
    return fn


def static_cache_unsupported(model: "TealModel") -> str | None:
    """Why the compiled static-cache step cannot run ``model`` (None: it can)."""
    if model._cache_kw != "cache":
        return "the installed transformers is older than 5.0 (another StaticCache interface)"
    if not getattr(model.llm, "_can_compile_fullgraph", False):
        return f"transformers' {type(model.llm).__name__} does not support a static KV cache"
    impl = model.llm.config._attn_implementation
    if impl not in ("sdpa", "eager"):
        return f"attention implementation '{impl}' (the compiled step supports sdpa and eager)"
    return None


def row_step_bound(prompt_lens: list[int], options: GenerateOptions, grammar: Grammar, context: int | None) -> int:
    """Most tokens one row of the batch can be fed after its prompt: the grammar's longest
    answer (``max_new_tokens`` text tokens, each of which may open a segment of up to its
    codec's limit plus ``</close>``; a forced segment and its boundaries), capped by the
    context (a row stops there)."""
    seg = {m: max((st.limit for st in grammar.states if st.kind == "codec" and st.modality == m), default=0) + 1
           for m in grammar.modalities}
    if grammar.forced:
        bound = 1 + seg[options.output_modality]
    elif grammar.open_ids and options.output_modality != "text":
        bound = options.max_new_tokens * (1 + max(seg.values()))
    else:
        bound = options.max_new_tokens
    if context:
        bound = min(bound, context - min(prompt_lens))
    return max(bound, 0) + 1


def use_compiled(model: "TealModel", options: GenerateOptions, tight: bool = True) -> bool:
    """``options.compile``: ``on``/``off``; ``auto``: compile when the model supports it, the
    batch's bound is ``tight`` (a forced segment or text only: not a free answer whose bound
    counts every segment the model might open, which would size the cache for the whole
    context), and the eager decoding seconds this model has spent in this process
    (:func:`eager_seconds`) reach :data:`AUTO_COMPILE_SECONDS`. Raises UsageError for ``on``
    with a model it cannot run."""
    if options.compile == "off":
        return False
    why = static_cache_unsupported(model)
    if options.compile == "on":
        if why:
            raise UsageError(f"--compile on: {why}; use --compile auto or off")
        return True
    if why or not tight:
        return False
    return eager_seconds(model) >= AUTO_COMPILE_SECONDS.get(model.device.type, float("inf"))


def eager_seconds(model: "TealModel", add: float = 0.0) -> float:
    """The wall seconds ``model`` has spent decoding eagerly in this process, after adding ``add``."""
    spent = model.__dict__.get("_eager_seconds", 0.0) + add
    model.__dict__["_eager_seconds"] = spent
    return spent


def decoding_steps(model: "TealModel", prompts: list[list[int]], options: GenerateOptions, grammar: Grammar,
                   rows: int, width: int) -> EagerSteps:
    """The batch's step function: :class:`CompiledSteps` or :class:`EagerSteps` (``options.compile``)."""
    bound = row_step_bound([len(p) for p in prompts], options, grammar, model.context_length)
    tight = grammar.forced or options.output_modality == "text" or not grammar.open_ids
    if use_compiled(model, options, tight):
        return CompiledSteps(model, rows, width + bound)
    return EagerSteps(model)


# ---------------------------------------------------------------------- records in, records out


def provenance(model: "TealModel", options: GenerateOptions) -> dict[str, Any]:
    """The ``generation`` field's run-wide part: model directory and adapter sha256 (when the
    model was loaded from a directory), base LLM, dtype, every option, teal version."""
    import teal_cli

    directory = getattr(model, "directory", None)
    settings = asdict(options)
    settings.pop("echo")
    return {
        "model": str(directory) if directory else None,
        "adapter_sha256": model.adapter_sha256(directory) if directory else None,
        "base_llm": model.config.llm.get("name"),
        "dtype": str(next(model.llm.parameters()).dtype).removeprefix("torch."),
        **settings,
        "teal_version": teal_cli.__version__,
    }


def generate(model: "TealModel", records: Iterable[Record], options: GenerateOptions,
             on_bad: "Callable[[Record, DataError], None] | None" = None) -> Iterator[Record]:
    """Continue each prompt record; yield one record per prompt, in input order.

    The prompt is the record's segments without ``role: target``
    (``model.encode_record(record, prompt_only=True)``). Records are decoded
    ``options.batch_size`` at a time and yielded as each batch finishes. Each output record
    keeps the prompt's id and other top-level fields; ``segments`` are the generated ones
    (after the prompt's with ``echo``); ``generation`` holds :func:`provenance` plus
    ``finish`` (see :class:`Generated`) and, for a repeated id, ``repeat`` (its seed input).

    Raises UsageError for bad options, DataError naming the record for a prompt that does not
    fit the context (or leaves no room for a forced image segment) or cannot be read; with
    ``on_bad``, such a prompt is passed to ``on_bad(record, error)`` instead and gets no output.
    """
    options.check()
    model.eval()
    grammar = Grammar(model, options)
    info = provenance(model, options)
    context = model.context_length
    seen: Counter[str] = Counter()
    need = grammar.need[options.output_modality] if grammar.forced else 1

    def run(batch: list[tuple[Record, list[int], int]]) -> Iterator[Record]:
        seeds = [row_seed(options.seed, rec.id, repeat) for rec, _, repeat in batch]
        results = generate_ids(model, [ids for _, ids, _ in batch], options, grammar, seeds)
        for (rec, _, repeat), res in zip(batch, results):
            segments = echoed_prompt(rec) if options.echo else []
            generation = {**info, "finish": res.finish}
            if repeat:
                generation["repeat"] = repeat
            yield Record(id=rec.id, segments=segments + model.decode_ids(res.ids),
                         extra={**rec.extra, "generation": generation})

    batch: list[tuple[Record, list[int], int]] = []
    for record in records:
        try:
            ids = _prompt_ids(model, record, context, need, options)
        except DataError as exc:
            if on_bad is None:
                raise
            on_bad(record, exc)
            continue
        batch.append((record, ids, seen[record.id]))
        seen[record.id] += 1
        if len(batch) == options.batch_size:
            yield from run(batch)
            batch = []
    if batch:
        yield from run(batch)


def echoed_prompt(record: Record) -> list[Segment]:
    """The prompt segments ``--echo`` puts before the answer, each marked ``role: prompt`` so that
    eval scores only what was generated (both engines use this)."""
    return [s.with_role("prompt") for s in record.segments if s.extra.get("role") != "target"]


def _prompt_ids(model: "TealModel", record: Record, context: int | None, need: int, options: GenerateOptions) -> list[int]:
    """A prompt's joint ids; DataError naming the record when it is empty or leaves no room."""
    ids = model.encode_record(record, prompt_only=True).ids
    if not ids:
        raise DataError(f"record '{record.id}': the prompt is empty (no segments without role 'target', and the "
                        "tokenizer adds no BOS); give it a text or media segment")
    if context and len(ids) + need > context:
        room = ("no room for a token" if need == 1 else f"no room for the {need - 2}-id image segment"
                if options.output_modality == "image" else "no room for an audio segment")
        raise DataError(f"record '{record.id}': the prompt has {len(ids)} tokens and the base LLM's context is "
                        f"{context}: {room}; shorten the prompt")
    return ids


def text_prompt(text: str, record_id: str = "prompt") -> Record:
    """A prompt record holding one text segment (what ``teal generate --text`` makes)."""
    return Record(id=record_id, segments=[Segment(modality="text", text=text)])
