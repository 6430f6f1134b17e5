"""Text normalisations and answer parsers used by the scorers, each documented here once.

- :func:`coco_tokenize`: a pure-Python stand-in for the COCO caption evaluation's Java PTB
  tokenizer plus its punctuation filter (pycocoevalcap ``tokenizer/ptbtokenizer.py``).
- :func:`asr_normalize`: the text normalisation applied before WER/CER.
- :func:`parse_choice`: the letter of a multiple-choice answer.
- :func:`class_of` / :func:`canonical_class`: class words in free-text answers.
"""

from __future__ import annotations

import re
import unicodedata

# The list the COCO evaluation drops after PTB tokenisation (pycocoevalcap PUNCTUATIONS).
PTB_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                             ".", "?", "!", ",", ":", "-", "--", "...", ";"])
_LOWER_PUNCTUATION = frozenset(p.lower() for p in PTB_PUNCTUATION)
# Characters PTB splits off the edges of a word (then dropped by the list above, brackets
# as -LRB- and friends, double quotes as `` and '').
_EDGE = ".,?!:;'\"`()[]{}-"
_CLITICS = ("n't", "'s", "'re", "'ve", "'ll", "'m", "'d")
# Punctuation PTB splits off inside a word too (except a comma or colon between digits: 1,000 / 10:30).
_INNER = re.compile(r"(?<!\d)[,:]|[,:](?!\d)|[;!?\"()\[\]{}]|--+|\.\.\.+")


def coco_tokenize(text: str) -> str:
    """Tokenise a caption as the COCO evaluation does (PTB tokenizer, lowercased, then its
    punctuation list removed), in Python; returns the tokens joined by single spaces.

    Rule: lowercase; split on whitespace; split on ``; ! ? " ( ) [ ] { }``, ``--``, ``...``
    and on commas/colons not between two digits; peel ``. , ? ! : ; ' " ` ( ) [ ] { } -``
    off the edges of each token; split the clitics ``n't 's 're 've 'll 'm 'd`` off the
    end of a word ("don't" -> "do n't", "dog's" -> "dog 's"); drop tokens left empty or
    in the COCO punctuation list. Text that is already tokenised this way (lowercase, no
    punctuation tokens) comes back unchanged, so scores on it equal the COCO scorers'.

    Differences from Stanford PTBTokenizer 3.4.1: abbreviations keep no final period
    ("e.g." -> "e.g", "mr." -> "mr"); "cannot", "gonna" and the like are not split; symbols
    such as ``$ % & #`` stay attached to their word; Unicode quotes and dashes are not
    normalised; brackets are dropped (PTB writes ``-lrb-``). Captions rarely hold any of these.
    """
    words: list[str] = []
    for token in _INNER.sub(" ", text.lower().replace("\n", " ")).split():
        if token in _LOWER_PUNCTUATION:
            continue
        if token in _CLITICS:
            words.append(token)
            continue
        token = token.strip(_EDGE)
        if not token:
            continue
        for clitic in _CLITICS:
            if token.endswith(clitic) and len(token) > len(clitic):
                words.extend([token[: -len(clitic)], clitic])
                break
        else:
            words.append(token)
    return " ".join(w for w in words if w not in _LOWER_PUNCTUATION)


def asr_normalize(text: str) -> str:
    """The normalisation applied before WER/CER: Unicode NFKC, lowercase, apostrophes
    removed ("don't" -> "dont"), every other punctuation or symbol character (Unicode
    categories P* and S*) replaced by a space, whitespace collapsed to single spaces and
    stripped. Digits and letters of every script are kept; numbers are not spelled out."""
    text = unicodedata.normalize("NFKC", text).lower()
    out = []
    for ch in text:
        if ch in "'\u2019\u02bc":
            continue
        cat = unicodedata.category(ch)
        out.append(" " if cat[0] in "PS" else ch)
    return " ".join("".join(out).split())


# --------------------------------------------------------------------------- multiple choice

_OPTION = re.compile(r"(?:^|\s|\n)\(([A-Z])\)\s*(.*?)(?=\s*\([A-Z]\)|\n|$)", re.S)
_OPTION_LINE = re.compile(r"^\s*([A-Z])[.)]\s+(.+?)\s*$", re.M)
_ANSWER_IS = re.compile(r"\banswer\s*(?:is|:)?\s*:?\s*\(?([A-Za-z])\)?(?![A-Za-z])", re.I)
_BRACKETED = re.compile(r"\(([A-Z])\)")
_LEADING = re.compile(r"^\s*\(?([A-Z])(?:[.):,]|\s|$)")


def prompt_options(prompt: str) -> dict[str, str]:
    """The options a ScienceQA-style prompt lists: ``(A) cat (B) dog`` or one ``A. cat`` /
    ``A) cat`` per line; letter -> option text. Empty when the prompt lists none."""
    found = {m.group(1): m.group(2).strip() for m in _OPTION.finditer(prompt)}
    if not found:
        found = {m.group(1): m.group(2).strip() for m in _OPTION_LINE.finditer(prompt)}
    return found


def parse_choice(text: str, options: dict[str, str] | None = None) -> str | None:
    """The option letter an answer names, or None.

    In order, the first rule that finds a letter wins (letters limited to ``options``'
    keys when given, else A-Z):
    1. the whole answer, stripped of brackets and ``.:,`` and spaces, is one letter (any case);
    2. ``answer is X`` / ``answer: X`` / ``answer is (X)`` (any case);
    3. the first bracketed capital ``(X)``;
    4. the answer starts with a capital letter followed by ``. ) : ,``, a space or its end
       ("B. the moon", "C");
    5. the answer, normalised as for ASR, equals exactly one option's text.
    """
    allowed = set(options) if options else None

    def ok(letter: str | None) -> str | None:
        if letter is None:
            return None
        letter = letter.upper()
        return letter if allowed is None or letter in allowed else None

    bare = text.strip().strip("().:,[] ").strip()
    if len(bare) == 1 and bare.isascii() and bare.isalpha() and ok(bare):
        return ok(bare)
    for pattern in (_ANSWER_IS, _BRACKETED, _LEADING):
        m = pattern.search(text)
        if m and ok(m.group(1)):
            return ok(m.group(1))
    if options:
        said = asr_normalize(text)
        hits = [k for k, v in options.items() if asr_normalize(v) == said]
        if len(hits) == 1:
            return hits[0]
    return None


# --------------------------------------------------------------------------- class words

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_DIGIT_OF = {w: str(i) for i, w in enumerate(DIGIT_WORDS)}


def _words(text: str) -> list[str]:
    return asr_normalize(text).split()


def canonical_class(text: str) -> str:
    """The key a class word is compared by: ASR-normalised words, each digit word
    ("seven") replaced by its numeral ("7"), joined by spaces."""
    return " ".join(_DIGIT_OF.get(w, w) for w in _words(text))


def class_of(text: str, classes: list[str]) -> str | None:
    """Which of ``classes`` (canonical keys, :func:`canonical_class`) the answer ``text`` names.

    The answer's canonical words are searched for each class as a whole-word sequence; the
    class found earliest wins, the longer one on a tie ("ice cream" over "ice"). None when
    none occurs.
    """
    words = canonical_class(text).split()
    best: tuple[int, int, str] | None = None
    for cls in classes:
        target = cls.split()
        if not target:
            continue
        for i in range(len(words) - len(target) + 1):
            if words[i : i + len(target)] == target:
                key = (i, -len(target), cls)
                if best is None or key < best:
                    best = key
                break
    return best[2] if best else None
