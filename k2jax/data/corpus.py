"""Text corpora that need no download, split deterministically into train and held-out.

"stdlib" is the Python standard library's own source files (present wherever
k2jax runs). A directory (its .txt/.md/.rst/.py files as documents, plus the
records of its .jsonl/.parquet files), a .txt file (one document per
blank-line-separated block), a .jsonl file ("text" per line) or a .parquet file
("text" column) work the same way. The split hashes each document's name with
MD5, so it never depends on file order, Python's hash salt or the machine.
`iter_documents` streams, for `k2jax prepare` on corpora larger than memory.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator

from k2jax.config import ConfigError, DataConfig

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
RECORD_SUFFIXES = (".jsonl", ".parquet")
Document = tuple[str, str]  # (name, text)


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "test", "tests", "idlelib", "__pycache__")
    files = [p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts)]
    return sorted(files, key=lambda p: _digest(str(p.relative_to(root))))  # a stable mix of modules


def _iter_jsonl(path: Path, name: str, text_field: str) -> Iterator[Document]:
    with path.open(encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_field]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConfigError(f"data.corpus: {path} line {i + 1} is not JSON with a {text_field!r} field ({e})")
            yield f"{name}:{i}", text


def _iter_parquet(path: Path, name: str, text_field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    if text_field not in table.schema_arrow.names:
        raise ConfigError(f"data.corpus: {path} has no {text_field!r} column (columns: {table.schema_arrow.names})")
    i = 0
    for batch in table.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            yield f"{name}:{i}", text or ""
            i += 1


def iter_documents(path: str | Path, text_field: str = "text") -> Iterator[Document]:
    """(name, text) of every non-empty document under `path`, in a fixed order."""
    if str(path) == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = [(f, str(f.relative_to(root))) for f in _stdlib_files()]
    else:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"data.corpus: {str(path)!r} is neither 'stdlib' nor an existing file or directory")
        if path.is_dir():
            files = [(f, str(f.relative_to(path))) for f in sorted(path.rglob("*"))
                     if f.is_file() and f.suffix in TEXT_SUFFIXES + RECORD_SUFFIXES]
        else:
            files = [(path, path.name)]
    for file, name in files:
        if file.suffix == ".jsonl":
            docs = _iter_jsonl(file, name, text_field)
        elif file.suffix == ".parquet":
            docs = _iter_parquet(file, name, text_field)
        elif file is path and file.suffix == ".txt":  # a single text file: blank-line-separated blocks
            text = file.read_text(encoding="utf-8", errors="replace")
            docs = ((f"{name}:{i}", b) for i, b in enumerate(text.split("\n\n")))
        else:
            docs = [(name, file.read_text(encoding="utf-8", errors="replace"))]
        yield from ((n, t) for n, t in docs if t.strip())


def within_bytes(documents: Iterable[Document], budget: int) -> Iterator[Document]:
    """Documents until `budget` bytes of text have been taken (the last one may cross it)."""
    used = 0
    for doc in documents:
        if used >= budget:
            return
        used += len(doc[1].encode())
        yield doc


def _read_documents(cfg: DataConfig) -> list[Document]:
    return list(within_bytes(iter_documents(cfg.corpus), cfg.max_corpus_bytes))


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
