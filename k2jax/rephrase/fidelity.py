"""Fidelity checks: does a rewrite keep its source chunk's content? A score in [0, 1] per chunk,
accepted at or above the check's threshold.

  facts      (default; needs only the two texts) the share of the source's facts found in the
             rewrite: its numbers (1,000 and 1000 are the same number) and its capitalised names
             (a capitalised word that does not start a sentence, or an acronym); 1.0 when the
             source has none. Default threshold 0.9.
  embedding  the cosine of the two texts' embeddings from the generator server's /v1/embeddings
             (nmoe keeps a rewrite at cosine >= 0.85, the default threshold).
  judge      an LLM on the same server (any model it serves) grades the rewrite against the
             source with the rubric of prompts/judge.yaml, 1 to 5 (5: every fact kept, nothing
             added), at temperature 0; the score is (n - 1) / 4. Default threshold 0.75 (4 of 5).
             A reply without a score raises Unscored.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Protocol

import yaml

from k2jax.config import ConfigError
from k2jax.rephrase.client import Client
from k2jax.rephrase.prompts import JUDGE

_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_WORD = re.compile(r"[^\W\d_][\w'’-]*")
_GRADE = re.compile(r"(?<![\d./])[1-5](?!\d|\.\d)")  # 1-5 alone: not in 10, 2.5 or 0/5


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


class Unscored(Exception):
    """A judge reply holding no score from 1 to 5: the rewrite fails the check."""


class JudgeCheck:
    """(n - 1) / 4 for the first integer n from 1 to 5 that `model` (at `client`'s server) answers the rubric with."""

    name = "judge"
    max_tokens = 16  # the score, and room for a word or two around it

    def __init__(self, client: Client, model: str | None = None, threshold: float = 0.75):
        self.client, self.model, self.threshold = client, model or client.model, threshold
        self.rubric = yaml.safe_load(JUDGE.read_text())["template"]
        self.rubric_hash = hashlib.sha256(self.rubric.encode()).hexdigest()[:16]

    def score(self, source: str, rewrite: str) -> float:
        prompt = self.rubric.format(source=source, rewrite=rewrite)
        reply = self.client.generate(prompt, max_tokens=self.max_tokens, temperature=0.0, model=self.model)
        return (parse_grade(reply.text) - 1) / 4


def parse_grade(reply: str) -> int:
    """The first integer from 1 to 5 standing alone in `reply` ("Score: 4/5" -> 4); Unscored if none."""
    match = _GRADE.search(reply)
    if match is None:
        raise Unscored(f"no score from 1 to 5 in the judge's reply {reply[:80]!r}")
    return int(match.group())


CHECKS = ("facts", "embedding", "judge")


def make_check(name: str, client: Client, threshold: float | None = None, judge_model: str | None = None) -> Check:
    """The check `name` with `threshold` (default: the check's own); the judge asks `judge_model`
    (default: the client's model)."""
    if name not in CHECKS:
        raise ConfigError(f"--fidelity: {name!r} is not a check; choose one of {', '.join(CHECKS)}")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"--min-fidelity must be in [0, 1], got {threshold}")
    kwargs = {} if threshold is None else {"threshold": threshold}
    if name == "judge":
        return JudgeCheck(client, judge_model, **kwargs)
    return FactsCheck(**kwargs) if name == "facts" else EmbeddingCheck(client, **kwargs)
