"""Write the shipped tasks, tasks/stdlib_mc.jsonl and tasks/stdlib_qa.jsonl, from held-out stdlib text.

`python -m k2jax.eval.build_tasks [OUT_DIR]` (default: this package's tasks/). Deterministic for a given
Python: the lines come from the stdlib files the default corpus holds out (data.heldout_fraction 0.02,
which every stdlib run holds out whatever its data.max_corpus_bytes), picked with a fixed seed. The
committed files were written with Python BUILT_WITH.

stdlib_mc (100 items): the context is the lines before a source line (at most CONTEXT_CHARS characters,
whole lines); which of four lines is the real next one? The three others are that line with two adjacent
words swapped, with one punctuation mark replaced by another, and with one identifier replaced by an
identifier of another held-out file: word order, syntax and the names in use each tell one apart (a
line of the same indentation from elsewhere, tried first, was chosen over the real one as often as not
by the trained default run: fit with a short context is not something a model of this size learns).
stdlib_qa (50 items): the prompt is such a context plus the start of a line up to its first keyword and
space ("    return "), the answer the rest of the line.
"""

from __future__ import annotations

import json
import keyword
import re
import sys
from pathlib import Path

import numpy as np

from k2jax.config import DataConfig
from k2jax.data.corpus import iter_documents, is_heldout, within_bytes

BUILT_WITH = "3.11.7"
CONTEXT_CHARS, LINE_CHARS = 72, (8, 48)
KEYWORDS = ("return", "import", "from", "raise", "if", "elif", "for", "while", "with", "def", "class", "assert")
PUNCTUATION = "()[]{}:,.="
QA_QUESTION = "Complete this line of Python standard-library source."


def _heldout_documents() -> list[tuple[str, list[str]]]:
    cfg = DataConfig()
    docs = within_bytes(iter_documents(cfg.corpus), cfg.max_corpus_bytes)
    return [(name, text.split("\n")) for name, text in docs if is_heldout(name, cfg.heldout_fraction)]


def _context(lines: list[str], i: int) -> str | None:
    """The whole lines before line i, at most CONTEXT_CHARS characters, each ending in a newline."""
    context = ""
    for line in reversed(lines[:i]):
        if len(context) + len(line) + 1 > CONTEXT_CHARS:
            break
        context = line + "\n" + context
    return context if context.strip() else None


def _indent(line: str) -> str:
    return line[:len(line) - len(line.lstrip())]


def _candidates(docs) -> list[tuple[int, int]]:
    """(document, line) of lines worth predicting: code (not comments or docstring quotes) of LINE_CHARS
    length with a non-blank context."""
    out = []
    for d, (_, lines) in enumerate(docs):
        for i, line in enumerate(lines):
            body = line.strip()
            if (LINE_CHARS[0] <= len(line) <= LINE_CHARS[1] and body[0] not in "#\"'" and
                    _context(lines, i) is not None):
                out.append((d, i))
    return out


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _identifiers(text: str) -> list[str]:
    return [m for m in _IDENTIFIER.findall(text) if not keyword.iskeyword(m)]


def _swapped(line: str, rng) -> str | None:
    """The line with two adjacent words (space-separated, after the indentation) swapped."""
    words = line.strip().split(" ")
    pairs = [j for j in range(len(words) - 1) if words[j] != words[j + 1]]
    if not pairs:
        return None
    j = pairs[int(rng.integers(len(pairs)))]
    words[j], words[j + 1] = words[j + 1], words[j]
    return _indent(line) + " ".join(words)


def _punctuated(line: str, rng) -> str | None:
    """The line with one of its PUNCTUATION marks replaced by another (None if it has none)."""
    spots = [j for j, c in enumerate(line) if c in PUNCTUATION]
    if not spots:
        return None
    j = spots[int(rng.integers(len(spots)))]
    other = [c for c in PUNCTUATION if c != line[j]]
    return line[:j] + other[int(rng.integers(len(other)))] + line[j + 1:]


def _renamed(line: str, names: list[str], rng) -> str | None:
    """The line with one identifier occurrence replaced by another name from `names`."""
    spans = [m.span() for m in _IDENTIFIER.finditer(line) if not keyword.iskeyword(m.group())]
    if not spans:
        return None
    start, end = spans[int(rng.integers(len(spans)))]
    name = names[int(rng.integers(len(names)))]
    return None if name == line[start:end] else line[:start] + name + line[end:]


def multiple_choice(docs, rng, n: int = 100) -> list[dict]:
    pool = _candidates(docs)
    names = [sorted(set(_identifiers("\n".join(lines)))) for _, lines in docs]
    items = []
    for k in rng.permutation(len(pool)):
        d, i = pool[k]
        line = docs[d][1][i]
        other_names = sorted({x for e, ns in enumerate(names) if e != d for x in ns} - set(names[d]))
        choices = [_swapped(line, rng), _punctuated(line, rng), _renamed(line, other_names, rng)]
        if None in choices or len({line, *choices}) < 4:
            continue
        gold = int(rng.integers(4))
        choices.insert(gold, line)
        items.append({"context": _context(docs[d][1], i), "choices": choices, "gold": gold,
                      "source": f"{docs[d][0]}:{i + 1}"})
        if len(items) == n:
            break
    return items


def qa(docs, rng, n: int = 50) -> list[dict]:
    items = []
    pool = _candidates(docs)
    for k in rng.permutation(len(pool)):
        d, i = pool[k]
        line = docs[d][1][i]
        word, _, rest = line.strip().partition(" ")
        if word not in KEYWORDS or not 2 <= len(rest) <= 24:
            continue
        items.append({"question": QA_QUESTION, "prompt": _context(docs[d][1], i) + _indent(line) + word + " ",
                      "answers": [rest], "source": f"{docs[d][0]}:{i + 1}"})
        if len(items) == n:
            break
    return items


def write(out_dir: Path) -> None:
    docs = _heldout_documents()
    for name, items in (("stdlib_mc", multiple_choice(docs, np.random.default_rng(0))),
                        ("stdlib_qa", qa(docs, np.random.default_rng(1)))):
        (out_dir / f"{name}.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
        print(f"{len(items)} items -> {out_dir / name}.jsonl")


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "tasks")
