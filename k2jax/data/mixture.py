"""Training on a mixture of prepared corpora (`data.sources`), mixed by token share on grain.

Each source's train split is cut into chunks as a single corpus is (pipeline.py), shuffled with
its own seed and reshuffled every epoch, and repeated without end. grain's IterDataset.mix draws
chunks with weights weight_i / (mean next-token pairs per chunk of source i), so source i supplies
weight_i / sum(weights) of the training tokens in expectation. Every packed token carries its
source, so the iterator counts the tokens it hands out per source; the counts travel with grain's
state in checkpoints, and a resumed run continues both exactly. `max_epochs` is checked before
training: a run that would read a source more often than that is refused.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import grain
import numpy as np

from k2jax.config import ConfigError
from k2jax.config.schema import SourceConfig
from k2jax.data import pipeline, prepared


def tokenizer_digest(directory: Path) -> str:
    """MD5 over the names and bytes of a saved tokenizer's files."""
    digest = hashlib.md5()
    for f in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(directory)).encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()


class Sources:
    """The prepared corpora of `data.sources`, as this process reads them (documents shard_index::shard_count)."""

    def __init__(self, configs: tuple[SourceConfig, ...], seq_len: int, shard_index: int = 0, shard_count: int = 1):
        self.configs, self.seq_len = configs, seq_len
        self.labels = [c.label for c in configs]
        corpora = []
        for i, c in enumerate(configs):
            try:
                corpora.append(prepared.PreparedCorpus(c.path))
            except ConfigError as e:
                raise ConfigError(f"data.sources[{i}] ({c.label}): {e}") from e
        digests = [tokenizer_digest(corpus.path / "tokenizer") for corpus in corpora]
        for i, digest in enumerate(digests):
            if digest != digests[0]:
                raise ConfigError(f"data.sources[{i}] ({self.labels[i]}): its tokenizer differs from data.sources[0]'s "
                                  f"({self.labels[0]}); prepare every source with the same one "
                                  f"(`k2jax prepare ... --tokenizer {configs[0].path}`)")
        self._corpora = corpora
        self.train = [corpus.chunks("train", seq_len, shard_index, shard_count) for corpus in corpora]
        self.heldout = [corpus.chunks("heldout", seq_len) for corpus in corpora]
        total = sum(c.weight for c in configs)
        self.token_shares = [c.weight / total for c in configs]
        self.chunk_weights = [share * len(chunks) / max(chunks.pairs, 1)
                              for share, chunks in zip(self.token_shares, self.train)]

    def tokenizer(self):
        return self._corpora[0].tokenizer()

    def __len__(self) -> int:
        return sum(len(chunks) for chunks in self.train)

    def heldout_chunks(self) -> grain.MapDataset:
        """The sources' held-out chunks, mixed with the training weights (deterministic)."""
        return grain.MapDataset.mix([grain.MapDataset.source(h) for h in self.heldout], self.chunk_weights)

    def check_epochs(self, tokens: int) -> None:
        """Refuse to train on `tokens` tokens (this process's, padding included: an upper bound) when a source
        would be read more than its max_epochs times."""
        for i, (c, share, chunks) in enumerate(zip(self.configs, self.token_shares, self.train)):
            epochs = tokens * share / max(chunks.pairs, 1)
            if c.max_epochs is not None and epochs > c.max_epochs:
                raise ConfigError(f"data.sources[{i}] ({c.label}): the run reads up to {epochs:.2f} epochs of it "
                                  f"({share:.1%} of {tokens:,} tokens over {chunks.pairs:,}), above its "
                                  f"max_epochs={c.max_epochs:g}; lower its weight or train.steps, or raise max_epochs")

    def iterator(self, batch_size: int, seed: int) -> "MixtureIterator":
        return MixtureIterator(self, batch_size, seed)


def _tagged(source: int, chunk: np.ndarray) -> dict:
    """A chunk's pairs and, per token, 1 + the index of its source (0 is left for padding)."""
    return {"inputs": chunk[:-1], "targets": chunk[1:], "sources": np.full(len(chunk) - 1, source, np.int32)}


class MixtureIterator:
    """Endless packed batches (inputs, targets, segment_ids, positions) of a mixture; `tokens`: the
    tokens handed out per source so far. get_state/set_state (JSON) cover both."""

    def __init__(self, sources: Sources, batch_size: int, seed: int):
        streams = [grain.MapDataset.source(chunks).shuffle(seed=seed + i).repeat()
                   .map(lambda chunk, tag=i + 1: _tagged(tag, chunk)).to_iter_dataset()
                   for i, chunks in enumerate(sources.train)]
        mixed = grain.IterDataset.mix(streams, sources.chunk_weights)
        self._batches = iter(pipeline.packed_rows(mixed, sources.seq_len, batch_size, seed,
                                                  fields=("inputs", "targets", "sources")))
        self.tokens = np.zeros(len(streams), np.int64)
        self.pairs = [chunks.pairs for chunks in sources.train]  # (sources,) this process's train tokens per epoch

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._batches)
        tags = batch.pop("sources")  # (B, T) 1 + source index; 0 in padding
        self.tokens += np.bincount(tags.ravel(), minlength=len(self.tokens) + 1)[1:]
        return batch

    def get_state(self) -> dict:
        return {"grain": self._batches.get_state(), "tokens": self.tokens.tolist()}

    def set_state(self, state: dict) -> None:
        if len(state.get("tokens", ())) != len(self.tokens):
            raise ConfigError(f"the checkpoint's data state has {len(state.get('tokens', ()))} sources, "
                              f"data.sources has {len(self.tokens)}")
        self._batches.set_state(state["grain"])
        self.tokens = np.asarray(state["tokens"], np.int64)
