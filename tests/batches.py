"""Shared test helper: the training loop's data pipeline (k2jax/train/loop.py) from a DataConfig."""

from k2jax.config import DataConfig
from k2jax.data.pipeline import chunk_documents, fixed_batches, shard_documents, train_iterator


def make_train_iterator(cfg: DataConfig, tokenizer, texts: list[str], batch_size: int, *, seed: int,
                        shard_index: int = 0, shard_count: int = 1):
    """Endless, epoch-reshuffled batches; this process reads documents shard_index::shard_count."""
    chunks = chunk_documents(tokenizer, shard_documents(texts, shard_index, shard_count), cfg.seq_len)
    return train_iterator(chunks, cfg.seq_len, batch_size, seed=seed)


def eval_batches(cfg: DataConfig, tokenizer, texts: list[str], batch_size: int, num_batches: int) -> list[dict]:
    """The same held-out batches every call (no shuffling); fewer if the held-out text runs out."""
    return fixed_batches(chunk_documents(tokenizer, texts, cfg.seq_len), cfg.seq_len, batch_size, num_batches)
