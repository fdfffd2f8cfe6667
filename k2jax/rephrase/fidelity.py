"""Fidelity checks: does a rewrite keep its source chunk's content? A score in [0, 1] per chunk,
accepted at or above the check's threshold.

  facts      (default; needs only the two texts) the share of the source's facts found in the
             rewrite: its numbers (1,000 and 1000 are the same number) and its capitalised names
             (a capitalised word that does not start a sentence, or an acronym); 1.0 when the
             source has none. Default threshold 0.9.
  embedding  the cosine of the two texts' embeddings from the generator server's /v1/embeddings
             (nmoe keeps a rewrite at cosine >= 0.85, the default threshold).
"""

from __future__ import annotations

import math
import re
from typing import Protocol

from k2jax.config import ConfigError
from k2jax.rephrase.client import Client

_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_WORD = re.compile(r"[^\W\d_][\w'’-]*")


class Check(Protocol):
    name: str
    threshold: float

    def score(self, source: str, rewrite: str) -> float: ...


def numbers(text: str) -> set[str]:
    """The numbers of `text`, thousands separators removed ("1,000" -> "1000"; "3.14" stays)."""
    return {re.sub(r",(?=\d{3}(?:\D|$))", "", m.group()).rstrip(".,") for m in _NUMBER.finditer(text)}


def names(text: str) -> set[str]:
    """Capitalised words that do not start a sentence, and acronyms (two or more capitals) anywhere."""
    found = set()
    for m in _WORD.finditer(text):
        word = m.group().rstrip("'’-")
        if word[0].isupper() and (sum(c.isupper() for c in word) >= 2 or not _starts_sentence(text, m.start())):
            found.add(word)
    return found


def _starts_sentence(text: str, i: int) -> bool:
    before = text[:i].rstrip(" \t\"'“‘([")
    return not before or before[-1] in ".!?…:\n\r"


class FactsCheck:
    """The share of the source's numbers and names that the rewrite keeps."""

    name = "facts"

    def __init__(self, threshold: float = 0.9):
        self.threshold = threshold

    def score(self, source: str, rewrite: str) -> float:
        facts = numbers(source) | names(source)
        if not facts:
            return 1.0
        words = {m.group().rstrip("'’-") for m in _WORD.finditer(rewrite)}
        kept = facts & (numbers(rewrite) | words)
        return len(kept) / len(facts)


class EmbeddingCheck:
    """The cosine of the source's and the rewrite's embeddings (POST /embeddings of `client`'s server)."""

    name = "embedding"

    def __init__(self, client: Client, threshold: float = 0.85):
        self.client, self.threshold = client, threshold

    def score(self, source: str, rewrite: str) -> float:
        a, b = self.client.embed([source, rewrite])
        norm = math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))
        return sum(x * y for x, y in zip(a, b)) / norm if norm else 0.0


CHECKS = ("facts", "embedding")


def make_check(name: str, client: Client, threshold: float | None = None) -> Check:
    """The check `name` with `threshold` (default: the check's own)."""
    if name not in CHECKS:
        raise ConfigError(f"--fidelity: {name!r} is not a check; choose one of {', '.join(CHECKS)}")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"--min-fidelity must be in [0, 1], got {threshold}")
    kwargs = {} if threshold is None else {"threshold": threshold}
    return FactsCheck(**kwargs) if name == "facts" else EmbeddingCheck(client, **kwargs)
