"""Text corpora that need no download, split deterministically into train and held-out.

"stdlib" is the Python standard library's own source files (present wherever
k2jax runs). A directory (its .txt/.md/.rst/.py files), a .txt file (one
document per blank-line-separated block) or a .jsonl file ("text" per line)
work the same way. The split hashes each document's name with MD5, so it never
depends on file order, Python's hash salt or the machine.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from pathlib import Path

from k2jax.config import ConfigError, DataConfig

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
Document = tuple[str, str]  # (name, text)


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "test", "tests", "idlelib", "__pycache__")
    files = [p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts)]
    return sorted(files, key=lambda p: _digest(str(p.relative_to(root))))  # a stable mix of modules


def _read_files(files: list[Path], root: Path, budget: int) -> list[Document]:
    docs, used = [], 0
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            continue
        docs.append((str(path.relative_to(root)), text))
        used += len(text.encode())
        if used >= budget:
            break
    return docs


def _read_documents(cfg: DataConfig) -> list[Document]:
    if cfg.corpus == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        return _read_files(_stdlib_files(), root, cfg.max_corpus_bytes)
    path = Path(cfg.corpus)
    if not path.exists():
        raise ConfigError(f"data.corpus: {cfg.corpus!r} is neither 'stdlib' nor an existing file or directory")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        return _read_files(files, path, cfg.max_corpus_bytes)
    text = path.read_text(encoding="utf-8", errors="replace")[: cfg.max_corpus_bytes]
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    docs.append((f"{path.name}:{i}", json.loads(line)["text"]))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ConfigError(f"data.corpus: {path} line {i + 1} is not JSON with a 'text' field ({e})")
        return [d for d in docs if d[1].strip()]
    blocks = [b for b in text.split("\n\n") if b.strip()]
    return [(f"{path.name}:{i}", b) for i, b in enumerate(blocks)]


def _digest(name: str) -> int:
    return int.from_bytes(hashlib.md5(name.encode()).digest()[:4], "little")


def is_heldout(name: str, fraction: float) -> bool:
    return _digest(name) / 2**32 < fraction


def load_corpus(cfg: DataConfig) -> tuple[list[str], list[str]]:
    """(train texts, held-out texts); both non-empty or a ConfigError naming the corpus."""
    docs = _read_documents(cfg)
    if not docs:
        raise ConfigError(f"data.corpus: {cfg.corpus!r} is empty: no text documents found")
    train = [text for name, text in docs if not is_heldout(name, cfg.heldout_fraction)]
    heldout = [text for name, text in docs if is_heldout(name, cfg.heldout_fraction)]
    if not heldout:  # tiny corpora: hold out the last document rather than fail
        train, heldout = train[:-1], train[-1:]
    if not train:
        raise ConfigError(f"data.corpus: {cfg.corpus!r} has too few documents ({len(docs)}) to split")
    return train, heldout
