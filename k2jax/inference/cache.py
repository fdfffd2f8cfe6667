"""The decode cache: every attention layer's per-token entries for a batch of slots.

One dict keyed like the model's stats ({"dense_layers": ..., "moe_layers": ...}, or
"moe_layers.3" without scanned layers), each a dict of arrays (L, B, S, ...) (no L without
scan): MLA's normed latent and rotary key, or MHA/GQA's keys and values per KV head.
Slot b's entry at position p is the token at p of the request in that slot; entries past a
request's position are stale and masked by `Attention.decode`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from k2jax.config import ModelConfig
from k2jax.model.attention import cache_layout
from k2jax.model.layers import dtype_of
from k2jax.model.transformer import DENSE, MOE


def _stack_sizes(cfg: ModelConfig) -> dict[str, int | None]:
    """Cache key -> layer count on its leading axis (None: one unstacked layer)."""
    stacks = ((DENSE, cfg.num_dense_layers), (MOE, cfg.num_moe_layers))
    if cfg.scan_layers:
        return {name: n for name, n in stacks if n}
    return {f"{name}.{i}": None for name, n in stacks for i in range(n)}


def seq_axis(cfg: ModelConfig) -> int:
    """The position axis of the cache arrays."""
    return 2 if cfg.scan_layers else 1


def new_cache(cfg: ModelConfig, batch: int, capacity: int, sharding=None) -> dict:
    """An empty (zero) cache for `batch` slots of `capacity` positions, in the compute dtype."""
    dtype = dtype_of(cfg.compute_dtype)
    out = {}
    for key, layers in _stack_sizes(cfg).items():
        lead = (layers,) if layers is not None else ()
        out[key] = {field: jnp.zeros(lead + (batch, capacity) + shape, dtype, device=sharding)
                    for field, shape in cache_layout(cfg).items()}
    return out


def bytes_per_token(cfg: ModelConfig) -> int:
    """Cache bytes one token takes over all layers (K2 in bf16: 61 x 576 x 2 = 70,272)."""
    values = sum(math.prod(shape) for shape in cache_layout(cfg).values())
    return cfg.num_layers * values * jnp.dtype(dtype_of(cfg.compute_dtype)).itemsize


def full_kv_bytes_per_token(cfg: ModelConfig) -> int:
    """What caching materialised per-head keys and values would take instead (MaxText's MLA cache)."""
    att = cfg.attention
    per_head = (att.qk_head_dim + att.v_head_dim) if att.kind == "mla" else 2 * att.head_dim
    heads = att.num_heads if att.kind == "mla" else att.num_kv_heads
    return cfg.num_layers * heads * per_head * jnp.dtype(dtype_of(cfg.compute_dtype)).itemsize


def insert(cache: dict, entries: dict, slots, cfg: ModelConfig) -> dict:
    """Write prefill entries (L?, n, P, ...) into the cache's first P positions of `slots` (n,);
    a slot id >= batch (padding rows of a prefill batch) writes nothing."""
    axis = seq_axis(cfg)

    def put(c, e):
        index = (slice(None),) * (axis - 1) + (slots, slice(0, e.shape[axis]))
        return c.at[index].set(e.astype(c.dtype), mode="drop")

    return jax.tree.map(put, cache, entries)


def window(cache: dict, span: int, cfg: ModelConfig) -> dict:
    """The cache's first `span` positions (a decode bucket attends over these only)."""
    axis = seq_axis(cfg)
    return jax.tree.map(lambda c: jax.lax.slice_in_dim(c, 0, span, axis=axis), cache)


def put_window(cache: dict, part: dict, cfg: ModelConfig) -> dict:
    """The cache with its first positions replaced by `part` (from `window`)."""
    axis = seq_axis(cfg)
    return jax.tree.map(lambda c, p: jax.lax.dynamic_update_slice_in_dim(c, p, 0, axis=axis), cache, part)
