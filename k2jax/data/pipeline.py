"""grain pipelines: documents -> token chunks -> shuffled, packed, batched rows.

Each document becomes [bos, tokens..., eos]; documents longer than one row are
cut into chunks of at most T + 1 tokens that overlap by one, so every
next-token pair is trained on once and no target ever comes from another
document. grain's FirstFitPackIterDataset packs chunks into rows of T with
segment ids (0 = padding) and positions restarting per chunk; batches are
dicts of int32 (B, T): inputs, targets, segment_ids, positions. The train
stream reshuffles every epoch and is checkpointable (`get_state`/`set_state`,
JSON-serialisable).
"""

from __future__ import annotations

import grain
import numpy as np

from k2jax.config import ConfigError

PACKING_BINS = 8  # rows under construction at once: more bins fill rows better


def chunk_starts(length: int, seq_len: int) -> range:
    """Start offsets of the chunks of a document of `length` ids (each chunk has 2..seq_len+1 ids)."""
    return range(0, max(length - 1, 0), seq_len)


def document_ids(tokenizer, text: str) -> np.ndarray:
    return np.concatenate([[tokenizer.bos_id], tokenizer.encode(text), [tokenizer.eos_id]]).astype(np.int32)


def chunk_documents(tokenizer, texts: list[str], seq_len: int) -> list[np.ndarray]:
    """Token chunks of at most seq_len + 1 ids (each yields <= seq_len training pairs)."""
    chunks = []
    for text in texts:
        ids = document_ids(tokenizer, text)
        chunks.extend(ids[start:start + seq_len + 1] for start in chunk_starts(len(ids), seq_len))
    return chunks


def _pairs(chunk: np.ndarray) -> dict:
    return {"inputs": chunk[:-1], "targets": chunk[1:]}


def packed_rows(examples: grain.IterDataset, seq_len: int, batch_size: int, seed: int,
                fields: tuple[str, ...] = ("inputs", "targets"), drop_remainder: bool = True) -> grain.IterDataset:
    """Batches of rows packed from `examples` (dicts of equal-length 1-D `fields`, inputs and targets first);
    other fields come out as (B, T) int32 beside them, 0 in padding."""
    packed = grain.experimental.FirstFitPackIterDataset(
        examples, length_struct={f: seq_len for f in fields}, num_packing_bins=PACKING_BINS,
        seed=seed, shuffle_bins=False)
    return packed.map(lambda ex: _to_batch_row(ex, fields)).batch(batch_size, drop_remainder=drop_remainder)


def _to_batch_row(ex: dict, fields: tuple[str, ...]) -> dict:
    return {**{f: ex[f].astype(np.int32) for f in fields},
            "segment_ids": ex["inputs_segment_ids"].astype(np.int32),
            "positions": ex["inputs_positions"].astype(np.int32)}


def shard_documents(texts: list[str], shard_index: int, shard_count: int) -> list[str]:
    """The documents one process reads (shard_index::shard_count): documents never straddle processes."""
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} must be in [0, {shard_count})")
    if len(texts) < shard_count:
        raise ConfigError(f"data.corpus: only {len(texts)} documents for {shard_count} data shards")
    return texts[shard_index::shard_count]


def train_iterator(chunks, seq_len: int, batch_size: int, *, seed: int):
    """Endless, epoch-reshuffled batches from a random-access sequence of token chunks."""
    ds = grain.MapDataset.source(chunks).shuffle(seed=seed).repeat().map(_pairs)
    return iter(packed_rows(ds.to_iter_dataset(), seq_len, batch_size, seed))


def fixed_batches(chunks, seq_len: int, batch_size: int, num_batches: int) -> list[dict]:
    """The first `num_batches` packed batches of `chunks`, in order; held-out text that fills no whole batch
    gives one batch whose missing rows are padding (segment id 0, not scored)."""
    ds = grain.MapDataset.source(chunks).map(_pairs).to_iter_dataset()
    out = []
    for batch in packed_rows(ds, seq_len, batch_size, seed=0, drop_remainder=False):
        if len(batch["inputs"]) < batch_size and out:
            break
        out.append({k: np.pad(v, ((0, batch_size - len(v)), (0, 0))) for k, v in batch.items()})
        if len(out) == num_batches:
            break
    if not out:
        raise ConfigError("data: the held-out split holds no text to evaluate on; raise data.heldout_fraction")
    return out
