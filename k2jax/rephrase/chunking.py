"""Split a document into chunks of at most T tokens at paragraph, then sentence boundaries.

The chunks are consecutive slices of the document: `"".join(chunk_text(text, T)) == text`
exactly (a chunk keeps the whitespace after it; strip it for a prompt). Each chunk ends at
the furthest paragraph boundary (a blank line) within T tokens of its start; where no
paragraph fits, at the furthest sentence boundary (., !, ? or … then whitespace); only
where one sentence alone is longer than T, at the furthest word boundary, and only where
one word is, inside the word. So every chunk holds at most T tokens, and none is cut
inside a sentence unless that sentence exceeds T. The furthest end within T tokens is found
by a galloping search over the characters (a chunk costs a few counts of slices about its
own length); for a counter whose counts do not grow with the slice, the chosen boundary is
checked and a nearer one taken where it does not fit.

Tokens are counted by a callable (text -> int), e.g. a tokenizer's `len(encode(text))`.
The default, `estimate_tokens`, needs no tokenizer: one token per 4 UTF-8 bytes, and at
least one per whitespace-separated word (English BPE vocabularies average ~4 bytes/token).
"""

from __future__ import annotations

import bisect
import re
from typing import Callable

TokenCounter = Callable[[str], int]

_PARAGRAPH = re.compile(r"\n[ \t]*\n\s*")
_SENTENCE = re.compile(r"[.!?…][\"'”’»)\]]*\s+")
_WORD = re.compile(r"\s+")


def estimate_tokens(text: str) -> int:
    """max(UTF-8 bytes / 4 rounded up, words): a tokenizer-free estimate of BPE tokens."""
    return max(-(-len(text.encode()) // 4), len(text.split()))


def _boundaries(pattern: re.Pattern, text: str) -> list[int]:
    """Offsets where a chunk may end (after the separator's whitespace), the end of the text included."""
    ends = [m.end() for m in pattern.finditer(text) if m.end() < len(text)]
    return ends + [len(text)]


def chunk_text(text: str, max_tokens: int, count: TokenCounter = estimate_tokens) -> list[str]:
    """Consecutive slices of `text`, each of at most `max_tokens` tokens (see the module docstring)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    paragraphs = _boundaries(_PARAGRAPH, text)
    sentences = sorted(set(paragraphs + _boundaries(_SENTENCE, text)))  # a paragraph ends its last sentence
    levels = [paragraphs, sentences, _boundaries(_WORD, text)]
    chunks, start = [], 0
    while start < len(text):
        fits = lambda end: count(text[start:end]) <= max_tokens  # noqa: E731
        limit = _furthest_fit(start, len(text), fits)
        end = None
        while end is None:  # the furthest boundary within the limit, of the coarsest level that has one
            ends = [cuts[i] for cuts in levels if (i := bisect.bisect_right(cuts, limit) - 1) >= 0]
            end = next((e for e in ends if e > start), limit)
            if end < limit and not fits(end):  # a counter that is not monotone: look below that boundary
                limit, end = max(end - 1, start + 1), None
        chunks.append(text[start:end])
        start = end
    return chunks


def _furthest_fit(start: int, stop: int, fits) -> int:
    """The largest end <= stop with text[start:end] fitting (start + 1 if none does): a galloping
    search, so a chunk costs counts of slices about its own length, not the rest of the document's."""
    if not fits(start + 1):
        return start + 1  # one character more than max_tokens: it is a chunk of its own
    good, step = start + 1, 1
    while good + step <= stop and fits(good + step):
        good, step = good + step, 2 * step
    bad = min(good + step, stop + 1)  # does not fit, or is past the end
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good
