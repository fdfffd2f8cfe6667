"""Where evaluation text and tasks come from.

Text sets (bits per byte): "heldout", the run's own held-out split (data.corpus split by
data.heldout_fraction as training splits it; in-memory corpora only), or NAME=PATH: a .jsonl file
(its "text" fields), a directory (its text and JSONL files, as `data.corpus` reads one) or any other
file (one document, read whole).

Tasks: a shipped name (TASKS_DIR/NAME.jsonl: `stdlib_mc`, `stdlib_qa`) or the path of a .jsonl file
(named by its stem). One item per line: multiple choice {"context": str, "choices": [str, ...],
"gold": int} or QA {"question": str, "answers": [str, ...], "prompt": str (optional)}; the first
line's fields decide which, every line is checked, and an error names the file and line.
"""

from __future__ import annotations

import json
from pathlib import Path

from k2jax.config import ConfigError
from k2jax.data import corpus as corpus_lib

TASKS_DIR = Path(__file__).parent / "tasks"
HELDOUT = "heldout"


def shipped_tasks() -> list[str]:
    return sorted(p.stem for p in TASKS_DIR.glob("*.jsonl"))


def split_text_spec(spec: str, where: str) -> tuple[str, str | None]:
    """(name, path) of "heldout" (path None) or "NAME=PATH"."""
    if spec == HELDOUT:
        return spec, None
    name, sep, path = spec.partition("=")
    if not sep or not name or not path or "/" in name:
        raise ConfigError(f"{where}: expected 'heldout' or NAME=PATH (a text file, directory or JSONL), got {spec!r}")
    return name, path


def read_texts(path: str, where: str) -> list[str]:
    """The documents of a text set's PATH (module docstring)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{where}: {path} does not exist")
    if p.is_file() and p.suffix != ".jsonl":
        return [p.read_text(encoding="utf-8", errors="replace")]
    try:
        texts = [text for _, text in corpus_lib.iter_documents(p)]
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if not texts:
        raise ConfigError(f"{where}: {path} holds no text")
    return texts


def within_bytes(texts: list[str], max_bytes: int | None) -> list[str]:
    """The first `max_bytes` UTF-8 bytes of the documents, in order: whole documents, the last one cut
    (at a character boundary) where the budget ends."""
    if max_bytes is None:
        return texts
    out, left = [], max_bytes
    for text in texts:
        data = text.encode("utf-8")
        if left <= 0:
            break
        out.append(data[:left].decode("utf-8", errors="ignore"))
        left -= len(data)
    return out


_MC, _QA = {"context", "choices", "gold"}, {"question", "answers"}


def task_path(spec: str, where: str) -> Path:
    """The file of a shipped task name or a .jsonl path."""
    if spec in shipped_tasks():
        return TASKS_DIR / f"{spec}.jsonl"
    if spec.endswith(".jsonl") and Path(spec).is_file():
        return Path(spec)
    raise ConfigError(f"{where}: unknown task {spec!r}: neither a shipped task ({', '.join(shipped_tasks())}) nor "
                      f"an existing .jsonl file")


def load_task(spec: str, where: str, max_items: int | None = None) -> tuple[str, str, list[dict]]:
    """(name, kind "choice" or "qa", items) of a task, checked line by line."""
    path = task_path(spec, where)
    items, kind = [], None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            if not isinstance(item, dict):
                raise ValueError("not a JSON object")
            kind = kind or ("choice" if _MC <= item.keys() else "qa" if _QA <= item.keys() else None)
            if kind is None:
                raise ValueError(f"fields {sorted(item)}: expected {sorted(_MC)} (multiple choice) or "
                                 f"{sorted(_QA)} (QA)")
            (_check_choice if kind == "choice" else _check_qa)(item)
        except ValueError as e:  # json.JSONDecodeError included
            raise ConfigError(f"{where}: {path} line {number}: {e}") from None
        items.append(item)
        if len(items) == max_items:
            break
    if not items:
        raise ConfigError(f"{where}: {path} holds no items")
    return Path(spec).stem, kind, items


def _check_choice(item: dict) -> None:
    choices = item["choices"]
    if not isinstance(item["context"], str):
        raise ValueError("'context' must be a string")
    if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
        raise ValueError("'choices' must be a list of two or more non-empty strings")
    if isinstance(item["gold"], bool) or not isinstance(item["gold"], int) or not 0 <= item["gold"] < len(choices):
        raise ValueError(f"'gold' must be an index into the {len(choices)} choices, got {item['gold']!r}")


def _check_qa(item: dict) -> None:
    if not isinstance(item["question"], str) or not isinstance(item.get("prompt", ""), str):
        raise ValueError("'question' (and 'prompt', if given) must be strings")
    if not (isinstance(item["answers"], list) and item["answers"] and all(isinstance(a, str) for a in item["answers"])):
        raise ValueError("'answers' must be a non-empty list of strings")
