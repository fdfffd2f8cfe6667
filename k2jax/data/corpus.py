"""Text corpora that need no download, split deterministically into train and held-out.

"stdlib" is the Python standard library's own source files (present wherever
k2jax runs). A directory (its .txt/.md/.rst/.py files as documents, plus the
records of its .jsonl/.parquet files), a .txt file (one document per
blank-line-separated block), a .jsonl file ("text" per line) or a .parquet file
("text" column) work the same way. The split hashes each document's name with
MD5, so it never depends on file order, Python's hash salt or the machine.
`iter_documents` streams, for `k2jax prepare` on corpora larger than memory.

Files are read as UTF-8. Bytes that are not text (undecodable, or control characters
other than whitespace) are counted per file: a file above WARN_FRACTION is named in a
warning (its undecodable bytes become U+FFFD), one above REFUSE_FRACTION is refused.
Files with other suffixes in a directory are counted and reported, not read.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import sys
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator

from k2jax.config import ConfigError, DataConfig

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
RECORD_SUFFIXES = (".jsonl", ".parquet")
Document = tuple[str, str]  # (name, text)
WARN_FRACTION, REFUSE_FRACTION = 1e-3, 0.1  # of a file's bytes that are not text
# control characters that never occur in text (whitespace \t \n \v \f \r and ESC excluded)
_CONTROL = bytes([*range(0, 9), *range(14, 27), *range(28, 32), 127])


@dataclasses.dataclass
class ReadReport:
    """What reading a corpus left out or repaired, for the caller to tell the user."""

    skipped: dict[str, str] = dataclasses.field(default_factory=dict)  # file -> its unsupported suffix
    not_text: dict[str, float] = dataclasses.field(default_factory=dict)  # file -> share of non-text bytes

    def skipped_note(self) -> str:
        """'' or one sentence: how many files were not read, by suffix."""
        if not self.skipped:
            return ""
        by_suffix = collections.Counter(self.skipped.values()).most_common()
        kinds = ", ".join(f"{n} {suffix or '(no suffix)'}" for suffix, n in by_suffix)
        n = len(self.skipped)
        return (f"{n} file{'s' * (n != 1)} not read, unsupported suffixes ({kinds}); "
                f"read are {' '.join(TEXT_SUFFIXES + RECORD_SUFFIXES)}")

    def warnings(self) -> list[str]:
        out = [self.skipped_note()] if self.skipped else []
        if self.not_text:
            names = ", ".join(f"{f} ({x:.1%})" for f, x in list(self.not_text.items())[:5])
            more = f" and {len(self.not_text) - 5} more" if len(self.not_text) > 5 else ""
            out.append(f"{len(self.not_text)} file(s) hold bytes that are not UTF-8 text (undecodable ones "
                       f"were replaced by U+FFFD): {names}{more}")
        return out

    def print_warnings(self) -> None:
        for line in self.warnings():
            print(f"warning: {line}", file=sys.stderr, flush=True)


def _non_text_bytes(data: bytes) -> tuple[str, int]:
    """(the text, with undecodable bytes replaced; how many bytes are undecodable or control characters)."""
    control = len(data) - len(data.translate(None, _CONTROL))
    try:
        return data.decode("utf-8"), control
    except UnicodeDecodeError:
        undecodable = len(data) - len(data.decode("utf-8", errors="ignore").encode("utf-8"))
        return data.decode("utf-8", errors="replace"), undecodable + control


def _check_text(file: Path, bad: int, total: int, report: ReadReport | None) -> None:
    share = bad / max(total, 1)
    if share > REFUSE_FRACTION:
        raise ConfigError(f"{file} is not UTF-8 text: {bad:,} of its {total:,} bytes ({share:.0%}) are undecodable "
                          f"or control characters; remove it from the corpus or convert it to UTF-8")
    if share > WARN_FRACTION and report is not None:
        report.not_text[str(file)] = share


def _read_text(file: Path, report: ReadReport | None) -> str:
    data = file.read_bytes()
    text, bad = _non_text_bytes(data)
    _check_text(file, bad, len(data), report)
    return text


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "test", "tests", "idlelib", "__pycache__")
    files = [p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts)]
    return sorted(files, key=lambda p: _digest(str(p.relative_to(root))))  # a stable mix of modules


def _iter_jsonl(path: Path, name: str, text_field: str, report: ReadReport | None) -> Iterator[Document]:
    bad = total = 0
    with path.open("rb") as f:
        for i, raw in enumerate(f):
            line, line_bad = _non_text_bytes(raw)
            bad, total = bad + line_bad, total + len(raw)
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_field]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConfigError(f"data.corpus: {path} line {i + 1} is not JSON with a {text_field!r} field ({e})")
            yield f"{name}:{i}", text
    _check_text(path, bad, total, report)


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


def iter_documents(path: str | Path, text_field: str = "text", report: ReadReport | None = None) -> Iterator[Document]:
    """(name, text) of every non-empty document under `path`, in a fixed order; files skipped or
    repaired are recorded in `report`."""
    if str(path) == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = [(f, str(f.relative_to(root))) for f in _stdlib_files()]
    else:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"data.corpus: {str(path)!r} is neither 'stdlib' nor an existing file or directory")
        if path.is_dir():
            files = []
            for f in sorted(path.rglob("*")):
                if f.is_file() and f.suffix in TEXT_SUFFIXES + RECORD_SUFFIXES:
                    files.append((f, str(f.relative_to(path))))
                elif f.is_file() and report is not None:
                    report.skipped[str(f)] = f.suffix
        else:
            files = [(path, path.name)]
    for file, name in files:
        if file.suffix == ".jsonl":
            docs = _iter_jsonl(file, name, text_field, report)
        elif file.suffix == ".parquet":
            docs = _iter_parquet(file, name, text_field)
        elif file is path and file.suffix == ".txt":  # a single text file: blank-line-separated blocks
            docs = ((f"{name}:{i}", b) for i, b in enumerate(_read_text(file, report).split("\n\n")))
        else:
            docs = [(name, _read_text(file, report))]
        yield from ((n, t) for n, t in docs if t.strip())


def within_bytes(documents: Iterable[Document], budget: int) -> Iterator[Document]:
    """Documents until `budget` bytes of text have been taken (the last one may cross it)."""
    used = 0
    for doc in documents:
        if used >= budget:
            return
        used += len(doc[1].encode())
        yield doc


def _read_documents(cfg: DataConfig, report: ReadReport | None = None) -> list[Document]:
    return list(within_bytes(iter_documents(cfg.corpus, report=report), cfg.max_corpus_bytes))


def _digest(name: str) -> int:
    return int.from_bytes(hashlib.md5(name.encode()).digest()[:4], "little")


def is_heldout(name: str, fraction: float) -> bool:
    return _digest(name) / 2**32 < fraction


def load_corpus(cfg: DataConfig) -> tuple[list[str], list[str]]:
    """(train texts, held-out texts); both non-empty or a ConfigError naming the corpus. Skipped and
    repaired files are reported on stderr."""
    report = ReadReport()
    docs = _read_documents(cfg, report)
    if not docs:
        skipped = f" ({report.skipped_note()})" if report.skipped else ""
        raise ConfigError(f"data.corpus: {cfg.corpus!r} is empty: no text documents found{skipped}")
    report.print_warnings()
    train = [text for name, text in docs if not is_heldout(name, cfg.heldout_fraction)]
    heldout = [text for name, text in docs if is_heldout(name, cfg.heldout_fraction)]
    if not heldout:  # tiny corpora: hold out the last document rather than fail
        train, heldout = train[:-1], train[-1:]
    if not train:
        raise ConfigError(f"data.corpus: {cfg.corpus!r} has too few documents ({len(docs)}) to split")
    return train, heldout
