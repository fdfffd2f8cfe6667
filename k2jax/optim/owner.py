"""Muon's Newton-Schulz on a mesh: every matrix orthogonalised once, by one owner device.

Left to GSPMD, Newton-Schulz on sharded weights all-reduces X X^T at every iteration and
repeats the small products on every device (the stacked layers/experts axes that optax
flattens into one batch get all-gathered too). Here each parameter's update runs through
`shard_map` with explicit collectives instead:

1. Devices that hold pieces of the same matrices form a group: the mesh axes that split the
   parameter's matrix dimensions (fsdp on d_model, tensor on heads or FFN width), and the
   axes it is replicated over (data, or expert for an attention weight) where splitting the
   work over them lowers the matrices per device. The axes that split its stacked
   layers/experts dimensions separate groups that hold different matrices.
2. Within a group, the local stack of M matrix pieces (M = local layers x experts) is
   padded to a multiple of the group size G; each replica keeps its share of the stack (no
   traffic: it holds every piece already), and the share is exchanged by all-to-all over
   each splitting axis, so each device ends with M/G whole matrices.
3. Each device orthogonalises its own M/G matrices (optax's Newton-Schulz, float32 or
   bfloat16 iterations), then the reverse all-to-alls put every piece back where it came
   from and replicas all-gather the shares. A replica axis that would not lower M/G (a
   60-layer stack on 64 fsdp shards x 8 expert replicas) is not split: its replicas repeat
   the same work rather than pad and gather 512 slots for 60 matrices.

A matrix whose pieces all sit on one device (experts split only over the expert axis) has
a group of one: it is orthogonalised where it is, with no traffic. Bytes moved per device
per step: about twice the parameter's local size (there and back), never per iteration.

A stack that would pad (M not a multiple of G: kimi-k2's 61-layer attention stacks on 512
chips, any one-layer stack) is pooled instead, with the others replicated over the same axes,
into one ragged exchange where no padding travels (`owner_pool.py`). Only a stack whose
stacked dims are themselves split (experts over the expert axis) is still padded here.

Balance: a stack of M matrices padded to k G slots leaves k G - M devices a padding slot,
which they skip (`lax.cond`: no iterations run on it). `assign_owners` rotates each padded
stack so that its real matrices start where the devices carry the least work so far
(greedy, most expensive matrices first); `plan_owners` then gives the pooled matrices to the
least-loaded devices.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P
from optax.contrib import MuonDimensionNumbers
from optax.contrib._muon import orthogonalize_via_newton_schulz  # not exported by optax 0.2.8

from k2jax.optim.owner_pool import assign_pools, orthogonalise_pool, pooled_leaf, poolable
from k2jax.params import ParamInfo, is_info
from k2jax.parallel.sharding import logical_spec, spec_axes


@dataclasses.dataclass(frozen=True)
class OwnerLayout:
    """How one parameter's matrices reach their owners, in the (M, *matrix dims) local layout."""

    spec: P  # the parameter's PartitionSpec
    order: tuple[int, ...]  # parameter dims reordered: stacked (batch) dims first, then matrix dims
    exchanges: tuple[tuple[int, str], ...]  # (dim in the local layout, mesh axis), in all-to-all order
    replicas: tuple[str, ...]  # mesh axes the parameter is replicated over that split the work
    group: int  # devices sharing each local stack of matrices
    dimension_numbers: MuonDimensionNumbers  # of the (M, *matrix dims) layout
    matrices: int  # M: matrices in each group's stack
    matrix_flops: float  # Newton-Schulz FLOPs of one matrix, per iteration

    @property
    def slots(self) -> int:
        """k: matrices each device orthogonalises (padding included)."""
        return -(-self.matrices // self.group)


def newton_schulz(x, dimension_numbers: MuonDimensionNumbers, ns_coeffs, ns_steps: int, dtype):
    """x orthogonalised by optax's Newton-Schulz iterations in `dtype`, one matrix per slice of its
    dimension numbers, cast back to x's dtype. optax 0.2.8 does not export the function; this is
    the one place that imports it."""
    coeffs = jnp.asarray(ns_coeffs, dtype)
    return orthogonalize_via_newton_schulz(x.astype(dtype), coeffs, ns_steps,
                                           dimension_numbers=dimension_numbers).astype(x.dtype)


def matrix_flops(a: int, b: int) -> float:
    """One Newton-Schulz iteration on an (a, b) matrix: with m = min, n = max (optax iterates in
    the wide orientation), X X^T (2 m^2 n), A A (2 m^3) and the product with X (2 m^2 n)."""
    m, n = min(a, b), max(a, b)
    return 4.0 * m * m * n + 2.0 * m ** 3


def owner_layout(info: ParamInfo, shape: tuple[int, ...], mesh) -> OwnerLayout:
    spec = logical_spec(info.axes, shape, mesh, strict=True)
    spec = P(*(tuple(spec) + (None,) * (len(shape) - len(spec))))
    batch = info.batch_axes
    matrix = tuple(i for i in range(len(shape)) if i not in batch)
    exchanges = []
    for position, dim in enumerate(matrix, start=1):
        for axis in reversed(spec_axes(spec[dim])):  # inner mesh axis first: pieces concatenate in order
            exchanges.append((position, axis))
    shards = lambda dim: math.prod(mesh.shape[a] for a in spec_axes(spec[dim]))  # noqa: E731
    stack = math.prod(shape[d] // shards(d) for d in batch)
    used = {axis for entry in spec for axis in spec_axes(entry)}
    group = math.prod(mesh.shape[a] for _, a in exchanges)
    replicas = []
    for axis in (a for a in mesh.axis_names if mesh.shape[a] > 1 and a not in used):
        if -(-stack // (group * mesh.shape[axis])) < -(-stack // group):  # fewer matrices per device
            replicas.append(axis)
            group *= mesh.shape[axis]
    reduction = tuple(p for p, dim in enumerate(matrix, start=1) if dim in info.reduction_axes)
    output = tuple(p for p, dim in enumerate(matrix, start=1) if dim not in info.reduction_axes)
    flops = matrix_flops(math.prod(shape[d] for d in info.reduction_axes),
                         math.prod(shape[d] for d in matrix if d not in info.reduction_axes))
    return OwnerLayout(spec, batch + matrix, tuple(exchanges), tuple(replicas), group,
                       MuonDimensionNumbers(reduction_axis=reduction, output_axis=output), stack, flops)


def _group_positions(layout: OwnerLayout, mesh) -> np.ndarray:
    """(devices,) each device's position in its group (mesh order), as `orthogonalise_owned`
    assigns them: replicas most significant, then the exchanged axes in exchange order."""
    coords = np.indices(tuple(mesh.shape[a] for a in mesh.axis_names)).reshape(len(mesh.axis_names), -1)
    at = dict(zip(mesh.axis_names, coords))
    position = np.zeros(coords.shape[1], np.int64)
    for axis in _position_axes(layout):
        position = position * mesh.shape[axis] + at[axis]
    return position


def _position_axes(layout: OwnerLayout) -> list[str]:
    return list(layout.replicas) + [axis for _, axis in layout.exchanges]


def _real_slots(position, rotation: int, layout: OwnerLayout) -> np.ndarray:
    """How many of each position's k slots hold a matrix when the stack starts at `rotation`."""
    k, padded = layout.slots, layout.slots * layout.group
    slots = position[..., None] * k + np.arange(k)
    return np.sum((slots - rotation) % padded < layout.matrices, axis=-1)


def assign_owners(layouts: list[OwnerLayout], mesh, steps: int) -> tuple[list[int], np.ndarray]:
    """A rotation per layout (where its real matrices start among the padded slots), chosen
    greedily, most expensive matrices first, to even out the work; and the resulting
    Newton-Schulz FLOPs of every device."""
    load = np.zeros(mesh.size)
    rotations = [0] * len(layouts)
    for i in sorted(range(len(layouts)), key=lambda i: -layouts[i].matrix_flops):
        layout = layouts[i]
        position = _group_positions(layout, mesh)
        cost = steps * layout.matrix_flops
        if layout.matrices % layout.group:
            candidates = np.arange(layout.group) * layout.slots
            extra = np.stack([cost * _real_slots(position, r, layout) for r in candidates])  # (G, devices)
            rotations[i] = int(candidates[np.argmin(np.max(load + extra, axis=1))])
        load += cost * _real_slots(position, rotations[i], layout)
    return rotations, load


def orthogonalise_owned(u, layout: OwnerLayout, mesh, orthogonalise, rotation: int = 0):
    """u: one parameter's (global) update; orthogonalise: (K, *matrix dims) -> same, per matrix;
    rotation: where the stack's real matrices start among its padded slots (`assign_owners`)."""
    inverse = tuple(sorted(range(len(layout.order)), key=layout.order.__getitem__))
    n_batch = len(layout.order) - len(layout.dimension_numbers.reduction_axis) - len(
        layout.dimension_numbers.output_axis)

    def local(x):  # x: this device's block of the parameter
        x = jnp.transpose(x, layout.order)
        lead = x.shape[:n_batch]
        x = x.reshape((math.prod(lead),) + x.shape[n_batch:])  # (M, *matrix dims)
        m, k = x.shape[0], layout.slots
        x = jnp.roll(jnp.pad(x, [(0, k * layout.group - m)] + [(0, 0)] * (x.ndim - 1)), rotation, axis=0)
        if layout.replicas:  # each replica keeps its share
            share = x.shape[0] // math.prod(mesh.shape[a] for a in layout.replicas)
            x = jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(layout.replicas) * share, share)
        for dim, axis in layout.exchanges:  # (M, pieces) -> (M / n, whole along dim)
            x = jax.lax.all_to_all(x, axis, 0, dim, tiled=True)
        if m % layout.group:  # (k, *matrix dims): own matrices, some slots padding: skip those
            slot = _device_position(layout, mesh) * k + jnp.arange(k)
            real = (slot - rotation) % (k * layout.group) < m
            x = jax.lax.map(lambda args: jax.lax.cond(args[1], lambda y: orthogonalise(y[None])[0], lambda y: y,
                                                      args[0]), (x, real))
        else:
            x = orthogonalise(x)  # (k, *matrix dims): this device's own matrices
        for dim, axis in reversed(layout.exchanges):
            x = jax.lax.all_to_all(x, axis, dim, 0, tiled=True)
        if layout.replicas:
            x = jax.lax.all_gather(x, layout.replicas, axis=0, tiled=True)
        x = jnp.roll(x, -rotation, axis=0)[:m].reshape(lead + x.shape[1:])
        return jnp.transpose(x, inverse)

    return jax.shard_map(local, mesh=mesh, in_specs=layout.spec, out_specs=layout.spec, check_vma=False)(u)


def _device_position(layout: OwnerLayout, mesh):
    """This device's position in its group (traced; `_group_positions` for every device)."""
    position = jnp.zeros((), jnp.int32)
    for axis in _position_axes(layout):
        position = position * mesh.shape[axis] + jax.lax.axis_index(axis)
    return position


def plan_owners(infos, leaves, mesh, steps: int):
    """Who orthogonalises what: (per-leaf [(index among leaves, layout, rotation)], pools of the
    leaves whose stacks would pad (`owner_pool.py`), and every device's Newton-Schulz FLOPs)."""
    flat_infos = jax.tree.leaves(infos, is_leaf=is_info)
    own, pooled = [], []
    for i, layout in _layouts(infos, leaves, mesh):
        if poolable(layout, flat_infos[i], mesh):
            pooled.append(pooled_leaf(i, layout, leaves[i].shape, mesh))
        else:
            own.append((i, layout))
    rotations, load = assign_owners([layout for _, layout in own], mesh, steps)
    itemsize = max((np.dtype(leaves[leaf.index].dtype).itemsize for leaf in pooled), default=4)
    pools = assign_pools(pooled, mesh, steps, load, itemsize)
    return [(i, layout, rotation) for (i, layout), rotation in zip(own, rotations)], pools, load


def owner_newton_schulz_flops(infos, shapes, mesh, steps: int) -> float:
    """Newton-Schulz FLOPs of the busiest device in one owner-sharded Muon update (padding
    slots skipped); shapes: a tree like infos of arrays or ShapeDtypeStructs."""
    return float(np.max(plan_owners(infos, jax.tree.leaves(shapes), mesh, steps)[2]))


def _layouts(infos, leaves, mesh) -> list[tuple[int, OwnerLayout]]:
    """(index among `leaves`, layout) of every Muon matrix; leaves: the flattened updates."""
    flat_infos = jax.tree.leaves(infos, is_leaf=is_info)
    return [(i, owner_layout(info, u.shape, mesh)) for i, (u, info) in enumerate(zip(leaves, flat_infos))
            if not is_masked(u) and info.kind == "matrix"]


def is_masked(x) -> bool:
    """`is_leaf` for updates in which optax.masked left MaskedNodes (the other branch's leaves)."""
    return isinstance(x, optax.MaskedNode)


def owner_newton_schulz_tree(infos, mesh, ns_coeffs, ns_steps: int, dtype):
    """updates -> updates: each Muon update (momentum-averaged, normalised; MaskedNode elsewhere)
    orthogonalised on its owner device with Newton-Schulz iterations in `dtype`, cast back, in the
    update's own sharding."""
    def orthogonaliser(layout):
        return lambda x: newton_schulz(x, layout.dimension_numbers, ns_coeffs, ns_steps, dtype)

    def tree(updates):
        leaves, structure = jax.tree.flatten(updates, is_leaf=is_masked)
        own, pools, _ = plan_owners(infos, leaves, mesh, ns_steps)
        for i, layout, rotation in own:
            leaves[i] = orthogonalise_owned(leaves[i], layout, mesh, orthogonaliser(layout), rotation)
        for pool in pools:
            done = orthogonalise_pool([leaves[leaf.index] for leaf in pool.leaves], pool, mesh,
                                      [orthogonaliser(leaf.layout) for leaf in pool.leaves])
            for leaf, x in zip(pool.leaves, done):
                leaves[leaf.index] = x
        return jax.tree.unflatten(structure, leaves)

    return tree
