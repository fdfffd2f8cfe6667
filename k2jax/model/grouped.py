"""Expert SwiGLU on token copies sorted by expert (grouped matmul), and the dropless dispatch.

Two grouped matmuls: jax.lax.ragged_dot (XLA's ragged dot on GPU and TPU) and `_swiglu_tiled`,
ours, for CPU, where JAX lowers ragged_dot densely (every row through every expert).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from k2jax.config import ModelConfig
from k2jax.platform import target_platform

TILE_ROWS = 64  # rows per tile of the tiled grouped matmul


def _swiglu_ragged(xs, gate, up, down, group_sizes):
    h = jax.nn.silu(jax.lax.ragged_dot(xs, gate, group_sizes)) * jax.lax.ragged_dot(xs, up, group_sizes)
    return jax.lax.ragged_dot(h, down, group_sizes)


def _swiglu_tiled(xs, gate, up, down, group_sizes, tile: int = TILE_ROWS):
    """The expert SwiGLU on rows sorted by expert, as batched matmuls over fixed-size tiles.

    xs (M, D) sorted by group, group_sizes (E,) with sum <= M (later rows belong to no expert
    and come back zero). Each group is padded to whole tiles of `tile` rows, so every tile
    belongs to one expert and its weights are gathered per tile: (M + E * tile) rows of work
    instead of the E * M that jax.lax.ragged_dot's dense fallback (CPU) computes.
    """
    m, e = xs.shape[0], gate.shape[0]
    num_tiles = -(-m // tile) + e  # static bound: each group wastes less than one tile
    padded = -(-group_sizes // tile) * tile  # (E,)
    padded_start = jnp.cumsum(padded) - padded
    group_end = jnp.cumsum(group_sizes)
    row = jnp.arange(m)
    group = jnp.searchsorted(group_end, row, side="right")  # (M,), e for rows past every group
    in_group = group < e
    group = jnp.minimum(group, e - 1)
    # (M,) padded position of each row; rows past every group point past the end and are dropped
    dest = jnp.where(in_group, padded_start[group] + row - (group_end - group_sizes)[group], num_tiles * tile)
    x_tiles = jnp.zeros((num_tiles * tile, xs.shape[1]), xs.dtype).at[dest].set(xs, mode="drop")
    x_tiles = x_tiles.reshape(num_tiles, tile, -1)  # (T, tile, D)
    tile_start = jnp.arange(num_tiles) * tile
    tile_group = jnp.minimum(jnp.searchsorted(jnp.cumsum(padded), tile_start, side="right"), e - 1)  # (T,)
    h = jax.nn.silu(jnp.einsum("tmd,tdf->tmf", x_tiles, gate[tile_group]))  # (T, tile, F)
    h = h * jnp.einsum("tmd,tdf->tmf", x_tiles, up[tile_group])
    y = jnp.einsum("tmf,tfd->tmd", h, down[tile_group]).reshape(num_tiles * tile, -1)  # (T * tile, D)
    return jnp.where(in_group[:, None], y.at[dest].get(mode="fill", fill_value=0), 0)  # (M, D)


def swiglu_grouped(impl: str):
    """The grouped SwiGLU (xs, gate, up, down, group_sizes) -> ys for impl "ragged_dot" or "tiled"."""
    return _swiglu_tiled if impl == "tiled" else _swiglu_ragged


def grouped_matmul_impl(cfg: ModelConfig) -> str:
    """"ragged_dot" or "tiled" for cfg.grouped_matmul ("auto": tiled on CPU, where ragged_dot
    is lowered densely over all experts; XLA's ragged dot on GPU and TPU)."""
    if cfg.grouped_matmul != "auto":
        return cfg.grouped_matmul
    return "tiled" if target_platform() == "cpu" else "ragged_dot"


def dispatch_ragged(x, ids, weights, w_gate, w_up, w_down, impl: str = "ragged_dot"):
    """Dropless: x (N, D), ids/weights (N, K), expert weights (E, D, F)/(E, F, D) -> (N, D).

    Ids outside [0, E) are token copies meant for experts held elsewhere: they sort
    last, fall outside every group (their rows come back zero) and add nothing.
    impl: "ragged_dot" (jax.lax.ragged_dot) or "tiled" (`_swiglu_tiled`).
    """
    n, k = ids.shape
    e = w_gate.shape[0]
    flat = ids.reshape(-1)
    here = (flat >= 0) & (flat < e)
    expert = jnp.where(here, flat, e)  # copies for experts held elsewhere sort last
    order = jnp.argsort(expert, stable=True)  # token copies grouped by expert
    group_sizes = jnp.bincount(expert, length=e).astype(jnp.int32)
    ys = swiglu_grouped(impl)(x[order // k], w_gate, w_up, w_down, group_sizes)  # (N*K, D)
    ys = jnp.zeros_like(ys).at[order].set(ys).reshape(n, k, -1)
    weights = jnp.where(here.reshape(n, k), weights, 0.0)
    return jnp.einsum("nkd,nk->nd", ys, weights.astype(ys.dtype)), jnp.zeros((), jnp.float32)
