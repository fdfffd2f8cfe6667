"""Owner-sharded Muon for stacks that do not fill their group: one ragged exchange for many leaves.

`owner.py` pads each parameter's stack of M matrices to a multiple of its group of G devices.
Where M is much smaller than G (kimi-k2's 61-layer attention stacks split over 512 chips, its one
dense layer), the padded all-to-alls move G/M times the parameter's bytes (8.5x; 512x for the
dense layer), and replicated leaves (wq_b and wkv_b over the expert axis) gather their padded
shares back. Here such leaves share one exchange instead:

1. A pool is the leaves replicated over the same mesh axes R (size > 1, unused by their specs);
   their pieces are spread over the other axes, the senders S. Every matrix of every leaf gets one
   owner device, chosen greedily (most expensive matrices first) where the Newton-Schulz load,
   then the bytes its replica bucket gathers, are lowest.
2. Each device (r, s) sends the pieces it holds of the matrices owned by devices of its own
   replica bucket r, one ragged all-to-all over S; the owner assembles whole matrices.
3. Owners orthogonalise their matrices (a device owning fewer than the most any device owns of a
   leaf skips the empty slots), and a second ragged all-to-all returns each piece to its sender.
4. Over R, each bucket all-gathers what its devices got back (padded to the largest bucket).

Bytes per device: its pieces out and back, the whole matrices it owns in and out, and, with R,
its share of the replicated pieces gathered (about its local bytes of those leaves).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from k2jax.parallel.ragged import ragged_all_to_all
from k2jax.parallel.sharding import spec_axes

if TYPE_CHECKING:
    from k2jax.optim.owner import OwnerLayout


# Exchange buffers are (rows, LANE): XLA:TPU lays a 1-D ragged all-to-all out as (N, 1, 128) tiles,
# 128x its bytes (measured on kimi-k2's pools: 36 GiB instead of 0.14).
LANE = 128


@dataclasses.dataclass(frozen=True)
class PooledLeaf:
    """One parameter's place in a pool, in its (M, *matrix dims) local layout."""

    index: int  # among the flattened updates
    layout: OwnerLayout  # spec, dims order, dimension numbers, M, FLOPs per matrix
    piece: tuple[int, ...]  # this device's block of one matrix
    matrix: tuple[int, ...]  # one whole matrix
    splits: tuple[tuple[str, ...], ...]  # per matrix dim: the mesh axes splitting it, outer first

    @property
    def piece_size(self) -> int:
        return math.prod(self.piece)

    @property
    def piece_rows(self) -> int:
        """Rows of LANE elements one piece takes in the exchange buffers (padded)."""
        return -(-self.piece_size // LANE)


@dataclasses.dataclass(frozen=True)
class Pool:
    """Leaves replicated over the same axes, exchanged together; owners[l][j]: the mesh-linear
    index of the device that orthogonalises matrix j of leaf l."""

    replicas: tuple[str, ...]  # R, in mesh order
    senders: tuple[str, ...]  # S: the other mesh axes, in mesh order
    leaves: tuple[PooledLeaf, ...]
    owners: tuple[tuple[int, ...], ...]


def poolable(layout: OwnerLayout, info, mesh) -> bool:
    """Whether `owner.py` would pad this leaf's stack (M not a multiple of its group) while its
    stacked dims are whole on every device (each device holds a piece of every matrix)."""
    whole = all(math.prod(mesh.shape[a] for a in spec_axes(layout.spec[d])) == 1 for d in info.batch_axes)
    return whole and layout.matrices % layout.group != 0


def pooled_leaf(index: int, layout: OwnerLayout, shape: tuple[int, ...], mesh) -> PooledLeaf:
    n_batch = len(layout.order) - len(layout.dimension_numbers.reduction_axis) - len(
        layout.dimension_numbers.output_axis)
    dims = layout.order[n_batch:]
    splits = tuple(tuple(a for a in spec_axes(layout.spec[d]) if mesh.shape[a] > 1) for d in dims)
    matrix = tuple(shape[d] for d in dims)
    piece = tuple(n // math.prod(mesh.shape[a] for a in axes) for n, axes in zip(matrix, splits))
    return PooledLeaf(index, layout, piece, matrix, splits)


def replica_axes(leaf: PooledLeaf, mesh) -> tuple[str, ...]:
    used = {a for axes in leaf.splits for a in axes}
    return tuple(a for a in mesh.axis_names if mesh.shape[a] > 1 and a not in used)


def _coords(mesh, axes) -> np.ndarray:
    """(devices,) each device's mesh-linear position over `axes` (row-major, mesh order)."""
    at = np.indices(tuple(mesh.shape.values())).reshape(len(mesh.axis_names), -1)
    position = np.zeros(at.shape[1], np.int64)
    for axis in axes:
        position = position * mesh.shape[axis] + at[mesh.axis_names.index(axis)]
    return position


def assign_pools(leaves: list[PooledLeaf], mesh, steps: int, load: np.ndarray, itemsize: int = 4) -> list[Pool]:
    """Pools of `leaves` with an owner for every matrix; adds their Newton-Schulz FLOPs to `load`
    (devices,) in place. Greedy, most expensive matrices first: the least-loaded device, then the
    one whose replica bucket gathers the fewest bytes, then the fewest bytes owned."""
    groups: dict[tuple[str, ...], list[PooledLeaf]] = {}
    for leaf in leaves:
        groups.setdefault(replica_axes(leaf, mesh), []).append(leaf)
    pools = []
    for replicas, members in groups.items():
        bucket = _coords(mesh, replicas)  # (devices,) replica bucket of each device
        bucket_bytes = np.zeros(int(bucket.max()) + 1)
        owned_bytes = np.zeros(mesh.size)
        owners = [np.zeros(leaf.layout.matrices, np.int64) for leaf in members]
        work = sorted(((l, j) for l, leaf in enumerate(members) for j in range(leaf.layout.matrices)),
                      key=lambda lj: -members[lj[0]].layout.matrix_flops)
        for l, j in work:
            leaf = members[l]
            device = int(np.lexsort((np.arange(mesh.size), owned_bytes, bucket_bytes[bucket], load))[0])
            owners[l][j] = device
            load[device] += steps * leaf.layout.matrix_flops
            bucket_bytes[bucket[device]] += leaf.piece_rows * LANE * itemsize
            owned_bytes[device] += math.prod(leaf.matrix) * itemsize
        senders = tuple(a for a in mesh.axis_names if a not in replicas)
        pools.append(Pool(replicas, senders, tuple(members), tuple(tuple(int(o) for o in x) for x in owners)))
    return pools


@dataclasses.dataclass(frozen=True)
class PoolTables:
    """Static bookkeeping of one pool. Matrices are laid out in `order`: by replica bucket r, then
    owner's sender position s, then leaf, then index; `start[l][j]`: where matrix j's piece sits."""

    order: tuple[tuple[int, int], ...]
    start: tuple[tuple[int, ...], ...]  # rows
    bucket_start: np.ndarray  # (R,)
    bucket_size: np.ndarray  # (R,)
    chunk_start: np.ndarray  # (R, S) rows, within the bucket
    chunk_size: np.ndarray  # (R, S) rows: all pieces of one sender for this owner
    count: np.ndarray  # (leaves, R, S) matrices of each leaf each owner holds
    offset: np.ndarray  # (leaves, R, S) where each leaf's pieces start in an owner's chunk
    slots: tuple[int, ...]  # per leaf: the most matrices any owner holds
    capacity: int  # C: an owner's receive rows per sender


def pool_tables(pool: Pool, mesh) -> PoolTables:
    """The pool's static bookkeeping on this mesh (every device's offsets and sizes)."""
    n_r = math.prod(mesh.shape[a] for a in pool.replicas)
    n_s = math.prod(mesh.shape[a] for a in pool.senders)
    r_of, s_of = _coords(mesh, pool.replicas), _coords(mesh, pool.senders)
    order = sorted(((l, j) for l, leaf in enumerate(pool.leaves) for j in range(leaf.layout.matrices)),
                   key=lambda lj: (r_of[pool.owners[lj[0]][lj[1]]], s_of[pool.owners[lj[0]][lj[1]]], lj))
    sizes = [leaf.piece_rows for leaf in pool.leaves]
    start = [[0] * leaf.layout.matrices for leaf in pool.leaves]
    count = np.zeros((len(pool.leaves), n_r, n_s), np.int64)
    position = 0
    for l, j in order:
        start[l][j] = position
        position += sizes[l]
        owner = pool.owners[l][j]
        count[l, r_of[owner], s_of[owner]] += 1
    per_leaf = count * np.asarray(sizes)[:, None, None]  # (leaves, R, S) rows
    chunk_size = per_leaf.sum(0)
    offset = np.where(count > 0, np.cumsum(per_leaf, axis=0) - per_leaf, 0)  # absent leaves: 0, slots masked
    bucket_size = chunk_size.sum(1)
    chunk_start = np.cumsum(chunk_size, axis=1) - chunk_size
    slots = tuple(int(c) for c in count.max(axis=(1, 2)))
    capacity = int(max(np.max(offset[l] + slots[l] * sizes[l]) for l in range(len(sizes))))
    return PoolTables(tuple(order), tuple(tuple(s) for s in start), np.cumsum(bucket_size) - bucket_size,
                      bucket_size, chunk_start, chunk_size, count, offset, slots, capacity)


def _piece_order(leaf: PooledLeaf, senders) -> tuple[list[int], list[int]]:
    """Axis labels of (*sender axes, k, *piece): 0..n-1 the sender axes, n the slot, n+1+d piece dim d.
    Returns the sender axes that split no matrix dim (size 1), and the order that puts each matrix
    dim's splitting axes (outer first) before its piece: (k, [axes, piece] per dim)."""
    n = len(senders)
    used = {a for axes in leaf.splits for a in axes}
    order = [n]
    for dim, axes in enumerate(leaf.splits):
        order += [senders.index(a) for a in axes] + [n + 1 + dim]
    return [i for i in range(n) if senders[i] not in used], order


def _assemble(block, leaf: PooledLeaf, senders, mesh):
    """(S, k, *piece) pieces in sender order -> (k, *matrix) whole matrices."""
    unused, order = _piece_order(leaf, senders)
    x = block.reshape([mesh.shape[a] for a in senders] + list(block.shape[1:]))
    x = jnp.transpose(x, unused + order)  # unused sender axes have size 1
    return x.reshape((block.shape[1],) + leaf.matrix)


def _disassemble(matrices, leaf: PooledLeaf, senders, mesh):
    """(k, *matrix) -> (S, k, *piece), the inverse of `_assemble`."""
    unused, order = _piece_order(leaf, senders)
    shape = [matrices.shape[0]]
    for dim, axes in enumerate(leaf.splits):
        shape += [mesh.shape[a] for a in axes] + [leaf.piece[dim]]
    x = matrices.reshape((1,) * len(unused) + tuple(shape))  # axes labelled unused + order
    x = jnp.transpose(x, np.argsort(unused + order))  # (*sender axes, k, *piece)
    return x.reshape((math.prod(mesh.shape[a] for a in senders), matrices.shape[0]) + leaf.piece)


def _to_rows(pieces, leaf: PooledLeaf):
    """(n, piece size) -> (n, piece rows, LANE), zero-padded."""
    pad = leaf.piece_rows * LANE - leaf.piece_size
    return jnp.pad(pieces, ((0, 0), (0, pad))).reshape(pieces.shape[0], leaf.piece_rows, LANE)


def _orthogonalise_owned_slots(received, leaf: PooledLeaf, orthogonalise, at, count, slots: int, senders, mesh):
    """received (S, C, LANE): every sender's pieces of this device's matrices; the `count` of this
    leaf's (of at most `slots`), from row `at`, replaced by their orthogonalised pieces. An empty
    slot runs nothing, not even its slicing (`lax.cond` over the whole buffer)."""
    n_s = received.shape[0]

    def one(i, buffer):
        start = (0, at + i * leaf.piece_rows, 0)
        block = jax.lax.dynamic_slice(buffer, start, (n_s, leaf.piece_rows, LANE))
        block = block.reshape(n_s, 1, -1)[..., :leaf.piece_size].reshape((n_s, 1) + leaf.piece)
        done = _disassemble(orthogonalise(_assemble(block, leaf, senders, mesh)), leaf, senders, mesh)
        return jax.lax.dynamic_update_slice(buffer, _to_rows(done.reshape(n_s, -1), leaf), start)

    return jax.lax.fori_loop(0, slots, lambda i, b: jax.lax.cond(i < count, one, lambda _, x: x, i, b), received)


def orthogonalise_pool(updates: list, pool: Pool, mesh, orthogonalisers: list):
    """updates: the pool's leaves' (global) updates, in pool order; orthogonalisers: per leaf,
    (k, *matrix dims) -> same. Returns the orthogonalised updates in their own shardings."""
    t = pool_tables(pool, mesh)
    n_s = math.prod(mesh.shape[a] for a in pool.senders)
    width = int(t.bucket_size.max())
    tables = {name: jnp.asarray(v, jnp.int32) for name, v in
              (("bucket_start", t.bucket_start), ("chunk_start", t.chunk_start), ("chunk_size", t.chunk_size),
               ("count", t.count), ("offset", t.offset))}
    specs = [leaf.layout.spec for leaf in pool.leaves]

    def local(*blocks):  # this device's blocks of the pool's parameters
        r = jax.lax.axis_index(pool.replicas) if pool.replicas else 0
        s = jax.lax.axis_index(pool.senders)
        rows = [_to_rows(jnp.transpose(b, leaf.layout.order).reshape(leaf.layout.matrices, -1), leaf)
                for b, leaf in zip(blocks, pool.leaves)]  # (M, piece rows, LANE)
        laid = jnp.concatenate([rows[l][j] for l, j in t.order])  # every piece, in bucket/owner order
        if pool.replicas:  # this bucket's pieces only
            laid = jax.lax.dynamic_slice_in_dim(jnp.pad(laid, ((0, width), (0, 0))), tables["bucket_start"][r], width)
        my_chunk = tables["chunk_size"][r, s]
        received = ragged_all_to_all(
            laid, jnp.zeros((n_s * t.capacity, LANE), laid.dtype), tables["chunk_start"][r], tables["chunk_size"][r],
            jnp.full(n_s, s * t.capacity, jnp.int32), jnp.full(n_s, my_chunk, jnp.int32),
            axis_name=pool.senders).reshape(n_s, t.capacity, LANE)  # each sender's pieces of my matrices
        for l, (leaf, orthogonalise) in enumerate(zip(pool.leaves, orthogonalisers)):
            received = _orthogonalise_owned_slots(received, leaf, orthogonalise, tables["offset"][l, r, s],
                                                  tables["count"][l, r, s], t.slots[l], pool.senders, mesh)
        back = ragged_all_to_all(
            received.reshape(n_s * t.capacity, LANE), jnp.zeros(laid.shape, laid.dtype),
            jnp.arange(n_s, dtype=jnp.int32) * t.capacity, jnp.full(n_s, my_chunk, jnp.int32),
            jnp.full(n_s, tables["chunk_start"][r, s], jnp.int32), tables["chunk_size"][r],
            axis_name=pool.senders)  # my pieces, orthogonalised, where I sent them from
        if pool.replicas:  # every bucket's pieces, in the global order
            every = jax.lax.all_gather(back, pool.replicas)  # (R, width, LANE)
            back = jnp.concatenate([every[b, :size] for b, size in enumerate(t.bucket_size)])
        out = []
        for l, (b, leaf) in enumerate(zip(blocks, pool.leaves)):
            x = jnp.stack([back[t.start[l][j]:t.start[l][j] + leaf.piece_rows] for j in range(leaf.layout.matrices)])
            x = x.reshape(leaf.layout.matrices, -1)[:, :leaf.piece_size]
            x = x.reshape(tuple(b.shape[d] for d in leaf.layout.order))
            out.append(jnp.transpose(x, np.argsort(leaf.layout.order)))
        return tuple(out)

    return list(jax.shard_map(local, mesh=mesh, in_specs=tuple(specs), out_specs=tuple(specs),
                              check_vma=False)(*updates))
