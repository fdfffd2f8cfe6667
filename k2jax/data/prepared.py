"""Prepared corpora: documents tokenized once into ArrayRecord shards that grain reads.

`k2jax prepare SOURCE... --out DIR` streams documents (text files, JSONL,
Parquet, a Hugging Face dataset), splits them into train and held-out by the
MD5 of their names (the same rule as in-memory corpora), and writes

  DIR/manifest.json                      format, tokenizer, per-split files and counts, and the
                                         settings and counts of each `k2jax rephrase` output read
  DIR/tokenizer/                         the tokenizer, loaded by every run on DIR
  DIR/{split}-{i:05d}.array_record       one record per document: int32 ids [bos, ..., eos]
  DIR/{split}-{i:05d}.lengths.npy        ids per record, so runs index chunks without a scan

A rephrase output directory is read through its manifests (committed parts only), and each
rewrite falls in the split of the document it rewrites. Everything is written into DIR.partial
and renamed at the end, so DIR either is complete or does not exist. A run trains on DIR with
`data.corpus: DIR` (or on several with `data.sources`, k2jax/data/mixture.py); chunks are cut at
train time, so one prepared corpus serves any seq_len.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from k2jax.config import ConfigError
from k2jax.data import corpus as corpus_lib
from k2jax.data import tokenizer as tokenizer_lib
from k2jax.data.pipeline import chunk_starts, document_ids

FORMAT = "k2jax-tokens-v1"
SPLITS = ("train", "heldout")


def is_prepared(path: str) -> bool:
    return (Path(path) / "manifest.json").is_file()


REPHRASE_FORMAT = "k2jax-rephrase-v1"  # the manifests `k2jax rephrase` writes (k2jax/rephrase/job.py)


def rephrase_manifests(source: str) -> list[dict]:
    """The `k2jax rephrase` manifests of a directory (one per --shard worker; none for other sources)."""
    path = Path(source)
    if source.startswith("hf:") or not path.is_dir():
        return []
    manifests = []
    for file in sorted(path.glob("*manifest.json")):
        try:
            manifest = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(manifest, dict) and manifest.get("format") == REPHRASE_FORMAT:
            manifests.append(manifest)
    return manifests


def read_rephrase_part(file: Path, fields: list[str]) -> list[dict]:
    """The records of a `k2jax rephrase` part file (JSONL or Parquet), each with only `fields`."""
    if file.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(file, columns=fields).to_pylist()
    with open(file) as f:
        return [{k: record[k] for k in fields} for record in (json.loads(line) for line in f if line.strip())]


def _iter_rephrased(directory: Path, manifests: list[dict], text_field: str) -> Iterator[corpus_lib.Document]:
    """The rewrites in the parts the manifests commit (not a part a running or killed job left unlisted),
    named by their ids, "{source_id}#{rephrasing}"."""
    for manifest in manifests:
        for part in manifest["parts"]:
            records = read_rephrase_part(directory / part["file"], ["id", text_field])
            yield from ((r["id"], r[text_field]) for r in records if r[text_field].strip())


def split_key(name: str) -> str:
    """What decides a document's split: its name, or for a rewrite its source document's, so that every
    rewrite of a document falls in the split the document itself falls in."""
    source_id, sep, rephrasing = name.rpartition("#")
    return source_id if sep and rephrasing.isdigit() else name


def iter_source(source: str, text_field: str = "text", report: corpus_lib.ReadReport | None = None,
                manifests: list[dict] | None = None) -> Iterator[corpus_lib.Document]:
    """Documents of one source: a `k2jax rephrase` output directory (the parts its `manifests` commit; None:
    read them now), a path (see corpus.iter_documents) or hf:NAME[:CONFIG][@SPLIT]."""
    manifests = rephrase_manifests(source) if manifests is None else manifests
    if manifests:
        yield from _iter_rephrased(Path(source), manifests, text_field)
        return
    if not source.startswith("hf:"):
        yield from corpus_lib.iter_documents(source, text_field, report)
        return
    try:
        import datasets
    except ImportError as e:
        raise ConfigError(f"{source}: reading a Hugging Face dataset needs `pip install datasets` "
                          f"and network access") from e
    spec, _, split = source[3:].partition("@")
    name, _, config = spec.partition(":")
    stream = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
    for i, example in enumerate(stream):
        if text_field not in example:
            raise ConfigError(f"{source}: example {i} has no {text_field!r} field ({sorted(example)})")
        if example[text_field].strip():
            yield f"{name}:{i}", example[text_field]


class _ShardWriter:
    """Rolls over to a new ArrayRecord file every `shard_tokens` ids."""

    def __init__(self, directory: Path, split: str, shard_tokens: int):
        self.directory, self.split, self.shard_tokens = directory, split, shard_tokens
        self.files: list[str] = []
        self.documents = self.tokens = 0
        self._writer = None
        self._lengths: list[int] = []
        self._shard_tokens_used = 0

    def add(self, ids: np.ndarray) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        if self._writer is None:
            name = f"{self.split}-{len(self.files):05d}.array_record"
            self._writer = ArrayRecordWriter(str(self.directory / name), "group_size:1")
            self.files.append(name)
        self._writer.write(ids.astype(np.int32).tobytes())
        self._lengths.append(len(ids))
        self._shard_tokens_used += len(ids)
        self.documents += 1
        self.tokens += len(ids)
        if self._shard_tokens_used >= self.shard_tokens:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            np.save(self.directory / self.files[-1].replace(".array_record", ".lengths.npy"),
                    np.asarray(self._lengths, np.int64))
            self._writer, self._lengths, self._shard_tokens_used = None, [], 0

    def close(self) -> dict:
        self._close_shard()
        return {"files": self.files, "documents": self.documents, "tokens": self.tokens}


def prepare(sources: Iterable[str], out_dir: str | Path, *, tokenizer: str = "byte", text_field: str = "text",
            heldout_fraction: float = 0.01, shard_tokens: int = 50_000_000, bpe_vocab_size: int = 8192,
            bpe_sample_bytes: int = 50_000_000, bos_token: str | None = None,
            eos_token: str | None = None) -> dict:
    """Tokenize `sources` into out_dir (which must not exist); returns the manifest. Documents are split
    by name like in-memory corpora; when none falls in the held-out split the last train document is
    held out. Skipped and repaired files are reported on stderr."""
    sources = list(sources)
    out = Path(out_dir)
    if not sources:
        raise ConfigError("prepare: give at least one source (a file, a directory or hf:NAME)")
    if out.exists():
        raise ConfigError(f"prepare: {out} already exists; choose a new --out (nothing was changed)")
    if not 0 < heldout_fraction < 1:
        raise ConfigError(f"prepare: --heldout-fraction must be in (0, 1), got {heldout_fraction}")
    for source in sources:
        if not source.startswith("hf:") and source != "stdlib" and not Path(source).exists():
            raise ConfigError(f"prepare: source {source!r} does not exist")

    report = corpus_lib.ReadReport()
    # read once: the parts tokenized and the provenance recorded come from the same manifests
    rephrased = {source: rephrase_manifests(source) for source in sources}

    def documents():
        for source in sources:
            yield from iter_source(source, text_field, report, rephrased[source])

    try:
        tok = tokenizer_lib.from_spec(tokenizer, _bpe_sample(documents(), heldout_fraction, bpe_sample_bytes)
                                      if tokenizer == "bpe" else (), bpe_vocab_size, bos_token, eos_token)
    except ValueError as e:
        raise ConfigError(f"prepare: --tokenizer: {e}") from e
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # a previous interrupted prepare
    partial.mkdir(parents=True)
    try:
        start = time.perf_counter()
        writers = {split: _ShardWriter(partial, split, shard_tokens) for split in SPLITS}
        pending = None  # the latest train document, written one behind so that it can be held out instead
        for name, text in documents():
            ids = document_ids(tok, text)
            if corpus_lib.is_heldout(split_key(name), heldout_fraction):
                writers["heldout"].add(ids)
            else:
                if pending is not None:
                    writers["train"].add(pending)
                pending = ids
        if pending is not None:
            writers["train" if writers["heldout"].documents else "heldout"].add(pending)
        splits = {split: w.close() for split, w in writers.items()}
        found = splits["train"]["documents"] + splits["heldout"]["documents"]
        if found < 2:
            skipped = f"; {report.skipped_note()}" if report.skipped else ""
            raise ConfigError(f"prepare: {sources} gave {found} document{'s' * (found != 1)}, at least 2 are "
                              f"needed (one to train on, one held out){skipped}")
        if not splits["train"]["documents"]:
            raise ConfigError(f"prepare: all {found} documents fell in the held-out split; lower --heldout-fraction")
        tok.save(partial / "tokenizer")
        provenance = {src: [{"settings": m["settings"], "counts": m["counts"]} for m in manifests]
                      for src, manifests in rephrased.items() if manifests}
        manifest = {"format": FORMAT, "sources": sources, "provenance": provenance, "text_field": text_field,
                    "heldout_fraction": heldout_fraction, "tokenizer": tok.kind, "vocab_size": tok.vocab_size,
                    "bos_id": tok.bos_id, "eos_id": tok.eos_id, "splits": splits,
                    "seconds": round(time.perf_counter() - start, 3)}
        (partial / "manifest.json").write_text(json.dumps(manifest, indent=2))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    partial.rename(out)
    report.print_warnings()
    return manifest


def _bpe_sample(documents, heldout_fraction: float, budget: int) -> list[str]:
    """Train-split texts up to `budget` bytes, to train a BPE tokenizer on."""
    train_docs = (doc for doc in documents if not corpus_lib.is_heldout(split_key(doc[0]), heldout_fraction))
    return [text for _, text in corpus_lib.within_bytes(train_docs, budget)]


class TokenChunks:
    """Random-access chunks (2..seq_len+1 ids) of a prepared split, for grain.MapDataset.source.

    This process sees the documents shard_index::shard_count, so documents never straddle processes.
    """

    def __init__(self, directory: Path, files: list[str], seq_len: int, shard_index: int = 0, shard_count: int = 1):
        from grain.sources import ArrayRecordDataSource

        self._source = ArrayRecordDataSource([str(directory / f) for f in files])
        lengths = np.concatenate([np.load(directory / f.replace(".array_record", ".lengths.npy")) for f in files])
        docs = np.arange(shard_index, len(lengths), shard_count)
        per_doc = [np.asarray(chunk_starts(int(lengths[d]), seq_len), np.int64) for d in docs]
        self._doc = np.repeat(docs, [len(s) for s in per_doc])  # (chunks,) record index
        self._start = np.concatenate(per_doc) if per_doc else np.zeros(0, np.int64)  # (chunks,) offset
        self._seq_len = seq_len
        # next-token pairs the chunks hold (the tokens they train on), e.g. to weigh a mixture by tokens
        self.pairs = int(np.minimum(lengths[self._doc] - self._start, seq_len + 1).sum() - len(self._doc))

    def __len__(self) -> int:
        return len(self._doc)

    def __getitem__(self, i: int) -> np.ndarray:
        ids = np.frombuffer(self._source[int(self._doc[i])], np.int32)
        start = int(self._start[i])
        return ids[start:start + self._seq_len + 1]


class PreparedCorpus:
    """A directory written by `prepare`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.manifest = json.loads((self.path / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"data.corpus: {self.path} has no readable manifest.json ({e}); "
                              f"re-run `k2jax prepare`") from e
        if self.manifest.get("format") != FORMAT:
            raise ConfigError(f"data.corpus: {self.path} is format {self.manifest.get('format')!r}, "
                              f"this k2jax reads {FORMAT!r}")
        for split in SPLITS:
            for f in self.manifest["splits"][split]["files"]:
                for name in (f, f.replace(".array_record", ".lengths.npy")):
                    if not (self.path / name).is_file():
                        raise ConfigError(f"data.corpus: {self.path / name} listed in manifest.json is missing")

    def tokenizer(self):
        return tokenizer_lib.load(self.path / "tokenizer")

    def chunks(self, split: str, seq_len: int, shard_index: int = 0, shard_count: int = 1) -> TokenChunks:
        files = self.manifest["splits"][split]["files"]
        if self.manifest["splits"][split]["documents"] < shard_count:
            raise ConfigError(f"data.corpus: {self.path} has too few {split} documents for {shard_count} "
                              f"data shards")
        return TokenChunks(self.path, files, seq_len, shard_index, shard_count)
