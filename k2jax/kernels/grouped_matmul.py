"""Expert SwiGLU on token copies sorted by expert (grouped matmul), and the dropless dispatch.

Three grouped matmuls: jax.lax.ragged_dot (XLA's ragged dot; for GPU), `_swiglu_megablox`
(JAX's megablox Pallas kernels, for TPU, where XLA lowers ragged_dot's weight gradient
densely: every expert against every row) and `_swiglu_tiled`, ours, for CPU, where JAX lowers
ragged_dot densely in forward and backward (every row through every expert).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu.megablox.ops import backend as megablox  # the gmm module
from jax.sharding import PartitionSpec as P

from k2jax.platform import target_platform

TILE_ROWS = 64  # rows per tile of the tiled grouped matmul


def _swiglu_ragged(xs, gate, up, down, group_sizes):
    h = jax.nn.silu(jax.lax.ragged_dot(xs, gate, group_sizes)) * jax.lax.ragged_dot(xs, up, group_sizes)
    return jax.lax.ragged_dot(h, down, group_sizes)


def _swiglu_tiled(xs, gate, up, down, group_sizes, tile: int | None = None):
    """The expert SwiGLU on rows sorted by expert, as batched matmuls over fixed-size tiles.

    xs (M, D) sorted by group, group_sizes (E,) with sum <= M (later rows belong to no expert
    and come back zero). Each group is padded to whole tiles of `tile` rows, so every tile
    belongs to one expert and its weights are gathered per tile: (M + E * tile) rows of work
    instead of the E * M that jax.lax.ragged_dot's dense fallback (CPU) computes. The default
    tile is TILE_ROWS, smaller when there are few rows per expert (decoding: M = batch x k rows,
    where 64-row tiles would be almost all padding).
    """
    m, e = xs.shape[0], gate.shape[0]
    if tile is None:
        if m < 2 * e:  # fewer than two rows per expert: tiles would gather more weights than rows need
            return _swiglu_per_row(xs, gate, up, down, group_sizes)
        tile = min(TILE_ROWS, 1 << max(m // e - 1, 0).bit_length())  # ~ rows per expert, a power of two
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



def _swiglu_per_row(xs, gate, up, down, group_sizes):
    """The expert SwiGLU with each row's own expert weights gathered: M weight reads, no padding.
    Same contract as `_swiglu_tiled`."""
    e = gate.shape[0]
    group = jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(xs.shape[0]), side="right")  # (M,)
    expert = jnp.minimum(group, e - 1)
    h = jax.nn.silu(jnp.einsum("md,mdf->mf", xs, gate[expert])) * jnp.einsum("md,mdf->mf", xs, up[expert])
    return jnp.where((group < e)[:, None], jnp.einsum("mf,mfd->md", h, down[expert]), 0)  # (M, D)


MEGABLOX_MAX_ROWS = 512  # the megablox row tile: at most this, and 128 unless groups are larger
MEGABLOX_MAX_TILE = 512  # D / F tile when the dim is a multiple of 128
MEGABLOX_MAX_WHOLE = 1024  # dims up to this that are no multiple of 128 are one tile (legal: the whole dim)


def _megablox_tile(dim: int) -> int:
    """A D / F tile that Mosaic takes in every position the three kernels put it (a block's last
    dim a multiple of 128 or the whole dim; second-to-last a multiple of 8 or the whole dim) and
    that divides `dim` (the caller pads dims for which there is none)."""
    if dim % 128 == 0:
        return next(t for t in (MEGABLOX_MAX_TILE, 256, 128) if dim % t == 0)
    return dim


def _megablox_padded_dim(dim: int) -> int:
    return dim if dim % 128 == 0 or dim <= MEGABLOX_MAX_WHOLE else -(-dim // 128) * 128


def _megablox_row_tile(m: int, num_groups: int) -> int:
    """Rows per tile: every group wastes up to one tile (a tile straddling two groups is run for
    each), so the tile follows the mean group size: 128 (the MXU's width) up to 512; a whole
    (8-row aligned) block when there are fewer rows than that."""
    tile = 128
    while tile < MEGABLOX_MAX_ROWS and 2 * tile * num_groups <= m:
        tile *= 2
    return min(tile, -(-m // 8) * 8)


def _rows_in_groups(out, group_sizes):
    """Zero the rows past every group: the kernels leave them unwritten (uninitialised memory)."""
    return jnp.where((jnp.arange(out.shape[0]) < jnp.sum(group_sizes))[:, None], out, 0)


def _varying_axes(*xs) -> frozenset:
    """The manual mesh axes (under shard_map) over which any of xs varies."""
    return frozenset().union(*(jax.typeof(x).mat.varying for x in xs))


def _kernel(fn, vma: frozenset, *args):
    """fn(*args) (megablox kernel calls), its result typed as varying over `vma`.

    Under a shard_map that checks varying manual axes (the expert-parallel dispatches), a Pallas
    call needs its out_shape to say how it varies, which megablox's do not: the kernels run in a
    nested shard_map over no further axes with the check off (local values in and out), and the
    result is cast back to the inputs' varying axes. Only inside the custom VJP (never transposed).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not mesh.manual_axes:
        return fn(*args)
    out = jax.shard_map(fn, in_specs=P(), out_specs=P(), axis_names=frozenset(), check_vma=False)(*args)
    missing = tuple(a for a in mesh.axis_names if a in vma - _varying_axes(out))
    return jax.lax.pcast(out, missing, to="varying") if missing else out


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm_vjp(lhs, rhs, group_sizes, tm: int, interpret):
    return _gmm_fwd(lhs, rhs, group_sizes, tm, interpret)[0]


def _gmm_fwd(lhs, rhs, group_sizes, tm, interpret):
    k, n = rhs.shape[1:]
    gmm = functools.partial(megablox.gmm, preferred_element_type=lhs.dtype,
                            tiling=(tm, _megablox_tile(k), _megablox_tile(n)), interpret=interpret)
    out = _kernel(gmm, _varying_axes(lhs), lhs, rhs, group_sizes)
    return _rows_in_groups(out, group_sizes), (lhs, rhs, group_sizes)


def _gmm_bwd(tm, interpret, residuals, d_out):
    lhs, rhs, group_sizes = residuals
    k, n = rhs.shape[1:]
    d_out = d_out.astype(lhs.dtype)
    vma = _varying_axes(lhs)
    gmm = functools.partial(megablox.gmm, preferred_element_type=lhs.dtype, transpose_rhs=True,
                            tiling=(tm, _megablox_tile(n), _megablox_tile(k)), interpret=interpret)
    tgmm = functools.partial(megablox.tgmm, preferred_element_type=rhs.dtype,
                             tiling=(tm, _megablox_tile(k), _megablox_tile(n)), interpret=interpret)
    d_lhs = _kernel(gmm, vma, d_out, rhs, group_sizes)
    d_rhs = _kernel(tgmm, vma, lhs.swapaxes(0, 1), d_out, group_sizes)
    return _rows_in_groups(d_lhs, group_sizes), d_rhs, None


_gmm_vjp.defvjp(_gmm_fwd, _gmm_bwd)


def _gmm(lhs, rhs, group_sizes, tm: int, interpret):
    """Megablox grouped matmul lhs (M, K) sorted by group, rhs (E, K, N) -> (M, N) in lhs.dtype
    (float32 accumulation), rows past every group zero; backward by the grouped kernels too
    (gmm for d lhs, tgmm for d rhs). JAX's megablox `ops.gmm` has this VJP but one tiling for
    all three kernels, which would have to suit K and N in both positions; this picks each's.
    Operands that vary over fewer manual axes than the others are cast to vary over them all
    first, outside the VJP, so AD sums their gradient over those axes (as for any matmul)."""
    vma = _varying_axes(lhs, rhs, group_sizes)
    if vma:
        lhs, rhs, group_sizes = (jax.lax.pcast(x, tuple(vma - _varying_axes(x)), to="varying")
                                 for x in (lhs, rhs, group_sizes))
    return _gmm_vjp(lhs, rhs, group_sizes, tm, interpret)


def _swiglu_megablox(xs, gate, up, down, group_sizes, *, tm: int | None = None, interpret=None):
    """The expert SwiGLU on rows sorted by expert with JAX's megablox kernels (Pallas, TPU).

    Same contract as `_swiglu_ragged`: xs (M, D), group_sizes (E,) with sum <= M, later rows
    come back zero. Row tiles of `tm` rows visit only their groups' experts (M + E * tm rows of
    work at most), forward and backward, where XLA's TPU ragged dot runs the weight gradient
    over every expert for every row. Interpreted (slowly, on CPU) unless traced for TPU.

    Shapes the kernels need, padded here with zeros (sliced off after; no-ops for the presets):
    M to a multiple of the row tile; D or F past 1024 that is no multiple of 128 to one.
    Where GSPMD partitions the call (a mesh axis of several devices not manual here:
    execution.expert_parallel=gspmd, or a mesh that splits no tokens), which it cannot do for a
    Mosaic kernel, this is `_swiglu_ragged`.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and any(size > 1 and name not in mesh.manual_axes for name, size in mesh.shape.items()):
        return _swiglu_ragged(xs, gate, up, down, group_sizes)
    if interpret is None:
        interpret = target_platform() != "tpu"
    interpret = pltpu.InterpretParams() if interpret is True else interpret  # TPU interpret mode
    m, d = xs.shape
    e, _, f = gate.shape
    tm = tm or _megablox_row_tile(m, e)
    pm, pd, pf = -(-m // tm) * tm, _megablox_padded_dim(d), _megablox_padded_dim(f)
    if (pm, pd, pf) != (m, d, f):
        xs = jnp.pad(xs, ((0, pm - m), (0, pd - d)))
        gate, up = (jnp.pad(w, ((0, 0), (0, pd - d), (0, pf - f))) for w in (gate, up))
        down = jnp.pad(down, ((0, 0), (0, pf - f), (0, pd - d)))
    group_sizes = group_sizes.astype(jnp.int32)
    h = jax.nn.silu(_gmm(xs, gate, group_sizes, tm, interpret)) * _gmm(xs, up, group_sizes, tm, interpret)
    return _gmm(h, down, group_sizes, tm, interpret)[:m, :d]


def swiglu_grouped(impl: str):
    """The grouped SwiGLU (xs, gate, up, down, group_sizes) -> ys for impl "ragged_dot", "tiled"
    or "megablox"."""
    return {"tiled": _swiglu_tiled, "megablox": _swiglu_megablox}.get(impl, _swiglu_ragged)


def dispatch_ragged(x, ids, weights, w_gate, w_up, w_down, impl: str = "ragged_dot"):
    """Dropless: x (N, D), ids/weights (N, K), expert weights (E, D, F)/(E, F, D) -> (N, D).

    Ids outside [0, E) are token copies meant for experts held elsewhere: they sort
    last, fall outside every group (their rows come back zero) and add nothing.
    impl: "ragged_dot" (jax.lax.ragged_dot), "tiled" (`_swiglu_tiled`) or "megablox"
    (`_swiglu_megablox`).
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
